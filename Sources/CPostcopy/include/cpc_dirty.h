// Dirty tracking with userfaultfd write-protect in async mode and the
// PAGEMAP_SCAN ioctl (dirty.c; Linux 6.7). Part of cpostcopy.h: include that.
// Debian 12's headers (6.1) predate these names: they are defined here with the
// kernel's values, guarded so that newer headers win.
#ifndef CPC_DIRTY_H
#define CPC_DIRTY_H

#include <stdint.h>
#include <linux/userfaultfd.h>
#include <linux/fs.h>

#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

#ifndef PAGEMAP_SCAN
struct page_region {
    __u64 start;
    __u64 end;
    __u64 categories;
};
struct pm_scan_arg {
    __u64 size;
    __u64 flags;
    __u64 start;
    __u64 end;
    __u64 walk_end;
    __u64 vec;
    __u64 vec_len;
    __u64 max_pages;
    __u64 category_inverted;
    __u64 category_mask;
    __u64 category_anyof_mask;
    __u64 return_mask;
};
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

/// A run of written pages [start, end) (addresses), as PAGEMAP_SCAN reports it.
typedef struct page_region cpc_page_region;

/// UFFDIO_WRITEPROTECT of [start, start+len): protect (1) or unprotect (0).
/// 0 or -errno.
int cpc_uffd_writeprotect(int uffd, uint64_t start, uint64_t len, int protect);
/// Opens /proc/self/pagemap for PAGEMAP_SCAN. fd or -errno.
int cpc_pagemap_open(void);
/// One PAGEMAP_SCAN over [start, end) of pages written since they were last
/// protected; with `reprotect`, protecting them again in the same walk
/// (PM_SCAN_WP_MATCHING), otherwise only looking. PM_SCAN_CHECK_WPASYNC: pages
/// not under async write-protect fail with -EPERM. Fills up to `vec_len` runs;
/// returns how many, or -errno. *walk_end receives where the walk stopped
/// (== end when the range is done).
int cpc_pagemap_scan_written(int pagemap_fd, uint64_t start, uint64_t end,
                             cpc_page_region *vec, uint64_t vec_len, uint64_t *walk_end, int reprotect);

static const uint64_t CPC_UFFD_FEATURE_WP_ASYNC = UFFD_FEATURE_WP_ASYNC;
static const uint64_t CPC_UFFD_FEATURE_WP_UNPOPULATED = UFFD_FEATURE_WP_UNPOPULATED;
static const uint64_t CPC_UFFD_FEATURE_WP_HUGETLBFS_SHMEM = UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
static const uint64_t CPC_UFFDIO_REGISTER_MODE_WP = UFFDIO_REGISTER_MODE_WP;
static const uint64_t CPC_IOCTL_BIT_WRITEPROTECT = 1ULL << _UFFDIO_WRITEPROTECT;

#endif
