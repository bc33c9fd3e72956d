/* Starting a process for EXEC: stdio (pipes or a new pty), session, credentials, limits,
 * working directory, PATH search. Setup failures before execve come back to the parent
 * through a close-on-exec status pipe and become an ERROR frame; a program that cannot
 * be executed is the process's own outcome (stderr message, exit 127/126), as in a shell. */
#define _GNU_SOURCE
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

struct stdio_plan {
    int master;         /* pty master, -1 without a tty */
    char slave[64];     /* pty slave path */
    int out[2], err[2], in[2]; /* pipes; -1 when unused */
};

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void plan_close(struct stdio_plan *p)
{
    close_fd(&p->master);
    for (int i = 0; i < 2; i++) {
        close_fd(&p->out[i]);
        close_fd(&p->err[i]);
        close_fd(&p->in[i]);
    }
}

static int open_pty(struct stdio_plan *p, const struct exec_req *req)
{
    p->master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (p->master < 0 || grantpt(p->master) < 0 || unlockpt(p->master) < 0 ||
        ptsname_r(p->master, p->slave, sizeof p->slave) != 0)
        return errno ? errno : EIO;
    if (req->rows && req->cols) {
        struct winsize ws = {.ws_row = req->rows, .ws_col = req->cols};
        ioctl(p->master, TIOCSWINSZ, &ws);
    }
    return 0;
}

static int plan_stdio(struct stdio_plan *p, const struct exec_req *req)
{
    memset(p, 0xff, sizeof *p); /* every fd -1 */
    p->slave[0] = 0;
    if (req->tty)
        return open_pty(p, req);
    if (pipe2(p->out, O_CLOEXEC) < 0 || pipe2(p->err, O_CLOEXEC) < 0)
        return errno;
    if (req->stdin_open && pipe2(p->in, O_CLOEXEC) < 0)
        return errno;
    return 0;
}

/* ---- in the child ---- */

static _Noreturn void child_fail(int status_fd, const char *what, const char *arg, int err)
{
    char msg[600];
    int n = snprintf(msg, sizeof msg, "%d %s%s%s: %s", err, what, arg ? " " : "", arg ? arg : "",
                     strerror(err));
    if (write(status_fd, msg, (size_t)n) < 0) {
        /* nothing left to tell anyone */
    }
    _exit(126);
}

static void reset_signals(void)
{
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int s = 1; s < NSIG; s++)
        signal(s, SIG_DFL);
}

static void child_stdio(const struct stdio_plan *p, const struct exec_req *req, int status_fd,
                        uid_t uid)
{
    int in = -1, out, err;
    if (req->tty) {
        /* Opening the slave as a session leader without O_NOCTTY makes it the
         * controlling terminal; TIOCSCTTY makes sure of it. */
        int slave = open(p->slave, O_RDWR);
        if (slave < 0)
            child_fail(status_fd, "open", p->slave, errno);
        ioctl(slave, TIOCSCTTY, 0);
        if (uid != 0 && fchown(slave, uid, (gid_t)-1) < 0) {
            /* best effort: the process can still use the terminal it has open */
        }
        out = err = slave;
        if (req->stdin_open)
            in = slave;
    } else {
        out = p->out[1];
        err = p->err[1];
        if (req->stdin_open)
            in = p->in[0];
    }
    if (in < 0 && (in = open("/dev/null", O_RDONLY)) < 0)
        child_fail(status_fd, "open", "/dev/null", errno);
    if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
        child_fail(status_fd, "dup2", NULL, errno);
}

static void child_limits(const struct exec_req *req, int status_fd)
{
    if (g_pid1) {
        /* The agent runs at -1000; children must be fair game for the OOM killer. */
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            if (write(fd, "0", 1) < 0) {
                /* best effort */
            }
            close(fd);
        }
    }
    for (int i = 0; i < req->nrlimits; i++) {
        struct rlimit rl = {.rlim_cur = req->rlimits[i].soft, .rlim_max = req->rlimits[i].hard};
        if (setrlimit((int)req->rlimits[i].resource, &rl) < 0)
            child_fail(status_fd, "setrlimit", NULL, errno);
    }
}

static void child_creds(const struct creds *c, int status_fd)
{
    if (setgroups((size_t)c->ngroups, c->groups) < 0 && !(errno == EPERM && c->uid == 0))
        child_fail(status_fd, "setgroups", NULL, errno);
    if (setgid(c->gid) < 0)
        child_fail(status_fd, "setgid", NULL, errno);
    if (setuid(c->uid) < 0)
        child_fail(status_fd, "setuid", NULL, errno);
}

