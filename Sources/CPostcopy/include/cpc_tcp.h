// TCP sockets (tcp.c). Part of cpostcopy.h.
#ifndef CPC_TCP_H
#define CPC_TCP_H

#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

/// Connects a TCP socket (non-blocking after connect, TCP_NODELAY, CLOEXEC) to
/// host:port. Returns fd or -errno; on name resolution failure returns -EHOSTUNREACH
/// and writes the resolver's message into err (size errlen).
int cpc_tcp_connect(const char *host, const char *port, int timeout_ms, char *err, int errlen);
/// Creates a listening TCP socket (SO_REUSEADDR, CLOEXEC). Returns fd or -errno.
/// *bound_port receives the actual port (useful with port 0).
int cpc_tcp_listen(const char *host, const char *port, int backlog, int *bound_port, char *err, int errlen);
/// accept4 with CLOEXEC|NONBLOCK and TCP_NODELAY. Returns fd or -errno.
/// peer receives a printable address.
int cpc_tcp_accept(int lfd, char *peer, int peerlen);
/// Non-blocking recv, recvmsg into `n` iovecs (n <= IOV_MAX), and sendmsg of
/// `n` iovecs (MSG_NOSIGNAL), returning bytes or -errno (EINTR retried).
ssize_t cpc_recv(int fd, void *p, size_t n);
ssize_t cpc_recvv(int fd, const struct iovec *iov, int n);
ssize_t cpc_sendv(int fd, const struct iovec *iov, int n);
/// shutdown(SHUT_RDWR); 0 or -errno.
int cpc_shutdown(int fd);

#endif
