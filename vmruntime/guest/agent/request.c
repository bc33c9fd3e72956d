/* Host requests: opening channels (EXEC, FILE_READ, FILE_WRITE, PORT_CONNECT), MOUNT,
 * and the frames that act on an open channel (STDIN, STDIN_EOF, WINDOW, SIGNAL, RESIZE,
 * ABORT).
 * Every field is checked here; a bad opening request is answered with ERROR on its own id. */
#define _GNU_SOURCE
#include "channel.h"
#include "request.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

/* Field-list walking with the checks every request shares. why[] gets the reason. */
struct parse {
    struct field_iter it;
    uint64_t seen; /* bit per single-valued tag already present */
    char why[256];
};

static void parse_init(struct parse *p, const uint8_t *body, size_t len)
{
    p->it = (struct field_iter){.p = body, .left = len};
    p->seen = 0;
    p->why[0] = 0;
}

/* 1: next field in *f, 0: end, -1: error (why set). */
static int parse_next(struct parse *p, struct field *f)
{
    int r = field_next(&p->it, f);
    if (r < 0)
        snprintf(p->why, sizeof p->why, "truncated field");
    return r;
}

static bool once(struct parse *p, const struct field *f)
{
    uint64_t bit = 1ull << (f->tag & 63);
    if (p->seen & bit) {
        snprintf(p->why, sizeof p->why, "field %u repeated", f->tag);
        return false;
    }
    p->seen |= bit;
    return true;
}

static bool get_u64(struct parse *p, const struct field *f, uint64_t max, uint64_t *out)
{
    if (!once(p, f))
        return false;
    if (!field_as_u64(f, out) || *out > max) {
        snprintf(p->why, sizeof p->why, "field %u: not a u64 at most %llu", f->tag,
                 (unsigned long long)max);
        return false;
    }
    return true;
}

static char *get_str(struct parse *p, const struct field *f, bool single)
{
    if (single && !once(p, f))
        return NULL;
    char *s = field_as_str(f);
    if (!s)
        snprintf(p->why, sizeof p->why, "field %u contains a NUL byte", f->tag);
    return s;
}

static bool unknown_tag(struct parse *p, const struct field *f)
{
    snprintf(p->why, sizeof p->why, "unknown field tag %u", f->tag);
    return false;
}

/* ---- EXEC ---- */

static void push_str(char ***arr, int *n, char *s)
{
    *arr = xrealloc(*arr, sizeof(char *) * (size_t)(*n + 2));
    (*arr)[(*n)++] = s;
    (*arr)[*n] = NULL;
}

static void free_exec(struct exec_req *r)
{
    for (int i = 0; i < r->argc; i++)
        free(r->argv[i]);
    for (int i = 0; i < r->envc; i++)
        free(r->envp[i]);
    free(r->argv);
    free(r->envp);
    free(r->cwd);
    free(r->user);
}

static bool exec_field(struct parse *p, const struct field *f, struct exec_req *r)
{
    uint64_t v;
    char *s;
    switch (f->tag) {
    case T_ARG:
    case T_ENV:
        if (!(s = get_str(p, f, false)))
            return false;
        if (f->tag == T_ARG)
            push_str(&r->argv, &r->argc, s);
        else
            push_str(&r->envp, &r->envc, s);
        return true;
    case T_CWD:
        if (!(s = get_str(p, f, true)))
            return false;
        free(r->cwd);
        r->cwd = s;
        return true;
    case T_USER:
        return (r->user = get_str(p, f, true)) != NULL;
    case T_TTY:
    case T_STDIN:
    case T_DETACHED:
        if (!get_u64(p, f, 1, &v))
            return false;
        *(f->tag == T_TTY ? &r->tty : f->tag == T_STDIN ? &r->stdin_open : &r->detached) = v;
        return true;
    case T_ROWS:
    case T_COLS:
        if (!get_u64(p, f, 65535, &v))
            return false;
        *(f->tag == T_ROWS ? &r->rows : &r->cols) = (uint16_t)v;
        return true;
    case T_TIMEOUT_MS:
        return get_u64(p, f, UINT64_MAX, &r->timeout_ms);
    case T_RLIMIT: {
        uint64_t res = 0;
        if (f->len != 24 || r->nrlimits >= 32) {
            snprintf(p->why, sizeof p->why, "RLIMIT: 24 bytes each, at most 32");
            return false;
        }
        for (int i = 7; i >= 0; i--)
            res = (res << 8) | f->val[i];
        if (res >= RLIM_NLIMITS) {
            snprintf(p->why, sizeof p->why, "RLIMIT: unknown resource %llu",
                     (unsigned long long)res);
            return false;
        }
        struct field part = {.len = 8};
        r->rlimits[r->nrlimits].resource = res;
        part.val = f->val + 8;
        field_as_u64(&part, &r->rlimits[r->nrlimits].soft);
        part.val = f->val + 16;
        field_as_u64(&part, &r->rlimits[r->nrlimits].hard);
        r->nrlimits++;
        return true;
    }
    default:
        return unknown_tag(p, f);
    }
}

