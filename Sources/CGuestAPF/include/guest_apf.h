// Guest side of paravirtual async page faults: what a guest kernel would
// implement, as a small C library (C is the natural ABI for it). A VMM whose
// guest RAM is registered with UFFD_FEATURE_SIGBUS gets SIGBUS instead of a
// blocked vCPU when it touches a missing page; this library's handler posts
// "page not present (token, address, vCPU)" to the request ring shared with the
// page-fault daemon, parks the faulting task and switches to another runnable
// task of the same vCPU thread (cooperative ucontext tasks). When the daemon
// posts "page ready (token)", the task runs again and re-executes the access.
//
// Shared memory layout: see Sources/PostcopyHandoff/APFRing.swift (version 1).
//
// One .c a section: channel.c (header, request and completion rings, batched
// notifications), fault.c (SIGBUS handler), tasks.c (ucontext tasks and the
// per-vCPU scheduler), workloads.c (reference workloads); what they share is in
// the private apf_internal.h.
#ifndef GUEST_APF_H
#define GUEST_APF_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct apf_channel apf_channel;

/// Writes a version-1 header into `mem` (`size` bytes, zeroed by the caller)
/// and returns the guest's end of the channel; `req_efd` is written to notify the
/// daemon of requests, `comp_efd` is written by the daemon for completions.
/// NULL when the rings do not fit.
apf_channel *apf_channel_create(void *mem, size_t size, uint32_t req_entries, uint32_t comp_entries,
                                int req_efd, int comp_efd);
void apf_channel_destroy(apf_channel *ch);
/// Bytes a channel with these ring sizes needs.
size_t apf_channel_bytes(uint32_t req_entries, uint32_t comp_entries);

/// Installs the process-wide SIGBUS handler (SA_SIGINFO | SA_NODEFER: a second
/// task faulting before the first handler returned must not kill the process).
/// A SIGBUS outside an APF task gets the default action.
int apf_install_handler(void);

typedef struct apf_task_stats {
    uint64_t not_present;   // "page not present" posted by this task
    uint64_t stall_ns;      // time parked waiting for "page ready"
    uint64_t ops;           // work done (the workload counts it)
} apf_task_stats;

typedef struct apf_vcpu_stats {
    uint64_t not_present;
    uint64_t ready;
    uint64_t notifications;        // eventfd writes to the daemon (batched)
    uint64_t blocking_fallbacks;   // ring full: waited in place instead of switching
    uint64_t idle_ns;              // every task parked: the vCPU waited
} apf_vcpu_stats;

typedef void (*apf_task_fn)(void *arg, int task);

/// Runs `ntasks` tasks of `fn(arg, i)` on the calling thread (a vCPU), each on
/// its own stack, until all return. With `ch` NULL the guest is a blocking one:
/// the same tasks, but a missing page blocks the whole thread in the kernel.
int apf_run_tasks(apf_channel *ch, uint32_t vcpu, int ntasks, size_t stack_bytes, apf_task_fn fn, void *arg,
                  apf_task_stats *task_stats, apf_vcpu_stats *vcpu_stats);

/// Lets the other tasks of this vCPU run (a scheduling point; no-op outside tasks).
void apf_yield(void);

/// The reference workload: read a random 8-byte word of a random page of
/// [base, base + pages * page_size), `think` iterations of arithmetic per read,
/// yield every 64 reads, until *stop. Counts ops in the task's stats.
typedef struct apf_random_args {
    const volatile uint8_t *base;
    uint64_t pages;
    uint64_t page_size;
    uint64_t seed;
    uint32_t think;
    volatile int *stop;
    apf_task_stats *stats;   // one per task
    uint64_t checksum;       // keeps the reads from being optimized away
} apf_random_args;
void apf_random_reader(void *arg, int task);

/// Reads one byte of every page of [base, base + pages * page_size), split in
/// `tasks` slices (task i reads slice i): brings every page in.
typedef struct apf_touch_args {
    const volatile uint8_t *base;
    uint64_t pages;
    uint64_t page_size;
    int tasks;
    uint64_t checksum;
} apf_touch_args;
void apf_touch_all(void *arg, int task);

/// A relaxed atomic load (counters another thread updates).
uint64_t apf_load_u64(const uint64_t *p);

#ifdef __cplusplus
}
#endif
#endif
