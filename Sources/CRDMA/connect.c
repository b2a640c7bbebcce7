// Destination side, connection lifecycle: connect (resolve, PD, CQ, QP,
// rdma_connect), teardown, and the rdma_cm events that say the peer is gone.
#define _GNU_SOURCE
#include "crdma.h"
#include "crdma_internal.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits (up to the deadline) for the next event on `ec`; the caller acks it. */
static int next_event(struct rdma_event_channel *ec, int64_t deadline, struct rdma_cm_event **ev) {
    for (;;) {
        if (rdma_get_cm_event(ec, ev) == 0) return 0;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -errno;
        int64_t left = deadline - now_ms();
        if (left <= 0) return -ETIMEDOUT;
        struct pollfd p = {.fd = ec->fd, .events = POLLIN};
        if (poll(&p, 1, (int)(left > 1000 ? 1000 : left)) < 0 && errno != EINTR) return -errno;
    }
}

static int expect_event(crdma_conn *c, int64_t deadline, enum rdma_cm_event_type want, const char *stage,
                        char *err, size_t err_len) {
    struct rdma_cm_event *ev;
    int rc = next_event(c->ec, deadline, &ev);
    if (rc < 0) return crdma_fail(err, err_len, rc, "%s", stage);
    enum rdma_cm_event_type got = ev->event;
    int status = ev->status;
    rdma_ack_cm_event(ev);
    if (got != want) {
        int code = got == RDMA_CM_EVENT_REJECTED ? ECONNREFUSED
                 : got == RDMA_CM_EVENT_UNREACHABLE || got == RDMA_CM_EVENT_ADDR_ERROR || got == RDMA_CM_EVENT_ROUTE_ERROR ? EHOSTUNREACH
                 : ECONNABORTED;
        if (err && err_len)
            snprintf(err, err_len, "%s: got %s (status %d)", stage, rdma_event_str(got), status);
        return -code;
    }
    return 0;
}

