// C shim for the kernel interfaces Swift cannot reach directly: the userfaultfd
// ioctls (their request numbers are function-like macros), USERFAULTFD_IOC_NEW,
// syscall(), gettid, eventfd, scheduling policy, thread names; plus the two byte
// loops on the hot path (zero-page scan and the xxh64 digest).
//
// Convention: every wrapper returns the raw non-negative result or -errno, so the
// Swift side maps errors in exactly one place.
#ifndef CPOSTCOPY_H
#define CPOSTCOPY_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <linux/userfaultfd.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---- userfaultfd -----------------------------------------------------------

/// Opens a userfaultfd: /dev/userfaultfd + USERFAULTFD_IOC_NEW, falling back to
/// the userfaultfd(2) syscall. `flags` are O_CLOEXEC | O_NONBLOCK style flags.
/// On success returns the fd and sets *via_dev to 1 (device) or 0 (syscall).
int cpc_uffd_open(int flags, int *via_dev);
/// UFFDIO_API. Returns 0 or -errno; fills *features_out and *ioctls_out.
int cpc_uffd_api(int uffd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
/// UFFDIO_REGISTER (MISSING mode when mode == UFFDIO_REGISTER_MODE_MISSING).
int cpc_uffd_register(int uffd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
/// UFFDIO_UNREGISTER.
int cpc_uffd_unregister(int uffd, uint64_t start, uint64_t len);
/// UFFDIO_COPY. Returns 0 or -errno; *copied receives the kernel's .copy field
/// (bytes copied, also on a partial copy that ends in -EAGAIN).
int cpc_uffd_copy(int uffd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, int64_t *copied);
/// UFFDIO_ZEROPAGE. Same conventions as cpc_uffd_copy.
int cpc_uffd_zeropage(int uffd, uint64_t start, uint64_t len, uint64_t mode, int64_t *zeroed);
/// UFFDIO_WAKE.
int cpc_uffd_wake(int uffd, uint64_t start, uint64_t len);

static const uint64_t CPC_UFFD_API = UFFD_API;
static const uint64_t CPC_UFFDIO_REGISTER_MODE_MISSING = UFFDIO_REGISTER_MODE_MISSING;
static const uint64_t CPC_UFFDIO_COPY_MODE_DONTWAKE = UFFDIO_COPY_MODE_DONTWAKE;
static const uint8_t CPC_UFFD_EVENT_PAGEFAULT = UFFD_EVENT_PAGEFAULT;
static const uint8_t CPC_UFFD_EVENT_REMOVE = UFFD_EVENT_REMOVE;
static const uint8_t CPC_UFFD_EVENT_UNMAP = UFFD_EVENT_UNMAP;
static const uint8_t CPC_UFFD_EVENT_REMAP = UFFD_EVENT_REMAP;
static const uint8_t CPC_UFFD_EVENT_FORK = UFFD_EVENT_FORK;
static const uint64_t CPC_UFFD_PAGEFAULT_FLAG_WRITE = UFFD_PAGEFAULT_FLAG_WRITE;
static const uint64_t CPC_UFFD_FEATURE_EVENT_REMOVE = UFFD_FEATURE_EVENT_REMOVE;
static const uint64_t CPC_UFFD_FEATURE_THREAD_ID = UFFD_FEATURE_THREAD_ID;
static const uint64_t CPC_UFFD_FEATURE_SIGBUS = UFFD_FEATURE_SIGBUS;
/// Bits in the `ioctls` masks returned by UFFDIO_API / UFFDIO_REGISTER.
static const uint64_t CPC_IOCTL_BIT_REGISTER = 1ULL << _UFFDIO_REGISTER;
static const uint64_t CPC_IOCTL_BIT_UNREGISTER = 1ULL << _UFFDIO_UNREGISTER;
static const uint64_t CPC_IOCTL_BIT_API = 1ULL << _UFFDIO_API;
static const uint64_t CPC_IOCTL_BIT_COPY = 1ULL << _UFFDIO_COPY;
static const uint64_t CPC_IOCTL_BIT_ZEROPAGE = 1ULL << _UFFDIO_ZEROPAGE;
static const uint64_t CPC_IOCTL_BIT_WAKE = 1ULL << _UFFDIO_WAKE;

/// Reads up to `max` uffd_msg records (non-blocking fd). Returns count or -errno.
int cpc_uffd_read_msgs(int uffd, struct uffd_msg *msgs, int max);

// ---- misc syscalls -----------------------------------------------------------

/// epoll over tokens (the event's data.u64). Return 0 / count or -errno.
int cpc_epoll_create(void);
int cpc_epoll_add(int epfd, int fd, uint64_t token, uint32_t events);
int cpc_epoll_del(int epfd, int fd);
/// Waits; EINTR is returned as 0 events. tokens must hold `max` entries.
int cpc_epoll_wait(int epfd, uint64_t *tokens, int max, int timeout_ms);
static const uint32_t CPC_EPOLLIN = 0x001;
static const uint32_t CPC_EPOLLOUT = 0x004;

/// eventfd with EFD_CLOEXEC | EFD_NONBLOCK.
int cpc_eventfd(unsigned int initval, int flags);
int cpc_eventfd_signal(int fd);
int cpc_eventfd_drain(int fd);
pid_t cpc_gettid(void);
/// Moves the calling thread to SCHED_IDLE (background work that must never
/// delay the fault path). Returns 0 or -errno.
int cpc_set_sched_idle(void);
/// Sets the calling thread's nice value (per-thread on Linux). Returns 0 or -errno.
int cpc_set_thread_nice(int nice);
int cpc_set_thread_name(const char *name);
/// Unblocks every signal in the calling thread (a process spawned by a parent
/// whose thread blocked SIGTERM would otherwise ignore being told to stop).
void cpc_unblock_signals(void);
/// memfd_create wrapper. Returns fd or -errno.
int cpc_memfd_create(const char *name, unsigned int flags);
/// Monotonic clock in nanoseconds.
uint64_t cpc_now_ns(void);
/// Thread CPU time of the calling process (all threads), in nanoseconds.
uint64_t cpc_process_cpu_ns(void);

// ---- sockets ---------------------------------------------------------------------

/// Connects a TCP socket (non-blocking after connect, TCP_NODELAY, CLOEXEC) to
/// host:port. Returns fd or -errno; on name resolution failure returns -EHOSTUNREACH
/// and writes the resolver's message into err (size errlen).
int cpc_tcp_connect(const char *host, const char *port, int timeout_ms, char *err, int errlen);
/// Creates a listening TCP socket (SO_REUSEADDR, CLOEXEC). Returns fd or -errno.
/// *bound_port receives the actual port (useful with port 0).
int cpc_tcp_listen(const char *host, const char *port, int backlog, int *bound_port, char *err, int errlen);
/// accept4 with CLOEXEC|NONBLOCK and TCP_NODELAY. Returns fd or -errno.
/// peer receives a printable address.
int cpc_tcp_accept(int lfd, char *peer, int peerlen);
/// Non-blocking recv, and sendmsg of `n` iovecs (n <= IOV_MAX, MSG_NOSIGNAL),
/// returning bytes or -errno (EINTR retried).
ssize_t cpc_recv(int fd, void *p, size_t n);
ssize_t cpc_sendv(int fd, const struct iovec *iov, int n);
/// poll one fd for events (POLLIN=1, POLLOUT=4); returns >0 ready, 0 timeout, -errno.
int cpc_poll1(int fd, short events, int timeout_ms);
/// poll() for input on two fds: bit 0 set when `a` is readable, bit 1 when `b`; -errno.
int cpc_poll2(int a, int b, int timeout_ms);
/// The same for three fds (bit 2: `c`).
int cpc_poll3(int a, int b, int c, int timeout_ms);
int cpc_shutdown(int fd);

// ---- Unix sockets with SCM_RIGHTS (VMM handoff) ----------------------------------

/// Listening SOCK_STREAM Unix socket at path (an existing socket file is replaced,
/// mode 0600). Returns fd or -errno.
int cpc_unix_listen(const char *path, int backlog);
/// Connects to a Unix socket. Returns fd or -errno.
int cpc_unix_connect(const char *path);
/// accept4 (CLOEXEC). Returns fd or -errno.
int cpc_unix_accept(int lfd);
/// recvmsg of up to len bytes plus any SCM_RIGHTS fds (up to maxfds; more are
/// closed and counted). Returns bytes (0 = EOF) or -errno; *nfds = fds received
/// (including closed extras), *ctrunc = 1 if control data was truncated.
ssize_t cpc_recv_with_fds(int fd, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *ctrunc);
/// sendmsg of buf with nfds fds as SCM_RIGHTS (nfds may be 0). Returns bytes or -errno.
ssize_t cpc_send_with_fds(int fd, const void *buf, size_t len, const int *fds, int nfds);
/// Peer process id from SO_PEERCRED, or -errno.
int cpc_peer_pid(int fd);
/// madvise(MADV_DONTNEED); 0 or -errno.
int cpc_madvise_dontneed(void *addr, size_t len);

// ---- byte loops ----------------------------------------------------------------

/// 1 if `len` bytes at p are all zero (len multiple of 8).
int cpc_is_zero(const void *p, size_t len);
/// xxh64 of a buffer.
uint64_t cpc_xxh64(const void *p, size_t len, uint64_t seed);
/// Fills `len` bytes with a deterministic pseudo-random pattern (splitmix64 from seed).
void cpc_fill_random(void *p, size_t len, uint64_t seed);
/// Atomic byte access for flags shared between the fault thread and guest threads.
static inline uint8_t cpc_load_u8(const uint8_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void cpc_store_u8(uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int cpc_store_i32_release(int32_t *p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); return 0; }
/// Compare-and-swap of a byte; 1 if it was `expected` and is now `desired`.
static inline int cpc_cas_u8(uint8_t *p, uint8_t expected, uint8_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
/// Index of the first byte equal to `value` in p[from..<n], or -1.
long cpc_find_byte(const uint8_t *p, long from, long n, uint8_t value);

/// Reads one byte per page to force faults (volatile); returns a checksum.
uint64_t cpc_touch_read(const void *p);

// ---- baselines (baselines.c) ------------------------------------------------------

/// Raw loopback TCP: 16-byte request, 4 KiB reply, blocking sockets, TCP_NODELAY.
/// Fills out_ns[0..<samples]; returns samples measured or -errno.
int cpc_baseline_tcp_rtt(int samples, uint64_t *out_ns);
/// Local userfaultfd fault service: a thread touches `pages` fresh pages, a
/// handler sleeping in poll() resolves each with UFFDIO_COPY from memory.
/// Returns pages measured or -errno.
int cpc_baseline_uffd_fault(int pages, uint64_t *out_ns);

#ifdef __cplusplus
}
#endif
#endif
