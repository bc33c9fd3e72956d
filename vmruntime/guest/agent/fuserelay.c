/* MOUNT with FSTYPE fuse-console: a FUSE mount whose requests travel over a virtio-console
 * port to the host's broker (docs/broker.md, "Transport (c)"), instead of a vhost-user-fs
 * device. A console port migrates with the VM; vhost-user-fs does not (QEMU 7.2), so this
 * is the transport of sandboxes that are memory-snapshotted.
 *
 * The stream on the port is nothing but FUSE messages back to back: each request as
 * /dev/fuse gives it (one read = one request, its length in fuse_in_header.len), each
 * reply as /dev/fuse takes it (one write = one reply, its length in fuse_out_header.len).
 * The broker checks and bounds every length it reads (the guest is hostile to it); this
 * side bounds what it reads from the host too.
 *
 * The relay is one process per share, forked off the agent at MOUNT and never
 * restarted, with two threads: A reads /dev/fuse and writes requests to the port, B
 * reads the port and writes replies to /dev/fuse. Two, so that neither direction waits
 * on the other (a request blocked on a full port must not stop the replies that would
 * drain it); threads, not processes, because under TCG every switch between address
 * spaces flushes the emulated TLB and the translated-code jump cache, which measured as
 * the main cost of this transport (bench/broker.py; perf on QEMU). The process is its
 * own session (the host's exec kills never reach it) and survives the host's
 * reconnects: while no broker is connected, writes to the port block and reads return
 * 0, and B waits and goes on with the next broker, dropping a reply the old one left
 * half-sent. It ends when the mount goes (read on /dev/fuse: ENODEV), at shutdown
 * (SIGTERM to everyone), or when either thread fails; then the mount fails with
 * ENOTCONN. */
#define _GNU_SOURCE
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <time.h>
#include <unistd.h>

/* The broker answers INIT with max_write 1 MiB; a read of /dev/fuse must have room for
 * in_header + write_in + max_write (the kernel refuses a smaller buffer with EINVAL). */
#define RELAY_MAX_WRITE (1u << 20)
#define RELAY_BUFFER (RELAY_MAX_WRITE + 8192u)
#define FUSE_IN_HEADER 40u
#define FUSE_OUT_HEADER 16u

static void nap_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* All of buf to the port; blocks while no broker is connected. false: the port is gone. */
static bool write_all(int fd, const uint8_t *buf, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return false;
        buf += w;
        n -= (size_t)w;
    }
    return true;
}

static void request_read_failed(void)
{
    if (errno != ENODEV) /* ENODEV: unmounted, the normal end */
        logmsg("fuse-console relay: read /dev/fuse: %s", strerror(errno));
    _exit(0);
}

/* ENOENT: the request was interrupted before we took it. */
static bool retry_request_read(void)
{
    return errno == EINTR || errno == ENOENT || errno == EAGAIN;
}

/* A: requests from /dev/fuse to the port, one whole request per read. */
static _Noreturn void requests_to_port(int fuse_fd, int port_fd)
{
    uint8_t *buf = xmalloc(RELAY_BUFFER);
    for (;;) {
        ssize_t n = read(fuse_fd, buf, RELAY_BUFFER);
        if (n < 0 && retry_request_read())
            continue;
        if (n < 0)
            request_read_failed();
        if ((size_t)n < FUSE_IN_HEADER || le32(buf) != (uint32_t)n) {
            logmsg("fuse-console relay: odd request of %zd bytes from /dev/fuse", n);
            continue;
        }
        if (!write_all(port_fd, buf, (size_t)n)) {
            logmsg("fuse-console relay: write to the port: %s", strerror(errno));
            _exit(1);
        }
    }
}

/* The mount's readahead knob, /sys/class/bdi/MAJ:MIN/read_ahead_kb, from mountinfo (a
 * stat() of the mount would wait on the broker); "" if not found. */
static void readahead_knob(const char *path, char *knob, size_t size)
{
    knob[0] = 0;
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f)
        return;
    char line[4096], point[4096], dev[32] = "";
    while (fgets(line, sizeof line, f)) {
        char got[32];
        if (sscanf(line, "%*s %*s %31s %*s %4095s", got, point) == 2 && strcmp(point, path) == 0)
            snprintf(dev, sizeof dev, "%s", got); /* the last one is ours */
    }
    fclose(f);
    if (dev[0])
        snprintf(knob, size, "/sys/class/bdi/%s/read_ahead_kb", dev);
}

/* Readahead up to max_read (1 MiB) instead of the kernel's 128 KiB: a sequential read then
 * costs one round trip per MiB, not eight, and a round trip over the port costs the guest
 * more than one over virtio-fs. Only once INIT is answered: the kernel lowers readahead
 * to INIT's max_readahead when the reply arrives. Best effort. */
static void widen_readahead(const char *knob)
{
    int fd = knob[0] ? open(knob, O_WRONLY | O_CLOEXEC) : -1;
    if (fd < 0)
        return;
    char value[16];
    int n = snprintf(value, sizeof value, "%u", RELAY_MAX_WRITE / 1024);
    if (write(fd, value, (size_t)n) != n)
        debugmsg("fuse-console: %s: %s", knob, strerror(errno));
    close(fd);
}