static bool parse_exec(const uint8_t *body, size_t len, struct exec_req *r, struct parse *p)
{
    struct field f;
    int got;
    parse_init(p, body, len);
    while ((got = parse_next(p, &f)) > 0)
        if (!exec_field(p, &f, r))
            return false;
    if (got < 0)
        return false;
    if (r->argc == 0) {
        snprintf(p->why, sizeof p->why, "EXEC needs at least one ARG");
        return false;
    }
    if (!r->cwd)
        r->cwd = xstrndup("/", 1);
    if (!r->envp) { /* an empty environment is still a NULL-terminated array */
        r->envp = xmalloc(sizeof(char *));
        r->envp[0] = NULL;
    }
    return true;
}

void request_exec(uint32_t id, const uint8_t *body, size_t len)
{
    struct exec_req r;
    struct parse p;
    memset(&r, 0, sizeof r);
    if (!parse_exec(body, len, &r, &p)) {
        send_error(id, EINVAL, "EXEC: %s", p.why);
        free_exec(&r);
        return;
    }
    if (r.detached && chan_count_detached() >= MAX_DETACHED) {
        send_error(id, EMFILE, "EXEC: at most %d detached execs at once", MAX_DETACHED);
        free_exec(&r);
        return;
    }
    struct channel *ch = chan_open(id, CH_EXEC);
    if (!ch) {
        send_error(id, EMFILE, "too many open channels");
        free_exec(&r);
        return;
    }
    ch->detached = r.detached;
    ch->oom_base = oom_kill_count();
    struct spawned sp;
    char why[MAX_ERROR_MESSAGE];
    int err = spawn_exec(&r, &sp, why, sizeof why);
    if (err) {
        chan_fail(ch, err, "%s", why);
    } else {
        ch->pid = sp.pid;
        ch->running = true;
        ch->tty = r.tty;
        ch->out_fd[0] = sp.out_fd;
        ch->out_fd[1] = sp.err_fd;
        ch->in_fd = sp.in_fd;
        ch->has_stdin = r.stdin_open;
        if (r.timeout_ms) {
            uint64_t now = now_ms();
            ch->deadline_ms = r.timeout_ms > UINT64_MAX - now ? UINT64_MAX : now + r.timeout_ms;
        }
        debugmsg("channel %u: started %s as pid %d", id, r.argv[0], sp.pid);
        size_t fr = frame_begin(&g_outq, MSG_STARTED, id);
        field_u64(&g_outq, T_PID, (uint64_t)sp.pid);
        frame_end(&g_outq, fr);
    }
    free_exec(&r);
}

/* ---- FILE_READ / FILE_WRITE ---- */

/* PATH (required, absolute) and MODE (optional, only when allowed). */
static bool parse_path(const uint8_t *body, size_t len, bool mode_allowed, char **path,
                       uint64_t *mode, struct parse *p)
{
    struct field f;
    int got;
    parse_init(p, body, len);
    while ((got = parse_next(p, &f)) > 0) {
        if (f.tag == T_PATH) {
            if (!(*path = get_str(p, &f, true)))
                return false;
        } else if (f.tag == T_MODE && mode_allowed) {
            if (!get_u64(p, &f, 07777, mode))
                return false;
        } else {
            return unknown_tag(p, &f);
        }
    }
    if (got < 0)
        return false;
    if (!*path || (*path)[0] != '/') {
        snprintf(p->why, sizeof p->why, "PATH missing or not absolute");
        return false;
    }
    return true;
}