static const char *env_path(char *const *envp, int envc)
{
    for (int i = 0; i < envc; i++)
        if (strncmp(envp[i], "PATH=", 5) == 0)
            return envp[i] + 5;
    return DEFAULT_PATH;
}

/* execvpe with the request's PATH and no shell fallback; returns the errno to report. */
static int exec_search(const struct exec_req *req)
{
    const char *file = req->argv[0];
    if (!*file)
        return ENOENT;
    if (strchr(file, '/')) {
        execve(file, req->argv, req->envp);
        return errno;
    }
    bool denied = false;
    size_t flen = strlen(file);
    for (const char *p = env_path(req->envp, req->envc);; ) {
        size_t dlen = strcspn(p, ":");
        char full[PATH_MAX];
        if (dlen + flen + 2 <= sizeof full) {
            memcpy(full, dlen ? p : ".", dlen ? dlen : 1);
            size_t at = dlen ? dlen : 1;
            full[at++] = '/';
            memcpy(full + at, file, flen + 1);
            execve(full, req->argv, req->envp);
            if (errno == EACCES)
                denied = true;
            else if (errno != ENOENT && errno != ENOTDIR && errno != ESTALE && errno != ENODEV)
                return errno;
        }
        if (!p[dlen])
            break;
        p += dlen + 1;
    }
    return denied ? EACCES : ENOENT;
}

static _Noreturn void run_child(const struct exec_req *req, const struct creds *c,
                                const struct stdio_plan *p, int status_fd)
{
    reset_signals();
    if (setsid() < 0)
        child_fail(status_fd, "setsid", NULL, errno);
    child_stdio(p, req, status_fd, c->uid);
    child_limits(req, status_fd);
    child_creds(c, status_fd);
    if (chdir(req->cwd) < 0)
        child_fail(status_fd, "chdir", req->cwd, errno);
    int err = exec_search(req);
    dprintf(2, "vmr-agent: %s: %s\n", req->argv[0], strerror(err));
    _exit(err == ENOENT || err == ENOTDIR ? 127 : 126);
}

/* ---- in the parent ---- */

/* Wait for execve (status pipe closes) or a setup failure ("<errno> <message>"). */
static int await_exec(pid_t pid, int status_fd, char *why, size_t whylen)
{
    char msg[600];
    ssize_t n;
    do
        n = read(status_fd, msg, sizeof msg - 1);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
        return 0;
    msg[n] = 0;
    char *rest;
    long err = strtol(msg, &rest, 10);
    snprintf(why, whylen, "%s", *rest ? rest + 1 : "setup failed");
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
    return err > 0 && err < 4096 ? (int)err : EIO;
}

int spawn_exec(const struct exec_req *req, struct spawned *sp, char *why, size_t whylen)
{
    struct creds c;
    const char *reason = "";
    int err = resolve_user(req->user ? req->user : "", &c, &reason);
    if (err) {
        snprintf(why, whylen, "user %s: %s", req->user, reason);
        return err;
    }
    struct stdio_plan p;
    int status[2] = {-1, -1};
    errno = 0;
    if ((err = plan_stdio(&p, req)) != 0 || (pipe2(status, O_CLOEXEC) < 0 && (err = errno))) {
        snprintf(why, whylen, "stdio: %s", strerror(err));
        plan_close(&p);
        return err;
    }
    pid_t pid = fork();
    if (pid < 0) {
        err = errno;
        snprintf(why, whylen, "fork: %s", strerror(err));
        plan_close(&p);
        close(status[0]);
        close(status[1]);
        return err;
    }
    if (pid == 0) {
        close(status[0]);
        run_child(req, &c, &p, status[1]);
    }
    close(status[1]);
    close_fd(&p.out[1]);
    close_fd(&p.err[1]);
    close_fd(&p.in[0]);
    err = await_exec(pid, status[0], why, whylen);
    close(status[0]);
    if (err) {
        plan_close(&p);
        return err;
    }
    sp->pid = pid;
    if (req->tty) {
        sp->out_fd = p.master;
        sp->err_fd = -1;
        sp->in_fd = req->stdin_open ? fcntl(p.master, F_DUPFD_CLOEXEC, 3) : -1;
    } else {
        sp->out_fd = p.out[0];
        sp->err_fd = p.err[0];
        sp->in_fd = p.in[1];
    }
    int fds[3] = {sp->out_fd, sp->err_fd, sp->in_fd};
    for (int i = 0; i < 3; i++)
        if (fds[i] >= 0)
            set_nonblock(fds[i]);
    return 0;
}
