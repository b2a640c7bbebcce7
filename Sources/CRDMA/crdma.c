#define _GNU_SOURCE
#include "crdma.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <arpa/inet.h>
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

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

static int fail(char *err, size_t len, int rc, const char *fmt, ...) {
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

static int set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -errno;
    return 0;
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int crdma_device_count(void) {
    int n = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (!list) return 0;
    ibv_free_device_list(list);
    return n;
}

const char *crdma_wc_status_str(int status) { return ibv_wc_status_str((enum ibv_wc_status)status); }

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
    if (rc < 0) return fail(err, err_len, rc, "%s", stage);
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
    if (priv_len > 56) return fail(err, err_len, EINVAL, "private data of %u bytes", priv_len);
    crdma_conn *c = calloc(1, sizeof *c);
    if (!c) return -ENOMEM;
    int64_t deadline = now_ms() + timeout_ms;
    int rc;
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *ai = NULL;

    c->ec = rdma_create_event_channel();
    if (!c->ec) { rc = fail(err, err_len, errno, "rdma_create_event_channel"); goto out; }
    if ((rc = set_nonblock(c->ec->fd)) < 0) { rc = fail(err, err_len, rc, "event channel"); goto out; }
    if (rdma_create_id(c->ec, &c->id, c, RDMA_PS_TCP)) { rc = fail(err, err_len, errno, "rdma_create_id"); goto out; }
    int g = getaddrinfo(host, port, &hints, &ai);
    if (g) {
        if (err && err_len) snprintf(err, err_len, "resolve %s:%s: %s", host, port, gai_strerror(g));
        rc = -EHOSTUNREACH;
        goto out;
    }
    if (rdma_resolve_addr(c->id, NULL, ai->ai_addr, timeout_ms)) {
        rc = fail(err, err_len, errno, "rdma_resolve_addr %s (no RDMA device with a route to it?)", host);
        goto out;
    }
    if ((rc = expect_event(c, deadline, RDMA_CM_EVENT_ADDR_RESOLVED, "address resolution", err, err_len)) < 0) goto out;
    if (rdma_resolve_route(c->id, timeout_ms)) { rc = fail(err, err_len, errno, "rdma_resolve_route"); goto out; }
    if ((rc = expect_event(c, deadline, RDMA_CM_EVENT_ROUTE_RESOLVED, "route resolution", err, err_len)) < 0) goto out;
    /* A READ the peer never answers (host gone, its QP destroyed) must fail
       rather than wait forever: local ACK timeout 4.096 us * 2^17 = 0.5 s, times
       retry_count (7) below, then IBV_WC_RETRY_EXC_ERR. Best effort: old
       kernels lack the option. */
    uint8_t ack_timeout = 17;
    (void)rdma_set_option(c->id, RDMA_OPTION_ID, RDMA_OPTION_ID_ACK_TIMEOUT, &ack_timeout, sizeof ack_timeout);

    struct ibv_device_attr dev;
    if ((rc = ibv_query_device(c->id->verbs, &dev))) { rc = fail(err, err_len, rc, "ibv_query_device"); goto out; }
    c->pd = ibv_alloc_pd(c->id->verbs);
    if (!c->pd) { rc = fail(err, err_len, errno, "ibv_alloc_pd"); goto out; }
    if (!busy_poll) {
        c->cc = ibv_create_comp_channel(c->id->verbs);
        if (!c->cc) { rc = fail(err, err_len, errno, "ibv_create_comp_channel"); goto out; }
        if ((rc = set_nonblock(c->cc->fd)) < 0) { rc = fail(err, err_len, rc, "completion channel"); goto out; }
    }
    int cqe = (int)max_wr + 1;
    if (cqe > dev.max_cqe) cqe = dev.max_cqe;
    c->cq = ibv_create_cq(c->id->verbs, cqe, c, c->cc, 0);
    if (!c->cq) { rc = fail(err, err_len, errno, "ibv_create_cq"); goto out; }
    if (c->cc && (rc = ibv_req_notify_cq(c->cq, 0))) { rc = fail(err, err_len, rc, "ibv_req_notify_cq"); goto out; }
    uint32_t wr = max_wr;
    if (wr > (uint32_t)dev.max_qp_wr) wr = (uint32_t)dev.max_qp_wr;
    struct ibv_qp_init_attr qa = {
        .send_cq = c->cq, .recv_cq = c->cq, .qp_type = IBV_QPT_RC, .sq_sig_all = 0,
        .cap = {.max_send_wr = wr, .max_recv_wr = 1, .max_send_sge = 1, .max_recv_sge = 1},
    };
    if (rdma_create_qp(c->id, c->pd, &qa)) { rc = fail(err, err_len, errno, "rdma_create_qp"); goto out; }
    c->qp_created = 1;
    uint32_t depth = dev.max_qp_init_rd_atom > 0 ? (uint32_t)dev.max_qp_init_rd_atom : 1;
    if (depth > 64) depth = 64;
    c->read_depth = depth;
    struct rdma_conn_param cp = {
        .private_data = priv, .private_data_len = priv_len,
        .initiator_depth = (uint8_t)depth, .responder_resources = 0,
        .retry_count = 7, .rnr_retry_count = 7,
    };
    if (rdma_connect(c->id, &cp)) { rc = fail(err, err_len, errno, "rdma_connect"); goto out; }
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

/* ---- source side ---- */

int crdma_listen(const char *host, const char *port, int backlog, crdma_listener **out, uint16_t *bound_port,
                 char *err, size_t err_len) {
    *out = NULL;
    crdma_listener *l = calloc(1, sizeof *l);
    if (!l) return -ENOMEM;
    int rc;
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai = NULL;
    l->ec = rdma_create_event_channel();
    if (!l->ec) { rc = fail(err, err_len, errno, "rdma_create_event_channel"); goto out; }
    if ((rc = set_nonblock(l->ec->fd)) < 0) { rc = fail(err, err_len, rc, "event channel"); goto out; }
    if (rdma_create_id(l->ec, &l->id, l, RDMA_PS_TCP)) { rc = fail(err, err_len, errno, "rdma_create_id"); goto out; }
    int g = getaddrinfo(host, port, &hints, &ai);
    if (g) {
        if (err && err_len) snprintf(err, err_len, "resolve %s:%s: %s", host, port, gai_strerror(g));
        rc = -EADDRNOTAVAIL;
        goto out;
    }
    if (rdma_bind_addr(l->id, ai->ai_addr)) { rc = fail(err, err_len, errno, "rdma_bind_addr %s", host); goto out; }
    if (!l->id->verbs) {
        rc = fail(err, err_len, ENODEV, "%s is not the address of an RDMA device (listen on the device's own IP)", host);
        goto out;
    }
    if (rdma_listen(l->id, backlog)) { rc = fail(err, err_len, errno, "rdma_listen"); goto out; }
    *bound_port = ntohs(rdma_get_src_port(l->id));
    struct ibv_device_attr dev;
    if ((rc = ibv_query_device(l->id->verbs, &dev))) { rc = fail(err, err_len, rc, "ibv_query_device"); goto out; }
    l->responder_resources = dev.max_qp_rd_atom > 0 ? (uint32_t)dev.max_qp_rd_atom : 1;
    if (l->responder_resources > 64) l->responder_resources = 64;
    l->pd = ibv_alloc_pd(l->id->verbs);
    if (!l->pd) { rc = fail(err, err_len, errno, "ibv_alloc_pd"); goto out; }
    rc = 0;
out:
    if (ai) freeaddrinfo(ai);
    if (rc < 0) crdma_listener_destroy(l);
    else *out = l;
    return rc;
}

void crdma_listener_destroy(crdma_listener *l) {
    if (!l) return;
    if (l->pd) ibv_dealloc_pd(l->pd);
    if (l->id) rdma_destroy_id(l->id);
    if (l->ec) rdma_destroy_event_channel(l->ec);
    free(l);
}

int crdma_listener_reg_remote_read(crdma_listener *l, void *addr, size_t len, uint32_t *rkey, void **mr_out) {
    return reg(l->pd, addr, len, IBV_ACCESS_REMOTE_READ, 1, rkey, mr_out);
}

int crdma_listener_fd(const crdma_listener *l) { return l->ec->fd; }

int crdma_listener_next(crdma_listener *l, crdma_event *out) {
    struct rdma_cm_event *ev;
    if (rdma_get_cm_event(l->ec, &ev)) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
        return -errno;
    }
    memset(out, 0, sizeof *out);
    out->cm_event = ev->event;
    out->status = ev->status;
    out->id = ev->id;
    switch (ev->event) {
    case RDMA_CM_EVENT_CONNECT_REQUEST: {
        out->kind = CRDMA_EV_CONNECT_REQUEST;
        uint8_t n = ev->param.conn.private_data_len;
        if (n > sizeof out->priv) n = sizeof out->priv;
        if (ev->param.conn.private_data && n) memcpy(out->priv, ev->param.conn.private_data, n);
        out->priv_len = n;
        break;
    }
    case RDMA_CM_EVENT_ESTABLISHED: out->kind = CRDMA_EV_ESTABLISHED; break;
    case RDMA_CM_EVENT_DISCONNECTED:
    case RDMA_CM_EVENT_TIMEWAIT_EXIT:
        out->kind = CRDMA_EV_DISCONNECTED;
        break;
    default: out->kind = CRDMA_EV_OTHER; break;
    }
    rdma_ack_cm_event(ev);
    return 1;
}

