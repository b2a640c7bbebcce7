// userfaultfd (uffd.c). Part of cpostcopy.h: include that.
#ifndef CPC_UFFD_H
#define CPC_UFFD_H

#include <stdint.h>
#include <linux/userfaultfd.h>

// MINOR faults and UFFDIO_CONTINUE (Linux 5.13; shmem 5.14): present in
// Debian 12's headers, guarded so older headers still build.
#ifndef UFFD_FEATURE_MINOR_HUGETLBFS
#define UFFD_FEATURE_MINOR_HUGETLBFS (1 << 9)
#endif
#ifndef UFFD_FEATURE_MINOR_SHMEM
#define UFFD_FEATURE_MINOR_SHMEM (1 << 10)
#endif
#ifndef UFFDIO_REGISTER_MODE_MINOR
#define UFFDIO_REGISTER_MODE_MINOR ((__u64)1 << 2)
#endif
#ifndef UFFD_PAGEFAULT_FLAG_MINOR
#define UFFD_PAGEFAULT_FLAG_MINOR (1 << 2)
#endif
#ifndef _UFFDIO_CONTINUE
#define _UFFDIO_CONTINUE (0x07)
struct uffdio_continue {
    struct uffdio_range range;
    __u64 mode;
    __s64 mapped;
};
#define UFFDIO_CONTINUE _IOWR(UFFDIO, _UFFDIO_CONTINUE, struct uffdio_continue)
#endif

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
/// UFFDIO_CONTINUE: maps pages already in the page cache of a shmem/hugetlbfs
/// range registered in MINOR mode. Same conventions as cpc_uffd_copy: 0 or
/// -errno; *mapped receives the kernel's .mapped field (bytes mapped, also on a
/// partial result that ends in -EAGAIN).
int cpc_uffd_continue(int uffd, uint64_t start, uint64_t len, uint64_t mode, int64_t *mapped);
/// UFFDIO_WAKE.
int cpc_uffd_wake(int uffd, uint64_t start, uint64_t len);
/// Reads up to `max` uffd_msg records (non-blocking fd). Returns count or -errno.
int cpc_uffd_read_msgs(int uffd, struct uffd_msg *msgs, int max);

static const uint64_t CPC_UFFD_API = UFFD_API;
static const uint64_t CPC_UFFDIO_REGISTER_MODE_MISSING = UFFDIO_REGISTER_MODE_MISSING;
static const uint64_t CPC_UFFDIO_REGISTER_MODE_MINOR = UFFDIO_REGISTER_MODE_MINOR;
static const uint64_t CPC_UFFDIO_COPY_MODE_DONTWAKE = UFFDIO_COPY_MODE_DONTWAKE;
static const uint8_t CPC_UFFD_EVENT_PAGEFAULT = UFFD_EVENT_PAGEFAULT;
static const uint8_t CPC_UFFD_EVENT_REMOVE = UFFD_EVENT_REMOVE;
static const uint8_t CPC_UFFD_EVENT_UNMAP = UFFD_EVENT_UNMAP;
static const uint8_t CPC_UFFD_EVENT_REMAP = UFFD_EVENT_REMAP;
static const uint8_t CPC_UFFD_EVENT_FORK = UFFD_EVENT_FORK;
static const uint64_t CPC_UFFD_PAGEFAULT_FLAG_WRITE = UFFD_PAGEFAULT_FLAG_WRITE;
static const uint64_t CPC_UFFD_PAGEFAULT_FLAG_MINOR = UFFD_PAGEFAULT_FLAG_MINOR;
static const uint64_t CPC_UFFD_FEATURE_MINOR_HUGETLBFS = UFFD_FEATURE_MINOR_HUGETLBFS;
static const uint64_t CPC_UFFD_FEATURE_MINOR_SHMEM = UFFD_FEATURE_MINOR_SHMEM;
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
static const uint64_t CPC_IOCTL_BIT_CONTINUE = 1ULL << _UFFDIO_CONTINUE;

#endif
