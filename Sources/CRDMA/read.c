// Destination side, data path: RDMA READ posting, CQ polling, the completion
// channel, and breaking the QP so posted READs flush.
#define _GNU_SOURCE
#include "crdma.h"
#include "crdma_internal.h"

#include <errno.h>
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

uint32_t crdma_conn_read_depth(const crdma_conn *c) { return c->read_depth; }

int crdma_post_read(crdma_conn *c, uint64_t wr_id, void *local, uint32_t lkey, uint32_t len, uint64_t remote,
                    uint32_t rkey) {
    struct ibv_sge sge = {.addr = (uintptr_t)local, .length = len, .lkey = lkey};
    struct ibv_send_wr wr = {
        .wr_id = wr_id, .sg_list = &sge, .num_sge = 1,
        .opcode = IBV_WR_RDMA_READ, .send_flags = IBV_SEND_SIGNALED,
    };
    wr.wr.rdma.remote_addr = remote;
    wr.wr.rdma.rkey = rkey;
    struct ibv_send_wr *bad = NULL;
    int rc = ibv_post_send(c->id->qp, &wr, &bad);
    return rc ? -rc : 0;
}

int crdma_poll(crdma_conn *c, crdma_wc *out, int n) {
    struct ibv_wc wc[32];
    if (n > 32) n = 32;
    int got = ibv_poll_cq(c->cq, n, wc);
    if (got < 0) return -EIO;
    for (int i = 0; i < got; i++) {
        out[i].wr_id = wc[i].wr_id;
        out[i].status = (int32_t)wc[i].status;
        out[i].byte_len = wc[i].byte_len;
        out[i].vendor_err = wc[i].vendor_err;
    }
    return got;
}

int crdma_comp_fd(const crdma_conn *c) { return c->cc ? c->cc->fd : -1; }

int crdma_rearm(crdma_conn *c) {
    if (!c->cc) return 0;
    struct ibv_cq *cq;
    void *ctx;
    while (ibv_get_cq_event(c->cc, &cq, &ctx) == 0) ibv_ack_cq_events(cq, 1);
    if (errno != EAGAIN && errno != EWOULDBLOCK) return -errno;
    int rc = ibv_req_notify_cq(c->cq, 0);
    return rc ? -rc : 0;
}

int crdma_conn_break(crdma_conn *c) {
    struct ibv_qp_attr a = {.qp_state = IBV_QPS_ERR};
    int rc = ibv_modify_qp(c->id->qp, &a, IBV_QP_STATE);
    return rc ? -rc : 0;
}

const char *crdma_wc_status_str(int status) { return ibv_wc_status_str((enum ibv_wc_status)status); }
