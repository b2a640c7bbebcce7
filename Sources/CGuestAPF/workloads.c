// The reference workloads tasks run, and a relaxed load for their counters.
#define _GNU_SOURCE
#include "guest_apf.h"

#include <stdint.h>

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
