// Baselines the benchmarks compare to (baselines.c). Part of cpostcopy.h.
#ifndef CPC_BASELINES_H
#define CPC_BASELINES_H

#include <stddef.h>
#include <stdint.h>

/// Raw loopback TCP: 16-byte request, 4 KiB reply, blocking sockets, TCP_NODELAY.
/// Fills out_ns[0..<samples]; returns samples measured or -errno.
int cpc_baseline_tcp_rtt(int samples, uint64_t *out_ns);
/// Local userfaultfd fault service: a thread touches `pages` fresh pages, a
/// handler sleeping in poll() resolves each with UFFDIO_COPY from memory.
/// Returns pages measured or -errno.
int cpc_baseline_uffd_fault(int pages, uint64_t *out_ns);
/// Raw loopback TCP stream: a thread sends `total` bytes in `write_size`
/// writes, this thread receives each write's worth. `span` 0: from and into
/// one buffer of a write each (hot in the cache); otherwise the writes walk
/// `span` bytes of allocated memory at each end, as guest RAM is sent from
/// the source's and received into the destination's (memory to memory). Sets the
/// wall time and the receiving thread's CPU time; returns 0 or -errno.
int cpc_baseline_tcp_stream(size_t write_size, size_t total, size_t span, uint64_t *out_ns, uint64_t *out_recv_cpu_ns);

#endif
