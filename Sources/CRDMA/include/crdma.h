// Small C shim over libibverbs + librdmacm for the RDMA transport. One struct
// holds a connection's state (as in rdma-core's rping.c); every call returns 0
// (or a count) on success and -errno on failure, and fills `err` with the stage
// that failed, so the Swift side maps errors in one place. Teardown runs in
// exact reverse order of setup.
//
// One .c a section: connect.c (destination connection lifecycle), read.c (READ,
// CQ polling, completion channel), memory.c (registration), listen.c (source
// side), common.c (device count, shared helpers); the structs and the helpers
// the files share are in the private crdma_internal.h.
#ifndef CRDMA_H
#define CRDMA_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct crdma_conn crdma_conn;
typedef struct crdma_listener crdma_listener;

/// Number of RDMA devices the verbs library sees (0 when none or no library support).
int crdma_device_count(void);

/// Destination side: resolves `host`:`port` with rdma_cm, creates a protection
/// domain, a CQ (with a completion channel unless `busy_poll`) and an RC QP with
/// room for `max_wr` outstanding work requests, connects presenting `priv`
/// (at most 56 bytes) and waits until the connection is established.
int crdma_connect(const char *host, const char *port, const void *priv, uint8_t priv_len,
                  int timeout_ms, uint32_t max_wr, int busy_poll, crdma_conn **out,
                  char *err, size_t err_len);
/// Disconnects and frees everything, in reverse order of setup. NULL is fine.
void crdma_conn_destroy(crdma_conn *c);
/// Registers local memory in the connection's PD for local write (a staging buffer).
int crdma_conn_reg(crdma_conn *c, void *addr, size_t len, uint32_t *lkey, void **mr);
void crdma_dereg(void *mr);
/// Outstanding RDMA READs the peer accepted (initiator depth).
uint32_t crdma_conn_read_depth(const crdma_conn *c);
/// Posts one signaled RDMA READ of `len` bytes from `remote`/`rkey` into `local`/`lkey`.
int crdma_post_read(crdma_conn *c, uint64_t wr_id, void *local, uint32_t lkey, uint32_t len,
                    uint64_t remote, uint32_t rkey);

typedef struct crdma_wc {
    uint64_t wr_id;
    int32_t status;      // enum ibv_wc_status; 0 = success
    uint32_t byte_len;
    uint32_t vendor_err;
} crdma_wc;
/// Polls up to `n` completions without blocking; returns how many or -errno.
int crdma_poll(crdma_conn *c, crdma_wc *wc, int n);
/// The completion channel's fd (non-blocking), or -1 for a busy-polled CQ.
int crdma_comp_fd(const crdma_conn *c);
/// Consumes pending CQ events, acknowledges them and re-arms the CQ. Call
/// before draining with crdma_poll so no completion is missed.
int crdma_rearm(crdma_conn *c);
/// Moves the QP to the error state: every posted READ completes with
/// IBV_WC_WR_FLUSH_ERR (waking whoever waits for it). Safe from any thread.
int crdma_conn_break(crdma_conn *c);
/// The rdma_cm event channel fd: readable when the peer disconnected.
int crdma_conn_cm_fd(const crdma_conn *c);
/// 1 when a DISCONNECTED (or error) event arrived on the connection's channel.
int crdma_conn_disconnected(crdma_conn *c);
const char *crdma_wc_status_str(int status);

/// Source side: listens with rdma_cm on `host` (a specific address, which picks
/// the device) and port `port` ("0" = any), allocates the PD the RAM is registered in.
int crdma_listen(const char *host, const char *port, int backlog, crdma_listener **out,
                 uint16_t *bound_port, char *err, size_t err_len);
void crdma_listener_destroy(crdma_listener *l);
/// Registers `len` bytes at `addr` with IBV_ACCESS_REMOTE_READ only (never remote
/// write, never local write: the mapping may be read-only).
int crdma_listener_reg_remote_read(crdma_listener *l, void *addr, size_t len, uint32_t *rkey, void **mr);
/// The event channel fd (non-blocking) for poll().
int crdma_listener_fd(const crdma_listener *l);

enum {
    CRDMA_EV_NONE = 0,
    CRDMA_EV_CONNECT_REQUEST = 1,
    CRDMA_EV_ESTABLISHED = 2,
    CRDMA_EV_DISCONNECTED = 3,
    CRDMA_EV_OTHER = 4,
};
typedef struct crdma_event {
    int32_t kind;
    int32_t cm_event;    // the raw rdma_cm event type
    int32_t status;
    uint8_t priv_len;
    uint8_t priv[56];
    void *id;            // struct rdma_cm_id * of the connection
} crdma_event;
/// Takes the next event without blocking: 1 with `ev` filled, 0 when none, -errno.
/// The event is acknowledged before returning.
int crdma_listener_next(crdma_listener *l, crdma_event *ev);
/// Accepts a connect request on `id`: a QP in the listener's PD that only ever
/// answers READs (responder resources as the peer asked, capped by the device).
int crdma_listener_accept(crdma_listener *l, void *id, char *err, size_t err_len);
/// Refuses a connect request.
void crdma_listener_reject(void *id);
/// Frees an accepted connection's QP, CQ and id (after DISCONNECTED or on shutdown).
void crdma_listener_release(void *id);
/// Disconnects an accepted connection (the peer sees it torn down).
void crdma_listener_disconnect(void *id);

#ifdef __cplusplus
}
#endif
#endif
