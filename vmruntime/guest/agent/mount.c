/* MOUNT: the shares (virtiofs, or fuse-console: fuserelay.c) and disks (ext4) the host attached, mounted where it asks
 * (docs/agent-protocol.md, "Conversation", item 8). The host sends these right after
 * HELLO, before any exec, so a failure reaches the sandbox's creator as an error instead
 * of a guest that silently lacks a folder. */
#define _GNU_SOURCE
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_DISK_MOUNTS 64

/* O_PATH fds of the writable disk mounts, for the read-only remount at shutdown: a path
 * could be covered by a later mount, the fd always names this one. */
static int disk_fds[MAX_DISK_MOUNTS];
static int ndisk_fds;

/* /dev/vdX of the virtio-blk disk with this serial; false if there is none. */
static bool disk_by_serial(const char *serial, char *dev, size_t size)
{
    DIR *d = opendir("/sys/block");
    if (!d)
        return false;
    struct dirent *e;
    char path[300], got[64];
    bool found = false;
    while (!found && (e = readdir(d))) {
        if (strncmp(e->d_name, "vd", 2) != 0 || strlen(e->d_name) > 16)
            continue;
        snprintf(path, sizeof path, "/sys/block/%s/serial", e->d_name);
        if (read_small(path, got, sizeof got) > 0 && strcmp(got, serial) == 0) {
            snprintf(dev, size, "/dev/%s", e->d_name);
            found = true;
        }
    }
    closedir(d);
    return found;
}

/* mkdir -p: every missing directory of path, mode 0755. 0 or an errno (why[] set). */
static int make_dirs(const char *path, char *why, size_t whylen)
{
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) {
        snprintf(why, whylen, "%s: path too long", path);
        return ENAMETOOLONG;
    }
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p != 0)
            continue;
        char saved = *p;
        *p = 0;
        if (mkdir(buf, 0755) < 0 && errno != EEXIST) {
            int err = errno;
            snprintf(why, whylen, "mkdir %s: %s", buf, strerror(err));
            return err;
        }
        *p = saved;
        if (!saved)
            return 0;
    }
}

/* A directory of the root mounted again at PATH (or PATH itself, which then becomes a
 * mount of its own), or PATH's mount made read-only: source and path "/" with READONLY
 * is the root made read-only while the mounts under it keep their own flags. */
static int bind_request(const struct mount_req *m, char *why, size_t whylen)
{
    bool root_only = strcmp(m->source, "/") == 0 && strcmp(m->path, "/") == 0;
    if (!root_only) {
        int err = make_dirs(m->source, why, whylen);
        if (!err)
            err = make_dirs(m->path, why, whylen);
        if (err)
            return err;
        if (mount(m->source, m->path, NULL, MS_BIND | MS_REC, NULL) < 0) {
            err = errno;
            snprintf(why, whylen, "bind %s on %s: %s", m->source, m->path, strerror(err));
            return err;
        }
    }
    if (m->readonly && mount(NULL, m->path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) < 0) {
        int err = errno;
        snprintf(why, whylen, "remount %s read-only: %s", m->path, strerror(err));
        return err;
    }
    debugmsg("bound %s on %s%s", m->source, m->path, m->readonly ? " (read-only)" : "");
    return 0;
}

int mount_request(const struct mount_req *m, char *why, size_t whylen)
{
    if (strcmp(m->fstype, "bind") == 0)
        return bind_request(m, why, whylen);
    if (strcmp(m->fstype, "fuse-console") == 0) {
        int err = make_dirs(m->path, why, whylen);
        return err ? err : fuse_console_mount(m, why, whylen);
    }
    bool disk = strcmp(m->fstype, "ext4") == 0;
    char dev[64];
    const char *source = m->source;
    if (disk) {
        if (!disk_by_serial(m->source, dev, sizeof dev)) {
            snprintf(why, whylen, "%s: no virtio disk with serial %s", m->path, m->source);
            return ENODEV;
        }
        source = dev;
    }
    int err = make_dirs(m->path, why, whylen);
    if (err)
        return err;
    unsigned long flags = m->readonly ? MS_RDONLY : 0;
    /* A read-only disk may be in use by a writer elsewhere: its journal may need a
     * replay that a read-only device cannot take, so the journal is not read at all. */
    const char *data = disk && m->readonly ? "noload" : NULL;
    if (mount(source, m->path, m->fstype, flags, data) < 0) {
        err = errno;
        snprintf(why, whylen, "mount %s %s on %s: %s", m->fstype, m->source, m->path,
                 strerror(err));
        return err;
    }
    if (disk && !m->readonly && ndisk_fds < MAX_DISK_MOUNTS) {
        int fd = open(m->path, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0)
            disk_fds[ndisk_fds++] = fd;
    }
    debugmsg("mounted %s %s on %s%s", m->fstype, m->source, m->path,
             m->readonly ? " (read-only)" : "");
    return 0;
}

void mounts_remount_readonly(void)
{
    char path[64];
    for (int i = ndisk_fds - 1; i >= 0; i--) {
        syncfs(disk_fds[i]);
        snprintf(path, sizeof path, "/proc/self/fd/%d", disk_fds[i]);
        if (mount(NULL, path, NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0)
            debugmsg("remount disk read-only: %s", strerror(errno));
    }
}
