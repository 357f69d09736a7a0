/* vtool-connect HOST PORT TIMEOUT [LOG]: connect to HOST:PORT, turn Nagle's algorithm off
 * (TCP_NODELAY) and hand the connected socket to ssh, which runs this as its ProxyCommand with
 * ProxyUseFdpass. OpenSSH leaves Nagle on for commands without a terminal, and each of its
 * small handshake messages that follows another then waits for the peer's delayed ACK
 * (40 ms on Linux): this saves two such waits per new connection. Errors are written as ssh
 * writes its own ("ssh: connect to host H port P: REASON"), to LOG when given (ssh -E). */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <fcntl.h>

static int fail(const char *host, const char *port, const char *why, const char *log) {
    FILE *f = log && *log ? fopen(log, "a") : NULL;
    fprintf(f ? f : stderr, "ssh: connect to host %s port %s: %s\n", host, port, why);
    if (f) fclose(f);
    return 255;
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    const char *host = argv[1], *port = argv[2], *log = argc > 4 ? argv[4] : NULL;
    int timeout_ms = atoi(argv[3]) * 1000;
    struct addrinfo hints = {0}, *res, *ai;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc) return fail(host, port, gai_strerror(rc), log);
    int err = ECONNREFUSED;
    for (ai = res; ai; ai = ai->ai_next) {
        int s = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (s < 0) { err = errno; continue; }
        int fl = fcntl(s, F_GETFL);
        fcntl(s, F_SETFL, fl | O_NONBLOCK);
        if (connect(s, ai->ai_addr, ai->ai_addrlen) < 0) {
            if (errno != EINPROGRESS) { err = errno; close(s); continue; }
            struct pollfd p = {s, POLLOUT, 0};
            int n = poll(&p, 1, timeout_ms > 0 ? timeout_ms : -1);
            socklen_t len = sizeof err;
            if (n == 0) { err = ETIMEDOUT; close(s); continue; }
            if (n < 0 || getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) { if (!err) err = errno; close(s); continue; }
        }
        fcntl(s, F_SETFL, fl);
        int one = 1;
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        char byte = 0;
        struct iovec iov = {&byte, 1};
        char buf[CMSG_SPACE(sizeof(int))];
        memset(buf, 0, sizeof buf);
        struct msghdr msg = {0};
        msg.msg_iov = &iov; msg.msg_iovlen = 1;
        msg.msg_control = buf; msg.msg_controllen = sizeof buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET; c->cmsg_type = SCM_RIGHTS; c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &s, sizeof(int));
        if (sendmsg(1, &msg, 0) < 0) return fail(host, port, strerror(errno), log);
        return 0;
    }
    freeaddrinfo(res);
    return fail(host, port, err == ETIMEDOUT ? "Connection timed out" : strerror(err), log);
}
