// TCP sockets: connect, listen, accept (TCP_NODELAY), recv, sendmsg, shutdown.
#define _GNU_SOURCE
#include "cpostcopy.h"
#include "shim_errno.h"
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

static void set_nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

int cpc_tcp_connect(const char *host, const char *port, int timeout_ms, char *err, int errlen) {
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *res = NULL;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) { snprintf(err, (size_t)errlen, "%s", gai_strerror(rc)); return -EHOSTUNREACH; }
    int last = -ECONNREFUSED;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
        if (fd < 0) { last = -errno; continue; }
        set_nodelay(fd);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) { freeaddrinfo(res); return fd; }
        if (errno == EINPROGRESS) {
            struct pollfd p = { .fd = fd, .events = POLLOUT };
            int n;
            do { n = poll(&p, 1, timeout_ms); } while (n < 0 && errno == EINTR);
            if (n == 1) {
                int soerr = 0; socklen_t l = sizeof soerr;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &l);
                if (soerr == 0) { freeaddrinfo(res); return fd; }
                last = -soerr;
            } else {
                last = n == 0 ? -ETIMEDOUT : -errno;
            }
        } else {
            last = -errno;
        }
        close(fd);
    }
    freeaddrinfo(res);
    return last;
}

int cpc_tcp_listen(const char *host, const char *port, int backlog, int *bound_port, char *err, int errlen) {
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE }, *res = NULL;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) { snprintf(err, (size_t)errlen, "%s", gai_strerror(rc)); return -EHOSTUNREACH; }
    int last = -EADDRNOTAVAIL;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) { last = -errno; continue; }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, backlog) == 0) {
            struct sockaddr_storage ss; socklen_t l = sizeof ss;
            getsockname(fd, (struct sockaddr *)&ss, &l);
            if (bound_port) *bound_port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                                        : ((struct sockaddr_in *)&ss)->sin_port);
            freeaddrinfo(res);
            return fd;
        }
        last = -errno;
        close(fd);
    }
    freeaddrinfo(res);
    return last;
}

int cpc_tcp_accept(int lfd, char *peer, int peerlen) {
    struct sockaddr_storage ss; socklen_t l = sizeof ss;
    int fd;
    do { fd = accept4(lfd, (struct sockaddr *)&ss, &l, SOCK_CLOEXEC | SOCK_NONBLOCK); } while (fd < 0 && errno == EINTR);
    if (fd < 0) return -errno;
    set_nodelay(fd);
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (ss.ss_family == AF_INET) {
        inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, host, sizeof host);
        port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    } else if (ss.ss_family == AF_INET6) {
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, host, sizeof host);
        port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    snprintf(peer, (size_t)peerlen, "%s:%d", host, port);
    return fd;
}

ssize_t cpc_recv(int fd, void *p, size_t n) {
    for (;;) {
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && errno == EINTR) continue;
        return r < 0 ? -errno : r;
    }
}

ssize_t cpc_recvv(int fd, const struct iovec *iov, int n) {
    struct msghdr m = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n };
    for (;;) {
        ssize_t r = recvmsg(fd, &m, 0);
        if (r < 0 && errno == EINTR) continue;
        return r < 0 ? -errno : r;
    }
}

ssize_t cpc_sendv(int fd, const struct iovec *iov, int n) {
    struct msghdr m = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n };
    for (;;) {
        ssize_t r = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR) continue;
        return r < 0 ? -errno : r;
    }
}

int cpc_shutdown(int fd) { return cpc_neg_errno(shutdown(fd, SHUT_RDWR)); }
