// Dirty tracking: UFFDIO_WRITEPROTECT and PAGEMAP_SCAN (see cpc_dirty.h).
#define _GNU_SOURCE
#include "cpostcopy.h"
#include "shim_errno.h"
#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

// The kernel checks arg.size against its own struct: the layouts must match
// the kernel's exactly (include/uapi/linux/fs.h, Linux 6.7).
_Static_assert(sizeof(struct pm_scan_arg) == 96, "pm_scan_arg layout");
_Static_assert(sizeof(struct page_region) == 24, "page_region layout");
_Static_assert(sizeof(struct uffdio_writeprotect) == 24, "uffdio_writeprotect layout");

int cpc_uffd_writeprotect(int uffd, uint64_t start, uint64_t len, int protect) {
    struct uffdio_writeprotect wp = {
        .range = { .start = start, .len = len },
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    return ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

int cpc_pagemap_open(void) {
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int cpc_pagemap_scan_written(int pagemap_fd, uint64_t start, uint64_t end,
                             cpc_page_region *vec, uint64_t vec_len, uint64_t *walk_end, int reprotect) {
    struct pm_scan_arg arg = {
        .size = sizeof arg,
        .flags = (reprotect ? PM_SCAN_WP_MATCHING : 0) | PM_SCAN_CHECK_WPASYNC,
        .start = start,
        .end = end,
        .vec = (uint64_t)(uintptr_t)vec,
        .vec_len = vec_len,
        .category_mask = PAGE_IS_WRITTEN,
        .return_mask = PAGE_IS_WRITTEN,
    };
    long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
    if (n < 0) return -errno;
    if (walk_end) *walk_end = arg.walk_end;
    return (int)n;
}