void request_file_read(uint32_t id, const uint8_t *body, size_t len)
{
    char *path = NULL;
    struct parse p;
    if (!parse_path(body, len, false, &path, NULL, &p)) {
        send_error(id, EINVAL, "FILE_READ: %s", p.why);
        free(path);
        return;
    }
    /* O_NONBLOCK: a FIFO planted at the path must not hang the agent on open. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    struct stat st;
    int err = fd < 0 ? errno : fstat(fd, &st) < 0 ? errno : 0;
    if (!err && !S_ISREG(st.st_mode))
        err = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
    if (err) {
        send_error(id, err, "%s: %s", path, err == EINVAL ? "not a regular file" : strerror(err));
        if (fd >= 0)
            close(fd);
        free(path);
        return;
    }
    struct channel *ch = chan_open(id, CH_FILE_READ);
    if (!ch) {
        send_error(id, EMFILE, "too many open channels");
        close(fd);
        free(path);
        return;
    }
    ch->out_fd[0] = fd;
    ch->path = path;
}

void request_file_write(uint32_t id, const uint8_t *body, size_t len)
{
    char *path = NULL;
    uint64_t mode = UINT64_MAX;
    struct parse p;
    if (!parse_path(body, len, true, &path, &mode, &p)) {
        send_error(id, EINVAL, "FILE_WRITE: %s", p.why);
        free(path);
        return;
    }
    if (freeze_active()) {
        /* Its temporary file would block the agent on the frozen filesystem. */
        send_error(id, EBUSY, "FILE_WRITE %s: the writable layer is frozen", path);
        free(path);
        return;
    }
    struct channel *ch = chan_open(id, CH_FILE_WRITE);
    if (!ch) {
        send_error(id, EMFILE, "too many open channels");
        free(path);
        return;
    }
    ch->path = path;
    char *copy = xstrndup(path, strlen(path));
    size_t tlen = strlen(path) + 32;
    ch->tmp_path = xmalloc(tlen);
    snprintf(ch->tmp_path, tlen, "%s/.vmr-write-XXXXXX", dirname(copy));
    free(copy);
    int fd = mkostemp(ch->tmp_path, O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        free(ch->tmp_path);
        ch->tmp_path = NULL; /* nothing was created */
        chan_fail(ch, err, "%s: %s", path, strerror(err));
        return;
    }
    /* Replacing a file keeps its owner and (unless MODE says otherwise) its mode. */
    struct stat old;
    bool exists = stat(path, &old) == 0 && S_ISREG(old.st_mode);
    if (exists && fchown(fd, old.st_uid, old.st_gid) < 0) {
        /* best effort: the new file stays root's */
    }
    mode_t m = mode != UINT64_MAX ? (mode_t)mode : exists ? old.st_mode & 07777 : 0644;
    fchmod(fd, m);
    ch->in_fd = fd;
    ch->has_stdin = true;
}

/* ---- PORT_CONNECT ---- */

void request_port_connect(uint32_t id, const uint8_t *body, size_t len)
{
    struct parse p;
    struct field f;
    uint64_t port = 0;
    int got;
    parse_init(&p, body, len);
    while ((got = parse_next(&p, &f)) > 0)
        if (f.tag != T_PORT ? !unknown_tag(&p, &f) : !get_u64(&p, &f, 65535, &port))
            break;
    if (got != 0 || port == 0) {
        send_error(id, EINVAL, "PORT_CONNECT: %s", p.why[0] ? p.why : "PORT missing or 0");
        return;
    }
    struct channel *ch = chan_open(id, CH_PORT);
    if (!ch) {
        send_error(id, EMFILE, "too many open channels");
        return;
    }
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0) {
        chan_fail(ch, errno, "socket: %s", strerror(errno));
        return;
    }
    ch->out_fd[0] = s;
    ch->in_fd = fcntl(s, F_DUPFD_CLOEXEC, 3);
    ch->has_stdin = true;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int err = connect(s, (struct sockaddr *)&sa, sizeof sa) < 0 ? errno : 0;
    if (err && err != EINPROGRESS) {
        chan_fail(ch, err, "connect to 127.0.0.1:%u: %s", (unsigned)port, strerror(err));
        return;
    }
    ch->connecting = true;
    if (!err)
        chan_finish_connect(ch);
}

/* ---- MOUNT ---- */

static bool mount_field(struct parse *p, const struct field *f, struct mount_req *m)
{
    char **slot = f->tag == T_SOURCE ? &m->source
                  : f->tag == T_FSTYPE ? &m->fstype
                  : f->tag == T_PATH   ? &m->path
                                       : NULL;
    if (slot) {
        char *s = get_str(p, f, true);
        if (!s)
            return false;
        *slot = s;
        return true;
    }
    if (f->tag == T_READONLY) {
        uint64_t v;
        if (!get_u64(p, f, 1, &v))
            return false;
        m->readonly = v;
        return true;
    }
    return unknown_tag(p, f);
}

