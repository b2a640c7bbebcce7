// Waiting for descriptors: epoll over tokens, eventfd, poll().
#define _GNU_SOURCE
#include "cpostcopy.h"
#include "shim_errno.h"
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

int cpc_epoll_create(void) { return cpc_neg_errno(epoll_create1(EPOLL_CLOEXEC)); }

int cpc_epoll_add(int epfd, int fd, uint64_t token, uint32_t events) {
    struct epoll_event ev = { .events = events, .data = { .u64 = token } };
    return cpc_neg_errno(epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev));
}

int cpc_epoll_del(int epfd, int fd) {
    struct epoll_event ev = { 0 };
    return cpc_neg_errno(epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev));
}

int cpc_epoll_wait(int epfd, uint64_t *tokens, int max, int timeout_ms) {
    struct epoll_event evs[16];
    if (max > 16) max = 16;
    int n = epoll_wait(epfd, evs, max, timeout_ms);
    if (n < 0) return errno == EINTR ? 0 : -errno;
    for (int i = 0; i < n; i++) tokens[i] = evs[i].data.u64;
    return n;
}

int cpc_eventfd(unsigned int initval, int flags) {
    return cpc_neg_errno(eventfd(initval, flags));
}

int cpc_eventfd_signal(int fd) {
    uint64_t one = 1;
    for (;;) {
        ssize_t n = write(fd, &one, sizeof one);
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : 0;
    }
}

int cpc_eventfd_drain(int fd) {
    uint64_t v;
    for (;;) {
        ssize_t n = read(fd, &v, sizeof v);
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : 0;
    }
}

int cpc_poll1(int fd, short events, int timeout_ms) {
    struct pollfd p = { .fd = fd, .events = events };
    int n = poll(&p, 1, timeout_ms);
    if (n < 0) return errno == EINTR ? 0 : -errno;
    return n;
}

int cpc_poll2(int a, int b, int timeout_ms) {
    struct pollfd p[2] = { { .fd = a, .events = POLLIN }, { .fd = b, .events = POLLIN } };
    int n = poll(p, 2, timeout_ms);
    if (n < 0) return errno == EINTR ? 0 : -errno;
    return (p[0].revents ? 1 : 0) | (p[1].revents ? 2 : 0);
}
