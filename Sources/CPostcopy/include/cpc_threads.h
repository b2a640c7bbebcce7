// The calling thread's scheduling, name and signal mask (threads.c). Part of cpostcopy.h.
#ifndef CPC_THREADS_H
#define CPC_THREADS_H

/// Moves the calling thread to SCHED_IDLE (background work that must never
/// delay the fault path). Returns 0 or -errno.
int cpc_set_sched_idle(void);
/// Sets the calling thread's nice value (per-thread on Linux). Returns 0 or -errno.
int cpc_set_thread_nice(int nice);
/// pthread_setname_np for the calling thread (truncated to 15 bytes). 0 or -errno.
int cpc_set_thread_name(const char *name);
/// Unblocks every signal in the calling thread (a process spawned by a parent
/// whose thread blocked SIGTERM would otherwise ignore being told to stop).
void cpc_unblock_signals(void);

#endif
