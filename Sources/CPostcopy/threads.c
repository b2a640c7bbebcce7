// The calling thread's scheduling policy, nice value, name and signal mask.
#define _GNU_SOURCE
#include "cpostcopy.h"
#include "shim_errno.h"
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

int cpc_set_sched_idle(void) {
    struct sched_param p = { .sched_priority = 0 };
    return cpc_neg_errno(sched_setscheduler(0, SCHED_IDLE, &p));
}

int cpc_set_thread_nice(int nice) {
    // PRIO_PROCESS with a thread id sets that thread's nice value alone (Linux).
    return cpc_neg_errno(setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice));
}

int cpc_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, 15);
    buf[15] = 0;
    return -pthread_setname_np(pthread_self(), buf);
}

void cpc_unblock_signals(void) {
    sigset_t none;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, NULL);
}
