#define _GNU_SOURCE
#include "guest_apf.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

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

static struct sched *_Atomic scheds[MAX_VCPUS];
static __thread struct sched *cur;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline _Atomic uint32_t *idx(apf_channel *ch, size_t off) { return (_Atomic uint32_t *)(ch->mem + off); }
static void lock(atomic_flag *f) { while (atomic_flag_test_and_set_explicit(f, memory_order_acquire)) {} }
static void unlock(atomic_flag *f) { atomic_flag_clear_explicit(f, memory_order_release); }

size_t apf_channel_bytes(uint32_t req_entries, uint32_t comp_entries) {
    return APF_HEADER + (size_t)req_entries * REQ_BYTES + (size_t)comp_entries * COMP_BYTES;
}

apf_channel *apf_channel_create(void *mem, size_t size, uint32_t req_entries, uint32_t comp_entries, int req_efd,
                                int comp_efd) {
    if (!req_entries || !comp_entries || (req_entries & (req_entries - 1)) || (comp_entries & (comp_entries - 1)) ||
        size < apf_channel_bytes(req_entries, comp_entries))
        return NULL;
    apf_channel *ch = calloc(1, sizeof *ch);
    if (!ch) return NULL;
    ch->mem = mem;
    ch->req_entries = req_entries;
    ch->comp_entries = comp_entries;
    ch->req_off = APF_HEADER;
    ch->comp_off = APF_HEADER + req_entries * REQ_BYTES;
    ch->req_efd = req_efd;
    ch->comp_efd = comp_efd;
    atomic_flag_clear(&ch->req_lock);
    atomic_flag_clear(&ch->comp_lock);
    uint8_t *h = mem;
    uint32_t magic = APF_MAGIC;
    uint16_t version = 1, hsize = APF_HEADER;
    memcpy(h, &magic, 4);
    memcpy(h + 4, &version, 2);
    memcpy(h + 6, &hsize, 2);
    memcpy(h + 8, &req_entries, 4);
    memcpy(h + 12, &comp_entries, 4);
    memcpy(h + 16, &ch->req_off, 4);
    memcpy(h + 20, &ch->comp_off, 4);
    return ch;
}

void apf_channel_destroy(apf_channel *ch) { free(ch); }

/* Posts one request; 0 when the ring is full. */
static int post_request(apf_channel *ch, uint64_t token, uint64_t addr, uint32_t vcpu) {
    lock(&ch->req_lock);
    uint32_t prod = atomic_load_explicit(idx(ch, REQ_PROD), memory_order_relaxed);
    uint32_t cons = atomic_load_explicit(idx(ch, REQ_CONS), memory_order_acquire);
    int ok = prod - cons < ch->req_entries;
    if (ok) {
        uint8_t *e = ch->mem + ch->req_off + (size_t)(prod & (ch->req_entries - 1)) * REQ_BYTES;
        uint32_t flags = 0;
        memcpy(e, &token, 8);
        memcpy(e + 8, &addr, 8);
        memcpy(e + 16, &vcpu, 4);
        memcpy(e + 20, &flags, 4);
        atomic_store_explicit(idx(ch, REQ_PROD), prod + 1, memory_order_release);
    }
    unlock(&ch->req_lock);
    return ok;
}

static void notify(struct sched *s) {
    if (!s->unnotified) return;
    uint64_t one = 1;
    (void)!write(s->ch->req_efd, &one, 8);
    s->unnotified = 0;
    __atomic_fetch_add(&s->stats->notifications, 1, __ATOMIC_RELAXED);
}

/* Takes every completion posted; marks each token's task ready (waking its
   vCPU when that is another one). Returns how many. */
