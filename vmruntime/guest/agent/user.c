/* User resolution from the guest root's /etc/passwd and /etc/group, parsed here because
 * a static glibc cannot load NSS modules (getpwnam would silently find nobody). */
#define _GNU_SOURCE
#include "agent.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Split a colon-separated line into at most max fields, in place. */
static int split_colons(char *line, char **fields, int max)
{
    int n = 0;
    line[strcspn(line, "\n")] = 0;
    while (n < max) {
        fields[n++] = line;
        char *c = strchr(line, ':');
        if (!c)
            break;
        *c = 0;
        line = c + 1;
    }
    return n;
}

/* A decimal id below 2^32-1 (which is the kernel's "no id"). */
static bool parse_id(const char *s, uint32_t *out)
{
    if (!*s || strlen(s) > 10)
        return false;
    uint64_t v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9')
            return false;
        v = v * 10 + (uint64_t)(*p - '0');
    }
    if (v >= 0xffffffffu)
        return false;
    *out = (uint32_t)v;
    return true;
}

struct pwent {
    char name[256];
    uint32_t uid, gid;
};

/* Find by name (if name) or by uid; true when found. */
static bool find_passwd(const char *name, uint32_t uid, struct pwent *out)
{
    FILE *f = fopen("/etc/passwd", "re");
    if (!f)
        return false;
    char *line = NULL;
    size_t cap = 0;
    bool found = false;
    while (!found && getline(&line, &cap, f) > 0) {
        char *fl[7];
        uint32_t u, g;
        if (split_colons(line, fl, 7) < 4 || !parse_id(fl[2], &u) || !parse_id(fl[3], &g))
            continue;
        if (name ? strcmp(fl[0], name) == 0 : u == uid) {
            snprintf(out->name, sizeof out->name, "%s", fl[0]);
            out->uid = u;
            out->gid = g;
            found = true;
        }
    }
    free(line);
    fclose(f);
    return found;
}

static bool list_has(const char *csv, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = csv; *p;) {
        size_t len = strcspn(p, ",");
        if (len == n && strncmp(p, name, n) == 0)
            return true;
        p += len;
        if (*p)
            p++;
    }
    return false;
}

static void add_group(struct creds *c, gid_t g)
{
    for (int i = 0; i < c->ngroups; i++)
        if (c->groups[i] == g)
            return;
    if (c->ngroups < (int)(sizeof c->groups / sizeof c->groups[0]))
        c->groups[c->ngroups++] = g;
}

/* Find a group id by name (group_name) and/or collect supplementary groups of member. */
static bool scan_groups(const char *group_name, uint32_t *gid, const char *member,
                        struct creds *c)
{
    FILE *f = fopen("/etc/group", "re");
    if (!f)
        return false;
    char *line = NULL;
    size_t cap = 0;
    bool found = false;
    while (getline(&line, &cap, f) > 0) {
        char *fl[4];
        uint32_t g;
        if (split_colons(line, fl, 4) < 3 || !parse_id(fl[2], &g))
            continue;
        if (group_name && !found && strcmp(fl[0], group_name) == 0) {
            *gid = g;
            found = true;
        }
        if (member && c && fl[3] && list_has(fl[3], member))
            add_group(c, g);
    }
    free(line);
    fclose(f);
    return found;
}

int resolve_user(const char *spec, struct creds *out, const char **why)
{
    memset(out, 0, sizeof *out);
    if (!*spec) /* default: root */
        return 0;
    char user[256], *group = NULL;
    if (strlen(spec) >= sizeof user) {
        *why = "user name too long";
        return EINVAL;
    }
    strcpy(user, spec);
    char *colon = strchr(user, ':');
    if (colon) {
        *colon = 0;
        group = colon + 1;
    }
    struct pwent pw;
    bool known;
    uint32_t id;
    if (parse_id(user, &id)) {
        known = find_passwd(NULL, id, &pw);
        out->uid = id;
        out->gid = known ? pw.gid : 0; /* like Docker: an unknown uid gets gid 0 */
    } else {
        known = find_passwd(user, 0, &pw);
        if (!known) {
            *why = "no such user in /etc/passwd";
            return ENOENT;
        }
        out->uid = pw.uid;
        out->gid = pw.gid;
    }
    if (group) {
        uint32_t gid;
        if (!parse_id(group, &gid) && !scan_groups(group, &gid, NULL, NULL)) {
            *why = "no such group in /etc/group";
            return ENOENT;
        }
        out->gid = gid;
        add_group(out, gid);
        return 0;
    }
    add_group(out, out->gid);
    if (known)
        scan_groups(NULL, NULL, pw.name, out);
    return 0;
}
