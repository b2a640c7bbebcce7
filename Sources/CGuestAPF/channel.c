// The channel: the shared header, the request ring (vCPUs post "page not
// present"), batched notifications to the daemon, and the completion ring
// ("page ready") drained into every vCPU's scheduler.
#define _GNU_SOURCE
#include "guest_apf.h"
#include "apf_internal.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
int apf_post_request(apf_channel *ch, uint64_t token, uint64_t addr, uint32_t vcpu) {
    apf_lock(&ch->req_lock);
    uint32_t prod = atomic_load_explicit(apf_idx(ch, REQ_PROD), memory_order_relaxed);
    uint32_t cons = atomic_load_explicit(apf_idx(ch, REQ_CONS), memory_order_acquire);
    int ok = prod - cons < ch->req_entries;
    if (ok) {
        uint8_t *e = ch->mem + ch->req_off + (size_t)(prod & (ch->req_entries - 1)) * REQ_BYTES;
        uint32_t flags = 0;
        memcpy(e, &token, 8);
        memcpy(e + 8, &addr, 8);
        memcpy(e + 16, &vcpu, 4);
        memcpy(e + 20, &flags, 4);
        atomic_store_explicit(apf_idx(ch, REQ_PROD), prod + 1, memory_order_release);
    }
    apf_unlock(&ch->req_lock);
    return ok;
}

void apf_notify(struct sched *s) {
    if (!s->unnotified) return;
    uint64_t one = 1;
    (void)!write(s->ch->req_efd, &one, 8);
    s->unnotified = 0;
    __atomic_fetch_add(&s->stats->notifications, 1, __ATOMIC_RELAXED);
}

/* Takes every completion posted; marks each token's task ready (waking its
   vCPU when that is another one). Returns how many. */
int apf_drain_completions(apf_channel *ch, struct sched *self) {
    int n = 0;
    struct sched *woken[MAX_VCPUS];   /* other vCPUs with a task made ready: one wake each, after the batch */
    int nwoken = 0;
    apf_lock(&ch->comp_lock);
    uint32_t cons = atomic_load_explicit(apf_idx(ch, COMP_CONS), memory_order_relaxed);
    uint32_t prod = atomic_load_explicit(apf_idx(ch, COMP_PROD), memory_order_acquire);
    while (cons != prod) {
        uint8_t *e = ch->mem + ch->comp_off + (size_t)(cons & (ch->comp_entries - 1)) * COMP_BYTES;
        uint64_t token;
        uint32_t status;
        memcpy(&token, e, 8);
        memcpy(&status, e + 8, 4);
        cons++;
        uint32_t vcpu = (uint32_t)(token >> 48), t = (uint32_t)(token >> 32) & 0xffff;
        struct sched *s = vcpu < MAX_VCPUS ? atomic_load(&apf_scheds[vcpu]) : NULL;
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
    atomic_store_explicit(apf_idx(ch, COMP_CONS), cons, memory_order_release);
    /* A vCPU that is running will see its ready tasks at its next scheduling
       point; only one asleep in poll() needs the eventfd (a syscall and a
       wake-up saved per completion). Still under the lock: a vCPU leaves
       `apf_scheds` under it (apf_run_tasks), so none of these can be gone yet. */
    for (int i = 0; i < nwoken; i++) {
        if (atomic_load_explicit(&woken[i]->sleeping, memory_order_seq_cst)) {
            uint64_t one = 1;
            (void)!write(woken[i]->wake_efd, &one, 8);
        }
    }
    apf_unlock(&ch->comp_lock);
    return n;
}