static int drain_completions(apf_channel *ch, struct sched *self) {
    int n = 0;
    struct sched *woken[MAX_VCPUS];   /* other vCPUs with a task made ready: one wake each, after the batch */
    int nwoken = 0;
    lock(&ch->comp_lock);
    uint32_t cons = atomic_load_explicit(idx(ch, COMP_CONS), memory_order_relaxed);
    uint32_t prod = atomic_load_explicit(idx(ch, COMP_PROD), memory_order_acquire);
    while (cons != prod) {
        uint8_t *e = ch->mem + ch->comp_off + (size_t)(cons & (ch->comp_entries - 1)) * COMP_BYTES;
        uint64_t token;
        uint32_t status;
        memcpy(&token, e, 8);
        memcpy(&status, e + 8, 4);
        cons++;
        uint32_t vcpu = (uint32_t)(token >> 48), t = (uint32_t)(token >> 32) & 0xffff;
        struct sched *s = vcpu < MAX_VCPUS ? atomic_load(&scheds[vcpu]) : NULL;
        if (!s || t >= (uint32_t)s->ntasks) continue;   /* not ours (a task long gone): ignore */
        atomic_store_explicit(&s->tasks[t].status, status, memory_order_relaxed);
        /* seq_cst: pairs with the sleeper's store of `sleeping` then load of `ready`. */
        atomic_store_explicit(&s->tasks[t].ready, token, memory_order_seq_cst);
        if (s != self) {
            int seen = 0;
            for (int i = 0; i < nwoken; i++) seen |= woken[i] == s;
            if (!seen) woken[nwoken++] = s;
        }
        n++;
    }
    atomic_store_explicit(idx(ch, COMP_CONS), cons, memory_order_release);
    /* A vCPU that is running will see its ready tasks at its next scheduling
       point; only one asleep in poll() needs the eventfd (a syscall and a
       wake-up saved per completion). Still under the lock: a vCPU leaves
       `scheds` under it, so none of these can be gone yet. */
    for (int i = 0; i < nwoken; i++) {
        if (atomic_load_explicit(&woken[i]->sleeping, memory_order_seq_cst)) {
            uint64_t one = 1;
            (void)!write(woken[i]->wake_efd, &one, 8);
        }
    }
    unlock(&ch->comp_lock);
    return n;
}

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    struct sched *s = cur;
    if (!s || !s->ch || !s->current || si->si_code != BUS_ADRERR) {
        /* Not a missing guest page under APF: the default action, at once. */
        signal(sig, SIG_DFL);
        return;
    }
    struct task *t = s->current;
    uint64_t addr = (uint64_t)(uintptr_t)si->si_addr & ~(uint64_t)4095;
    uint64_t token = ((uint64_t)s->vcpu << 48) | ((uint64_t)t->index << 32) | (++t->seq & 0xffffffffu);
    uint64_t t0 = now_ns();
    t->waiting = token;
    __atomic_fetch_add(&t->stats->not_present, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&s->stats->not_present, 1, __ATOMIC_RELAXED);
    while (!post_request(s->ch, token, addr, s->vcpu)) {
        /* Ring full: never drop the request; wait in place (the blocking path). */
        __atomic_fetch_add(&s->stats->blocking_fallbacks, 1, __ATOMIC_RELAXED);
        s->unnotified++;
        notify(s);
        drain_completions(s->ch, s);
        usleep(50);
    }
    s->unnotified++;
    t->state = T_PARKED;
    swapcontext(&t->ctx, &s->ctx);   /* to the scheduler; back here once ready */
    __atomic_fetch_add(&t->stats->stall_ns, now_ns() - t0, __ATOMIC_RELAXED);
    if (atomic_load(&t->status) != 0) abort();  /* the daemon says: not guest memory */
    /* Returning re-executes the access, now on a present page. */
}

int apf_install_handler(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, NULL) == 0 ? 0 : -errno;
}

static void trampoline(void) {
    struct sched *s = cur;
    struct task *t = s->current;
    s->fn(s->arg, t->index);
    t->state = T_DONE;
    /* uc_link returns to the scheduler */
}

