// CPostcopy: the C shim between the Swift modules and Linux. It holds what Swift
// cannot reach or should not run itself:
//   cpc_uffd.h         userfaultfd: open (device or syscall), the UFFDIO_* ioctls
//                      (function-like request macros), message reads, constants
//   cpc_events.h       epoll over tokens, eventfd, poll() on one or two fds
//   cpc_threads.h      per-thread scheduling policy, nice value, name, signal mask
//   cpc_clock.h        monotonic and process CPU clocks
//   cpc_memory.h       memfd_create, madvise(MADV_DONTNEED)
//   cpc_tcp.h          TCP connect/listen/accept, recv, sendmsg of iovecs, shutdown
//   cpc_unix_socket.h  Unix sockets with SCM_RIGHTS and SO_PEERCRED (VMM handoff)
//   cpc_bytes.h        hot byte loops (zero-page scan, xxh64, fill, find) and
//                      atomic byte access for flags shared between threads
//   cpc_baselines.h    the raw TCP and userfaultfd baselines the benchmarks compare to
//   cpc_dirty.h        dirty tracking: async userfaultfd write-protect, PAGEMAP_SCAN
//
// Convention: every wrapper returns the raw non-negative result or -errno, so the
// Swift side maps errors in exactly one place. Swift imports this umbrella only
// (`import CPostcopy`); the headers above are its parts.
#ifndef CPOSTCOPY_H
#define CPOSTCOPY_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/eventfd.h>
#include <linux/memfd.h>
#include <linux/userfaultfd.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "cpc_uffd.h"
#include "cpc_events.h"
#include "cpc_threads.h"
#include "cpc_clock.h"
#include "cpc_memory.h"
#include "cpc_tcp.h"
#include "cpc_unix_socket.h"
#include "cpc_bytes.h"
#include "cpc_baselines.h"
#include "cpc_dirty.h"

#ifdef __cplusplus
}
#endif
#endif