/* SOURCE, FSTYPE and PATH are required; READONLY defaults to 0. */
static bool parse_mount(const uint8_t *body, size_t len, struct mount_req *m, struct parse *p)
{
    struct field f;
    int got;
    parse_init(p, body, len);
    while ((got = parse_next(p, &f)) > 0)
        if (!mount_field(p, &f, m))
            return false;
    if (got < 0)
        return false;
    if (!m->source || !m->fstype || !m->path) {
        snprintf(p->why, sizeof p->why, "SOURCE, FSTYPE and PATH are required");
        return false;
    }
    bool bind = strcmp(m->fstype, "bind") == 0;
    if (strcmp(m->fstype, "virtiofs") != 0 && strcmp(m->fstype, "ext4") != 0 && !bind &&
        strcmp(m->fstype, "fuse-console") != 0) {
        snprintf(p->why, sizeof p->why, "FSTYPE %.64s: want virtiofs, ext4, bind or fuse-console",
                 m->fstype);
        return false;
    }
    if (bind && m->source[0] != '/') {
        snprintf(p->why, sizeof p->why, "SOURCE: a bind mount wants an absolute path");
        return false;
    }
    /* A virtiofs tag is at most 36 bytes, a virtio-blk serial at most 20, a port name
     * of ours (org.vmruntime.fs.N) fewer. */
    if (!bind && (!m->source[0] || strlen(m->source) > 36 || strchr(m->source, '/'))) {
        snprintf(p->why, sizeof p->why, "SOURCE: want a device tag, serial or port name");
        return false;
    }
    if (m->path[0] != '/') {
        snprintf(p->why, sizeof p->why, "PATH missing or not absolute");
        return false;
    }
    return true;
}

void request_mount(uint32_t id, const uint8_t *body, size_t len)
{
    struct mount_req m = {0};
    struct parse p;
    char why[MAX_ERROR_MESSAGE];
    if (!parse_mount(body, len, &m, &p)) {
        send_error(id, EINVAL, "MOUNT: %s", p.why);
    } else if (freeze_active()) {
        send_error(id, EBUSY, "MOUNT %s: the writable layer is frozen", m.path);
    } else {
        int err = mount_request(&m, why, sizeof why);
        if (err) {
            send_error(id, err, "%s", why);
        } else {
            size_t fr = frame_begin(&g_outq, MSG_EXIT, id);
            field_u64(&g_outq, T_CODE, 0);
            frame_end(&g_outq, fr);
        }
    }
    free(m.source);
    free(m.fstype);
    free(m.path);
}

/* ---- FREEZE / THAW ---- */

static void send_exit_zero(uint32_t id)
{
    size_t fr = frame_begin(&g_outq, MSG_EXIT, id);
    field_u64(&g_outq, T_CODE, 0);
    frame_end(&g_outq, fr);
}

/* TIMEOUT_MS is optional (0 or absent: until THAW or the host leaves). */
void request_freeze(uint32_t id, const uint8_t *body, size_t len)
{
    struct parse p;
    struct field f;
    uint64_t timeout_ms = 0;
    int got;
    parse_init(&p, body, len);
    while ((got = parse_next(&p, &f)) > 0) {
        bool ok = f.tag == T_TIMEOUT_MS ? get_u64(&p, &f, 24ull * 3600 * 1000, &timeout_ms)
                                        : unknown_tag(&p, &f);
        if (!ok)
            break;
    }
    if (got != 0) {
        send_error(id, EINVAL, "FREEZE: %s", p.why);
        return;
    }
    char why[MAX_ERROR_MESSAGE];
    int err = freeze_now(timeout_ms, why, sizeof why);
    if (err)
        send_error(id, err, "%s", why);
    else
        send_exit_zero(id);
}

void request_thaw(uint32_t id, size_t len)
{
    if (len) {
        send_error(id, EINVAL, "THAW: the body must be empty");
        return;
    }
    char why[MAX_ERROR_MESSAGE];
    int err = thaw_now(why, sizeof why);
    if (err)
        send_error(id, err, "%s", why);
    else
        send_exit_zero(id);
}

/* ---- ADOPT ---- */

