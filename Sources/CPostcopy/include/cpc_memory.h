// Memory files and advice (memory.c). Part of cpostcopy.h.
#ifndef CPC_MEMORY_H
#define CPC_MEMORY_H

#include <stddef.h>
#include <stdint.h>
#include <linux/memfd.h>

/// memfd_create(2) with `flags` (CPC_MFD_CLOEXEC). Returns fd or -errno.
int cpc_memfd_create(const char *name, unsigned int flags);
static const unsigned int CPC_MFD_CLOEXEC = MFD_CLOEXEC;
/// madvise(MADV_DONTNEED); 0 or -errno.
int cpc_madvise_dontneed(void *addr, size_t len);

// Linux 5.14; guarded for headers that predate it.
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
static const int CPC_MADV_POPULATE_WRITE = MADV_POPULATE_WRITE;
/// madvise(MADV_POPULATE_WRITE): allocates (and for shmem, adds to the page
/// cache) every page of the range as a write fault would, without touching
/// the bytes. 0 or -errno (-EINTR: interrupted, retry what is left).
int cpc_madvise_populate_write(void *addr, size_t len);
/// fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): frees the file's pages
/// in [offset, offset+len) (shmem: drops them from the page cache and zaps
/// every mapping of them). 0 or -errno.
int cpc_fallocate_punch_hole(int fd, int64_t offset, int64_t len);
/// fstatfs(2)'s f_type (the filesystem's magic: TMPFS_MAGIC for memfd and
/// tmpfs, HUGETLBFS_MAGIC) of the file `fd`, or -errno.
int64_t cpc_fs_type(int fd);
static const unsigned int CPC_MFD_HUGETLB = MFD_HUGETLB;

/// malloc_trim(0): gives freed heap back to the kernel. Returns 1 if any was.
int cpc_malloc_trim(void);

#endif
