/* PID 1's boot: from the initramfs to the sandbox root (docs/agent-protocol.md, "Boot").
 * Every failure is reported on the console and powers the VM off: a half-built root
 * must never serve requests. */
#define _GNU_SOURCE
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_LAYERS 128
#define DEVICE_WAIT_MS 10000
#define PORT_NAME "org.vmruntime.agent"

struct boot_params {
    int layers;
    bool writable;
    bool bare;
    char hostname[65];
    char modules[256]; /* vmr.modules=: on-demand module groups, comma-separated */
};

static _Noreturn void boot_fail(int err, const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    logmsg("boot failed: %s: %s", what, strerror(err));
    power_off();
    _exit(1);
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void mount_fs(const char *src, const char *target, const char *type, unsigned long flags,
                     const char *opts)
{
    if (mkdir(target, 0755) < 0 && errno != EEXIST)
        boot_fail(errno, "mkdir %s", target);
    if (mount(src, target, type, flags, opts) < 0)
        boot_fail(errno, "mount %s on %s", type, target);
    debugmsg("mounted %s on %s", type, target);
}

ssize_t read_small(const char *path, char *buf, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0)
        return -1;
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' ' || buf[n - 1] == '\0'))
        n--;
    buf[n] = 0;
    return n;
}

static void parse_cmdline(struct boot_params *bp)
{
    char line[4096];
    memset(bp, 0, sizeof *bp);
    if (read_small("/proc/cmdline", line, sizeof line) < 0)
        boot_fail(errno, "read /proc/cmdline");
    for (char *save, *tok = strtok_r(line, " \t\n", &save); tok;
         tok = strtok_r(NULL, " \t\n", &save)) {
        if (strncmp(tok, "vmr.layers=", 11) == 0)
            bp->layers = atoi(tok + 11);
        else if (strcmp(tok, "vmr.writable=1") == 0)
            bp->writable = true;
        else if (strcmp(tok, "vmr.debug=1") == 0)
            g_debug = true;
        else if (strcmp(tok, "vmr.bare=1") == 0)
            bp->bare = true;
        else if (strncmp(tok, "vmr.hostname=", 13) == 0)
            snprintf(bp->hostname, sizeof bp->hostname, "%s", tok + 13);
        else if (strncmp(tok, "vmr.modules=", 12) == 0)
            snprintf(bp->modules, sizeof bp->modules, "%s", tok + 12);
    }
    if (bp->layers < 1 || bp->layers > MAX_LAYERS)
        boot_fail(EINVAL, "vmr.layers=%d (want 1..%d)", bp->layers, MAX_LAYERS);
}

/* The kernel leaves fds 0-2 closed when the initramfs has no /dev/console. */
static void open_console(void)
{
    int fd = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (fd < 0)
        fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    for (int i = 0; i < 3; i++)
        if (fcntl(i, F_GETFD) < 0 && fd >= 0)
            dup2(fd, i);
    g_log_fd = fd >= 3 ? fd : 2;
}

/* Is `group` one of the comma-separated names in `list`? */
static bool in_list(const char *list, const char *group, size_t len)
{
    for (const char *p = list; *p;) {
        size_t n = strcspn(p, ",");
        if (n == len && strncmp(p, group, len) == 0)
            return true;
        p += n + (p[n] == ',');
    }
    return false;
}

/* load.order: boot modules, then "[group]" sections loaded only if vmr.modules names them. */
static void load_modules(const char *wanted_groups)
{
    FILE *f = fopen("/lib/modules/load.order", "re");
    if (!f)
        return; /* a kernel with everything built in */
    char line[512], path[600];
    bool active = true;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0] || line[0] == '#')
            continue;
        if (line[0] == '[') {
            size_t len = strcspn(line + 1, "]");
            active = in_list(wanted_groups, line + 1, len);
            continue;
        }
        if (!active)
            continue;
        snprintf(path, sizeof path, "/lib/modules/%s", line);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            boot_fail(errno, "open module %s", path);
        if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
            boot_fail(errno, "load module %s", path);
        close(fd);
        unlink(path); /* the initramfs is RAM: a loaded module's file is dead weight */
        debugmsg("loaded %s", line);
    }
    fclose(f);
}