int crdma_connect(const char *host, const char *port, const void *priv, uint8_t priv_len, int timeout_ms,
                  uint32_t max_wr, int busy_poll, crdma_conn **out, char *err, size_t err_len) {
    *out = NULL;
    if (priv_len > 56) return crdma_fail(err, err_len, EINVAL, "private data of %u bytes", priv_len);
    crdma_conn *c = calloc(1, sizeof *c);
    if (!c) return -ENOMEM;
    int64_t deadline = now_ms() + timeout_ms;
    int rc;
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *ai = NULL;

    c->ec = rdma_create_event_channel();
    if (!c->ec) { rc = crdma_fail(err, err_len, errno, "rdma_create_event_channel"); goto out; }
    if ((rc = crdma_set_nonblock(c->ec->fd)) < 0) { rc = crdma_fail(err, err_len, rc, "event channel"); goto out; }
    if (rdma_create_id(c->ec, &c->id, c, RDMA_PS_TCP)) { rc = crdma_fail(err, err_len, errno, "rdma_create_id"); goto out; }
    int g = getaddrinfo(host, port, &hints, &ai);
    if (g) {
        if (err && err_len) snprintf(err, err_len, "resolve %s:%s: %s", host, port, gai_strerror(g));
        rc = -EHOSTUNREACH;
        goto out;
    }
    if (rdma_resolve_addr(c->id, NULL, ai->ai_addr, timeout_ms)) {
        rc = crdma_fail(err, err_len, errno, "rdma_resolve_addr %s (no RDMA device with a route to it?)", host);
        goto out;
    }
    if ((rc = expect_event(c, deadline, RDMA_CM_EVENT_ADDR_RESOLVED, "address resolution", err, err_len)) < 0) goto out;
    if (rdma_resolve_route(c->id, timeout_ms)) { rc = crdma_fail(err, err_len, errno, "rdma_resolve_route"); goto out; }
    if ((rc = expect_event(c, deadline, RDMA_CM_EVENT_ROUTE_RESOLVED, "route resolution", err, err_len)) < 0) goto out;
    /* A READ the peer never answers (host gone, its QP destroyed) must fail
       rather than wait forever: local ACK timeout 4.096 us * 2^17 = 0.5 s, times
       retry_count (7) below, then IBV_WC_RETRY_EXC_ERR. Best effort: old
       kernels lack the option. */
    uint8_t ack_timeout = 17;
    (void)rdma_set_option(c->id, RDMA_OPTION_ID, RDMA_OPTION_ID_ACK_TIMEOUT, &ack_timeout, sizeof ack_timeout);

    struct ibv_device_attr dev;
    if ((rc = ibv_query_device(c->id->verbs, &dev))) { rc = crdma_fail(err, err_len, rc, "ibv_query_device"); goto out; }
    c->pd = ibv_alloc_pd(c->id->verbs);
    if (!c->pd) { rc = crdma_fail(err, err_len, errno, "ibv_alloc_pd"); goto out; }
    if (!busy_poll) {
        c->cc = ibv_create_comp_channel(c->id->verbs);
        if (!c->cc) { rc = crdma_fail(err, err_len, errno, "ibv_create_comp_channel"); goto out; }
        if ((rc = crdma_set_nonblock(c->cc->fd)) < 0) { rc = crdma_fail(err, err_len, rc, "completion channel"); goto out; }
    }
    int cqe = (int)max_wr + 1;
    if (cqe > dev.max_cqe) cqe = dev.max_cqe;
    c->cq = ibv_create_cq(c->id->verbs, cqe, c, c->cc, 0);
    if (!c->cq) { rc = crdma_fail(err, err_len, errno, "ibv_create_cq"); goto out; }
    if (c->cc && (rc = ibv_req_notify_cq(c->cq, 0))) { rc = crdma_fail(err, err_len, rc, "ibv_req_notify_cq"); goto out; }
    uint32_t wr = max_wr;
    if (wr > (uint32_t)dev.max_qp_wr) wr = (uint32_t)dev.max_qp_wr;
    struct ibv_qp_init_attr qa = {
        .send_cq = c->cq, .recv_cq = c->cq, .qp_type = IBV_QPT_RC, .sq_sig_all = 0,
        .cap = {.max_send_wr = wr, .max_recv_wr = 1, .max_send_sge = 1, .max_recv_sge = 1},
    };
    if (rdma_create_qp(c->id, c->pd, &qa)) { rc = crdma_fail(err, err_len, errno, "rdma_create_qp"); goto out; }
    c->qp_created = 1;
    uint32_t depth = dev.max_qp_init_rd_atom > 0 ? (uint32_t)dev.max_qp_init_rd_atom : 1;
    if (depth > 64) depth = 64;
    c->read_depth = depth;
    struct rdma_conn_param cp = {
        .private_data = priv, .private_data_len = priv_len,
        .initiator_depth = (uint8_t)depth, .responder_resources = 0,
        .retry_count = 7, .rnr_retry_count = 7,
    };
    if (rdma_connect(c->id, &cp)) { rc = crdma_fail(err, err_len, errno, "rdma_connect"); goto out; }
    if ((rc = expect_event(c, deadline, RDMA_CM_EVENT_ESTABLISHED, "connect", err, err_len)) < 0) goto out;
    c->connected = 1;
    rc = 0;
out:
    if (ai) freeaddrinfo(ai);
    if (rc < 0) crdma_conn_destroy(c);
    else *out = c;
    return rc;
}

void crdma_conn_destroy(crdma_conn *c) {
    if (!c) return;
    if (c->connected && !crdma_conn_disconnected(c)) {
        rdma_disconnect(c->id);
        /* The DISCONNECTED event is ours to ack before the id can go. */
        struct rdma_cm_event *ev;
        if (next_event(c->ec, now_ms() + 1000, &ev) == 0) rdma_ack_cm_event(ev);
    }
    if (c->qp_created) rdma_destroy_qp(c->id);
    if (c->cq) ibv_destroy_cq(c->cq);
    if (c->cc) ibv_destroy_comp_channel(c->cc);
    if (c->pd) ibv_dealloc_pd(c->pd);
    if (c->id) rdma_destroy_id(c->id);
    if (c->ec) rdma_destroy_event_channel(c->ec);
    free(c);
}

int crdma_conn_cm_fd(const crdma_conn *c) { return c->ec->fd; }

int crdma_conn_disconnected(crdma_conn *c) {
    struct rdma_cm_event *ev;
    while (!c->disconnected && rdma_get_cm_event(c->ec, &ev) == 0) {
        if (ev->event == RDMA_CM_EVENT_DISCONNECTED || ev->event == RDMA_CM_EVENT_DEVICE_REMOVAL ||
            ev->event == RDMA_CM_EVENT_TIMEWAIT_EXIT)
            c->disconnected = 1;
        rdma_ack_cm_event(ev);
    }
    return c->disconnected;
}
