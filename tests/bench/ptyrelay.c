/* The least a daemon can do between a TCP client and a PTY: raw bytes both ways, no
 * protocol, no authentication, one process, blocking poll(2). The bench times keystroke
 * echo through it to show the floor that any design on this machine stays above. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static int copy(int from, int to) {
    char buf[65536];
    ssize_t n = read(from, buf, sizeof buf);
    if (n <= 0) return -1;
    for (ssize_t off = 0; off < n;) {
        ssize_t w = write(to, buf + off, (size_t)(n - off));
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        off += w;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s COMMAND  (prints the loopback port, serves one client)\n",
                argv[0]);
        return 2;
    }
    int srv = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (srv < 0 || bind(srv, (struct sockaddr *)&addr, sizeof addr) || listen(srv, 1) ||
        getsockname(srv, (struct sockaddr *)&addr, &len)) {
        perror("ptyrelay: listen");
        return 1;
    }
    printf("%d\n", ntohs(addr.sin_port));
    fflush(stdout);
    int client = accept(srv, NULL, NULL);
    if (client < 0) { perror("ptyrelay: accept"); return 1; }
    close(srv);
    int one = 1;
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int master;
    pid_t pid = forkpty(&master, NULL, NULL, NULL);
    if (pid < 0) { perror("ptyrelay: forkpty"); return 1; }
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", argv[1], (char *)NULL);
        _exit(127);
    }
    struct pollfd fds[2] = {{.fd = client, .events = POLLIN}, {.fd = master, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) { if (errno == EINTR) continue; break; }
        if (fds[0].revents && copy(client, master)) break;
        if (fds[1].revents && copy(master, client)) break;
    }
    kill(pid, SIGHUP);
    waitpid(pid, NULL, 0);
    return 0;
}
