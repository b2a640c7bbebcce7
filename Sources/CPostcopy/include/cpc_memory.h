// Memory files and advice (memory.c). Part of cpostcopy.h.
#ifndef CPC_MEMORY_H
#define CPC_MEMORY_H

#include <stddef.h>
#include <linux/memfd.h>

/// memfd_create(2) with `flags` (CPC_MFD_CLOEXEC). Returns fd or -errno.
int cpc_memfd_create(const char *name, unsigned int flags);
static const unsigned int CPC_MFD_CLOEXEC = MFD_CLOEXEC;
/// madvise(MADV_DONTNEED); 0 or -errno.
int cpc_madvise_dontneed(void *addr, size_t len);

#endif
