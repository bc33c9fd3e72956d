/* Entry point: PID 1 boots the guest and serves the port; `--serve-fd N` serves the
 * protocol on an inherited fd on the host (how the fast tests run the real binary). */
#define _GNU_SOURCE
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

bool g_debug;
bool g_pid1;
int g_log_fd = 2;

static void vlog(const char *fmt, va_list ap)
{
    char line[1024];
    struct timespec up;
    /* The kernel's own lines carry uptime stamps; ours do too, so boot steps can be timed. */
    clock_gettime(CLOCK_BOOTTIME, &up);
    int n = snprintf(line, sizeof line, "[%5ld.%06ld] vmr-agent: ", (long)up.tv_sec,
                     up.tv_nsec / 1000);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    line[len++] = '\n';
    /* The console is the only witness of a failing boot: never let a short write hide it. */
    for (size_t off = 0; off < len;) {
        ssize_t w = write(g_log_fd, line + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        off += (size_t)w;
    }
}

void logmsg(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}

void debugmsg(const char *fmt, ...)
{
    if (!g_debug)
        return;
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}

void power_off(void)
{
    sync();
    /* QEMU runs with -no-reboot, so a reboot ends the VM; exiting PID 1 would panic. */
    reboot(RB_AUTOBOOT);
    _exit(1);
}

_Noreturn void fatal(const char *what, int err)
{
    logmsg("%s: %s", what, strerror(err));
    if (g_pid1)
        power_off();
    exit(1);
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        fatal("out of memory", ENOMEM);
    return p;
}

void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        fatal("out of memory", ENOMEM);
    return q;
}

char *xstrndup(const char *s, size_t n)
{
    char *p = xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -1;
    return 0;
}

static int usage(void)
{
    fprintf(stderr, "usage: vmr-agent (--serve-fd N | --listen-fd N) [--freeze-path DIR]"
                    " [--identity-log FILE] [--debug]   (or run as PID 1)\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (getpid() == 1) {
        g_pid1 = true;
        serve(boot(), true);
    }
    int fd = -1;
    bool listening = false;
    for (int i = 1; i < argc; i++) {
        bool serve_fd = strcmp(argv[i], "--serve-fd") == 0;
        if ((serve_fd || strcmp(argv[i], "--listen-fd") == 0) && i + 1 < argc) {
            /* --listen-fd: a listening socket, each connection a host in turn (the fast
             * tests' way to disconnect and come back, as hosts do on the guest's port) */
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < 0 || v > 65535)
                return usage();
            fd = (int)v;
            listening = !serve_fd;
        } else if (strcmp(argv[i], "--identity-log") == 0 && i + 1 < argc) {
            /* What IDENTITY would apply, appended here: host test mode never touches the
             * host's RNG, clock, hostname or files. */
            set_identity_log(argv[++i]);
        } else if (strcmp(argv[i], "--freeze-path") == 0 && i + 1 < argc) {
            /* What FREEZE acts on in host test mode (a test's own loop-mounted ext4). */
            int dir = open(argv[++i], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (dir < 0) {
                fprintf(stderr, "vmr-agent: --freeze-path %s: %s\n", argv[i], strerror(errno));
                return 2;
            }
            set_freeze_target(dir);
        } else if (strcmp(argv[i], "--debug") == 0) {
            g_debug = true;
        } else {
            return usage();
        }
    }
    if (fd < 0 || fcntl(fd, F_GETFD) < 0)
        return usage();
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    if (listening)
        serve_listening(fd);
    serve(fd, false);
}
