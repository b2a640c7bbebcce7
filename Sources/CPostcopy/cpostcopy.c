#define _GNU_SOURCE
#include "cpostcopy.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC 0xAA
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

_Static_assert(sizeof(struct uffd_msg) == 32, "uffd_msg layout");
_Static_assert(sizeof(struct uffdio_copy) == 40, "uffdio_copy layout");

static int neg_errno(int r) { return r < 0 ? -errno : r; }

int cpc_uffd_open(int flags, int *via_dev) {
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
        int saved = errno;
        close(dev);
        if (fd >= 0) { if (via_dev) *via_dev = 1; return fd; }
        errno = saved;
    }
    int fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd >= 0) { if (via_dev) *via_dev = 0; return fd; }
    return -errno;
}

int cpc_uffd_api(int uffd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out) {
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    if (ioctl(uffd, UFFDIO_API, &api) < 0) return -errno;
    if (features_out) *features_out = api.features;
    if (ioctls_out) *ioctls_out = api.ioctls;
    return 0;
}

int cpc_uffd_register(int uffd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out) {
    struct uffdio_register reg = { .range = { .start = start, .len = len }, .mode = mode };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) return -errno;
    if (ioctls_out) *ioctls_out = reg.ioctls;
    return 0;
}

int cpc_uffd_unregister(int uffd, uint64_t start, uint64_t len) {
    struct uffdio_range r = { .start = start, .len = len };
    return neg_errno(ioctl(uffd, UFFDIO_UNREGISTER, &r));
}

int cpc_uffd_copy(int uffd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, int64_t *copied) {
    struct uffdio_copy c = { .dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len, .mode = mode, .copy = 0 };
    int r = ioctl(uffd, UFFDIO_COPY, &c);
    int e = errno;
    if (copied) *copied = c.copy;
    return r < 0 ? -e : 0;
}

int cpc_uffd_zeropage(int uffd, uint64_t start, uint64_t len, uint64_t mode, int64_t *zeroed) {
    struct uffdio_zeropage z = { .range = { .start = start, .len = len }, .mode = mode, .zeropage = 0 };
    int r = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
    int e = errno;
    if (zeroed) *zeroed = z.zeropage;
    return r < 0 ? -e : 0;
}

int cpc_uffd_wake(int uffd, uint64_t start, uint64_t len) {
    struct uffdio_range r = { .start = start, .len = len };
    return neg_errno(ioctl(uffd, UFFDIO_WAKE, &r));
}

int cpc_uffd_read_msgs(int uffd, struct uffd_msg *msgs, int max) {
    for (;;) {
        ssize_t n = read(uffd, msgs, sizeof(struct uffd_msg) * (size_t)max);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -errno;
        return (int)(n / (ssize_t)sizeof(struct uffd_msg));
    }
}

int cpc_epoll_create(void) { return neg_errno(epoll_create1(EPOLL_CLOEXEC)); }

int cpc_epoll_add(int epfd, int fd, uint64_t token, uint32_t events) {
    struct epoll_event ev = { .events = events, .data = { .u64 = token } };
    return neg_errno(epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev));
}

int cpc_epoll_del(int epfd, int fd) {
    struct epoll_event ev = { 0 };
    return neg_errno(epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev));
}

int cpc_epoll_wait(int epfd, uint64_t *tokens, int max, int timeout_ms) {
    struct epoll_event evs[16];
    if (max > 16) max = 16;
    int n = epoll_wait(epfd, evs, max, timeout_ms);
    if (n < 0) return errno == EINTR ? 0 : -errno;
    for (int i = 0; i < n; i++) tokens[i] = evs[i].data.u64;
    return n;
}

int cpc_eventfd(unsigned int initval, int flags) {
    (void)flags;
    return neg_errno(eventfd(initval, EFD_CLOEXEC | EFD_NONBLOCK));
}

int cpc_eventfd_signal(int fd) {
    uint64_t one = 1;
    for (;;) {
        ssize_t n = write(fd, &one, sizeof one);
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : 0;
    }
}

int cpc_eventfd_drain(int fd) {
    uint64_t v;
    for (;;) {
        ssize_t n = read(fd, &v, sizeof v);
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : 0;
    }
}

pid_t cpc_gettid(void) { return (pid_t)syscall(SYS_gettid); }

int cpc_set_sched_idle(void) {
    struct sched_param p = { .sched_priority = 0 };
    return neg_errno(sched_setscheduler(0, SCHED_IDLE, &p));
}

int cpc_set_thread_nice(int nice) {
    return neg_errno(setpriority(PRIO_PROCESS, (id_t)cpc_gettid(), nice));
}

int cpc_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, 15);
    buf[15] = 0;
    return -pthread_setname_np(pthread_self(), buf);
}

void cpc_unblock_signals(void) {
    sigset_t none;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, NULL);
}

int cpc_memfd_create(const char *name, unsigned int flags) { return neg_errno(memfd_create(name, flags)); }

uint64_t cpc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

uint64_t cpc_process_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

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

uint64_t cpc_touch_read(const void *p) { return *(const volatile uint8_t *)p; }

static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

int cpc_tcp_connect(const char *host, const char *port, int timeout_ms, char *err, int errlen) {
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *res = NULL;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) { snprintf(err, (size_t)errlen, "%s", gai_strerror(rc)); return -EHOSTUNREACH; }
    int last = -ECONNREFUSED;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
        if (fd < 0) { last = -errno; continue; }
        set_nodelay(fd);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) { freeaddrinfo(res); return fd; }
        if (errno == EINPROGRESS) {
            struct pollfd p = { .fd = fd, .events = POLLOUT };
            int n;
            do { n = poll(&p, 1, timeout_ms); } while (n < 0 && errno == EINTR);
            if (n == 1) {
                int soerr = 0; socklen_t l = sizeof soerr;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &l);
                if (soerr == 0) { freeaddrinfo(res); return fd; }
                last = -soerr;
            } else {
                last = n == 0 ? -ETIMEDOUT : -errno;
            }
        } else {
            last = -errno;
        }
        close(fd);
    }
    freeaddrinfo(res);
    return last;
}