struct relay_fds {
    int fuse_fd, port_fd;
    char knob[96];
};

/* B: replies from the port to /dev/fuse, reassembled from the byte stream. */
static void *replies_to_fuse(void *arg)
{
    int fuse_fd = ((struct relay_fds *)arg)->fuse_fd;
    int port_fd = ((struct relay_fds *)arg)->port_fd;
    const char *knob = ((struct relay_fds *)arg)->knob;
    uint8_t *buf = xmalloc(RELAY_BUFFER);
    size_t have = 0;
    bool first_reply = true; /* INIT's: the first the kernel ever gets */
    for (;;) {
        ssize_t n = read(port_fd, buf + have, RELAY_BUFFER - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            logmsg("fuse-console relay: read the port: %s", strerror(errno));
            _exit(1);
        }
        if (n == 0) {
            /* No broker connected: what a broker left half-sent will never be finished,
             * and the next one starts at a message boundary. */
            have = 0;
            nap_ms(20);
            continue;
        }
        have += (size_t)n;
        size_t off = 0;
        while (have - off >= FUSE_OUT_HEADER) {
            uint32_t len = le32(buf + off);
            if (len < FUSE_OUT_HEADER || len > RELAY_BUFFER) {
                logmsg("fuse-console relay: reply length %u from the host: giving up", len);
                _exit(1);
            }
            if (have - off < len)
                break;
            /* ENOENT: the request was interrupted meanwhile; EINVAL: a reply the kernel
             * does not take. Neither stops the others. */
            if (write(fuse_fd, buf + off, len) < 0 && errno != ENOENT)
                debugmsg("fuse-console relay: write /dev/fuse: %s", strerror(errno));
            if (first_reply)
                widen_readahead(knob);
            first_reply = false;
            off += len;
        }
        memmove(buf, buf + off, have - off);
        have -= off;
    }
}

/* The relay pair, in a new session; returns in the agent only. */
static int start_relay(int fuse_fd, int port_fd, const char *knob, char *why, size_t whylen)
{
    pid_t a = fork();
    if (a < 0) {
        int err = errno;
        snprintf(why, whylen, "fork the fuse-console relay: %s", strerror(err));
        return err;
    }
    if (a > 0)
        return 0;
    setsid();
    /* Nothing of the agent's (its port, exec pipes) may stay open in the relay: a pipe
     * end held here would keep an exec's output from ever reaching EOF. */
    for (int fd = 3; fd < 1024; fd++)
        if (fd != fuse_fd && fd != port_fd && fd != g_log_fd)
            close(fd);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL); /* the agent blocks SIGCHLD for its signalfd */
    signal(SIGPIPE, SIG_IGN);
    /* Either thread ends the whole process (_exit is exit_group): half a relay would
     * only feed a dead end. */
    static struct relay_fds fds;
    fds.fuse_fd = fuse_fd;
    fds.port_fd = port_fd;
    snprintf(fds.knob, sizeof fds.knob, "%s", knob);
    pthread_t b;
    if (pthread_create(&b, NULL, replies_to_fuse, &fds) != 0)
        _exit(1);
    requests_to_port(fuse_fd, port_fd);
}

int fuse_console_mount(const struct mount_req *m, char *why, size_t whylen)
{
    int port_fd = open_virtio_port(m->source, O_RDWR | O_CLOEXEC | O_NOCTTY);
    if (port_fd < 0) {
        int err = errno == EBUSY ? EBUSY : ENODEV;
        snprintf(why, whylen, "%s: no free virtio-console port named %s", m->path, m->source);
        return err;
    }
    int fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fuse_fd < 0) {
        int err = errno;
        snprintf(why, whylen, "%s: open /dev/fuse: %s", m->path, strerror(err));
        close(port_fd);
        return err;
    }
    /* As a virtiofs mount: the guest kernel checks the modes and owners the broker shows
     * (default_permissions), anyone in the guest may use it (allow_other), and the broker
     * enforces read-only and containment on the host whatever the guest does. */
    char data[256];
    snprintf(data, sizeof data,
             "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions,"
             "max_read=%u",
             fuse_fd, RELAY_MAX_WRITE);
    unsigned long flags = m->readonly ? MS_RDONLY : 0;
    if (mount(m->source, m->path, "fuse", flags, data) < 0) {
        int err = errno;
        snprintf(why, whylen, "mount fuse %s on %s: %s", m->source, m->path, strerror(err));
        close(fuse_fd);
        close(port_fd);
        return err;
    }
    char knob[96];
    readahead_knob(m->path, knob, sizeof knob);
    int err = start_relay(fuse_fd, port_fd, knob, why, whylen);
    close(fuse_fd);
    close(port_fd);
    if (err) {
        umount2(m->path, MNT_DETACH);
        return err;
    }
    debugmsg("mounted fuse-console %s on %s%s", m->source, m->path,
             m->readonly ? " (read-only)" : "");
    return 0;
}
