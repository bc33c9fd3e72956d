/* FREEZE and THAW: hold the writable layer's filesystem still (FIFREEZE) while the host
 * copies its disk image, so a snapshot is consistent (docs/agent-protocol.md, item 10).
 *
 * The layer is ext4 without a journal: a copy taken while the guest writes can hold half
 * an update. FIFREEZE syncs it and blocks every new write until FITHAW; readers go on.
 * The agent itself must never write to the frozen filesystem (it would block the only
 * thread that can thaw it), so FILE_WRITE and MOUNT are refused while it is frozen, and a
 * freeze is lifted whenever the host that asked for it is gone (disconnect, a new HELLO,
 * SHUTDOWN) or its TIMEOUT_MS passes: the guest is never left frozen. */
#define _GNU_SOURCE
#include "channel.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int target_fd = -1;     /* a directory of the filesystem to freeze; -1: none */
static bool frozen;
static bool expired;           /* the last freeze was lifted by its timeout, not by THAW */
static uint64_t deadline_ms;   /* 0: no timeout */

void set_freeze_target(int fd)
{
    target_fd = fd;
}

bool freeze_active(void)
{
    return frozen;
}

int freeze_now(uint64_t timeout_ms, char *why, size_t whylen)
{
    if (target_fd < 0) {
        snprintf(why, whylen, "FREEZE: this guest has no writable layer to freeze");
        return ENODEV;
    }
    if (frozen) {
        snprintf(why, whylen, "FREEZE: the writable layer is already frozen");
        return EBUSY;
    }
    if (chan_count_kind(CH_FILE_WRITE) > 0) {
        /* Its next STDIN would block the agent on the frozen filesystem. */
        snprintf(why, whylen, "FREEZE: a FILE_WRITE is in progress");
        return EBUSY;
    }
    syncfs(target_fd); /* FIFREEZE syncs too; this gets the bulk out before writers block */
    if (ioctl(target_fd, FIFREEZE, 0) < 0) {
        int err = errno;
        snprintf(why, whylen, "FREEZE: FIFREEZE: %s", strerror(err));
        return err;
    }
    frozen = true;
    expired = false;
    deadline_ms = timeout_ms ? now_ms() + timeout_ms : 0;
    debugmsg("writable layer frozen (timeout %llu ms)", (unsigned long long)timeout_ms);
    return 0;
}

static int thaw_fs(void)
{
    frozen = false;
    deadline_ms = 0;
    if (ioctl(target_fd, FITHAW, 0) < 0) {
        int err = errno;
        logmsg("FITHAW: %s", strerror(err));
        return err;
    }
    return 0;
}

int thaw_now(char *why, size_t whylen)
{
    if (!frozen) {
        bool timed_out = expired;
        expired = false;
        if (timed_out) {
            snprintf(why, whylen, "THAW: the freeze had already ended: its timeout passed");
            return ETIMEDOUT;
        }
        snprintf(why, whylen, "THAW: the writable layer is not frozen");
        return EINVAL;
    }
    int err = thaw_fs();
    if (err)
        snprintf(why, whylen, "THAW: FITHAW: %s", strerror(err));
    debugmsg("writable layer thawed");
    return err;
}

void freeze_release(void)
{
    expired = false;
    if (frozen) {
        debugmsg("host gone: thawing the writable layer");
        thaw_fs();
    }
}

int freeze_next_timeout(uint64_t now)
{
    if (!frozen || !deadline_ms)
        return -1;
    return deadline_ms > now ? (int)(deadline_ms - now) : 0;
}

void freeze_timers(uint64_t now)
{
    if (frozen && deadline_ms && now >= deadline_ms) {
        logmsg("freeze timeout: thawing the writable layer");
        thaw_fs();
        expired = true;
    }
}
