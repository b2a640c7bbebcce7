// Baselines measured in the same run as the project's own numbers, so results
// are ratios: a raw loopback TCP 4 KiB request/response, and a local userfaultfd
// fault serviced from memory (fault -> poll wakes handler -> UFFDIO_COPY -> resume).
#define _GNU_SOURCE
#include "cpostcopy.h"
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int read_full(int fd, void *p, size_t n) {
    size_t off = 0;
    while (off < n) {
        ssize_t r = recv(fd, (char *)p + off, n - off, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        off += (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *p, size_t n) {
    size_t off = 0;
    while (off < n) {
        ssize_t r = send(fd, (const char *)p + off, n - off, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        off += (size_t)r;
    }
    return 0;
}

/* A TCP socket listening on 127.0.0.1, on a port the kernel picks (its
   address in *a); the fd or -errno. */
static int loopback_listener(struct sockaddr_in *a) {
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0) return -errno;
    *a = (struct sockaddr_in){ .sin_family = AF_INET, .sin_addr = { htonl(INADDR_LOOPBACK) }, .sin_port = 0 };
    socklen_t l = sizeof *a;
    if (bind(lfd, (struct sockaddr *)a, sizeof *a) < 0 || listen(lfd, 1) < 0 ||
        getsockname(lfd, (struct sockaddr *)a, &l) < 0) { int e = errno; close(lfd); return -e; }
    return lfd;
}

struct tcp_srv { int lfd; int samples; };

static void *tcp_server(void *arg) {
    struct tcp_srv *s = arg;
    int fd = accept(s->lfd, NULL, NULL);
    if (fd < 0) return NULL;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char req[16], page[4096];
    memset(page, 0xA5, sizeof page);
    for (int i = 0; i < s->samples; i++) {
        if (read_full(fd, req, sizeof req) < 0) break;
        if (write_full(fd, page, sizeof page) < 0) break;
    }
    close(fd);
    return NULL;
}

int cpc_baseline_tcp_rtt(int samples, uint64_t *out_ns) {
    struct sockaddr_in a;
    int lfd = loopback_listener(&a);
    if (lfd < 0) return lfd;
    struct tcp_srv srv = { lfd, samples };
    pthread_t t;
    pthread_create(&t, NULL, tcp_server, &srv);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { int e = errno; close(fd); close(lfd); pthread_join(t, NULL); return -e; }
    char req[16] = {0}, page[4096];
    int done = 0;
    for (int i = 0; i < samples; i++) {
        uint64_t t0 = cpc_now_ns();
        if (write_full(fd, req, sizeof req) < 0 || read_full(fd, page, sizeof page) < 0) break;
        out_ns[i] = cpc_now_ns() - t0;
        done++;
    }
    close(fd);
    pthread_join(t, NULL);
    close(lfd);
    return done;
}

struct uffd_srv { int uffd; int quit; char *src; size_t page; };

static void *uffd_handler(void *arg) {
    struct uffd_srv *s = arg;
    struct pollfd p[2] = { { s->uffd, POLLIN, 0 }, { s->quit, POLLIN, 0 } };
    for (;;) {
        if (poll(p, 2, -1) < 0 && errno == EINTR) continue;
        if (p[1].revents) return NULL;
        struct uffd_msg m;
        ssize_t n = read(s->uffd, &m, sizeof m);
        if (n != sizeof m || m.event != UFFD_EVENT_PAGEFAULT) continue;
        uint64_t addr = m.arg.pagefault.address & ~(uint64_t)(s->page - 1);
        struct uffdio_copy c = { .dst = addr, .src = (uint64_t)(uintptr_t)s->src, .len = s->page, .mode = 0 };
        if (ioctl(s->uffd, UFFDIO_COPY, &c) < 0 && errno == EEXIST) {
            struct uffdio_range r = { addr, s->page };
            ioctl(s->uffd, UFFDIO_WAKE, &r);
        }
    }
}

int cpc_baseline_uffd_fault(int pages, uint64_t *out_ns) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t len = page * (size_t)pages;
    int via = 0;
    int uffd = cpc_uffd_open(O_CLOEXEC | O_NONBLOCK, &via);
    if (uffd < 0) return uffd;
    uint64_t f, io;
    int r = cpc_uffd_api(uffd, 0, &f, &io);
    if (r < 0) { close(uffd); return r; }
    char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { int e = errno; close(uffd); return -e; }
    r = cpc_uffd_register(uffd, (uint64_t)(uintptr_t)mem, len, UFFDIO_REGISTER_MODE_MISSING, &io);
    if (r < 0) { munmap(mem, len); close(uffd); return r; }
    char *src = aligned_alloc(page, page);
    memset(src, 0x5A, page);
    struct uffd_srv s = { uffd, cpc_eventfd(0, CPC_EFD_CLOEXEC | CPC_EFD_NONBLOCK), src, page };
    pthread_t t;
    pthread_create(&t, NULL, uffd_handler, &s);
    for (int i = 0; i < pages; i++) {
        uint64_t t0 = cpc_now_ns();
        (void)cpc_touch_read(mem + (size_t)i * page);
        out_ns[i] = cpc_now_ns() - t0;
    }
    cpc_eventfd_signal(s.quit);
    pthread_join(t, NULL);
    close(s.quit);
    munmap(mem, len);
    free(src);
    close(uffd);
    return pages;
}

struct stream_tx { int lfd; size_t write_size; size_t total; size_t span; char *buf; int err; };

/// A buffer of `len` bytes, every page allocated and written (as guest RAM is
/// at a source, and a destination's alias after preallocation); NULL on error.
static char *stream_buffer(size_t len, int fill) {
    char *b = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b == MAP_FAILED) return NULL;
    memset(b, fill, len);
    return b;
}

static void *stream_sender(void *arg) {
    struct stream_tx *s = arg;
    int fd = accept(s->lfd, NULL, NULL);
    if (fd < 0) { s->err = errno; return NULL; }
    for (size_t sent = 0; sent < s->total; sent += s->write_size) {
        if (write_full(fd, s->buf + sent % s->span, s->write_size) < 0) { s->err = errno ? errno : EPIPE; break; }
    }
    close(fd);
    return NULL;
}

int cpc_baseline_tcp_stream(size_t write_size, size_t total, size_t span, uint64_t *out_ns, uint64_t *out_recv_cpu_ns) {
    if (write_size == 0 || total < write_size) return -EINVAL;
    total -= total % write_size;
    // `span` 0: one buffer of a write at each end, hot in the cache. Otherwise
    // the writes walk `span` bytes of memory at each end (memory to memory).
    span = span < write_size ? write_size : span - span % write_size;
    struct sockaddr_in a;
    int lfd = loopback_listener(&a);
    if (lfd < 0) return lfd;
    // Both buffers are ready before the clock starts.
    struct stream_tx tx = { lfd, write_size, total, span, stream_buffer(span, 0xA5), 0 };
    // The receiver reads each write's worth into its place, as the page
    // transport reads one reply: the baseline for the destination's stream.
    char *buf = stream_buffer(span, 0);
    if (!buf || !tx.buf) {
        if (buf) munmap(buf, span);
        if (tx.buf) munmap(tx.buf, span);
        close(lfd);
        return -ENOMEM;
    }
    pthread_t t;
    pthread_create(&t, NULL, stream_sender, &tx);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        int e = errno;
        close(fd);
        close(lfd);
        pthread_join(t, NULL);
        munmap(buf, span);
        munmap(tx.buf, span);
        return -e;
    }
    struct timespec c0, c1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
    uint64_t t0 = cpc_now_ns();
    size_t got = 0;
    int rc = 0;
    while (got < total) {
        if (read_full(fd, buf + got % span, write_size) < 0) { rc = -(errno ? errno : EPIPE); break; }
        got += write_size;
    }
    *out_ns = cpc_now_ns() - t0;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
    *out_recv_cpu_ns = (uint64_t)(c1.tv_sec - c0.tv_sec) * 1000000000ull + (uint64_t)(c1.tv_nsec - c0.tv_nsec);
    munmap(buf, span);
    close(fd);
    pthread_join(t, NULL);
    munmap(tx.buf, span);
    close(lfd);
    if (rc == 0 && tx.err) rc = -tx.err;
    return rc;
}
