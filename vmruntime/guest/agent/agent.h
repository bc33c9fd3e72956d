/* vmr-agent: PID 1 of every vmruntime microVM (spec: docs/agent-protocol.md).
 *
 * Files: agent.c (entry, logging, memory), boot.c (building the root),
 * wire.c (frames and fields), serve.c (the event loop and requests),
 * stream.c (moving bytes of a channel), exec.c (starting processes),
 * user.c (/etc/passwd and /etc/group), mount.c (shares and disks the host asks for),
 * fuserelay.c (a share's FUSE requests relayed over a virtio-console port),
 * freeze.c (holding the writable layer still for a snapshot), identity.c (a fresh
 * RNG seed, clock, hostname and machine-id for a clone restored from a memory snapshot).
 */
#ifndef VMR_AGENT_H
#define VMR_AGENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define AGENT_NAME "vmr-agent 1"
#define PROTO_VERSION 1
#define HEADER_SIZE 12
#define MAX_BODY (1u << 20)
#define WINDOW_SIZE 262144u
#define MAX_DATA 65536u
#define MAX_CHANNELS 1024
#define MAX_WINDOW_CREDIT (1ull << 32) /* a host granting more than this is confused */
/* Producers (child pipes, files, sockets) are not read while this much output waits
 * for the host, and host input is not read above the hard limit: memory stays bounded
 * even when the host stops reading. */
#define OUTQ_SOFT_LIMIT (4u << 20)
#define OUTQ_HARD_LIMIT (8u << 20)
#define MAX_ERROR_MESSAGE 1024
/* Detached execs outlive the host connection (parked until a later host ADOPTs them):
 * at most this many exist at once, each keeping at most PARKED_OUTPUT_MAX bytes of the
 * output nobody read (the oldest is dropped beyond it; the process never blocks). */
#define MAX_DETACHED 64
#define PARKED_OUTPUT_MAX (1u << 20)

enum msg_type {
    MSG_HELLO = 1, MSG_EXEC, MSG_STARTED, MSG_STDIN, MSG_STDOUT, MSG_STDERR,
    MSG_STDIN_EOF, MSG_WINDOW, MSG_SIGNAL, MSG_RESIZE, MSG_EXIT, MSG_ERROR,
    MSG_FILE_READ, MSG_FILE_WRITE, MSG_PORT_CONNECT, MSG_SHUTDOWN, MSG_MOUNT, MSG_ABORT,
    MSG_FREEZE, MSG_THAW, MSG_ADOPT, MSG_IDENTITY,
};

enum tag {
    T_VERSION_MIN = 1, T_VERSION_MAX, T_VERSION, T_AGENT, T_KERNEL, T_UPTIME_MS,
    T_ARG = 10, T_ENV, T_CWD, T_USER, T_TTY, T_ROWS, T_COLS, T_RLIMIT, T_TIMEOUT_MS,
    T_STDIN, T_PID, T_CODE, T_SIGNAL, T_CORE_DUMPED, T_TIMED_OUT, T_OOM_KILLED,
    T_ERRNO, T_MESSAGE, T_PATH, T_MODE, T_BYTES, T_GROUP, T_PORT,
    T_SOURCE, T_FSTYPE, T_READONLY, T_DETACHED, T_DROPPED, T_ENTROPY, T_TIME_NS,
    T_HOSTNAME, T_MACHINE_ID,
};

/* ---- agent.c ---- */
extern bool g_debug;
extern bool g_pid1;   /* running as the guest's init (not --serve-fd) */
extern int g_log_fd;  /* /dev/console in the guest, stderr in host test mode */
void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void debugmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
_Noreturn void fatal(const char *what, int err);
void *xmalloc(size_t n);
void *xrealloc(void *p, size_t n);
char *xstrndup(const char *s, size_t n);
uint64_t now_ms(void);
int set_nonblock(int fd);
void power_off(void);

/* ---- wire.c: a byte queue and frame building/parsing ---- */
struct buf {
    uint8_t *data;
    size_t off; /* consumed prefix */
    size_t len; /* end of valid bytes */
    size_t cap;
};
size_t buf_pending(const struct buf *b);
void buf_reserve(struct buf *b, size_t extra);
void buf_append(struct buf *b, const void *p, size_t n);
void buf_consume(struct buf *b, size_t n);
void buf_free(struct buf *b);

size_t frame_begin(struct buf *q, uint8_t type, uint32_t channel);
void frame_end(struct buf *q, size_t start);
void field_u64(struct buf *q, uint16_t tag, uint64_t v);
void field_bytes(struct buf *q, uint16_t tag, const void *p, size_t n);
void field_str(struct buf *q, uint16_t tag, const char *s);

