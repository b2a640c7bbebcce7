// Cooperative ucontext tasks on a vCPU thread: the scheduler, its scheduling
// points (yield, "page ready") and its idle wait.
#define _GNU_SOURCE
#include "guest_apf.h"
#include "apf_internal.h"

#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <ucontext.h>
#include <unistd.h>

struct sched *_Atomic apf_scheds[MAX_VCPUS];
__thread struct sched *apf_cur;

static void trampoline(void) {
    struct sched *s = apf_cur;
    struct task *t = s->current;
    s->fn(s->arg, t->index);
    t->state = T_DONE;
    /* uc_link returns to the scheduler */
}

void apf_yield(void) {
    struct sched *s = apf_cur;
    if (!s || !s->current) return;
    struct task *t = s->current;
    swapcontext(&t->ctx, &s->ctx);
}

/* Whether this parked task has its "page ready". */
static int page_ready(struct task *t) {
    /* seq_cst: the sleeper's look after announcing `sleeping` (see apf_run_tasks). */
    return t->state == T_PARKED && atomic_load_explicit(&t->ready, memory_order_seq_cst) == t->waiting;
}

static int has_ready(struct sched *s) {
    for (int k = 0; k < s->ntasks; k++)
        if (page_ready(&s->tasks[k])) return 1;
    return 0;
}

static struct task *next_runnable(struct sched *s) {
    for (int k = 0; k < s->ntasks; k++) {
        struct task *t = &s->tasks[(s->next + k) % s->ntasks];
        if (page_ready(t)) {
            t->state = T_RUNNABLE;
            __atomic_fetch_add(&s->stats->ready, 1, __ATOMIC_RELAXED);
        }
        if (t->state == T_RUNNABLE) {
            s->next = (t->index + 1) % s->ntasks;
            return t;
        }
    }
    return NULL;
}

int apf_run_tasks(apf_channel *ch, uint32_t vcpu, int ntasks, size_t stack_bytes, apf_task_fn fn, void *arg,
                  apf_task_stats *task_stats, apf_vcpu_stats *vcpu_stats) {
    if (vcpu >= MAX_VCPUS || ntasks < 1 || ntasks > MAX_TASKS) return -EINVAL;
    struct sched s;
    memset(&s, 0, sizeof s);
    s.ch = ch;
    s.vcpu = vcpu;
    s.ntasks = ntasks;
    s.fn = fn;
    s.arg = arg;
    s.stats = vcpu_stats;
    s.wake_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s.wake_efd < 0) return -errno;
    s.tasks = calloc((size_t)ntasks, sizeof *s.tasks);
    if (!s.tasks) { close(s.wake_efd); return -ENOMEM; }
    int rc = 0;
    for (int i = 0; i < ntasks; i++) {
        struct task *t = &s.tasks[i];
        t->index = i;
        t->state = T_RUNNABLE;
        t->stats = &task_stats[i];
        t->stack = malloc(stack_bytes);
        if (!t->stack) { rc = -ENOMEM; goto out; }
        getcontext(&t->ctx);
        t->ctx.uc_stack.ss_sp = t->stack;
        t->ctx.uc_stack.ss_size = stack_bytes;
        t->ctx.uc_link = &s.ctx;
        makecontext(&t->ctx, trampoline, 0);
    }
    apf_cur = &s;
    atomic_store(&apf_scheds[vcpu], &s);
    int done = 0;
    while (done < ntasks) {
        /* "Page ready" is taken at every scheduling point, not only when every
           task is parked: a vCPU whose other tasks keep running must still see
           its parked ones come back. */
        if (ch && atomic_load_explicit(apf_idx(ch, COMP_PROD), memory_order_acquire) != atomic_load_explicit(apf_idx(ch, COMP_CONS), memory_order_relaxed))
            apf_drain_completions(ch, &s);
        struct task *t = next_runnable(&s);
        if (t) {
            if (s.unnotified >= APF_NOTIFY_BATCH) apf_notify(&s);   /* batch notifications */
            s.current = t;
            swapcontext(&s.ctx, &t->ctx);
            s.current = NULL;
            if (t->state == T_DONE) done++;
            continue;
        }
        /* Every task parked: tell the daemon, take completions, else wait. */
        apf_notify(&s);
        if (ch && apf_drain_completions(ch, &s) > 0) continue;
        /* Announce the sleep, then look once more: a vCPU that made one of our
           tasks ready either sees `sleeping` and writes wake_efd, or stored the
           token before our look (seq_cst on both sides: no lost wake-up). */
        atomic_store_explicit(&s.sleeping, 1, memory_order_seq_cst);
        if (has_ready(&s)) {
            atomic_store_explicit(&s.sleeping, 0, memory_order_relaxed);
            continue;
        }
        uint64_t t0 = apf_now_ns();
        struct pollfd p[2] = {{.fd = ch ? ch->comp_efd : -1, .events = POLLIN}, {.fd = s.wake_efd, .events = POLLIN}};
        poll(p, 2, 1);
        atomic_store_explicit(&s.sleeping, 0, memory_order_relaxed);
        uint64_t v;
        if (p[1].revents) (void)!read(s.wake_efd, &v, 8);
        if (ch && p[0].revents) (void)!read(ch->comp_efd, &v, 8);
        __atomic_fetch_add(&vcpu_stats->idle_ns, apf_now_ns() - t0, __ATOMIC_RELAXED);
    }
out:
    /* Under the completion lock: a vCPU draining completions may be about to
       wake this one (see apf_drain_completions, channel.c). */
    if (ch) apf_lock(&ch->comp_lock);
    atomic_store(&apf_scheds[vcpu], NULL);
    if (ch) apf_unlock(&ch->comp_lock);
    apf_cur = NULL;
    for (int i = 0; i < ntasks; i++) free(s.tasks[i].stack);
    free(s.tasks);
    close(s.wake_efd);
    return rc;
}
