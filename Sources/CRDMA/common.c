// Shared by both sides: the device count, and the error and non-blocking fd
// helpers of crdma_internal.h.
#define _GNU_SOURCE
#include "crdma.h"
#include "crdma_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <infiniband/verbs.h>

int crdma_fail(char *err, size_t len, int rc, const char *fmt, ...) {
    if (err && len) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(err, len, fmt, ap);
        va_end(ap);
        if (n >= 0 && (size_t)n < len)
            snprintf(err + n, len - (size_t)n, ": %s", strerror(rc > 0 ? rc : -rc));
    }
    return rc > 0 ? -rc : (rc == 0 ? -EIO : rc);
}

int crdma_set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -errno;
    return 0;
}

int crdma_device_count(void) {
    int n = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (!list) return 0;
    ibv_free_device_list(list);
    return n;
}
