// Memory files and advice.
#define _GNU_SOURCE
#include <malloc.h>
#include "cpostcopy.h"
#include "shim_errno.h"
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <errno.h>

int cpc_memfd_create(const char *name, unsigned int flags) { return cpc_neg_errno(memfd_create(name, flags)); }

int cpc_madvise_dontneed(void *addr, size_t len) { return cpc_neg_errno(madvise(addr, len, MADV_DONTNEED)); }

int cpc_madvise_populate_write(void *addr, size_t len) { return cpc_neg_errno(madvise(addr, len, CPC_MADV_POPULATE_WRITE)); }

int cpc_fallocate_punch_hole(int fd, int64_t offset, int64_t len) {
    return cpc_neg_errno(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)len));
}

int64_t cpc_fs_type(int fd) {
    struct statfs fs;
    if (fstatfs(fd, &fs) != 0) return -(int64_t)errno;
    return (int64_t)(uint32_t)fs.f_type;
}

int cpc_malloc_trim(void) { return malloc_trim(0); }
