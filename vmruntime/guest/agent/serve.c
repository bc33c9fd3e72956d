/* The event loop: one poll over the host connection, SIGCHLD (signalfd) and every
 * channel's fds; frame splitting and dispatch; handshake; disconnect; shutdown. */
#define _GNU_SOURCE
#include "channel.h"
#include "request.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RECONNECT_POLL_MS 20
#define READ_CHUNK 65536

static struct {
    int fd;
    bool reconnecting; /* PID 1 (or --listen-fd): wait for the next host after a disconnect */
    int listen_fd;     /* --listen-fd: a listening socket whose connections are hosts; -1 */
    bool connected;
    bool hello;        /* handshake done */
    bool poisoned;     /* framing lost: ignore input until the host goes away */
    struct buf in;
} conn;

static int sigfd = -1;
static int writable_fd = -1;

void set_writable_mount_fd(int fd)
{
    writable_fd = fd;
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* ---- children ---- */

static void reap_children(void)
{
    struct signalfd_siginfo si;
    while (read(sigfd, &si, sizeof si) == sizeof si) {
    }
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
        chan_on_reaped(pid, st);
}

/* Reap until the given pids (or, with n < 0, all children) are gone or ms pass. */
static void wait_children(const pid_t *pids, int n, int ms)
{
    uint64_t deadline = now_ms() + (uint64_t)ms;
    int left = n;
    while (now_ms() < deadline) {
        if (n < 0) {
            while (waitpid(-1, NULL, WNOHANG) > 0) {
            }
            if (errno == ECHILD)
                return;
        } else {
            for (int i = 0; i < n; i++)
                if (pids[i] > 0 && waitpid(pids[i], NULL, WNOHANG) != 0) {
                    ((pid_t *)pids)[i] = 0;
                    left--;
                }
            if (left <= 0)
                return;
        }
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* ---- output ---- */

static void host_gone(void);

static void flush_output(void)
{
    while (conn.connected && buf_pending(&g_outq) > 0) {
        ssize_t n = write(conn.fd, g_outq.data + g_outq.off, buf_pending(&g_outq));
        if (n > 0) {
            buf_consume(&g_outq, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        host_gone();
        return;
    }
}

static void flush_blocking(int ms)
{
    uint64_t deadline = now_ms() + (uint64_t)ms;
    while (conn.connected && buf_pending(&g_outq) > 0 && now_ms() < deadline) {
        struct pollfd p = {.fd = conn.fd, .events = POLLOUT};
        poll(&p, 1, (int)(deadline - now_ms()));
        flush_output();
    }
}

/* ---- connection lifecycle ---- */

/* The host is gone (or replaced): its execs die, except detached ones, which are parked
 * for a later host to adopt unless no later host can come (keep_detached false). */
static void end_session(bool keep_detached)
{
    freeze_release(); /* first: a process blocked on the frozen layer cannot die */
    if (keep_detached)
        chan_park_detached();
    pid_t pids[MAX_CHANNELS];
    int n = chan_kill_all(!keep_detached, SIGKILL, pids, MAX_CHANNELS);
    chan_drop_all(!keep_detached);
    if (!g_pid1)
        wait_children(pids, n, 2000); /* the host test checks they are gone */
    conn.hello = false;
}

static void host_gone(void)
{
    debugmsg("host disconnected");
    end_session(conn.reconnecting);
    buf_free(&g_outq);
    buf_free(&conn.in);
    conn.poisoned = false;
    conn.connected = false;
    if (!conn.reconnecting)
        exit(0);
    if (conn.listen_fd >= 0) {
        close(conn.fd);
        conn.fd = -1;
    }
}

/* A virtio-console port polls POLLHUP while no host is connected; in --listen-fd test
 * mode the next host is the next connection on the listening socket. */
static void probe_connection(void)
{
    if (conn.listen_fd >= 0) {
        int fd = accept4(conn.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        conn.fd = fd;
    } else {
        struct pollfd p = {.fd = conn.fd, .events = POLLIN};
        if (poll(&p, 1, 0) == 1 && (p.revents & POLLHUP))
            return;
    }
    debugmsg("host connected");
    conn.connected = true;
}

/* ---- handshake and shutdown ---- */

static uint64_t uptime_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void handle_hello(const uint8_t *body, size_t len)
{
    struct field_iter it = {.p = body, .left = len};
    struct field f;
    uint64_t vmin = UINT64_MAX, vmax = 0, v;
    int got;
    while ((got = field_next(&it, &f)) > 0) {
        if ((f.tag != T_VERSION_MIN && f.tag != T_VERSION_MAX) || !field_as_u64(&f, &v)) {
            send_error(0, EINVAL, "HELLO: bad field %u", f.tag);
            return;
        }
        *(f.tag == T_VERSION_MIN ? &vmin : &vmax) = v;
    }
    if (got < 0) {
        send_error(0, EINVAL, "HELLO: truncated field");
        return;
    }
    if (vmin > PROTO_VERSION || vmax < PROTO_VERSION) {
        send_error(0, EPROTONOSUPPORT, "agent speaks protocol version %d only", PROTO_VERSION);
        return;
    }
    /* A HELLO on a live session means a new host whose arrival we did not see (a clone
     * restored from a memory snapshot still holds its original's session). Frames not
     * yet flushed were the old host's: to the new one they would be for channels it
     * never opened, ahead of its HELLO. */
    if (conn.hello) {
        end_session(true);
        buf_free(&g_outq);
    }
    struct utsname u;
    uname(&u);
    size_t fr = frame_begin(&g_outq, MSG_HELLO, 0);
    field_u64(&g_outq, T_VERSION, PROTO_VERSION);
    field_str(&g_outq, T_AGENT, AGENT_NAME);
    field_str(&g_outq, T_KERNEL, u.release);
    field_u64(&g_outq, T_UPTIME_MS, uptime_ms());
    frame_end(&g_outq, fr);
    conn.hello = true;
    debugmsg("handshake done");
}

static void remount_readonly(void)
{
    mounts_remount_readonly(); /* disks above the root first */
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0)
        debugmsg("remount / read-only: %s", strerror(errno));
    if (writable_fd < 0)
        return;
    syncfs(writable_fd);
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", writable_fd);
    if (mount(NULL, path, NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0)
        debugmsg("remount writable layer read-only: %s", strerror(errno));
}

static _Noreturn void handle_shutdown(void)
{
    debugmsg("shutdown");
    freeze_release(); /* processes blocked on it must end, and it must sync and remount */
    if (g_pid1) {
        kill(-1, SIGTERM); /* everyone but us */
        wait_children(NULL, -1, 1000);
        kill(-1, SIGKILL);
        wait_children(NULL, -1, 1000);
    } else {
        pid_t pids[MAX_CHANNELS];
        int n = chan_kill_all(true, SIGTERM, pids, MAX_CHANNELS);
        wait_children(pids, n, 1000);
        n = chan_kill_all(true, SIGKILL, pids, MAX_CHANNELS);
        wait_children(pids, n, 1000);
    }
    chan_drop_all(true);
    sync();
    if (g_pid1)
        remount_readonly();
    size_t fr = frame_begin(&g_outq, MSG_SHUTDOWN, 0);
    frame_end(&g_outq, fr);
    flush_blocking(2000);
    if (!g_pid1)
        exit(0);
    /* Let QEMU take the last buffers off the virtqueue before the reset. */
    struct timespec ts = {0, 100 * 1000 * 1000};
    nanosleep(&ts, NULL);
    power_off();
    _exit(1);
}

/* ---- dispatch ---- */

static void open_channel(uint8_t type, uint32_t id, const uint8_t *body, size_t len)
{
    if (id == 0 || chan_find(id)) {
        send_error(0, id ? EEXIST : EINVAL, "request type %u on channel %u: %s", type, id,
                   id ? "channel already open" : "channel 0 is the connection's");
        return;
    }
    if (chan_count() >= MAX_CHANNELS) {
        send_error(id, EMFILE, "too many open channels");
        return;
    }
    switch (type) {
    case MSG_EXEC:
        request_exec(id, body, len);
        break;
    case MSG_FILE_READ:
        request_file_read(id, body, len);
        break;
    case MSG_FILE_WRITE:
        request_file_write(id, body, len);
        break;
    case MSG_MOUNT:
        request_mount(id, body, len);
        break;
    case MSG_FREEZE:
        request_freeze(id, body, len);
        break;
    case MSG_THAW:
        request_thaw(id, len);
        break;
    case MSG_ADOPT:
        request_adopt(id, body, len);
        break;
    case MSG_IDENTITY:
        request_identity(id, body, len);
        break;
    default:
        request_port_connect(id, body, len);
        break;
    }
}

static void channel_frame(uint8_t type, uint32_t id, const uint8_t *body, size_t len)
{
    struct channel *ch = chan_find(id);
    if (!ch) {
        /* The channel ended (its EXIT may be in flight) or never was: nothing to act on. */
        debugmsg("type %u for channel %u, which is not open: ignored", type, id);
        return;
    }
    switch (type) {
    case MSG_STDIN:
        request_stdin(ch, body, len);
        break;
    case MSG_STDIN_EOF:
        request_stdin_eof(ch);
        break;
    case MSG_WINDOW:
        request_window(ch, body, len);
        break;
    case MSG_SIGNAL:
        request_signal(ch, body, len);
        break;
    case MSG_ABORT:
        request_abort(ch, len);
        break;
    default:
        request_resize(ch, body, len);
        break;
    }
}

static void dispatch(const uint8_t *h, const uint8_t *body, size_t len)
{
    uint8_t type = h[4];
    uint32_t id = get_u32(h + 8);
    if (h[5] || h[6] || h[7]) {
        send_error(0, EINVAL, "frame type %u on channel %u: nonzero flags/reserved", type, id);
        return;
    }
    if (!conn.hello && type != MSG_HELLO) {
        send_error(0, EPROTO, "frame type %u before HELLO", type);
        return;
    }
    switch (type) {
    case MSG_HELLO:
        if (id)
            send_error(0, EINVAL, "HELLO on channel %u", id);
        else
            handle_hello(body, len);
        break;
    case MSG_EXEC:
    case MSG_FILE_READ:
    case MSG_FILE_WRITE:
    case MSG_PORT_CONNECT:
    case MSG_MOUNT:
    case MSG_FREEZE:
    case MSG_THAW:
    case MSG_ADOPT:
    case MSG_IDENTITY:
        open_channel(type, id, body, len);
        break;
    case MSG_STDIN:
    case MSG_STDIN_EOF:
    case MSG_WINDOW:
    case MSG_SIGNAL:
    case MSG_RESIZE:
    case MSG_ABORT:
        channel_frame(type, id, body, len);
        break;
    case MSG_SHUTDOWN:
        handle_shutdown();
    case MSG_ERROR:
        debugmsg("host sent ERROR on channel %u", id);
        break;
    default:
        send_error(0, EINVAL, "frame type %u on channel %u: not a host request", type, id);
        break;
    }
}

/* Split buffered input into frames; a length beyond the limit loses the framing for good. */
static void process_input(void)
{
    while (!conn.poisoned && conn.connected && buf_pending(&conn.in) >= HEADER_SIZE) {
        const uint8_t *h = conn.in.data + conn.in.off;
        uint32_t len = get_u32(h);
        if (len > MAX_BODY) {
            send_error(0, EMSGSIZE, "frame length %u exceeds %u: framing lost", len, MAX_BODY);
            end_session(true);
            conn.poisoned = true;
            buf_free(&conn.in);
            return;
        }
        if (buf_pending(&conn.in) < HEADER_SIZE + (size_t)len)
            return;
        dispatch(h, h + HEADER_SIZE, len);
        if (!conn.connected) /* the dispatch may have lost the host */
            return;
        buf_consume(&conn.in, HEADER_SIZE + (size_t)len);
    }
}

static void read_host(void)
{
    buf_reserve(&conn.in, READ_CHUNK);
    ssize_t n = read(conn.fd, conn.in.data + conn.in.len, READ_CHUNK);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        host_gone();
        return;
    }
    if (conn.poisoned)
        return;
    conn.in.len += (size_t)n;
    process_input();
}

/* ---- the loop ---- */

static void setup_signals(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_BLOCK, &set, NULL);
    sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sigfd < 0)
        fatal("signalfd", errno);
    signal(SIGPIPE, SIG_IGN);
}

static struct pollfd pfds[2 + 3 * MAX_CHANNELS];
static struct poll_ref refs[2 + 3 * MAX_CHANNELS];

static void handle_channel_event(const struct poll_ref *r, short revents)
{
    struct channel *ch = r->ch;
    if (ch->closed || !revents)
        return;
    if (r->role < 2)
        chan_pump_out(ch, r->role);
    else if (ch->connecting)
        chan_finish_connect(ch);
    else
        chan_pump_in(ch);
}

static void loop_once(void)
{
    int n = 0;
    pfds[n++] = (struct pollfd){.fd = sigfd, .events = POLLIN};
    int conn_slot = -1;
    if (conn.connected) {
        short ev = buf_pending(&g_outq) < OUTQ_HARD_LIMIT ? POLLIN : 0;
        if (buf_pending(&g_outq))
            ev |= POLLOUT;
        conn_slot = n;
        pfds[n++] = (struct pollfd){.fd = conn.fd, .events = ev};
    }
    int first_chan = n;
    n += chan_poll_fds(pfds + n, refs + n, (int)(sizeof pfds / sizeof pfds[0]) - n);
    int timeout = chan_next_timeout(now_ms());
    int thaw_in = freeze_next_timeout(now_ms());
    if (thaw_in >= 0 && (timeout < 0 || thaw_in < timeout))
        timeout = thaw_in;
    if (!conn.connected && (timeout < 0 || timeout > RECONNECT_POLL_MS))
        timeout = RECONNECT_POLL_MS;
    if (poll(pfds, (nfds_t)n, timeout) < 0 && errno != EINTR)
        fatal("poll", errno);
    if (pfds[0].revents)
        reap_children();
    if (conn_slot >= 0 && (pfds[conn_slot].revents & POLLOUT))
        flush_output();
    if (conn_slot >= 0 && conn.connected && (pfds[conn_slot].revents & (POLLIN | POLLHUP | POLLERR)))
        read_host();
    for (int i = first_chan; i < n; i++)
        handle_channel_event(&refs[i], pfds[i].revents);
    chan_timers(now_ms());
    freeze_timers(now_ms());
    chan_sweep();
    if (conn.connected)
        flush_output();
    else
        buf_free(&g_outq); /* nobody to read it */
}

_Noreturn void serve(int fd, bool reconnecting)
{
    setup_signals();
    set_nonblock(fd);
    conn.fd = fd;
    conn.listen_fd = -1;
    conn.reconnecting = reconnecting;
    conn.connected = !reconnecting;
    debugmsg("serving on fd %d", fd);
    for (;;) {
        if (!conn.connected)
            probe_connection();
        loop_once();
    }
}

_Noreturn void serve_listening(int listen_fd)
{
    set_nonblock(listen_fd);
    conn.listen_fd = listen_fd;
    conn.fd = -1;
    conn.reconnecting = true;
    setup_signals();
    debugmsg("accepting hosts on fd %d", listen_fd);
    for (;;) {
        if (!conn.connected)
            probe_connection();
        loop_once();
    }
}