/* Map virtio-blk serials to /dev paths; true once every wanted disk has its node. */
static bool find_disks(const struct boot_params *bp, char layer_dev[][32], char *w_dev)
{
    DIR *d = opendir("/sys/block");
    if (!d)
        return false;
    struct dirent *e;
    char path[300], serial[64];
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "vd", 2) != 0 || strlen(e->d_name) > 16)
            continue;
        snprintf(path, sizeof path, "/sys/block/%s/serial", e->d_name);
        if (read_small(path, serial, sizeof serial) <= 0)
            continue;
        char *dev = NULL;
        if (strcmp(serial, "W") == 0)
            dev = w_dev;
        else if (serial[0] == 'L' && serial[1] >= '0' && serial[1] <= '9') {
            int i = atoi(serial + 1);
            if (i < bp->layers)
                dev = layer_dev[i];
        }
        if (dev)
            snprintf(dev, 32, "/dev/%s", e->d_name);
    }
    closedir(d);
    for (int i = 0; i < bp->layers; i++)
        if (!layer_dev[i][0] || access(layer_dev[i], F_OK) < 0)
            return false;
    return !bp->writable || (w_dev[0] && access(w_dev, F_OK) == 0);
}

static void wait_disks(const struct boot_params *bp, char layer_dev[][32], char *w_dev)
{
    for (int waited = 0; !find_disks(bp, layer_dev, w_dev); waited += 10) {
        if (waited >= DEVICE_WAIT_MS) {
            for (int i = 0; i < bp->layers; i++)
                if (!layer_dev[i][0])
                    boot_fail(ENODEV, "no virtio disk with serial L%d", i);
            boot_fail(ENODEV, "disks did not appear (writable disk W: %s)",
                      w_dev[0] ? w_dev : "missing");
        }
        sleep_ms(10);
    }
}

/* Layers under /layers, their union on /newroot; returns an fd of the writable layer's
 * mount (-1 without one) for FREEZE and for the read-only remount at shutdown. */
static int assemble_root(const struct boot_params *bp)
{
    static char layer_dev[MAX_LAYERS][32];
    char w_dev[32] = "", path[64];
    wait_disks(bp, layer_dev, w_dev);
    mount_fs("tmpfs", "/layers", "tmpfs", 0, "mode=0755,size=64k");
    for (int i = 0; i < bp->layers; i++) {
        snprintf(path, sizeof path, "/layers/L%d", i);
        mount_fs(layer_dev[i], path, "erofs", MS_RDONLY, NULL);
    }
    int wfd = -1;
    if (bp->writable) {
        mount_fs(w_dev, "/layers/W", "ext4", 0, "noinit_itable");
        if ((mkdir("/layers/W/upper", 0755) < 0 && errno != EEXIST) ||
            (mkdir("/layers/W/work", 0755) < 0 && errno != EEXIST))
            boot_fail(errno, "mkdir upper/work in the writable layer");
        /* Not O_PATH: FIFREEZE is an ioctl, and an O_PATH fd takes none. */
        wfd = open("/layers/W", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    }
    if (bp->layers == 1 && !bp->writable) {
        /* overlayfs wants two lower layers when there is no upper one */
        mount_fs("/layers/L0", "/newroot", NULL, MS_BIND, NULL);
        return wfd;
    }
    /* Relative lowerdir paths keep the options within a page for many layers. */
    if (chdir("/layers") < 0)
        boot_fail(errno, "chdir /layers");
    char opts[4096];
    size_t n = (size_t)snprintf(opts, sizeof opts, "lowerdir=");
    for (int i = bp->layers - 1; i >= 0; i--)
        n += (size_t)snprintf(opts + n, sizeof opts - n, "L%d%s", i, i ? ":" : "");
    if (bp->writable)
        snprintf(opts + n, sizeof opts - n, ",upperdir=W/upper,workdir=W/work");
    mount_fs("overlay", "/newroot", "overlay", bp->writable ? 0 : MS_RDONLY, opts);
    return wfd;
}

/* What switch_root does, minus deleting the initramfs (modules are already gone). */
static void enter_root(void)
{
    umount2("/proc", MNT_DETACH);
    umount2("/sys", MNT_DETACH);
    umount2("/dev", MNT_DETACH);
    if (chdir("/newroot") < 0)
        boot_fail(errno, "chdir /newroot");
    if (mount(".", "/", NULL, MS_MOVE, NULL) < 0)
        boot_fail(errno, "move /newroot to /");
    if (chroot(".") < 0 || chdir("/") < 0)
        boot_fail(errno, "chroot into the new root");
}

static void replace_symlink(const char *target, const char *link)
{
    unlink(link);
    if (symlink(target, link) < 0)
        boot_fail(errno, "symlink %s", link);
}

static void setup_root_mounts(void)
{
    const unsigned long nsd = MS_NOSUID | MS_NODEV;
    mount_fs("proc", "/proc", "proc", nsd | MS_NOEXEC, NULL);
    mount_fs("sysfs", "/sys", "sysfs", nsd | MS_NOEXEC, NULL);
    mount_fs("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    mount_fs("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
             "newinstance,ptmxmode=0666,mode=0620,gid=5");
    replace_symlink("pts/ptmx", "/dev/ptmx");
    replace_symlink("/proc/self/fd", "/dev/fd");
    replace_symlink("/proc/self/fd/0", "/dev/stdin");
    replace_symlink("/proc/self/fd/1", "/dev/stdout");
    replace_symlink("/proc/self/fd/2", "/dev/stderr");
    mount_fs("tmpfs", "/dev/shm", "tmpfs", nsd, "mode=1777");
    mount_fs("tmpfs", "/tmp", "tmpfs", nsd, "mode=1777");
    mount_fs("tmpfs", "/run", "tmpfs", nsd, "mode=0755");
}

/* Bringing lo up is enough: the kernel gives it 127.0.0.1/8 and ::1 itself. */
static void loopback_up(void)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        boot_fail(errno, "socket for lo");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
        boot_fail(errno, "get lo flags");
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
        boot_fail(errno, "bring lo up");
    close(s);
}