void apf_yield(void) {
    struct sched *s = cur;
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
    cur = &s;
    atomic_store(&scheds[vcpu], &s);
    int done = 0;
    while (done < ntasks) {
        /* "Page ready" is taken at every scheduling point, not only when every
           task is parked: a vCPU whose other tasks keep running must still see
           its parked ones come back. */
        if (ch && atomic_load_explicit(idx(ch, COMP_PROD), memory_order_acquire) != atomic_load_explicit(idx(ch, COMP_CONS), memory_order_relaxed))
            drain_completions(ch, &s);
        struct task *t = next_runnable(&s);
        if (t) {
            if (s.unnotified >= APF_NOTIFY_BATCH) notify(&s);   /* batch notifications */
            s.current = t;
            swapcontext(&s.ctx, &t->ctx);
            s.current = NULL;
            if (t->state == T_DONE) done++;
            continue;
        }
        /* Every task parked: tell the daemon, take completions, else wait. */
        notify(&s);
        if (ch && drain_completions(ch, &s) > 0) continue;
        /* Announce the sleep, then look once more: a vCPU that made one of our
           tasks ready either sees `sleeping` and writes wake_efd, or stored the
           token before our look (seq_cst on both sides: no lost wake-up). */
        atomic_store_explicit(&s.sleeping, 1, memory_order_seq_cst);
        if (has_ready(&s)) {
            atomic_store_explicit(&s.sleeping, 0, memory_order_relaxed);
            continue;
        }
        uint64_t t0 = now_ns();
        struct pollfd p[2] = {{.fd = ch ? ch->comp_efd : -1, .events = POLLIN}, {.fd = s.wake_efd, .events = POLLIN}};
        poll(p, 2, 1);
        atomic_store_explicit(&s.sleeping, 0, memory_order_relaxed);
        uint64_t v;
        if (p[1].revents) (void)!read(s.wake_efd, &v, 8);
        if (ch && p[0].revents) (void)!read(ch->comp_efd, &v, 8);
        __atomic_fetch_add(&vcpu_stats->idle_ns, now_ns() - t0, __ATOMIC_RELAXED);
    }
out:
    /* Under the completion lock: a vCPU draining completions may be about to
       wake this one (see drain_completions). */
    if (ch) lock(&ch->comp_lock);
    atomic_store(&scheds[vcpu], NULL);
    if (ch) unlock(&ch->comp_lock);
    cur = NULL;
    for (int i = 0; i < ntasks; i++) free(s.tasks[i].stack);
    free(s.tasks);
    close(s.wake_efd);
    return rc;
}

void apf_random_reader(void *arg, int task) {
    apf_random_args *a = arg;
    uint64_t x = a->seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(task + 1));
    uint64_t sum = 0, words = a->page_size / 8;
    apf_task_stats *st = &a->stats[task];
    for (uint64_t n = 1; !__atomic_load_n((const int *)a->stop, __ATOMIC_ACQUIRE); n++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        uint64_t page = x % a->pages, word = (x >> 32) % words;
        sum += *(const volatile uint64_t *)(a->base + page * a->page_size + word * 8);
        for (uint32_t i = 0; i < a->think; i++) sum = sum * 6364136223846793005ull + 1;
        __atomic_fetch_add(&st->ops, 1, __ATOMIC_RELAXED);
        if (n % 64 == 0) apf_yield();
    }
    __atomic_fetch_xor(&a->checksum, sum, __ATOMIC_RELAXED);
}

uint64_t apf_load_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

void apf_touch_all(void *arg, int task) {
    apf_touch_args *a = arg;
    uint64_t per = (a->pages + (uint64_t)a->tasks - 1) / (uint64_t)a->tasks;
    uint64_t from = per * (uint64_t)task, to = from + per < a->pages ? from + per : a->pages;
    uint64_t sum = 0;
    for (uint64_t p = from; p < to; p++) {
        sum += a->base[p * a->page_size];
        if ((p - from) % 64 == 63) apf_yield();
    }
    __atomic_fetch_xor(&a->checksum, sum, __ATOMIC_RELAXED);
}
