// Unix sockets with SCM_RIGHTS, for the VMM handoff (unix_socket.c). Part of cpostcopy.h.
#ifndef CPC_UNIX_SOCKET_H
#define CPC_UNIX_SOCKET_H

#include <stddef.h>
#include <sys/types.h>

/// Listening SOCK_STREAM Unix socket at path (an existing socket file is replaced,
/// mode 0600). Returns fd or -errno.
int cpc_unix_listen(const char *path, int backlog);
/// Connects to a Unix socket. Returns fd or -errno.
int cpc_unix_connect(const char *path);
/// accept4 (CLOEXEC). Returns fd or -errno.
int cpc_unix_accept(int lfd);
/// recvmsg of up to len bytes plus any SCM_RIGHTS fds (up to maxfds; more are
/// closed and counted). Returns bytes (0 = EOF) or -errno; *nfds = fds received
/// (including closed extras), *ctrunc = 1 if control data was truncated.
ssize_t cpc_recv_with_fds(int fd, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *ctrunc);
/// sendmsg of buf with nfds fds as SCM_RIGHTS (0 <= nfds <= 16). Returns bytes or -errno.
ssize_t cpc_send_with_fds(int fd, const void *buf, size_t len, const int *fds, int nfds);
/// Peer process id from SO_PEERCRED, or -errno.
int cpc_peer_pid(int fd);

#endif
