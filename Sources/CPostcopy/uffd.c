// userfaultfd: open, one small function per ioctl, message reads.
#define _GNU_SOURCE
#include "cpostcopy.h"
#include "shim_errno.h"
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC 0xAA
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

_Static_assert(sizeof(struct uffd_msg) == 32, "uffd_msg layout");
_Static_assert(sizeof(struct uffdio_copy) == 40, "uffdio_copy layout");
_Static_assert(sizeof(struct uffdio_continue) == 32, "uffdio_continue layout");

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
    return cpc_neg_errno(ioctl(uffd, UFFDIO_UNREGISTER, &r));
}

// A filling ioctl (COPY, ZEROPAGE, CONTINUE): 0 or -errno; *out receives the
// kernel's byte count field `count` of `arg`, also on a partial result.
static int fill_ioctl(int uffd, unsigned long request, void *arg, const int64_t *count, int64_t *out) {
    int r = ioctl(uffd, request, arg);
    int e = errno;
    if (out) *out = *count;
    return r < 0 ? -e : 0;
}

int cpc_uffd_copy(int uffd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, int64_t *copied) {
    struct uffdio_copy c = { .dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len, .mode = mode, .copy = 0 };
    return fill_ioctl(uffd, UFFDIO_COPY, &c, (const int64_t *)&c.copy, copied);
}

int cpc_uffd_zeropage(int uffd, uint64_t start, uint64_t len, uint64_t mode, int64_t *zeroed) {
    struct uffdio_zeropage z = { .range = { .start = start, .len = len }, .mode = mode, .zeropage = 0 };
    return fill_ioctl(uffd, UFFDIO_ZEROPAGE, &z, (const int64_t *)&z.zeropage, zeroed);
}

int cpc_uffd_continue(int uffd, uint64_t start, uint64_t len, uint64_t mode, int64_t *mapped) {
    struct uffdio_continue c = { .range = { .start = start, .len = len }, .mode = mode, .mapped = 0 };
    return fill_ioctl(uffd, UFFDIO_CONTINUE, &c, (const int64_t *)&c.mapped, mapped);
}

int cpc_uffd_wake(int uffd, uint64_t start, uint64_t len) {
    struct uffdio_range r = { .start = start, .len = len };
    return cpc_neg_errno(ioctl(uffd, UFFDIO_WAKE, &r));
}

int cpc_uffd_read_msgs(int uffd, struct uffd_msg *msgs, int max) {
    for (;;) {
        ssize_t n = read(uffd, msgs, sizeof(struct uffd_msg) * (size_t)max);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -errno;
        return (int)(n / (ssize_t)sizeof(struct uffd_msg));
    }
}
