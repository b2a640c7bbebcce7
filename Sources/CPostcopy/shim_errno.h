// Private to the shim's .c files: the -errno convention of cpostcopy.h.
#ifndef CPC_SHIM_ERRNO_H
#define CPC_SHIM_ERRNO_H

#include <errno.h>

/// A libc result (negative with errno set on failure) as the shim returns it:
/// the value, or -errno.
static inline int cpc_neg_errno(int r) { return r < 0 ? -errno : r; }

#endif