static void protect_from_oom(void)
{
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, "-1000", 5) != 5)
        boot_fail(errno, "set oom_score_adj");
    close(fd);
}

int open_virtio_port(const char *wanted, int flags)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return -1;
    struct dirent *e;
    char path[300], name[128];
    int fd = -1;
    while (fd < 0 && (e = readdir(d))) {
        if (strncmp(e->d_name, "vport", 5) != 0 || strlen(e->d_name) > 32)
            continue;
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        if (read_small(path, name, sizeof name) < 0 || strcmp(name, wanted) != 0)
            continue;
        /* devtmpfs made /dev/vportNpM; there is no udev for /dev/virtio-ports/NAME. */
        snprintf(path, sizeof path, "/dev/%s", e->d_name);
        fd = open(path, flags);
    }
    closedir(d);
    return fd;
}

static int open_port(void)
{
    for (int waited = 0;; waited += 10) {
        int fd = open_virtio_port(PORT_NAME, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
        if (fd >= 0) {
            debugmsg("agent port open");
            return fd;
        }
        if (waited >= DEVICE_WAIT_MS)
            boot_fail(ENODEV, "no virtio-console port named %s", PORT_NAME);
        sleep_ms(10);
    }
}

int boot(void)
{
    struct boot_params bp;
    /* /proc first: vmr.bare=1 (the boot-time baseline) must cost nothing else. */
    mkdir("/proc", 0755);
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        boot_fail(errno, "mount proc");
    char line[4096];
    if (read_small("/proc/cmdline", line, sizeof line) >= 0 && strstr(line, "vmr.bare=1")) {
        reboot(RB_AUTOBOOT);
        _exit(1);
    }
    mount_fs("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    open_console();
    parse_cmdline(&bp);
    debugmsg("booting: %d layer(s)%s", bp.layers, bp.writable ? " + writable" : "");
    mount_fs("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    load_modules(bp.modules);
    int wfd = assemble_root(&bp);
    enter_root();
    setup_root_mounts();
    loopback_up();
    if (bp.hostname[0] && sethostname(bp.hostname, strlen(bp.hostname)) < 0)
        boot_fail(errno, "sethostname %s", bp.hostname);
    protect_from_oom();
    set_writable_mount_fd(wfd);
    set_freeze_target(wfd);
    return open_port();
}
