// Memory registration: a staging buffer for local write (destination), RAM for
// remote read only (source), and deregistration.
#define _GNU_SOURCE
#include "crdma.h"
#include "crdma_internal.h"

#include <errno.h>
#include <infiniband/verbs.h>

/* Registers [addr, addr+len) in `pd`; hands back the key a peer (rkey) or this
   side (lkey) uses. */
static int reg(struct ibv_pd *pd, void *addr, size_t len, int access, int remote, uint32_t *key, void **mr_out) {
    struct ibv_mr *mr = ibv_reg_mr(pd, addr, len, access);
    if (!mr) return -errno;
    *key = remote ? mr->rkey : mr->lkey;
    *mr_out = mr;
    return 0;
}

int crdma_conn_reg(crdma_conn *c, void *addr, size_t len, uint32_t *lkey, void **mr_out) {
    return reg(c->pd, addr, len, IBV_ACCESS_LOCAL_WRITE, 0, lkey, mr_out);
}

void crdma_dereg(void *mr) {
    if (mr) ibv_dereg_mr((struct ibv_mr *)mr);
}

int crdma_listener_reg_remote_read(crdma_listener *l, void *addr, size_t len, uint32_t *rkey, void **mr_out) {
    return reg(l->pd, addr, len, IBV_ACCESS_REMOTE_READ, 1, rkey, mr_out);
}
