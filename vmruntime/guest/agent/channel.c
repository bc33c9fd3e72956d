/* The channel table and the movement of bytes: child/file/socket output to STDOUT and
 * STDERR frames under the host's window, host STDIN bytes to the sink under ours, and
 * the single EXIT or ERROR that ends every channel. */
#define _GNU_SOURCE
#include "channel.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

/* After a tty exec exits its last output can still be on its way through the pty's
 * flip buffer; give it this long unless the master reports EIO (all slaves closed). */
#define TTY_DRAIN_MS 50
/* A parked exec's pipes are read at most this many times per loop turn, so a process
 * that writes without pause cannot starve the rest of the agent. */
#define PARKED_READS_PER_TURN 16
#define RECORD_HEADER 5 /* backlog record: u8 stream index, u32 length */

struct buf g_outq;
static struct channel *chans[MAX_CHANNELS];
static int nchans;

void send_error(uint32_t channel, int err, const char *fmt, ...)
{
    char msg[MAX_ERROR_MESSAGE];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    debugmsg("ERROR channel %u: %s (errno %d)", channel, msg, err);
    size_t f = frame_begin(&g_outq, MSG_ERROR, channel);
    field_u64(&g_outq, T_ERRNO, (uint64_t)err);
    field_str(&g_outq, T_MESSAGE, msg);
    frame_end(&g_outq, f);
}

void send_window(uint32_t channel, uint64_t bytes)
{
    size_t f = frame_begin(&g_outq, MSG_WINDOW, channel);
    field_u64(&g_outq, T_BYTES, bytes);
    frame_end(&g_outq, f);
}

