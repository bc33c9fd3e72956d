/* IDENTITY: a clone restored from a memory snapshot shares its original's RNG state,
 * clock, hostname and machine-id; the host sends fresh ones before anything else runs
 * (docs/agent-protocol.md, item 12).
 *
 * The RNG is reseeded through the kernel (RNDADDENTROPY credits the host's bytes, then
 * RNDRESEEDCRNG makes the CRNG use them at once): microvm has no vmgenid device, so the
 * kernel cannot tell by itself that it was cloned. In host test mode none of this may
 * touch the host: --identity-log FILE makes the agent write what it would apply there. */
#define _GNU_SOURCE
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *log_path; /* host test mode: where IDENTITY is written instead */

void set_identity_log(const char *path)
{
    log_path = path;
}

static int log_identity(const struct identity_req *r, char *why, size_t whylen)
{
    FILE *f = fopen(log_path, "ae");
    if (!f) {
        int err = errno;
        snprintf(why, whylen, "IDENTITY: %s: %s", log_path, strerror(err));
        return err;
    }
    if (r->entropy) {
        fprintf(f, "entropy ");
        for (size_t i = 0; i < r->entropy_len; i++)
            fprintf(f, "%02x", r->entropy[i]);
        fprintf(f, "\n");
    }
    if (r->has_time)
        fprintf(f, "time_ns %llu\n", (unsigned long long)r->time_ns);
    if (r->hostname)
        fprintf(f, "hostname %s\n", r->hostname);
    if (r->machine_id)
        fprintf(f, "machine_id %s\n", r->machine_id);
    if (fclose(f) != 0) {
        int err = errno;
        snprintf(why, whylen, "IDENTITY: %s: %s", log_path, strerror(err));
        return err;
    }
    return 0;
}

static int reseed(const uint8_t *seed, size_t len, char *why, size_t whylen)
{
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        snprintf(why, whylen, "IDENTITY: /dev/urandom: %s", strerror(err));
        return err;
    }
    struct rand_pool_info *info = xmalloc(sizeof *info + len);
    info->entropy_count = (int)(8 * len);
    info->buf_size = (int)len;
    memcpy(info->buf, seed, len);
    const char *step = "RNDADDENTROPY";
    int err = ioctl(fd, RNDADDENTROPY, info) < 0 ? errno : 0;
    if (!err) {
        step = "RNDRESEEDCRNG";
        err = ioctl(fd, RNDRESEEDCRNG) < 0 ? errno : 0;
    }
    memset(info->buf, 0, len);
    free(info);
    close(fd);
    if (err)
        snprintf(why, whylen, "IDENTITY: %s: %s", step, strerror(err));
    return err;
}

static int set_clock(uint64_t ns, char *why, size_t whylen)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000u),
                          .tv_nsec = (long)(ns % 1000000000u)};
    if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
        int err = errno;
        snprintf(why, whylen, "IDENTITY: clock_settime: %s", strerror(err));
        return err;
    }
    return 0;
}

/* Replace path by text (a temporary beside it renamed over it): a reader sees the old
 * file or the new one, never a half-written one. 0 or an errno. */
static int replace_file(const char *path, const char *text, mode_t mode)
{
    char tmp[128];
    snprintf(tmp, sizeof tmp, "%s.vmr-XXXXXX", path);
    int fd = mkostemp(tmp, O_CLOEXEC);
    if (fd < 0)
        return errno;
    size_t len = strlen(text);
    int err = write(fd, text, len) == (ssize_t)len ? 0 : errno ? errno : EIO;
    if (!err && fchmod(fd, mode) < 0)
        err = errno;
    if (close(fd) < 0 && !err)
        err = errno;
    if (!err && rename(tmp, path) < 0)
        err = errno;
    if (err)
        unlink(tmp);
    return err;
}

static int set_hostname(const char *name, char *why, size_t whylen)
{
    if (sethostname(name, strlen(name)) < 0) {
        int err = errno;
        snprintf(why, whylen, "IDENTITY: sethostname: %s", strerror(err));
        return err;
    }
    /* Best effort: the kernel's name is what counts; the root may be read-only. */
    char line[80];
    snprintf(line, sizeof line, "%s\n", name);
    int err = replace_file("/etc/hostname", line, 0644);
    if (err)
        debugmsg("IDENTITY: /etc/hostname: %s", strerror(err));
    return 0;
}

static int set_machine_id(const char *id, char *why, size_t whylen)
{
    char line[40];
    snprintf(line, sizeof line, "%s\n", id);
    int err = replace_file("/etc/machine-id", line, 0444);
    if (err)
        snprintf(why, whylen, "IDENTITY: /etc/machine-id: %s", strerror(err));
    return err;
}

int identity_apply(const struct identity_req *r, char *why, size_t whylen)
{
    if (log_path)
        return log_identity(r, why, whylen);
    if (!g_pid1) {
        snprintf(why, whylen, "IDENTITY: refused in host test mode without --identity-log");
        return EOPNOTSUPP;
    }
    int err = 0;
    /* The seed first: whatever runs next must not share its original's random numbers. */
    if (r->entropy && (err = reseed(r->entropy, r->entropy_len, why, whylen)))
        return err;
    if (r->has_time && (err = set_clock(r->time_ns, why, whylen)))
        return err;
    if (r->hostname && (err = set_hostname(r->hostname, why, whylen)))
        return err;
    if (r->machine_id && (err = set_machine_id(r->machine_id, why, whylen)))
        return err;
    debugmsg("IDENTITY applied");
    return 0;
}
