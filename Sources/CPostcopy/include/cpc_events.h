// Waiting for descriptors: epoll, eventfd, poll (events.c). Part of cpostcopy.h.
#ifndef CPC_EVENTS_H
#define CPC_EVENTS_H

#include <stdint.h>
#include <sys/eventfd.h>

/// epoll over tokens (the event's data.u64). Return 0 / count or -errno.
int cpc_epoll_create(void);
int cpc_epoll_add(int epfd, int fd, uint64_t token, uint32_t events);
int cpc_epoll_del(int epfd, int fd);
/// Waits; EINTR is returned as 0 events. tokens must hold `max` entries.
int cpc_epoll_wait(int epfd, uint64_t *tokens, int max, int timeout_ms);
static const uint32_t CPC_EPOLLIN = 0x001;
static const uint32_t CPC_EPOLLOUT = 0x004;

/// eventfd(2) with `flags` (CPC_EFD_CLOEXEC | CPC_EFD_NONBLOCK). Returns fd or -errno.
int cpc_eventfd(unsigned int initval, int flags);
static const int CPC_EFD_CLOEXEC = EFD_CLOEXEC;
static const int CPC_EFD_NONBLOCK = EFD_NONBLOCK;
/// Adds 1 to the eventfd's counter. Returns 0 or -errno (EINTR retried).
int cpc_eventfd_signal(int fd);
/// Reads (and so resets) the counter. Returns 0 or -errno (-EAGAIN when it was 0
/// on a non-blocking eventfd).
int cpc_eventfd_drain(int fd);

/// poll one fd for events (POLLIN=1, POLLOUT=4); returns >0 ready, 0 timeout
/// (or EINTR), -errno.
int cpc_poll1(int fd, short events, int timeout_ms);
/// poll() for input on two fds (a negative fd is ignored): bit 0 set when `a` is
/// readable, bit 1 when `b`; 0 on timeout (or EINTR); -errno.
int cpc_poll2(int a, int b, int timeout_ms);

#endif
