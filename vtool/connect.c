/* vtool-connect HOST PORT TIMEOUT [LOG]: connect to HOST:PORT, turn Nagle's algorithm off
 * (TCP_NODELAY) and hand the connected socket to ssh, which runs this as its ProxyCommand with
 * ProxyUseFdpass. OpenSSH leaves Nagle on for commands without a terminal, and each of its
 * small handshake messages that follows another then waits for the peer's delayed ACK
 * (40 ms on Linux): this saves two such waits per new connection. Errors are written as ssh
 * writes its own ("ssh: connect to host H port P: REASON"), to LOG when given (ssh -E).
 *
 * With VTOOL_CONNECT_SHARE (a listening socket's path) and VTOOL_CONNECT_AS (a name) in its
 * environment, it also gives a copy of the connected socket, with that name, to the vtool
 * process listening there (vtool.early), best effort.
 *
 * ssh starts a ProxyCommand as `$SHELL -c "exec COMMAND"`. vtool gives ssh this program as its
 * $SHELL, so it is also run as `vtool-connect -c "exec WORDS"`: it splits WORDS itself (as sh
 * would: blanks, '...', "...", backslashes) and saves the start of a shell per connection. */
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
#include <sys/un.h>

static int fail(const char *host, const char *port, const char *why, const char *log) {
    FILE *f = log && *log ? fopen(log, "a") : NULL;
    fprintf(f ? f : stderr, "ssh: connect to host %s port %s: %s\n", host, port, why);
    if (f) fclose(f);
    return 255;
}

/* Reasons in glibc's words, which ssh prints (and vtool matches, e.g. to retry a refused
 * connection), whichever C library this program was built with (musl words some otherwise). */
static const char *why(int err) {
    switch (err) {
    case ECONNREFUSED: return "Connection refused";
    case ETIMEDOUT: return "Connection timed out";
    case EHOSTUNREACH: return "No route to host";
    case ENETUNREACH: return "Network is unreachable";
    case ECONNRESET: return "Connection reset by peer";
    case ENOTSOCK: return "Socket operation on non-socket";
    case EADDRNOTAVAIL: return "Cannot assign requested address";
    default: return strerror(err);
    }
}

static const char *why_name(int rc) {
    switch (rc) {
    case EAI_NONAME: return "Name or service not known";
    case EAI_AGAIN: return "Temporary failure in name resolution";
    default: return gai_strerror(rc);
    }
}

static int pass_fd(int channel, int fd, const void *data, size_t len) {
    struct iovec iov = {(void *)data, len};
    char buf[CMSG_SPACE(sizeof(int))];
    memset(buf, 0, sizeof buf);
    struct msghdr msg = {0};
    msg.msg_iov = &iov; msg.msg_iovlen = 1;
    msg.msg_control = buf; msg.msg_controllen = sizeof buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET; c->cmsg_type = SCM_RIGHTS; c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    return sendmsg(channel, &msg, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

/* The copy for vtool (see the top): never waits (a full backlog drops it) and never fails. */
static void share(int s) {
    const char *path = getenv("VTOOL_CONNECT_SHARE"), *name = getenv("VTOOL_CONNECT_AS");
    struct sockaddr_un a = {0};
    if (!path || !name || !*name || strlen(path) >= sizeof a.sun_path) return;
    int u = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (u < 0) return;
    a.sun_family = AF_UNIX;
    strcpy(a.sun_path, path);
    if (connect(u, (struct sockaddr *)&a, sizeof a) == 0) (void)pass_fd(u, s, name, strlen(name));
    close(u);
}

/* Split a ProxyCommand line (see the top) into at most `max` words, in place; -1 if it is not
 * one vtool wrote (an unmatched quote, a shell word it never writes, too many words). */
static int split(char *line, char **words, int max) {
    char *r = line, *w = line;
    int n = 0;
    while (*r) {
        while (*r == ' ' || *r == '\t') r++;
        if (!*r) break;
        if (n == max) return -1;
        words[n++] = w;
        while (*r && *r != ' ' && *r != '\t') {
            if (strchr("|&;<>()$`*?[]#~=\n", *r) && !(w > words[n - 1] && strchr("=~#", *r))) return -1;
            if (*r == '\'') {
                char *end = strchr(r + 1, '\'');
                if (!end) return -1;
                memmove(w, r + 1, (size_t)(end - r - 1));
                w += end - r - 1;
                r = end + 1;
            } else if (*r == '"') {
                for (r++; *r != '"'; r++) {
                    if (!*r || *r == '$' || *r == '`') return -1;
                    if (*r == '\\' && r[1] && strchr("\"\\$`", r[1])) r++;
                    *w++ = *r;
                }
                r++;
            } else if (*r == '\\') {
                if (!r[1]) return -1;
                *w++ = r[1];
                r += 2;
            } else {
                *w++ = *r++;
            }
        }
        if (*r) r++;
        *w++ = 0;
    }
    return n;
}

int main(int argc, char **argv) {
    char *words[6];
    if (argc == 3 && strcmp(argv[1], "-c") == 0) {  /* run as ssh's $SHELL (see the top) */
        char *line = strdup(argv[2]);  /* split writes into it; argv[2] stays whole for the message */
        int n = line && strncmp(line, "exec ", 5) == 0 ? split(line + 5, words, 5) : -1;
        if (n < 4) {
            fprintf(stderr, "vtool-connect: not a command it runs: %s\n", argv[2]);
            return 2;
        }
        words[n] = NULL;
        argc = n;
        argv = words;
    }
    if (argc < 4) return 2;
    const char *host = argv[1], *port = argv[2], *log = argc > 4 ? argv[4] : NULL;
    int timeout_ms = atoi(argv[3]) * 1000;
    struct addrinfo hints = {0}, *res, *ai;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc) return fail(host, port, why_name(rc), log);
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
        if (pass_fd(1, s, &byte, 1) < 0) return fail(host, port, why(errno), log);
        share(s);
        return 0;
    }
    freeaddrinfo(res);
    return fail(host, port, why(err), log);
}
