// Byte loops on the hot path and atomic byte flags (bytes.c). Part of cpostcopy.h.
#ifndef CPC_BYTES_H
#define CPC_BYTES_H

#include <stddef.h>
#include <stdint.h>

/// 1 if the `len` bytes at p are all zero, else 0. It reads 64 bytes (eight
/// 8-byte words) per step, so p must be 8-byte aligned and `len` a multiple of 64
/// (any page or run of pages is): otherwise it reads up to 56 bytes past p + len
/// and judges them too, and ignores the last len % 8 bytes.
int cpc_is_zero(const void *p, size_t len);
/// xxh64 of a buffer.
uint64_t cpc_xxh64(const void *p, size_t len, uint64_t seed);
/// Fills `len` bytes with a deterministic pseudo-random pattern (splitmix64 from
/// seed), 8 bytes at a time: the last len % 8 bytes are left as they are.
void cpc_fill_random(void *p, size_t len, uint64_t seed);
/// Index of the first byte equal to `value` in p[from..<n], or -1.
long cpc_find_byte(const uint8_t *p, long from, long n, uint8_t value);
/// Reads the byte at p (an atomic relaxed load, so a missing page faults and a
/// guest thread writing it meanwhile is no data race); returns it.
uint64_t cpc_touch_read(const void *p);
/// A guest's write of one byte of its RAM (the page workloads' writes): a
/// single store, unseen by ThreadSanitizer, as a VM's writes under KVM are.
void cpc_guest_write_u8(uint8_t *p, uint8_t v);

/// Atomic byte access for flags shared between the fault thread and guest threads.
static inline uint8_t cpc_load_u8(const uint8_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void cpc_store_u8(uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int cpc_store_i32_release(int32_t *p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); return 0; }
/// Compare-and-swap of a byte; 1 if it was `expected` and is now `desired`.
static inline int cpc_cas_u8(uint8_t *p, uint8_t expected, uint8_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

#endif