uint64_t oom_kill_count(void)
{
    char text[8192];
    int fd = open("/proc/vmstat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return 0;
    text[n] = 0;
    char *p = strstr(text, "\noom_kill ");
    return p ? strtoull(p + 10, NULL, 10) : 0;
}

int chan_count(void)
{
    return nchans;
}

int chan_count_kind(enum chan_kind kind)
{
    int n = 0;
    for (int i = 0; i < nchans; i++)
        n += chans[i]->kind == kind && !chans[i]->closed;
    return n;
}

struct channel *chan_find(uint32_t id)
{
    for (int i = 0; i < nchans; i++)
        if (chans[i]->id == id && !chans[i]->closed && !chans[i]->parked)
            return chans[i];
    return NULL;
}

struct channel *chan_open(uint32_t id, enum chan_kind kind)
{
    if (nchans >= MAX_CHANNELS)
        return NULL;
    struct channel *ch = xmalloc(sizeof *ch);
    memset(ch, 0, sizeof *ch);
    ch->id = id;
    ch->kind = kind;
    ch->out_fd[0] = ch->out_fd[1] = ch->in_fd = -1;
    ch->send_window = WINDOW_SIZE;
    chans[nchans++] = ch;
    return ch;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* Release everything but the struct (freed by chan_sweep, as poll refs may point at it). */
static void chan_close(struct channel *ch)
{
    close_fd(&ch->out_fd[0]);
    close_fd(&ch->out_fd[1]);
    close_fd(&ch->in_fd);
    buf_free(&ch->inbuf);
    if (ch->tmp_path)
        unlink(ch->tmp_path);
    free(ch->tmp_path);
    free(ch->path);
    ch->tmp_path = ch->path = NULL;
    buf_free(&ch->backlog);
    ch->closed = true;
}

/* Return STDIN credit to the host, except for bytes an earlier connection sent (that
 * host is gone; the current one never counted them against its window). */
static void return_credit(struct channel *ch, uint64_t n)
{
    uint64_t old = n < ch->in_carry ? n : ch->in_carry;
    ch->in_carry -= old;
    if (n > old && !ch->parked)
        send_window(ch->id, n - old);
}

void chan_fail(struct channel *ch, int err, const char *fmt, ...)
{
    char msg[MAX_ERROR_MESSAGE];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    send_error(ch->id, err, "%s", msg);
    if (ch->kind == CH_EXEC && ch->running)
        kill(-ch->pid, SIGKILL);
    chan_close(ch);
}

static void send_exit_code(struct channel *ch, int code)
{
    size_t f = frame_begin(&g_outq, MSG_EXIT, ch->id);
    field_u64(&g_outq, T_CODE, (uint64_t)code);
    frame_end(&g_outq, f);
    chan_close(ch);
}

static void send_exec_exit(struct channel *ch)
{
    int st = ch->wstatus;
    size_t f = frame_begin(&g_outq, MSG_EXIT, ch->id);
    if (WIFSIGNALED(st)) {
        field_u64(&g_outq, T_SIGNAL, (uint64_t)WTERMSIG(st));
        if (WCOREDUMP(st))
            field_u64(&g_outq, T_CORE_DUMPED, 1);
        /* The OOM killer uses SIGKILL; its counter moving during the run tells it apart
         * from a SIGKILL someone else sent (a race with another OOM kill is possible). */
        if (WTERMSIG(st) == SIGKILL && !ch->timed_out && oom_kill_count() > ch->oom_base)
            field_u64(&g_outq, T_OOM_KILLED, 1);
    } else {
        field_u64(&g_outq, T_CODE, (uint64_t)WEXITSTATUS(st));
    }
    if (ch->timed_out)
        field_u64(&g_outq, T_TIMED_OUT, 1);
    frame_end(&g_outq, f);
    debugmsg("channel %u: exit status 0x%x", ch->id, st);
    chan_close(ch);
}

void chan_check_done(struct channel *ch)
{
    /* A parked exec's end waits for the host that adopts it; a backlog goes out first. */
    if (ch->closed || ch->parked || buf_pending(&ch->backlog))
        return;
    bool drained = ch->out_fd[0] < 0 && ch->out_fd[1] < 0;
    switch (ch->kind) {
    case CH_EXEC:
        if (!ch->running && drained)
            send_exec_exit(ch);
        break;
    case CH_FILE_READ:
    case CH_PORT:
        if (drained && !ch->connecting)
            send_exit_code(ch, 0);
        break;
    case CH_FILE_WRITE:
        break;
    }
}

/* A read found nothing: once an exec has exited, what is not in the pipe now was
 * written by orphans and is dropped (spec: Conversation 3). */
static void on_source_empty(struct channel *ch, int idx)
{
    if (ch->kind != CH_EXEC || ch->running)
        return;
    if (!ch->tty || now_ms() >= ch->reaped_ms + TTY_DRAIN_MS)
        close_fd(&ch->out_fd[idx]);
}

/* Drop the oldest records until the backlog holds at most PARKED_OUTPUT_MAX bytes. */
static void trim_backlog(struct channel *ch)
{
    while (ch->backlog_bytes > PARKED_OUTPUT_MAX) {
        const uint8_t *r = ch->backlog.data + ch->backlog.off;
        uint32_t n;
        memcpy(&n, r + 1, 4);
        buf_consume(&ch->backlog, RECORD_HEADER + n);
        ch->backlog_bytes -= n;
        ch->dropped += n;
    }
}

/* Parked: read whatever the process wrote into the backlog, whoever reads it later. */
static void pump_parked(struct channel *ch, int idx)
{
    for (int turn = 0; turn < PARKED_READS_PER_TURN && ch->out_fd[idx] >= 0; turn++) {
        buf_reserve(&ch->backlog, RECORD_HEADER + MAX_DATA);
        uint8_t *r = ch->backlog.data + ch->backlog.len;
        ssize_t n = read(ch->out_fd[idx], r + RECORD_HEADER, MAX_DATA);
        if (n > 0) {
            uint32_t len = (uint32_t)n;
            r[0] = (uint8_t)idx;
            memcpy(r + 1, &len, 4);
            ch->backlog.len += RECORD_HEADER + len;
            ch->backlog_bytes += len;
            trim_backlog(ch);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            on_source_empty(ch, idx);
            return;
        }
        close_fd(&ch->out_fd[idx]); /* EOF, or EIO from a pty master */
    }
}

/* Adopted: send the backlog's records as STDOUT/STDERR frames within the window. A
 * record larger than the window is split: its head is sent and the rest kept. */
static void pump_backlog(struct channel *ch)
{
    while (buf_pending(&ch->backlog) && ch->send_window > 0 &&
           buf_pending(&g_outq) < OUTQ_SOFT_LIMIT) {
        uint8_t *r = ch->backlog.data + ch->backlog.off;
        uint32_t len;
        memcpy(&len, r + 1, 4);
        uint32_t take = ch->send_window < len ? (uint32_t)ch->send_window : len;
        size_t f = frame_begin(&g_outq, r[0] == 0 ? MSG_STDOUT : MSG_STDERR, ch->id);
        /* frame_begin may move g_outq, never the backlog: r still points at the record */
        buf_append(&g_outq, r + RECORD_HEADER, take);
        frame_end(&g_outq, f);
        ch->send_window -= take;
        ch->backlog_bytes -= take;
        if (take == len) {
            buf_consume(&ch->backlog, RECORD_HEADER + len);
            continue;
        }
        /* Keep the tail as a shorter record, its header rewritten just before it. */
        uint8_t stream = r[0];
        uint32_t rest = len - take;
        buf_consume(&ch->backlog, take);
        r = ch->backlog.data + ch->backlog.off;
        r[0] = stream;
        memcpy(r + 1, &rest, 4);
    }
    if (!buf_pending(&ch->backlog))
        buf_free(&ch->backlog);
}

void chan_pump_out(struct channel *ch, int idx)
{
    uint8_t type = idx == 0 ? MSG_STDOUT : MSG_STDERR;
    if (ch->closed)
        return;
    if (ch->parked) {
        pump_parked(ch, idx);
        return;
    }
    if (buf_pending(&ch->backlog)) {
        pump_backlog(ch);
        if (buf_pending(&ch->backlog))
            return; /* live output only after all of the backlog */
    }
    while (!ch->closed && ch->out_fd[idx] >= 0 && ch->send_window > 0 &&
           buf_pending(&g_outq) < OUTQ_SOFT_LIMIT) {
        size_t want = ch->send_window < MAX_DATA ? (size_t)ch->send_window : MAX_DATA;
        buf_reserve(&g_outq, HEADER_SIZE + want);
        size_t f = frame_begin(&g_outq, type, ch->id);
        ssize_t n = read(ch->out_fd[idx], g_outq.data + g_outq.len, want);
        if (n > 0) {
            g_outq.len += (size_t)n;
            frame_end(&g_outq, f);
            ch->send_window -= (uint64_t)n;
            continue;
        }
        g_outq.len -= HEADER_SIZE; /* take the empty frame back */
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            on_source_empty(ch, idx);
            break;
        }
        if (n < 0 && errno != EIO && ch->kind != CH_EXEC) {
            chan_fail(ch, errno, "read: %s", strerror(errno));
            return;
        }
        /* EOF, or EIO from a pty master whose slaves are all closed */
        close_fd(&ch->out_fd[idx]);
    }
    chan_check_done(ch);
}

static void finish_file_write(struct channel *ch)
{
    int fd = ch->in_fd;
    ch->in_fd = -1;
    if (close(fd) < 0) {
        chan_fail(ch, errno, "write %s: %s", ch->path, strerror(errno));
        return;
    }
    if (rename(ch->tmp_path, ch->path) < 0) {
        chan_fail(ch, errno, "rename to %s: %s", ch->path, strerror(errno));
        return;
    }
    free(ch->tmp_path);
    ch->tmp_path = NULL;
    send_exit_code(ch, 0);
}

/* The host's STDIN_EOF has reached the sink. */
static void finish_input(struct channel *ch)
{
    switch (ch->kind) {
    case CH_FILE_WRITE:
        finish_file_write(ch);
        return;
    case CH_PORT:
        shutdown(ch->in_fd, SHUT_WR);
        break;
    case CH_EXEC:
        if (ch->tty) {
            /* A terminal has no EOF of its own: type the EOF character (canonical mode). */
            struct termios t;
            char eof = tcgetattr(ch->in_fd, &t) == 0 ? (char)t.c_cc[VEOF] : 4;
            if (write(ch->in_fd, &eof, 1) < 0) {
                /* nobody reads the terminal any more */
            }
        }
        break;
    default:
        break;
    }
    close_fd(&ch->in_fd);
}

static void input_broken(struct channel *ch)
{
    ch->in_broken = true;
    size_t pending = buf_pending(&ch->inbuf);
    if (pending)
        return_credit(ch, pending);
    ch->in_carry = 0;
    buf_free(&ch->inbuf);
    close_fd(&ch->in_fd);
}

void chan_pump_in(struct channel *ch)
{
    if (ch->connecting)
        return;
    while (!ch->closed && ch->in_fd >= 0 && buf_pending(&ch->inbuf) > 0) {
        ssize_t n = write(ch->in_fd, ch->inbuf.data + ch->inbuf.off, buf_pending(&ch->inbuf));
        if (n > 0) {
            buf_consume(&ch->inbuf, (size_t)n);
            return_credit(ch, (uint64_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (ch->kind == CH_FILE_WRITE) {
            chan_fail(ch, n < 0 ? errno : EIO, "write %s: %s", ch->path,
                      strerror(n < 0 ? errno : EIO));
            return;
        }
        input_broken(ch); /* the process closed its stdin, the peer reset: drop the rest */
    }
    if (!ch->closed && ch->in_eof && ch->in_fd >= 0 && buf_pending(&ch->inbuf) == 0)
        finish_input(ch);
}

void chan_finish_connect(struct channel *ch)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(ch->out_fd[0], SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err) {
        chan_fail(ch, err, "connect to 127.0.0.1: %s", strerror(err));
        return;
    }
    ch->connecting = false;
    size_t f = frame_begin(&g_outq, MSG_STARTED, ch->id);
    field_u64(&g_outq, T_PID, 0);
    frame_end(&g_outq, f);
    chan_pump_in(ch);
}

void chan_on_reaped(pid_t pid, int wstatus)
{
    for (int i = 0; i < nchans; i++) {
        struct channel *ch = chans[i];
        if (ch->closed || ch->kind != CH_EXEC || !ch->running || ch->pid != pid)
            continue;
        ch->running = false;
        ch->wstatus = wstatus;
        ch->reaped_ms = now_ms();
        ch->deadline_ms = 0;
        /* Nothing more can be fed to a dead process. */
        if (ch->in_fd >= 0 && !ch->tty)
            input_broken(ch);
        /* Collect what is already in the pipes now: poll would not say so if an orphan
         * keeps a pipe open and silent. */
        chan_pump_out(ch, 0);
        if (!ch->closed)
            chan_pump_out(ch, 1);
        return;
    }
}

/* An adopted exec whose backlog can move now (it has no fd to wake the loop). */
static bool backlog_ready(const struct channel *ch)
{
    return !ch->closed && !ch->parked && buf_pending(&ch->backlog) && ch->send_window > 0 &&
           buf_pending(&g_outq) < OUTQ_SOFT_LIMIT;
}

static int add_poll(struct pollfd *pfd, struct poll_ref *refs, int n, int max, int fd,
                    short events, struct channel *ch, int role)
{
    if (n >= max)
        return n;
    pfd[n] = (struct pollfd){.fd = fd, .events = events};
    refs[n] = (struct poll_ref){.ch = ch, .role = role};
    return n + 1;
}

int chan_poll_fds(struct pollfd *pfd, struct poll_ref *refs, int max)
{
    int n = 0;
    bool room = buf_pending(&g_outq) < OUTQ_SOFT_LIMIT;
    for (int i = 0; i < nchans; i++) {
        struct channel *ch = chans[i];
        if (ch->closed)
            continue;
        if (ch->connecting) {
            n = add_poll(pfd, refs, n, max, ch->out_fd[0], POLLOUT, ch, 2);
            continue;
        }
        if (ch->parked) {
            /* Nobody's window applies: the backlog takes everything, oldest dropped. */
            for (int idx = 0; idx < 2; idx++)
                if (ch->out_fd[idx] >= 0)
                    n = add_poll(pfd, refs, n, max, ch->out_fd[idx], POLLIN, ch, idx);
            if (ch->in_fd >= 0 && buf_pending(&ch->inbuf) > 0)
                n = add_poll(pfd, refs, n, max, ch->in_fd, POLLOUT, ch, 2);
            continue;
        }
        if (buf_pending(&ch->backlog)) {
            /* The backlog goes first (chan_timers sends it); the pipes wait. */
            if (ch->in_fd >= 0 && buf_pending(&ch->inbuf) > 0)
                n = add_poll(pfd, refs, n, max, ch->in_fd, POLLOUT, ch, 2);
            continue;
        }
        /* Only fds we want something from: a hung-up pipe reports POLLHUP whatever
         * events say, and we must not spin on it while its window is closed. */
        for (int idx = 0; idx < 2; idx++)
            if (ch->out_fd[idx] >= 0 && ch->send_window > 0 && room)
                n = add_poll(pfd, refs, n, max, ch->out_fd[idx], POLLIN, ch, idx);
        if (ch->in_fd >= 0 && buf_pending(&ch->inbuf) > 0)
            n = add_poll(pfd, refs, n, max, ch->in_fd, POLLOUT, ch, 2);
    }
    return n;
}

int chan_next_timeout(uint64_t now)
{
    uint64_t best = UINT64_MAX;
    for (int i = 0; i < nchans; i++) {
        struct channel *ch = chans[i];
        if (ch->closed)
            continue;
        if (ch->deadline_ms && ch->deadline_ms < best)
            best = ch->deadline_ms;
        if (backlog_ready(ch))
            best = now;
        if (ch->kind == CH_EXEC && !ch->running && ch->tty && ch->out_fd[0] >= 0 &&
            ch->reaped_ms + TTY_DRAIN_MS < best)
            best = ch->reaped_ms + TTY_DRAIN_MS;
    }
    if (best == UINT64_MAX)
        return -1;
    return best <= now ? 0 : (int)(best - now > 60000 ? 60000 : best - now);
}

void chan_timers(uint64_t now)
{
    for (int i = 0; i < nchans; i++) {
        struct channel *ch = chans[i];
        if (ch->closed || ch->kind != CH_EXEC)
            continue;
        if (backlog_ready(ch))
            chan_pump_out(ch, 0);
        if (ch->closed)
            continue;
        if (ch->running && ch->deadline_ms && now >= ch->deadline_ms) {
            debugmsg("channel %u: timeout, killing group %d", ch->id, ch->pid);
            ch->timed_out = true;
            ch->deadline_ms = 0;
            kill(-ch->pid, SIGKILL);
        }
        if (!ch->running && ch->tty && ch->out_fd[0] >= 0 && now >= ch->reaped_ms + TTY_DRAIN_MS)
            chan_pump_out(ch, 0);
    }
}

void chan_sweep(void)
{
    int j = 0;
    for (int i = 0; i < nchans; i++) {
        if (chans[i]->closed)
            free(chans[i]);
        else
            chans[j++] = chans[i];
    }
    nchans = j;
}

int chan_kill_all(bool with_detached, int sig, pid_t *pids, int max)
{
    int n = 0;
    for (int i = 0; i < nchans; i++) {
        struct channel *ch = chans[i];
        if (ch->closed || ch->kind != CH_EXEC || !ch->running ||
            (ch->detached && !with_detached))
            continue;
        kill(-ch->pid, sig);
        if (n < max)
            pids[n++] = ch->pid;
    }
    return n;
}

void chan_drop_all(bool with_parked)
{
    for (int i = 0; i < nchans; i++)
        if (!chans[i]->closed && (with_parked || !chans[i]->parked))
            chan_close(chans[i]);
    /* not swept here: the loop may still hold poll refs to them this turn */
}

void chan_park_detached(void)
{
    for (int i = 0; i < nchans; i++) {
        struct channel *ch = chans[i];
        if (ch->closed || ch->parked || !ch->detached)
            continue;
        debugmsg("channel %u: host gone, parking detached pid %d", ch->id, ch->pid);
        ch->parked = true;
        ch->id = 0;
        /* Bytes of the old host not yet written still go to the process; the next
         * host's window does not count them. */
        ch->in_carry = buf_pending(&ch->inbuf);
    }
}

int chan_count_detached(void)
{
    int n = 0;
    for (int i = 0; i < nchans; i++)
        n += chans[i]->detached && !chans[i]->closed;
    return n;
}

struct channel *chan_find_parked(pid_t pid, bool *busy)
{
    *busy = false;
    for (int i = 0; i < nchans; i++) {
        struct channel *ch = chans[i];
        if (ch->closed || !ch->detached || ch->pid != pid)
            continue;
        if (ch->parked)
            return ch;
        *busy = true;
    }
    return NULL;
}

void chan_adopt(struct channel *ch, uint32_t id)
{
    ch->id = id;
    ch->parked = false;
    ch->send_window = WINDOW_SIZE;
    debugmsg("channel %u: adopted pid %d (%llu bytes waiting, %llu dropped)", id, ch->pid,
             (unsigned long long)ch->backlog_bytes, (unsigned long long)ch->dropped);
    size_t f = frame_begin(&g_outq, MSG_STARTED, id);
    field_u64(&g_outq, T_PID, (uint64_t)ch->pid);
    field_u64(&g_outq, T_DROPPED, ch->dropped);
    frame_end(&g_outq, f);
    ch->dropped = 0;
    chan_pump_out(ch, 0);
    if (!ch->closed)
        chan_pump_out(ch, 1);
    chan_check_done(ch); /* an exited, drained exec ends at once */
}
