// Hot byte loops: zero-page scan, xxh64, pattern fill, byte search, touch.
#include "cpostcopy.h"
#include <string.h>

// Not instrumented for ThreadSanitizer: during precopy the source looks at
// pages its guest may be writing at that moment, by design (each page was
// write-protected before, and a write racing the look is in the next dirty
// scan; the kernel's sendmsg reads the same bytes unseen by the sanitizer).
__attribute__((no_sanitize("thread")))
int cpc_is_zero(const void *p, size_t len) {
    const uint64_t *w = (const uint64_t *)p;
    size_t n = len / 8;
    for (size_t i = 0; i < n; i += 8) {
        uint64_t acc = w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
        if (acc) return 0;
    }
    return 1;
}

// xxh64, after the reference algorithm (public domain description by Yann Collet).
#define P1 11400714785074694791ULL
#define P2 14029467366897019727ULL
#define P3 1609587929392839161ULL
#define P4 9650029242287828579ULL
#define P5 2870177450012600261ULL
static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t round1(uint64_t acc, uint64_t in) { acc += in * P2; acc = rotl(acc, 31); return acc * P1; }
static inline uint64_t merge(uint64_t acc, uint64_t v) { v = round1(0, v); acc ^= v; return acc * P1 + P4; }

uint64_t cpc_xxh64(const void *input, size_t len, uint64_t seed) {
    const uint8_t *p = (const uint8_t *)input, *end = p + len;
    uint64_t h;
    if (len >= 32) {
        const uint8_t *limit = end - 32;
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        do {
            v1 = round1(v1, rd64(p)); v2 = round1(v2, rd64(p + 8));
            v3 = round1(v3, rd64(p + 16)); v4 = round1(v4, rd64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
        h = merge(h, v1); h = merge(h, v2); h = merge(h, v3); h = merge(h, v4);
    } else {
        h = seed + P5;
    }
    h += (uint64_t)len;
    while (p + 8 <= end) { h ^= round1(0, rd64(p)); h = rotl(h, 27) * P1 + P4; p += 8; }
    if (p + 4 <= end) { h ^= (uint64_t)rd32(p) * P1; h = rotl(h, 23) * P2 + P3; p += 4; }
    while (p < end) { h ^= (*p) * P5; h = rotl(h, 11) * P1; p++; }
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
}

void cpc_fill_random(void *p, size_t len, uint64_t seed) {
    uint64_t *w = (uint64_t *)p;
    uint64_t x = seed;
    for (size_t i = 0; i < len / 8; i++) {
        uint64_t z = (x += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        w[i] = z ^ (z >> 31);
    }
}

// Atomic (relaxed): guest threads may write the byte meanwhile (the page
// workloads write single bytes), and a plain read would race.
uint64_t cpc_touch_read(const void *p) { return __atomic_load_n((const uint8_t *)p, __ATOMIC_RELAXED); }

// Not instrumented: while precopy runs, the source sends pages (sendmsg, or
// the cipher reading them) that the guest's vCPUs write at that moment, by
// design (a write racing the send is in the next dirty scan). Under
// ThreadSanitizer, the send interceptor and the cipher read those bytes in user
// space: CI saw one such report in the hybrid migration test. A real guest's
// writes are not the VMM's code either. A byte store is single-copy atomic
// here; `volatile` keeps it one store (an atomic would be instrumented even in
// a function without the sanitizer).
__attribute__((no_sanitize("thread")))
void cpc_guest_write_u8(uint8_t *p, uint8_t v) { *(volatile uint8_t *)p = v; }

long cpc_find_byte(const uint8_t *p, long from, long n, uint8_t value) {
    if (from >= n) return -1;
    const uint8_t *hit = memchr(p + from, value, (size_t)(n - from));
    return hit ? (long)(hit - p) : -1;
}
