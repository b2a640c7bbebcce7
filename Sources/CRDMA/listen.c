// Source side: listen, connect requests and their acceptance (a QP that only
// answers READs), and release of accepted connections.
#define _GNU_SOURCE
#include "crdma.h"
#include "crdma_internal.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

int crdma_listen(const char *host, const char *port, int backlog, crdma_listener **out, uint16_t *bound_port,
                 char *err, size_t err_len) {
    *out = NULL;
    crdma_listener *l = calloc(1, sizeof *l);
    if (!l) return -ENOMEM;
    int rc;
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai = NULL;
    l->ec = rdma_create_event_channel();
    if (!l->ec) { rc = crdma_fail(err, err_len, errno, "rdma_create_event_channel"); goto out; }
    if ((rc = crdma_set_nonblock(l->ec->fd)) < 0) { rc = crdma_fail(err, err_len, rc, "event channel"); goto out; }
    if (rdma_create_id(l->ec, &l->id, l, RDMA_PS_TCP)) { rc = crdma_fail(err, err_len, errno, "rdma_create_id"); goto out; }
    int g = getaddrinfo(host, port, &hints, &ai);
    if (g) {
        if (err && err_len) snprintf(err, err_len, "resolve %s:%s: %s", host, port, gai_strerror(g));
        rc = -EADDRNOTAVAIL;
        goto out;
    }
    if (rdma_bind_addr(l->id, ai->ai_addr)) { rc = crdma_fail(err, err_len, errno, "rdma_bind_addr %s", host); goto out; }
    if (!l->id->verbs) {
        rc = crdma_fail(err, err_len, ENODEV, "%s is not the address of an RDMA device (listen on the device's own IP)", host);
        goto out;
    }
    if (rdma_listen(l->id, backlog)) { rc = crdma_fail(err, err_len, errno, "rdma_listen"); goto out; }
    *bound_port = ntohs(rdma_get_src_port(l->id));
    struct ibv_device_attr dev;
    if ((rc = ibv_query_device(l->id->verbs, &dev))) { rc = crdma_fail(err, err_len, rc, "ibv_query_device"); goto out; }
    l->responder_resources = dev.max_qp_rd_atom > 0 ? (uint32_t)dev.max_qp_rd_atom : 1;
    if (l->responder_resources > 64) l->responder_resources = 64;
    l->pd = ibv_alloc_pd(l->id->verbs);
    if (!l->pd) { rc = crdma_fail(err, err_len, errno, "ibv_alloc_pd"); goto out; }
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
    if (id->verbs != l->id->verbs) return crdma_fail(err, err_len, EXDEV, "connect request on another RDMA device");
    struct ibv_cq *cq = ibv_create_cq(id->verbs, 2, NULL, NULL, 0);
    if (!cq) return crdma_fail(err, err_len, errno, "ibv_create_cq");
    /* This QP never posts anything itself: it only answers READs, which use
       responder resources, not work requests. */
    struct ibv_qp_init_attr qa = {
        .send_cq = cq, .recv_cq = cq, .qp_type = IBV_QPT_RC,
        .cap = {.max_send_wr = 1, .max_recv_wr = 1, .max_send_sge = 1, .max_recv_sge = 1},
    };
    if (rdma_create_qp(id, l->pd, &qa)) {
        int e = errno;
        ibv_destroy_cq(cq);
        return crdma_fail(err, err_len, e, "rdma_create_qp");
    }
    id->context = cq;
    struct rdma_conn_param cp = {
        .responder_resources = (uint8_t)l->responder_resources, .initiator_depth = 0,
        .retry_count = 7, .rnr_retry_count = 7,
    };
    if (rdma_accept(id, &cp)) return crdma_fail(err, err_len, errno, "rdma_accept");
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
