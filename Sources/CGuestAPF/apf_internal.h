// Private to the CGuestAPF target's .c files (not under include/: Swift never
// sees it): the ring layout, the channel, task and per-vCPU scheduler state,
// and what the files share (hidden from the library's exports).
#ifndef APF_INTERNAL_H
#define APF_INTERNAL_H

#include "guest_apf.h"

#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#include <ucontext.h>

#define APF_MAGIC 0x46504150u
#define APF_HEADER 256
#define REQ_BYTES 32
#define COMP_BYTES 16
/* Index words in the header (APFRing.swift, version 1). */
#define REQ_PROD 64
#define REQ_CONS 128
#define COMP_PROD 192
#define COMP_CONS 224
#define MAX_VCPUS 256
#define MAX_TASKS 4096
/* Requests posted before the daemon is told (more are told at once when every task is parked). */
#ifndef APF_NOTIFY_BATCH
#define APF_NOTIFY_BATCH 4
#endif

struct apf_channel {
    uint8_t *mem;
    uint32_t req_entries, comp_entries, req_off, comp_off;
    int req_efd, comp_efd;
    atomic_flag req_lock;   /* vCPU threads share the request producer index */
    atomic_flag comp_lock;  /* ... and the completion consumer index */
};

enum { T_RUNNABLE, T_PARKED, T_DONE };
struct task {
    ucontext_t ctx;
    void *stack;
    int index, state;
    uint64_t seq, waiting;
    _Atomic uint64_t ready;      /* the token the daemon completed (any vCPU may store it) */
    _Atomic uint32_t status;
    apf_task_stats *stats;
};
struct sched {
    apf_channel *ch;
    uint32_t vcpu;
    ucontext_t ctx;
    struct task *tasks, *current;
    int ntasks, next;
    int wake_efd;                /* another vCPU completed one of our tasks */
    _Atomic int sleeping;        /* in poll(): only then does another vCPU write wake_efd */
    uint32_t unnotified;
    apf_task_fn fn;
    void *arg;
    apf_vcpu_stats *stats;
};

#define APF_INTERNAL __attribute__((visibility("hidden")))

/* Defined in tasks.c: every running scheduler by vCPU (a drain hands
   completions to any of them), and the calling thread's own (the SIGBUS
   handler's way in). */
APF_INTERNAL extern struct sched *_Atomic apf_scheds[MAX_VCPUS];
APF_INTERNAL extern __thread struct sched *apf_cur;

static inline uint64_t apf_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline _Atomic uint32_t *apf_idx(apf_channel *ch, size_t off) { return (_Atomic uint32_t *)(ch->mem + off); }
static inline void apf_lock(atomic_flag *f) { while (atomic_flag_test_and_set_explicit(f, memory_order_acquire)) {} }
static inline void apf_unlock(atomic_flag *f) { atomic_flag_clear_explicit(f, memory_order_release); }

/* The rings (channel.c). */
APF_INTERNAL int apf_post_request(apf_channel *ch, uint64_t token, uint64_t addr, uint32_t vcpu);
APF_INTERNAL void apf_notify(struct sched *s);
APF_INTERNAL int apf_drain_completions(apf_channel *ch, struct sched *self);

#endif
