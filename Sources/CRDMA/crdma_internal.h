// Private to the CRDMA target's .c files (not under include/: Swift never sees
// it): the state behind crdma.h's opaque handles, and the helpers both sides'
// setup share (defined in common.c, hidden from the library's exports).
#ifndef CRDMA_INTERNAL_H
#define CRDMA_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#define CRDMA_INTERNAL __attribute__((visibility("hidden")))

struct crdma_conn {
    struct rdma_event_channel *ec;
    struct rdma_cm_id *id;
    struct ibv_pd *pd;
    struct ibv_comp_channel *cc;
    struct ibv_cq *cq;
    int qp_created;
    int connected;
    int disconnected;
    uint32_t read_depth;
};

struct crdma_listener {
    struct rdma_event_channel *ec;
    struct rdma_cm_id *id;
    struct ibv_pd *pd;
    uint32_t responder_resources;
};

/// Fills `err` (if any) with the stage, printf-style, and strerror of `rc` (an
/// errno of either sign); returns -errno (-EIO for 0).
CRDMA_INTERNAL int crdma_fail(char *err, size_t len, int rc, const char *fmt, ...);
/// Sets O_NONBLOCK on `fd`; 0 or -errno.
CRDMA_INTERNAL int crdma_set_nonblock(int fd);

#endif
