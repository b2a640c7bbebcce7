// The SIGBUS handler: a missing guest page under APF posts "page not present"
// and parks the faulting task until "page ready".
#define _GNU_SOURCE
#include "guest_apf.h"
#include "apf_internal.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    struct sched *s = apf_cur;
    if (!s || !s->ch || !s->current || si->si_code != BUS_ADRERR) {
        /* Not a missing guest page under APF: the default action, at once. */
        signal(sig, SIG_DFL);
        return;
    }
    struct task *t = s->current;
    uint64_t addr = (uint64_t)(uintptr_t)si->si_addr & ~(uint64_t)4095;
    uint64_t token = ((uint64_t)s->vcpu << 48) | ((uint64_t)t->index << 32) | (++t->seq & 0xffffffffu);
    uint64_t t0 = apf_now_ns();
    t->waiting = token;
    __atomic_fetch_add(&t->stats->not_present, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&s->stats->not_present, 1, __ATOMIC_RELAXED);
    while (!apf_post_request(s->ch, token, addr, s->vcpu)) {
        /* Ring full: never drop the request; wait in place (the blocking path). */
        __atomic_fetch_add(&s->stats->blocking_fallbacks, 1, __ATOMIC_RELAXED);
        s->unnotified++;
        apf_notify(s);
        apf_drain_completions(s->ch, s);
        usleep(50);
    }
    s->unnotified++;
    t->state = T_PARKED;
    swapcontext(&t->ctx, &s->ctx);   /* to the scheduler; back here once ready */
    __atomic_fetch_add(&t->stats->stall_ns, apf_now_ns() - t0, __ATOMIC_RELAXED);
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