struct field {
    uint16_t tag;
    uint32_t len;
    const uint8_t *val;
};
struct field_iter {
    const uint8_t *p;
    size_t left;
};
/* 1: got a field, 0: end of body, -1: truncated header or value */
int field_next(struct field_iter *it, struct field *f);
bool field_as_u64(const struct field *f, uint64_t *out);
/* A string value as a NUL-terminated copy; NULL if it contains a NUL byte. */
char *field_as_str(const struct field *f);

/* ---- user.c ---- */
struct creds {
    uid_t uid;
    gid_t gid;
    int ngroups;
    gid_t groups[64];
};
/* Resolve `name`, `uid`, `name:group`, `uid:gid`; returns 0 or an errno, with *why. */
int resolve_user(const char *spec, struct creds *out, const char **why);

/* ---- exec.c ---- */
struct exec_req {
    char **argv;
    int argc;
    char **envp;
    int envc;
    char *cwd;
    char *user;
    bool tty;
    bool stdin_open;
    bool detached;
    uint16_t rows, cols;
    uint64_t timeout_ms;
    int nrlimits;
    struct { uint64_t resource, soft, hard; } rlimits[32];
};
struct spawned {
    pid_t pid;
    int out_fd; /* stdout pipe or pty master */
    int err_fd; /* stderr pipe, -1 with a tty */
    int in_fd;  /* stdin pipe or a dup of the pty master, -1 without stdin */
};
/* 0 with *sp filled, or an errno and a message in why[] for an ERROR frame. */
int spawn_exec(const struct exec_req *req, struct spawned *sp, char *why, size_t whylen);

/* ---- mount.c ---- */
struct mount_req {
    char *source; /* virtiofs: the device's tag; ext4: the virtio-blk serial;
                   * fuse-console: the virtio-console port's name */
    char *fstype; /* "virtiofs", "ext4", "bind" or "fuse-console" */
    char *path;   /* absolute guest path, created (mkdir -p) if missing */
    bool readonly;
};
/* 0 once mounted, or an errno and a message in why[] for an ERROR frame. */
int mount_request(const struct mount_req *m, char *why, size_t whylen);
/* ---- fuserelay.c ---- */
/* A fuse-console share at m->path (which exists): mount, then fork its relay. */
int fuse_console_mount(const struct mount_req *m, char *why, size_t whylen);
/* At shutdown: sync and remount read-only every writable disk the host attached. */
void mounts_remount_readonly(void);

/* ---- freeze.c ---- */
/* fd: a directory on the filesystem FREEZE acts on (the writable layer); -1: none. */
void set_freeze_target(int fd);
bool freeze_active(void);
/* 0 once frozen (timeout_ms 0: until THAW or the host leaves), else an errno + why[]. */
int freeze_now(uint64_t timeout_ms, char *why, size_t whylen);
/* 0 once thawed; ETIMEDOUT if the timeout already thawed it; EINVAL if not frozen. */
int thaw_now(char *why, size_t whylen);
/* The host that froze is gone: thaw (silently) if frozen. */
void freeze_release(void);
int freeze_next_timeout(uint64_t now); /* ms until the freeze's timeout, -1: none */
void freeze_timers(uint64_t now);

/* ---- identity.c ---- */
struct identity_req {
    uint8_t *entropy;     /* NULL: not asked for */
    size_t entropy_len;   /* 32..4096 */
    bool has_time;
    uint64_t time_ns;     /* CLOCK_REALTIME, ns since the epoch */
    char *hostname;       /* NULL: not asked for */
    char *machine_id;     /* 32 lowercase hex digits; NULL: not asked for */
};
/* In host test mode: append what IDENTITY would apply to this file instead. */
void set_identity_log(const char *path);
/* 0 once everything asked for is applied, else an errno + why[] (the steps before the
 * failing one stay applied). */
int identity_apply(const struct identity_req *r, char *why, size_t whylen);

/* ---- serve.c ---- */
/* Serve connections on fd until it is gone (test mode) or forever (PID 1). */
_Noreturn void serve(int fd, bool reconnecting);
/* Host test mode --listen-fd: each connection accepted on listen_fd is a host in turn,
 * as hosts come and go on the guest's port (detached execs outlive them). */
_Noreturn void serve_listening(int listen_fd);
void set_writable_mount_fd(int fd);

/* ---- boot.c ---- */
/* Builds the root and returns the agent port's fd; never returns on failure. */
int boot(void);
/* Whole small file into buf (NUL-terminated, trailing whitespace removed); -1 if absent. */
ssize_t read_small(const char *path, char *buf, size_t size);
/* The virtio-console port named `name` (its sysfs name), opened with `flags`; -1 if none. */
int open_virtio_port(const char *name, int flags);

#endif
