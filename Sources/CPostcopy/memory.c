// Memory files and advice.
#define _GNU_SOURCE
#include "cpostcopy.h"
#include "shim_errno.h"
#include <sys/mman.h>

int cpc_memfd_create(const char *name, unsigned int flags) { return cpc_neg_errno(memfd_create(name, flags)); }

int cpc_madvise_dontneed(void *addr, size_t len) { return cpc_neg_errno(madvise(addr, len, MADV_DONTNEED)); }