int crdma_listener_accept(crdma_listener *l, void *idp, char *err, size_t err_len) {
    struct rdma_cm_id *id = idp;
    id->context = NULL; /* inherited from the listening id; ours is the CQ */
    if (id->verbs != l->id->verbs) return fail(err, err_len, EXDEV, "connect request on another RDMA device");
    struct ibv_cq *cq = ibv_create_cq(id->verbs, 2, NULL, NULL, 0);
    if (!cq) return fail(err, err_len, errno, "ibv_create_cq");
    /* This QP never posts anything itself: it only answers READs, which use
       responder resources, not work requests. */
    struct ibv_qp_init_attr qa = {
        .send_cq = cq, .recv_cq = cq, .qp_type = IBV_QPT_RC,
        .cap = {.max_send_wr = 1, .max_recv_wr = 1, .max_send_sge = 1, .max_recv_sge = 1},
    };
    if (rdma_create_qp(id, l->pd, &qa)) {
        int e = errno;
        ibv_destroy_cq(cq);
        return fail(err, err_len, e, "rdma_create_qp");
    }
    id->context = cq;
    struct rdma_conn_param cp = {
        .responder_resources = (uint8_t)l->responder_resources, .initiator_depth = 0,
        .retry_count = 7, .rnr_retry_count = 7,
    };
    if (rdma_accept(id, &cp)) return fail(err, err_len, errno, "rdma_accept");
    return 0;
}

void crdma_listener_reject(void *idp) {
    struct rdma_cm_id *id = idp;
    rdma_reject(id, NULL, 0);
    rdma_destroy_id(id);
}

void crdma_listener_disconnect(void *idp) { rdma_disconnect((struct rdma_cm_id *)idp); }

void crdma_listener_release(void *idp) {
    struct rdma_cm_id *id = idp;
    struct ibv_cq *cq = id->context;
    if (id->qp) rdma_destroy_qp(id);
    if (cq) ibv_destroy_cq(cq);
    rdma_destroy_id(id);
}
