/* Channels: one per EXEC / FILE_READ / FILE_WRITE / PORT_CONNECT of the connection, and
 * the parked detached execs that a host connection left behind (id 0, no frames sent). */
#ifndef VMR_CHANNEL_H
#define VMR_CHANNEL_H

#include "agent.h"

#include <poll.h>

enum chan_kind { CH_EXEC, CH_FILE_READ, CH_FILE_WRITE, CH_PORT };

struct channel {
    uint32_t id;
    enum chan_kind kind;
    bool closed;          /* ended (EXIT or ERROR sent); freed at the end of the loop turn */
    pid_t pid;            /* exec: the session leader */
    bool running;         /* exec: not reaped yet */
    int wstatus;
    uint64_t reaped_ms;
    bool tty;
    int out_fd[2];        /* sources of STDOUT and STDERR frames; -1 once drained */
    int in_fd;            /* sink of STDIN frames; -1 when none or finished */
    struct buf inbuf;     /* host bytes not yet written: never more than WINDOW_SIZE */
    bool has_stdin;       /* the channel takes STDIN frames at all */
    bool in_eof;          /* STDIN_EOF arrived */
    bool in_broken;       /* the sink is gone: STDIN is acknowledged and dropped */
    uint64_t send_window; /* data bytes we may still send */
    uint64_t deadline_ms; /* exec TIMEOUT_MS; 0: none */
    bool timed_out;
    uint64_t oom_base;    /* /proc/vmstat oom_kill when the exec started */
    bool connecting;      /* port: connect() in progress */
    char *path, *tmp_path;
    /* Detached execs (EXEC DETACHED 1) outlive the connection: when it ends the channel
     * is parked instead of killed, and its output goes to backlog (records of u8 stream
     * index, u32 length, bytes; at most PARKED_OUTPUT_MAX data bytes, oldest dropped)
     * until a later host ADOPTs it and the backlog is sent before any live output. */
    bool detached;
    bool parked;
    struct buf backlog;
    uint64_t backlog_bytes;  /* data bytes in backlog */
    uint64_t dropped;        /* data bytes dropped from backlog since the last adoption */
    uint64_t in_carry;       /* inbuf bytes from an earlier connection: no WINDOW for them */
};

/* A poll entry's owner: role 0/1 = out_fd[role], 2 = in_fd (or the connecting socket). */
struct poll_ref {
    struct channel *ch;
    int role;
};

extern struct buf g_outq; /* frames waiting for the host */

void send_error(uint32_t channel, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void send_window(uint32_t channel, uint64_t bytes);

int chan_count(void);
int chan_count_kind(enum chan_kind kind);
struct channel *chan_find(uint32_t id);
struct channel *chan_open(uint32_t id, enum chan_kind kind);
void chan_fail(struct channel *ch, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void chan_check_done(struct channel *ch);
void chan_pump_out(struct channel *ch, int idx);
void chan_pump_in(struct channel *ch);
void chan_finish_connect(struct channel *ch);
void chan_on_reaped(pid_t pid, int wstatus);
int chan_poll_fds(struct pollfd *pfd, struct poll_ref *refs, int max);
int chan_next_timeout(uint64_t now);
void chan_timers(uint64_t now);
void chan_sweep(void);
/* Kill every exec's process group with sig, detached and parked ones too if
 * with_detached; returns how many pids were written to pids. */
int chan_kill_all(bool with_detached, int sig, pid_t *pids, int max);
/* The host is gone: detached execs are parked, every other channel is closed silently
 * (after chan_kill_all killed their processes). */
void chan_park_detached(void);
void chan_drop_all(bool with_parked);
int chan_count_detached(void);
/* A parked exec with this pid (the oldest if an exited one's pid was reused), or NULL;
 * *busy is set if a detached exec with this pid is open on the current connection. */
struct channel *chan_find_parked(pid_t pid, bool *busy);
/* Attach a parked exec to the channel id of the current connection: STARTED (PID,
 * DROPPED), then its backlog, live output and EXIT as for a new exec. */
void chan_adopt(struct channel *ch, uint32_t id);
uint64_t oom_kill_count(void);

#endif