static bool parse_u64s(const uint8_t *body, size_t len, const uint16_t *tags,
                       const uint64_t *max, uint64_t *out, int n, struct parse *p);

void request_adopt(uint32_t id, const uint8_t *body, size_t len)
{
    static const uint16_t tags[] = {T_PID};
    static const uint64_t max[] = {INT32_MAX};
    uint64_t pid = 0;
    struct parse p;
    if (!parse_u64s(body, len, tags, max, &pid, 1, &p) || pid == 0) {
        send_error(id, EINVAL, "ADOPT: %s", p.why[0] ? p.why : "PID missing or 0");
        return;
    }
    bool busy;
    struct channel *ch = chan_find_parked((pid_t)pid, &busy);
    if (!ch) {
        if (busy)
            send_error(id, EBUSY, "ADOPT: pid %llu is attached to this connection already",
                       (unsigned long long)pid);
        else
            send_error(id, ESRCH, "ADOPT: no parked detached exec has pid %llu",
                       (unsigned long long)pid);
        return;
    }
    chan_adopt(ch, id);
}

/* ---- IDENTITY ---- */

static bool lower_hex(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    return s[n] == 0;
}

static bool identity_field(struct parse *p, const struct field *f, struct identity_req *r)
{
    switch (f->tag) {
    case T_ENTROPY:
        if (!once(p, f))
            return false;
        if (f->len < 32 || f->len > 4096) {
            snprintf(p->why, sizeof p->why, "ENTROPY: %u bytes, want 32 to 4096", f->len);
            return false;
        }
        r->entropy = xmalloc(f->len);
        memcpy(r->entropy, f->val, f->len);
        r->entropy_len = f->len;
        return true;
    case T_TIME_NS:
        r->has_time = true;
        return get_u64(p, f, INT64_MAX, &r->time_ns);
    case T_HOSTNAME:
        if (!(r->hostname = get_str(p, f, true)))
            return false;
        /* HOST_NAME_MAX is 64; a name with a '/' would also make a bad /etc/hostname */
        if (!r->hostname[0] || strlen(r->hostname) > 64 || strpbrk(r->hostname, "/\n")) {
            snprintf(p->why, sizeof p->why, "HOSTNAME: want 1 to 64 bytes, no '/' or newline");
            return false;
        }
        return true;
    case T_MACHINE_ID:
        if (!(r->machine_id = get_str(p, f, true)))
            return false;
        if (f->len != 32 || !lower_hex(r->machine_id, 32)) {
            snprintf(p->why, sizeof p->why, "MACHINE_ID: want 32 lowercase hex digits");
            return false;
        }
        return true;
    default:
        return unknown_tag(p, f);
    }
}

static void free_identity(struct identity_req *r)
{
    if (r->entropy)
        memset(r->entropy, 0, r->entropy_len); /* seed material: do not leave it about */
    free(r->entropy);
    free(r->hostname);
    free(r->machine_id);
}

void request_identity(uint32_t id, const uint8_t *body, size_t len)
{
    struct identity_req r = {0};
    struct parse p;
    struct field f;
    int got;
    char why[MAX_ERROR_MESSAGE];
    parse_init(&p, body, len);
    while ((got = parse_next(&p, &f)) > 0)
        if (!identity_field(&p, &f, &r))
            break;
    if (got != 0) {
        send_error(id, EINVAL, "IDENTITY: %s", p.why);
    } else if (freeze_active() && (r.hostname || r.machine_id)) {
        /* /etc/hostname and /etc/machine-id live on the frozen layer: writing blocks */
        send_error(id, EBUSY, "IDENTITY: the writable layer is frozen");
    } else {
        int err = identity_apply(&r, why, sizeof why);
        if (err)
            send_error(id, err, "%s", why);
        else
            send_exit_zero(id);
    }
    free_identity(&r);
}

/* ---- frames on an open channel ---- */

void request_stdin(struct channel *ch, const uint8_t *data, size_t len)
{
    if (!ch->has_stdin || ch->in_eof) {
        send_error(0, EINVAL, "STDIN on channel %u, which %s", ch->id,
                   ch->in_eof ? "had STDIN_EOF" : "takes no stdin");
        return;
    }
    if (ch->in_broken) {
        if (len)
            send_window(ch->id, len);
        return;
    }
    /* Bytes an earlier host sent (ch->in_carry) do not count against this host's window. */
    if (buf_pending(&ch->inbuf) - ch->in_carry + len > WINDOW_SIZE) {
        send_error(0, EOVERFLOW, "STDIN on channel %u overruns its window; dropped", ch->id);
        return;
    }
    buf_append(&ch->inbuf, data, len);
    chan_pump_in(ch);
}