int cpc_tcp_listen(const char *host, const char *port, int backlog, int *bound_port, char *err, int errlen) {
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE }, *res = NULL;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) { snprintf(err, (size_t)errlen, "%s", gai_strerror(rc)); return -EHOSTUNREACH; }
    int last = -EADDRNOTAVAIL;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) { last = -errno; continue; }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, backlog) == 0) {
            struct sockaddr_storage ss; socklen_t l = sizeof ss;
            getsockname(fd, (struct sockaddr *)&ss, &l);
            if (bound_port) *bound_port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                                        : ((struct sockaddr_in *)&ss)->sin_port);
            freeaddrinfo(res);
            return fd;
        }
        last = -errno;
        close(fd);
    }
    freeaddrinfo(res);
    return last;
}

int cpc_tcp_accept(int lfd, char *peer, int peerlen) {
    struct sockaddr_storage ss; socklen_t l = sizeof ss;
    int fd;
    do { fd = accept4(lfd, (struct sockaddr *)&ss, &l, SOCK_CLOEXEC | SOCK_NONBLOCK); } while (fd < 0 && errno == EINTR);
    if (fd < 0) return -errno;
    set_nodelay(fd);
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (ss.ss_family == AF_INET) {
        inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, host, sizeof host);
        port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    } else if (ss.ss_family == AF_INET6) {
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, host, sizeof host);
        port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    snprintf(peer, (size_t)peerlen, "%s:%d", host, port);
    return fd;
}

ssize_t cpc_recv(int fd, void *p, size_t n) {
    for (;;) {
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && errno == EINTR) continue;
        return r < 0 ? -errno : r;
    }
}

ssize_t cpc_sendv(int fd, const struct iovec *iov, int n) {
    struct msghdr m = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n };
    for (;;) {
        ssize_t r = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR) continue;
        return r < 0 ? -errno : r;
    }
}

int cpc_poll1(int fd, short events, int timeout_ms) {
    struct pollfd p = { .fd = fd, .events = events };
    int n = poll(&p, 1, timeout_ms);
    if (n < 0) return errno == EINTR ? 0 : -errno;
    return n;
}

int cpc_poll3(int a, int b, int c, int timeout_ms) {
    struct pollfd p[3] = { { .fd = a, .events = POLLIN }, { .fd = b, .events = POLLIN }, { .fd = c, .events = POLLIN } };
    int n = poll(p, 3, timeout_ms);
    if (n < 0) return errno == EINTR ? 0 : -errno;
    return (p[0].revents ? 1 : 0) | (p[1].revents ? 2 : 0) | (p[2].revents ? 4 : 0);
}

/* poll() ignores a negative fd: two fds are three with the last one absent. */
int cpc_poll2(int a, int b, int timeout_ms) { return cpc_poll3(a, b, -1, timeout_ms); }

int cpc_shutdown(int fd) { return neg_errno(shutdown(fd, SHUT_RDWR)); }

long cpc_find_byte(const uint8_t *p, long from, long n, uint8_t value) {
    if (from >= n) return -1;
    const uint8_t *hit = memchr(p + from, value, (size_t)(n - from));
    return hit ? (long)(hit - p) : -1;
}

int cpc_unix_listen(const char *path, int backlog) {
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof a.sun_path) return -ENAMETOOLONG;
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    unlink(path);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || chmod(path, 0600) < 0 || listen(fd, backlog) < 0) {
        int e = errno; close(fd); return -e;
    }
    return fd;
}

int cpc_unix_connect(const char *path) {
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof a.sun_path) return -ENAMETOOLONG;
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { int e = errno; close(fd); return -e; }
    return fd;
}

int cpc_unix_accept(int lfd) {
    int fd;
    do { fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC); } while (fd < 0 && errno == EINTR);
    return fd < 0 ? -errno : fd;
}

ssize_t cpc_recv_with_fds(int fd, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *ctrunc) {
    char control[CMSG_SPACE(sizeof(int) * 16)];
    struct iovec iov = { buf, len };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
    ssize_t n;
    do { n = recvmsg(fd, &m, MSG_CMSG_CLOEXEC); } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    *nfds = 0;
    *ctrunc = (m.msg_flags & MSG_CTRUNC) ? 1 : 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *p = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            if (*nfds < maxfds) fds[*nfds] = p[i]; else close(p[i]);
            (*nfds)++;
        }
    }
    return n;
}

ssize_t cpc_send_with_fds(int fd, const void *buf, size_t len, const int *fds, int nfds) {
    char control[CMSG_SPACE(sizeof(int) * 16)];
    struct iovec iov = { (void *)buf, len };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds > 16) return -EINVAL;
    if (nfds > 0) {
        memset(control, 0, sizeof control);
        m.msg_control = control;
        m.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t n;
    do { n = sendmsg(fd, &m, MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

int cpc_peer_pid(int fd) {
    struct ucred cr; socklen_t l = sizeof cr;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &l) < 0) return -errno;
    return cr.pid;
}

int cpc_madvise_dontneed(void *addr, size_t len) { return neg_errno(madvise(addr, len, MADV_DONTNEED)); }
