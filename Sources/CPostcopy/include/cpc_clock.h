// Clocks (clock.c). Part of cpostcopy.h.
#ifndef CPC_CLOCK_H
#define CPC_CLOCK_H

#include <stdint.h>

/// CLOCK_MONOTONIC in nanoseconds.
uint64_t cpc_now_ns(void);
/// CLOCK_PROCESS_CPUTIME_ID (user + system of all threads) in nanoseconds.
uint64_t cpc_process_cpu_ns(void);

#endif