void request_stdin_eof(struct channel *ch)
{
    if (!ch->has_stdin || ch->in_eof)
        return;
    ch->in_eof = true;
    chan_pump_in(ch);
}

/* Parse a body of exactly the given single u64 fields (missing ones keep *out). */
static bool parse_u64s(const uint8_t *body, size_t len, const uint16_t *tags,
                       const uint64_t *max, uint64_t *out, int n, struct parse *p)
{
    struct field f;
    int got;
    parse_init(p, body, len);
    while ((got = parse_next(p, &f)) > 0) {
        int i = 0;
        while (i < n && tags[i] != f.tag)
            i++;
        if (i == n)
            return unknown_tag(p, &f);
        if (!get_u64(p, &f, max[i], &out[i]))
            return false;
    }
    return got == 0;
}

void request_window(struct channel *ch, const uint8_t *body, size_t len)
{
    static const uint16_t tags[] = {T_BYTES};
    static const uint64_t max[] = {MAX_WINDOW_CREDIT};
    uint64_t bytes = 0;
    struct parse p;
    if (!parse_u64s(body, len, tags, max, &bytes, 1, &p) || !(p.seen & (1ull << T_BYTES))) {
        send_error(0, EINVAL, "WINDOW on channel %u: %s", ch->id, p.why[0] ? p.why : "no BYTES");
        return;
    }
    if (ch->send_window + bytes > MAX_WINDOW_CREDIT) {
        send_error(0, EOVERFLOW, "WINDOW on channel %u: credit beyond 4 GiB", ch->id);
        return;
    }
    ch->send_window += bytes;
    chan_pump_out(ch, 0);
    if (!ch->closed)
        chan_pump_out(ch, 1);
}

void request_signal(struct channel *ch, const uint8_t *body, size_t len)
{
    static const uint16_t tags[] = {T_SIGNAL, T_GROUP};
    static const uint64_t max[] = {64, 1};
    uint64_t v[2] = {0, 0};
    struct parse p;
    if (!parse_u64s(body, len, tags, max, v, 2, &p) || v[0] == 0) {
        send_error(0, EINVAL, "SIGNAL on channel %u: %s", ch->id,
                   p.why[0] ? p.why : "SIGNAL missing or 0");
        return;
    }
    if (ch->kind != CH_EXEC) {
        send_error(0, EINVAL, "SIGNAL on channel %u, which is not an exec", ch->id);
        return;
    }
    if (!ch->running)
        return; /* it exited meanwhile; its EXIT is on the way */
    if (kill(v[1] ? -ch->pid : ch->pid, (int)v[0]) < 0)
        send_error(0, errno, "SIGNAL on channel %u: %s", ch->id, strerror(errno));
}

void request_resize(struct channel *ch, const uint8_t *body, size_t len)
{
    static const uint16_t tags[] = {T_ROWS, T_COLS};
    static const uint64_t max[] = {65535, 65535};
    uint64_t v[2] = {0, 0};
    struct parse p;
    if (!parse_u64s(body, len, tags, max, v, 2, &p)) {
        send_error(0, EINVAL, "RESIZE on channel %u: %s", ch->id, p.why);
        return;
    }
    /* Resizing a channel without a terminal is harmless and ignored. */
    if (ch->kind != CH_EXEC || !ch->tty || ch->out_fd[0] < 0)
        return;
    struct winsize ws = {.ws_row = (unsigned short)v[0], .ws_col = (unsigned short)v[1]};
    ioctl(ch->out_fd[0], TIOCSWINSZ, &ws);
}

void request_abort(struct channel *ch, size_t len)
{
    if (len) {
        send_error(0, EINVAL, "ABORT on channel %u: the body must be empty", ch->id);
        return;
    }
    if (ch->kind == CH_PORT) {
        /* The host's client is gone: reset the guest's side rather than leave its peer
         * writing into a window nobody will open again. */
        struct linger reset = {.l_onoff = 1, .l_linger = 0};
        int sock = ch->out_fd[0] >= 0 ? ch->out_fd[0] : ch->in_fd;
        if (sock >= 0)
            setsockopt(sock, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
    }
    chan_fail(ch, ECONNABORTED, "aborted by the host");
}
