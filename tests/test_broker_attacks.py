"""A hostile guest kernel against the virtio-fs broker's FuseHandler (docs/broker.md).

Requests are built with tests/broker_wire.py, written from Linux's fuse.h and not
from the broker's own codec, so the two cross-check each other. Every attack must get
an error reply carrying the errno we expect and echoing the request's ``unique``; the
broker must keep serving (``alive``); and nothing outside the share may be read,
changed or created (``World``: an inotify watch and a snapshot of a canary directory
beside the share, and a guard that fails the test if a canary secret or name ever
appears in a reply). Every test runs under both containment strategies.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import random
import stat
import sys
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from broker_wire import (
    BENIGN,
    CANARY_NAME,
    FATTR_ATIME,
    FATTR_GID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_SIZE,
    FATTR_UID,
    FUSE_ROOT_ID,
    GUEST_GID,
    GUEST_UID,
    IN_HEADER,
    IN_HEADER_SIZE,
    LINK_XATTR,
    PLANTED,
    PRIVATE_XATTRS,
    REC_GID,
    REC_MODE,
    REC_RDEV,
    REC_UID,
    SHARE_FILE,
    STAT_RECORD,
    STAT_XATTR,
    Client,
    Inotify,
    Op,
    Reply,
    WithoutSysAdmin,
    World,
    access_in,
    batch_forget_in,
    bind_mount,
    copy_file_range_in,
    create_in,
    cstr,
    errname,
    fallocate_in,
    flush_in,
    fsync_in,
    getattr_in,
    getxattr_in,
    init_in,
    interrupt_in,
    link_in,
    lseek_in,
    mkdir_in,
    mknod_in,
    new_encode_dev,
    open_fds,
    open_in,
    parse_dirents,
    parse_entry,
    parse_getxattr_out,
    parse_reply,
    read_in,
    release_in,
    rename2_in,
    rename_in,
    request,
    setattr_in,
    setxattr_in,
    stat_record,
    tree,
    unmount,
    write_in,
)

ROOT = FUSE_ROOT_ID
E = errno

# Errnos that say "this name is not acceptable". Deliberately absent: EEXIST, EXDEV,
# ELOOP, ENOTEMPTY, EBUSY, EISDIR: those come from a host syscall and would show that
# the name reached the host before being validated (the contract checks names first).
# LOOKUP may also answer ENOENT: the kernel reads that as "no such entry", harmless.
BAD_NAME = frozenset({E.EINVAL, E.ENAMETOOLONG, E.EPERM, E.EACCES})
BAD_XATTR_NAME = frozenset(
    {E.EINVAL, E.ERANGE, E.ENAMETOOLONG, E.EPERM, E.EACCES, E.EOPNOTSUPP, E.ENODATA}
)
# A node id the broker never handed out (or took back with FORGET).
UNKNOWN_NODE = frozenset({E.ENOENT, E.ESTALE, E.EBADF, E.EINVAL})
# An fh the broker never handed out (or took back with RELEASE).
UNKNOWN_FH = frozenset({E.EBADF, E.EINVAL, E.ENOENT})
# A symlink's node id used where a directory is needed.
NOT_A_DIR = frozenset({E.ENOTDIR, E.ELOOP, E.EINVAL, E.EACCES, E.EPERM, E.ENOENT})
# OPEN/OPENDIR of something that is not a regular file (resp. directory).
REFUSED_OPEN = frozenset(
    {E.ELOOP, E.EINVAL, E.EACCES, E.EPERM, E.ENXIO, E.EOPNOTSUPP, E.ENODEV, E.ENOTDIR, E.EISDIR}
)
# Something malformed: the contract says EINVAL (EIO only for an unusable header).
MALFORMED = frozenset({E.EINVAL})
# Where the contract leaves the errno open: any error reply.
ANY_ERROR = frozenset(range(1, 512))


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(params=["openat2", "walk"])
def containment(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def world(tmp_path: Path, containment: str) -> Iterator[World]:
    w = World(tmp_path, containment)
    yield w
    # Teardown asserts that nothing outside the share was touched, also after a failed
    # test: whether an attack that was not refused actually escaped is the question.
    w.finish()


@pytest.fixture
def c(world: World) -> Client:
    return world.client()


# --- helpers -------------------------------------------------------------------------


def describe(opcode: int, nodeid: int, body: bytes) -> str:
    try:
        name = Op(opcode).name
    except ValueError:
        name = f"opcode {opcode}"
    return f"{name} nodeid={nodeid:#x} body={body[:96].hex()}{'…' if len(body) > 96 else ''}"


def expect_error(reply: Reply | None, allowed: Collection[int], what: str) -> Reply:
    wanted = "any error" if len(allowed) > 64 else "/".join(sorted(errname(e) for e in allowed))
    assert reply is not None, f"{what}: no reply, expected {wanted}"
    assert not reply.ok, f"{what}: expected {wanted}, got success {reply!r}"
    assert reply.errno in allowed, f"{what}: expected {wanted}, got {errname(reply.errno)}"
    return reply


def attack(
    c: Client,
    opcode: int,
    nodeid: int,
    body: bytes = b"",
    allowed: Collection[int] = MALFORMED,
    **kw: Any,
) -> Reply:
    """Send one hostile request, demand an error from ``allowed``, then check the broker
    still serves. (``Client.send`` already checked framing and the unique echo.)"""
    what = describe(opcode, nodeid, body)
    reply = expect_error(c.send(opcode, nodeid, body, **kw), allowed, what)
    alive(c)
    return reply


def alive(c: Client) -> None:
    """A legitimate request that must still succeed, with its lookup count given back."""
    assert stat.S_ISDIR(c.getattr(ROOT).mode)
    entry = c.lookup(ROOT, "file.txt")
    c.forget(entry.nodeid, 1)


def read_file(c: Client, nodeid: int) -> bytes:
    fh = c.open(nodeid, os.O_RDONLY)
    data = c.read(nodeid, fh, 0, 1 << 16)
    c.release(nodeid, fh)
    return data


def no_block(fn: Callable[[], Any], what: str, fifo: Path | None = None, timeout: float = 5) -> Any:
    """Run ``fn`` (a handler call) and fail if it blocks, e.g. opening a FIFO."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        if fifo is not None:
            # Opening a FIFO read-write never blocks and releases a blocked opener.
            os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
        t.join(timeout)
        pytest.fail(f"{what}: the handler blocked for {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def share_state(world: World) -> dict[str, tuple[Any, ...]]:
    return tree(world.share)


# --- names: every op that takes one ---------------------------------------------------

# The name region as it goes on the wire. Several are built so that a lax parser would
# succeed: "file.txt\0junk" names an existing file up to its first NUL, and "a/b" an
# existing file one level down.
BAD_NAMES: dict[str, bytes] = {
    "dot": b".\0",
    "dotdot": b"..\0",
    "absolute": b"/etc/passwd\0",
    "absolute-outside": b"<OUTSIDE>\0",
    "slash": b"a/b\0",
    "dotdot-slash": b"../outside/secret.txt\0",
    "trailing-slash": b"dir/\0",
    "embedded-nul": b"file.txt\0junk\0",
    "empty": b"\0",
    "256-bytes": b"x" * 256 + b"\0",
    "unterminated": b"file.txt",
}


def name_region(world: World, key: str) -> bytes:
    raw = BAD_NAMES[key]
    if raw == b"<OUTSIDE>\0":
        return os.fsencode(world.outside / f"{PLANTED}-abs") + b"\0"
    return raw


@dataclass
class Nodes:
    file: int
    dir: int


def nodes(c: Client) -> Nodes:
    return Nodes(c.lookup(ROOT, "file.txt").nodeid, c.lookup(ROOT, "dir").nodeid)


NAME_OPS: dict[str, Callable[[Nodes, bytes], tuple[int, int, bytes]]] = {
    "LOOKUP": lambda n, name: (Op.LOOKUP, ROOT, name),
    "CREATE": lambda n, name: (Op.CREATE, ROOT, create_in(os.O_CREAT | os.O_RDWR, 0o644) + name),
    "MKDIR": lambda n, name: (Op.MKDIR, ROOT, mkdir_in(0o755) + name),
    "MKNOD": lambda n, name: (Op.MKNOD, ROOT, mknod_in(stat.S_IFREG | 0o644) + name),
    "SYMLINK-name": lambda n, name: (Op.SYMLINK, ROOT, name + cstr("target")),
    "LINK": lambda n, name: (Op.LINK, ROOT, link_in(n.file) + name),
    "RENAME-old": lambda n, name: (Op.RENAME, ROOT, rename_in(ROOT) + name + cstr(PLANTED)),
    "RENAME-new": lambda n, name: (Op.RENAME, ROOT, rename_in(ROOT) + cstr("clean.txt") + name),
    "RENAME2-old": lambda n, name: (Op.RENAME2, ROOT, rename2_in(ROOT) + name + cstr(PLANTED)),
    "RENAME2-new": lambda n, name: (
        Op.RENAME2,
        ROOT,
        rename2_in(ROOT) + cstr("clean.txt") + name,
    ),
    "UNLINK": lambda n, name: (Op.UNLINK, ROOT, name),
    "RMDIR": lambda n, name: (Op.RMDIR, ROOT, name),
    "UNLINK-in-dir": lambda n, name: (Op.UNLINK, n.dir, name),
    "RMDIR-in-dir": lambda n, name: (Op.RMDIR, n.dir, name),
    "MKDIR-in-dir": lambda n, name: (Op.MKDIR, n.dir, mkdir_in(0o755) + name),
}


@pytest.mark.parametrize("key", list(BAD_NAMES))
@pytest.mark.parametrize("op", list(NAME_OPS))
def test_bad_name_rejected(world: World, c: Client, op: str, key: str) -> None:
    n = nodes(c)
    before = share_state(world)
    opcode, nodeid, body = NAME_OPS[op](n, name_region(world, key))
    allowed = BAD_NAME | ({E.ENOENT} if opcode == Op.LOOKUP else set())
    attack(c, opcode, nodeid, body, allowed)
    assert share_state(world) == before, f"{op} with name {key!r} changed the share"


XATTR_BAD_NAMES: dict[str, bytes] = {
    "empty": b"\0",
    "embedded-nul": b"user.x\0junk\0",  # user.x exists: a first-NUL parser would find it
    "256-bytes": b"user." + b"x" * 251 + b"\0",
    "unterminated": b"user.x",
}

XATTR_OPS: dict[str, Callable[[int, bytes], tuple[int, int, bytes]]] = {
    "SETXATTR": lambda node, name: (Op.SETXATTR, node, setxattr_in(1) + name + b"v"),
    "GETXATTR": lambda node, name: (Op.GETXATTR, node, getxattr_in(4096) + name),
    "REMOVEXATTR": lambda node, name: (Op.REMOVEXATTR, node, name),
}


@pytest.mark.parametrize("key", list(XATTR_BAD_NAMES))
@pytest.mark.parametrize("op", list(XATTR_OPS))
def test_bad_xattr_name_rejected(world: World, c: Client, op: str, key: str) -> None:
    node = c.lookup(ROOT, "file.txt").nodeid
    before = share_state(world)
    opcode, nodeid, body = XATTR_OPS[op](node, XATTR_BAD_NAMES[key])
    if op == "SETXATTR" and key == "unterminated":
        # No NUL anywhere: the name runs into the value and the request ends.
        body = setxattr_in(1) + b"user.xv"
    attack(c, opcode, nodeid, body, BAD_XATTR_NAME)
    assert share_state(world) == before


def test_longest_name_works(world: World, c: Client) -> None:
    """255 bytes is allowed (the control for the 256-byte attacks above)."""
    name = "n" * 255
    entry = c.mkdir(ROOT, name)
    assert c.lookup(ROOT, name).nodeid == entry.nodeid
    assert (world.share / name).is_dir()
    c.symlink(ROOT, "s" * 255, "t" * 255)
    assert os.readlink(world.share / ("s" * 255)) == "t" * 255


# --- symlinks pointing out ---------------------------------------------------------------


def place_links(world: World) -> dict[str, str]:
    """Host-made symlinks in the share, each leading outside one way or another."""
    out = str(world.outside)
    depth = len(world.share.parts) + 3
    links = {
        "abs-dir": out,
        "abs-file": f"{out}/secret.txt",
        "rel-dir": "../outside",
        "rel-up": "../" * depth + out.lstrip("/"),
        "rel-file": "../outside/secret.txt",
        "chain-a": "chain-b",
        "chain-b": "../outside",
        "proc-root": "/proc/self/root",
        "proc-cwd": "/proc/self/cwd",
        "proc-fd-dir": f"/proc/self/fd/{world.outside_fd}",
        "proc-fd-file": f"/proc/self/fd/{world.secret_fd}",
        "proc-root-outside": f"/proc/self/root{out}",
        "dangling-out": f"{out}/{PLANTED}-dangling",
    }
    for name, target in links.items():
        os.symlink(target, world.share / name)
    return links


LINK_NAMES = [
    "abs-dir",
    "abs-file",
    "rel-dir",
    "rel-up",
    "rel-file",
    "chain-a",
    "proc-root",
    "proc-cwd",
    "proc-fd-dir",
    "proc-fd-file",
    "proc-root-outside",
    "dangling-out",
]


@pytest.mark.parametrize("link", LINK_NAMES)
def test_symlink_out_is_opaque(world: World, link: str) -> None:
    links = place_links(world)
    c = world.client()
    file_node = c.lookup(ROOT, "file.txt").nodeid
    entry = c.lookup(ROOT, link)
    node = entry.nodeid
    target = os.fsencode(links[link])
    # The link itself, never what it points at.
    assert stat.S_ISLNK(entry.attr.mode), f"LOOKUP {link} followed the link: {oct(entry.attr.mode)}"
    assert entry.attr.size == len(target)
    assert stat.S_ISLNK(c.getattr(node).mode)
    assert c.readlink(node) == target, "READLINK must return the target verbatim"

    # The link's node id used as a directory.
    for child in ("secret.txt", CANARY_NAME, "sub", "etc", "inner.txt"):
        attack(c, Op.LOOKUP, node, cstr(child), NOT_A_DIR)
    p = PLANTED
    for opcode, body in [
        (Op.CREATE, create_in(os.O_CREAT | os.O_RDWR, 0o644) + cstr(p)),
        (Op.MKDIR, mkdir_in(0o755) + cstr(p)),
        (Op.MKNOD, mknod_in(stat.S_IFREG | 0o644) + cstr(p)),
        (Op.SYMLINK, cstr(p) + cstr("x")),
        (Op.UNLINK, cstr("secret.txt")),
        (Op.RMDIR, cstr("sub")),
        (Op.RENAME, rename_in(ROOT) + cstr("secret.txt") + cstr(p)),
    ]:
        attack(c, opcode, node, body, NOT_A_DIR)
    attack(c, Op.LINK, node, link_in(file_node) + cstr(p), NOT_A_DIR)
    attack(c, Op.RENAME, ROOT, rename_in(node) + cstr("clean.txt") + cstr(p), NOT_A_DIR)
    attack(c, Op.RENAME2, ROOT, rename2_in(node) + cstr("clean.txt") + cstr(p), NOT_A_DIR)
    # Opening it, for reading, writing or listing.
    for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDONLY | os.O_NOFOLLOW):
        attack(c, Op.OPEN, node, open_in(flags), REFUSED_OPEN)
    attack(c, Op.OPENDIR, node, open_in(os.O_RDONLY), REFUSED_OPEN)
    # Changing it must not change the target. Truncating a link is meaningless: an error.
    attack(c, Op.SETATTR, node, setattr_in(FATTR_SIZE, size=0), REFUSED_OPEN | NOT_A_DIR)
    for valid, kw in [
        (FATTR_MODE, {"mode": 0o4777}),
        (FATTR_UID | FATTR_GID, {"uid": 4242, "gid": 4242}),
        (FATTR_ATIME | FATTR_MTIME, {"atime": 1, "mtime": 1}),
    ]:
        c.call(Op.SETATTR, node, setattr_in(valid, **kw))  # any answer; the target is checked
    c.call(Op.SETXATTR, node, setxattr_in(1) + cstr(f"user.{PLANTED}") + b"x")
    c.call(Op.REMOVEXATTR, node, cstr("user.canary"))
    # Its xattrs are not the target's (the guard also fails on SECRET_X in any reply).
    c.call(Op.GETXATTR, node, getxattr_in(4096) + cstr("user.canary"))
    listed = c.call(Op.LISTXATTR, node, getxattr_in(4096))
    assert b"user.canary" not in listed.body
    alive(c)


@pytest.mark.parametrize("link", ["abs-file", "rel-file", "dangling-out", "proc-fd-file"])
def test_create_over_symlink_does_not_follow(world: World, link: str) -> None:
    """O_CREAT/O_TRUNC on a name that is a symlink must not reach the target."""
    place_links(world)
    c = world.client()
    for flags in (
        os.O_CREAT | os.O_RDWR,
        os.O_CREAT | os.O_WRONLY | os.O_TRUNC,
        os.O_CREAT | os.O_EXCL | os.O_WRONLY,
    ):
        attack(c, Op.CREATE, ROOT, create_in(flags, 0o644) + cstr(link), REFUSED_OPEN | {E.EEXIST})
    for opcode, body in [
        (Op.MKDIR, mkdir_in(0o755) + cstr(link)),
        (Op.MKNOD, mknod_in(stat.S_IFREG | 0o644) + cstr(link)),
        (Op.SYMLINK, cstr(link) + cstr("x")),
    ]:
        attack(c, opcode, ROOT, body, {E.EEXIST})


def test_guest_symlink_target_stored_verbatim(world: World, c: Client) -> None:
    targets = [
        b"/proc/self/root",
        b"../../../../../../../etc/passwd",
        os.fsencode(world.outside / "secret.txt"),
        b"/proc/self/fd/0",
        b"\xff\xfe not utf-8 \x01",
        b"t" * 4000,
    ]
    for i, target in enumerate(targets):
        name = f"{PLANTED}-guest-link-{i}"
        entry = c.symlink(ROOT, name, target)
        assert stat.S_ISLNK(entry.attr.mode)
        assert os.readlink(os.fsencode(world.share / name)) == target
        assert c.readlink(entry.nodeid) == target
        attack(c, Op.LOOKUP, entry.nodeid, cstr("secret.txt"), NOT_A_DIR)
        attack(c, Op.OPEN, entry.nodeid, open_in(os.O_RDONLY), REFUSED_OPEN)


def test_symlink_setattr_passthrough_identity_leaves_target(world: World) -> None:
    """With host identity, chmod/chown/utimes/truncate on a link must not land on its target."""
    place_links(world)
    c = world.client(identity="passthrough")
    for link in ("abs-file", "rel-file", "proc-fd-file", "abs-dir"):
        node = c.lookup(ROOT, link).nodeid
        attack(c, Op.SETATTR, node, setattr_in(FATTR_SIZE, size=0), REFUSED_OPEN | NOT_A_DIR)
        for valid, kw in [
            (FATTR_MODE, {"mode": 0o4777}),
            (FATTR_UID | FATTR_GID, {"uid": 4242, "gid": 4242}),
            (FATTR_ATIME | FATTR_MTIME, {"atime": 1, "mtime": 1}),
        ]:
            c.call(Op.SETATTR, node, setattr_in(valid, **kw))
        c.call(Op.SETXATTR, node, setxattr_in(1) + cstr(f"user.{PLANTED}") + b"x")
    alive(c)


# --- /proc magic links -----------------------------------------------------------------


def test_proc_bind_mounted_into_share(world: World) -> None:
    """An operator bound /proc into the share: its magic links stay opaque."""
    mnt = world.share / "procmnt"
    mnt.mkdir()
    if not bind_mount("/proc", mnt):
        pytest.skip("bind mounts are not allowed here")
    try:
        c = world.client()
        reply = c.call(Op.LOOKUP, ROOT, cstr("procmnt"))
        if not reply.ok:
            return  # refusing to cross into another mount is also safe
        proc = parse_entry(reply.body).nodeid
        links: list[int] = []
        for name in ("self", "thread-self"):
            r = c.call(Op.LOOKUP, proc, cstr(name))
            if r.ok:
                e = parse_entry(r.body)
                assert stat.S_ISLNK(e.attr.mode)
                links.append(e.nodeid)
        piddir = c.lookup(proc, str(os.getpid())).nodeid
        for name in ("root", "cwd", "exe"):
            e = c.lookup(piddir, name)
            assert stat.S_ISLNK(e.attr.mode), f"/proc/<pid>/{name} came back as {oct(e.attr.mode)}"
            links.append(e.nodeid)
        fddir = c.lookup(piddir, "fd").nodeid
        for fd in (world.outside_fd, world.secret_fd):
            e = c.lookup(fddir, str(fd))
            assert stat.S_ISLNK(e.attr.mode)
            links.append(e.nodeid)
        for node in links:
            for child in ("etc", "secret.txt", CANARY_NAME, "sub"):
                attack(c, Op.LOOKUP, node, cstr(child), NOT_A_DIR)
            for flags in (os.O_RDONLY, os.O_RDWR):
                attack(c, Op.OPEN, node, open_in(flags), REFUSED_OPEN)
            attack(c, Op.OPENDIR, node, open_in(0), REFUSED_OPEN)
            attack(c, Op.MKDIR, node, mkdir_in(0o755) + cstr(PLANTED), NOT_A_DIR)
            attack(c, Op.CREATE, node, create_in(os.O_CREAT | os.O_RDWR, 0o644) + cstr(PLANTED),
                   NOT_A_DIR)  # fmt: skip
        world.close_handlers()
    finally:
        unmount(mnt)


# --- a directory swapped for a symlink while the guest works in it ---------------------


def test_directory_swapped_for_symlink_race(world: World, c: Client) -> None:
    race = world.share / "race"
    race.mkdir()
    (race / "secret.txt").write_bytes(BENIGN)
    (race / "sub").mkdir()
    (race / "sub" / "inner.txt").write_bytes(BENIGN)
    evil = world.share / "race.evil"
    os.symlink(world.outside, evil)

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    a, b = os.fsencode(race), os.fsencode(evil)
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:
        # Atomic exchange, so the name always exists and the guest's LOOKUP finds one
        # or the other: the real directory or a symlink to the canary.
        while not stop.is_set() or swaps[0] < 2000:
            if libc.renameat2(at_fdcwd, a, at_fdcwd, b, rename_exchange) != 0:
                raise OSError(ctypes.get_errno(), "renameat2")
            swaps[0] += 1

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the swapper and the handler finely
    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    seen_link = seen_dir = 0
    try:
        for i in range(600):
            reply = c.call(Op.LOOKUP, ROOT, cstr("race"))
            if not reply.ok:
                continue
            node = parse_entry(reply.body)
            n = node.nodeid
            if stat.S_ISLNK(node.attr.mode):
                seen_link += 1
                expect_error(c.call(Op.LOOKUP, n, cstr("secret.txt")), NOT_A_DIR, "race link")
                expect_error(c.call(Op.OPENDIR, n, open_in(0)), REFUSED_OPEN, "race link")
            else:
                seen_dir += 1
                r = c.call(Op.LOOKUP, n, cstr("secret.txt"))
                if r.ok:
                    child = parse_entry(r.body).nodeid
                    r2 = c.call(Op.OPEN, child, open_in(os.O_RDONLY))
                    if r2.ok:
                        fh = int.from_bytes(r2.body[:8], "little")
                        data = c.read(child, fh, 0, 4096)
                        assert data == BENIGN
                        c.release(child, fh)
                    c.forget(child, 1)
                r = c.call(Op.LOOKUP, n, cstr(CANARY_NAME))
                assert not r.ok or parse_entry(r.body).nodeid == 0, "found the canary's name"
                r = c.call(Op.CREATE, n, create_in(os.O_CREAT | os.O_RDWR, 0o600)
                           + cstr(f"{PLANTED}-{i}"))  # fmt: skip
                if r.ok:
                    fh = int.from_bytes(r.body[128:136], "little")
                    c.release(parse_entry(r.body[:128]).nodeid, fh)
                    c.forget(parse_entry(r.body[:128]).nodeid, 1)
                r = c.call(Op.MKDIR, n, mkdir_in(0o700) + cstr(f"{PLANTED}-d{i}"))
                if r.ok:
                    c.forget(parse_entry(r.body).nodeid, 1)
                r = c.call(Op.OPENDIR, n, open_in(0))
                if r.ok:
                    fh = int.from_bytes(r.body[:8], "little")
                    c.call(Op.READDIR, n, read_in(fh, 0, 8192))
                    c.releasedir(n, fh)
            c.forget(n, 1)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)
    assert swaps[0] >= 2000
    alive(c)
    # Everything the guest created landed in the real directory (under either name).
    planted = [p for p in world.share.rglob(f"{PLANTED}*")]
    assert all(world.share in p.parents for p in planted)
    # Both sides of the race were hit, or the test proved nothing.
    assert seen_dir > 0 and seen_link > 0, f"dir {seen_dir}, link {seen_link}"


# --- device nodes, FIFOs, sockets ------------------------------------------------------

SPECIAL_KINDS: dict[str, tuple[int, tuple[int, int]]] = {
    "chr-null": (stat.S_IFCHR, (1, 3)),
    "chr-mem": (stat.S_IFCHR, (1, 1)),
    "chr-zero": (stat.S_IFCHR, (1, 5)),
    "blk-sda": (stat.S_IFBLK, (8, 0)),
    "blk-loop0": (stat.S_IFBLK, (7, 0)),
    "fifo": (stat.S_IFIFO, (0, 0)),
    "socket": (stat.S_IFSOCK, (0, 0)),
}


@pytest.mark.parametrize("kind", list(SPECIAL_KINDS))
def test_guest_mknod_is_a_regular_host_file(world: World, c: Client, kind: str) -> None:
    ftype, (major, minor) = SPECIAL_KINDS[kind]
    name = f"{PLANTED}-{kind}"
    rdev = new_encode_dev(major, minor)
    entry = c.mknod(ROOT, name, ftype | 0o666, rdev)
    host = world.share / name
    st = os.lstat(host)
    assert stat.S_ISREG(st.st_mode), f"MKNOD {kind} made a {oct(st.st_mode)} on the host"
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_rdev == 0
    # The guest sees what it asked for; the host keeps it in the record.
    assert stat.S_IFMT(entry.attr.mode) == ftype
    if ftype in (stat.S_IFCHR, stat.S_IFBLK):
        assert entry.attr.rdev == rdev
    raw = os.getxattr(host, STAT_XATTR)
    version, flags, _, _, _, mode, rec_rdev = STAT_RECORD.unpack(raw)
    assert version == 1 and flags & REC_MODE and stat.S_IFMT(mode) == ftype
    if ftype in (stat.S_IFCHR, stat.S_IFBLK):
        assert flags & REC_RDEV and rec_rdev == rdev
    assert STAT_XATTR.encode() not in c.listxattr(entry.nodeid)

    for flags in (os.O_RDWR, os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY):
        reply = no_block(
            lambda flags=flags: c.call(Op.OPEN, entry.nodeid, open_in(flags)), f"OPEN {kind}"
        )
        if reply.ok:
            # Whatever the broker opened is the regular file: written bytes read back.
            fh = int.from_bytes(reply.body[:8], "little")
            if flags & os.O_ACCMODE == os.O_RDWR:
                assert c.write(entry.nodeid, fh, 0, b"written") == 7
                assert c.read(entry.nodeid, fh, 0, 100) == b"written"
            c.release(entry.nodeid, fh)
        else:
            assert reply.errno in REFUSED_OPEN, errname(reply.errno)
    assert stat.S_ISREG(os.lstat(host).st_mode)
    alive(c)


@pytest.mark.parametrize("kind", list(SPECIAL_KINDS))
def test_host_special_file_is_never_opened(world: World, kind: str) -> None:
    """virtiofsd's CVE-2020-35517: only regular files and directories are opened."""
    ftype, (major, minor) = SPECIAL_KINDS[kind]
    name = f"host-{kind}"
    host = world.share / name
    os.mknod(host, ftype | 0o666, os.makedev(major, minor))
    fifo = host if ftype == stat.S_IFIFO else None
    watch = Inotify()
    watch.watch(world.share)
    try:
        c = world.client()
        node = c.lookup(ROOT, name).nodeid
        for flags in (
            os.O_RDONLY,
            os.O_WRONLY,
            os.O_RDWR,
            os.O_RDONLY | os.O_NONBLOCK,
            os.O_WRONLY | os.O_TRUNC,
        ):
            reply = no_block(
                lambda flags=flags: c.call(Op.OPEN, node, open_in(flags)), f"OPEN {kind}", fifo
            )
            expect_error(reply, REFUSED_OPEN, f"OPEN {kind} flags={flags:#o}")
        expect_error(c.call(Op.OPENDIR, node, open_in(0)), REFUSED_OPEN, f"OPENDIR {kind}")
        for flags in (os.O_CREAT | os.O_RDWR, os.O_CREAT | os.O_WRONLY | os.O_TRUNC):
            body = create_in(flags, 0o644) + cstr(name)
            reply = no_block(lambda body=body: c.call(Op.CREATE, ROOT, body), "CREATE", fifo)
            expect_error(reply, REFUSED_OPEN | {E.EEXIST}, f"CREATE over {kind}")
        body = setattr_in(FATTR_SIZE, size=0)
        reply = no_block(lambda: c.call(Op.SETATTR, node, body), f"truncate {kind}", fifo)
        expect_error(reply, REFUSED_OPEN, f"SETATTR size on {kind}")
        alive(c)
        opened = [(hex(m), n) for _, m, n in watch.events() if n == name and m & 0x23]
        assert not opened, f"the host {kind} was opened/read/written: {opened}"
        st = os.lstat(host)
        assert stat.S_IFMT(st.st_mode) == ftype and st.st_rdev == os.makedev(major, minor)
    finally:
        watch.close()


# --- forged node ids and file handles --------------------------------------------------


def forged_values(world: World) -> list[int]:
    rng = random.Random(0xF05E)
    return [
        0,
        2**64 - 1,
        2**63,
        2**63 - 1,
        2**32,
        2**32 - 1,
        0xDEADBEEFCAFEBABE,
        world.outside_fd,
        world.secret_fd,
        *(rng.getrandbits(64) for _ in range(6)),
    ]


def test_forged_node_ids(world: World) -> None:
    c = world.client()
    # Only the root is known yet: every other id is forged, small ones included (they
    # would be valid if node ids were raw descriptors, like the two canary fds here).
    values = forged_values(world)
    for n in [*range(2, 300), *values]:
        for opcode, body in [
            (Op.GETATTR, getattr_in()),
            (Op.LOOKUP, cstr(CANARY_NAME)),
            (Op.LOOKUP, cstr("secret.txt")),
            (Op.OPEN, open_in(os.O_RDONLY)),
        ]:
            expect_error(c.call(opcode, n, body), UNKNOWN_NODE, describe(opcode, n, body))
    p = cstr(PLANTED)
    for n in values:
        for opcode, nodeid, body in [
            (Op.OPENDIR, n, open_in(0)),
            (Op.READLINK, n, b""),
            (Op.LISTXATTR, n, getxattr_in(4096)),
            (Op.GETXATTR, n, getxattr_in(4096) + cstr("user.canary")),
            (Op.SETXATTR, n, setxattr_in(1) + cstr("user.x") + b"v"),
            (Op.SETATTR, n, setattr_in(FATTR_SIZE | FATTR_MODE, size=0, mode=0o777)),
            (Op.MKDIR, n, mkdir_in(0o755) + p),
            (Op.CREATE, n, create_in(os.O_CREAT | os.O_RDWR, 0o644) + p),
            (Op.MKNOD, n, mknod_in(stat.S_IFREG | 0o644) + p),
            (Op.SYMLINK, n, p + cstr("x")),
            (Op.UNLINK, n, cstr("secret.txt")),
            (Op.RMDIR, n, cstr("sub")),
            (Op.ACCESS, n, access_in(os.R_OK)),
            (Op.LINK, ROOT, link_in(n) + p),
            (Op.RENAME, ROOT, rename_in(n) + cstr("clean.txt") + p),
            (Op.RENAME, n, rename_in(ROOT) + cstr("secret.txt") + p),
            (Op.RENAME2, ROOT, rename2_in(n) + cstr("clean.txt") + p),
        ]:
            attack(c, opcode, nodeid, body, UNKNOWN_NODE)
    assert not list(world.share.glob(f"{PLANTED}*"))


def test_stale_node_id_after_forget(world: World, c: Client) -> None:
    d = c.lookup(ROOT, "dir").nodeid
    assert c.lookup(ROOT, "dir").nodeid == d  # lookup count 2
    c.forget(d, 1)
    assert c.lookup(d, "inner.txt")  # still known
    c.forget(d, 1)
    f = c.lookup(ROOT, "clean.txt").nodeid
    c.forget(f, 5)  # more than it has: clamps, the node goes
    for opcode, nodeid, body in [
        (Op.GETATTR, d, getattr_in()),
        (Op.LOOKUP, d, cstr("inner.txt")),
        (Op.OPENDIR, d, open_in(0)),
        (Op.MKDIR, d, mkdir_in(0o755) + cstr(PLANTED)),
        (Op.GETATTR, f, getattr_in()),
        (Op.OPEN, f, open_in(os.O_RDONLY)),
        (Op.LINK, ROOT, link_in(f) + cstr(PLANTED)),
    ]:
        attack(c, opcode, nodeid, body, UNKNOWN_NODE)
    assert c.forget(0xDEAD_0000_0000, 1) is None  # FORGET of an unknown id: no reply
    assert c.lookup(ROOT, "dir").nodeid  # and the name can be looked up afresh
    alive(c)


def test_forget_root_keeps_serving(world: World, c: Client) -> None:
    """The kernel never forgets the root; a guest that does must not unpin it."""
    c.forget(ROOT, 2**64 - 1)
    assert c.send(Op.BATCH_FORGET, 0, batch_forget_in([(ROOT, 2**63)] * 3)) is None
    alive(c)
    assert c.lookup(ROOT, "dir")
    assert b"file.txt" in c.listdir(ROOT)


def test_forged_file_handles(world: World, c: Client) -> None:
    f = c.lookup(ROOT, "file.txt").nodeid
    values = [*range(0, 128), *forged_values(world)]
    for fh in values:
        for opcode, nodeid, body in [
            (Op.READ, f, read_in(fh, 0, 4096)),
            (Op.WRITE, f, write_in(fh, 0, 1) + b"X"),
            (Op.FLUSH, f, flush_in(fh)),
            (Op.FSYNC, f, fsync_in(fh)),
            (Op.LSEEK, f, lseek_in(fh, 0, os.SEEK_END)),
            (Op.FALLOCATE, f, fallocate_in(fh, 0, 10)),
            (Op.COPY_FILE_RANGE, f, copy_file_range_in(fh, 0, f, fh, 100, 10)),
            (Op.READDIR, ROOT, read_in(fh, 0, 4096)),
            (Op.READDIRPLUS, ROOT, read_in(fh, 0, 4096)),
            (Op.RELEASE, f, release_in(fh)),
            (Op.RELEASEDIR, ROOT, release_in(fh)),
        ]:
            expect_error(c.call(opcode, nodeid, body), UNKNOWN_FH, describe(opcode, nodeid, body))
    alive(c)
    # The canary descriptors of this process are still open: a forged RELEASE closed nothing.
    os.fstat(world.secret_fd)
    os.fstat(world.outside_fd)
    assert (world.share / "file.txt").read_bytes() == SHARE_FILE


def test_directory_and_file_handles_not_interchangeable(world: World, c: Client) -> None:
    f = c.lookup(ROOT, "file.txt").nodeid
    dfh = c.opendir(ROOT)
    ffh = c.open(f, os.O_RDWR)
    for opcode, nodeid, body, allowed in [
        (Op.READ, f, read_in(dfh, 0, 4096), UNKNOWN_FH | {E.EISDIR}),
        (Op.WRITE, f, write_in(dfh, 0, 1) + b"X", UNKNOWN_FH | {E.EISDIR}),
        (Op.READDIR, ROOT, read_in(ffh, 0, 4096), UNKNOWN_FH | {E.ENOTDIR}),
        (Op.READDIRPLUS, ROOT, read_in(ffh, 0, 4096), UNKNOWN_FH | {E.ENOTDIR}),
    ]:
        attack(c, opcode, nodeid, body, allowed)
    # Releasing with the wrong kind: whatever the first answer, the handle is gone
    # exactly once (a double close would hit whatever reuses the descriptor).
    first = c.call(Op.RELEASE, f, release_in(dfh))
    second = c.call(Op.RELEASEDIR, ROOT, release_in(dfh))
    assert first.ok != second.ok, f"RELEASE then RELEASEDIR of one handle: {first}, {second}"
    assert c.read(f, ffh, 0, 100) == SHARE_FILE
    c.release(f, ffh)
    assert (world.share / "file.txt").read_bytes() == SHARE_FILE


def test_released_handle_is_gone(world: World, c: Client) -> None:
    f = c.lookup(ROOT, "file.txt").nodeid
    g = c.lookup(ROOT, "clean.txt").nodeid
    fh_a = c.open(f, os.O_RDONLY)
    c.release(f, fh_a)
    fh_b = c.open(g, os.O_RDONLY)  # may reuse A's descriptor number inside the broker
    if fh_a != fh_b:  # (a reused fh value would name B legitimately)
        attack(c, Op.READ, f, read_in(fh_a, 0, 100), UNKNOWN_FH)
        attack(c, Op.RELEASE, f, release_in(fh_a), UNKNOWN_FH)
    assert c.read(g, fh_b, 0, 100) == b"clean"
    c.release(g, fh_b)
    attack(c, Op.RELEASE, g, release_in(fh_b), UNKNOWN_FH)


def test_file_node_as_parent(world: World, c: Client) -> None:
    f = c.lookup(ROOT, "file.txt").nodeid
    attack(c, Op.LOOKUP, f, cstr("x"), {E.ENOTDIR})
    attack(c, Op.MKDIR, f, mkdir_in(0o755) + cstr(PLANTED), {E.ENOTDIR})
    attack(c, Op.CREATE, f, create_in(os.O_CREAT | os.O_RDWR, 0o644) + cstr(PLANTED), {E.ENOTDIR})
    attack(c, Op.OPENDIR, f, open_in(0), {E.ENOTDIR})
    d = c.lookup(ROOT, "dir").nodeid
    attack(c, Op.OPEN, d, open_in(os.O_RDWR), {E.EISDIR})
    attack(c, Op.LINK, ROOT, link_in(d) + cstr(PLANTED), {E.EPERM})


# --- malformed requests ------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 8, 15, 16, 24, 39])
def test_short_header(world: World, c: Client, n: int) -> None:
    """Contract: an unusable header gets EIO with unique 0."""
    full = request(Op.GETATTR, ROOT, getattr_in(), unique=0x77)
    reply = parse_reply(c.raw(full[:n]) or b"")
    assert reply.error == -E.EIO and reply.unique == 0, reply
    alive(c)


def _len_lie_error(reply: Reply, unique: int, what: str) -> None:
    expect_error(reply, {E.EINVAL, E.EIO}, what)
    # EINVAL answers the request it names; EIO may say it could not tell which.
    assert reply.unique == unique or (reply.errno == E.EIO and reply.unique == 0), what


@pytest.mark.parametrize("delta", [+1, +8, +4096, -1, -8, "zero", "header-only", "max"])
def test_length_field_lies(world: World, c: Client, delta: int | str) -> None:
    body = cstr("file.txt")
    actual = IN_HEADER_SIZE + len(body)
    if isinstance(delta, int):
        length = actual + delta
    else:
        length = {"zero": 0, "header-only": IN_HEADER_SIZE, "max": 2**32 - 1}[delta]
    unique = c.next_unique()
    raw = c.raw(request(Op.LOOKUP, ROOT, body, unique=unique, length=length))
    assert raw is not None
    _len_lie_error(parse_reply(raw), unique, f"LOOKUP with len={length}, actual {actual}")
    alive(c)


@pytest.mark.parametrize("excess", [1, 4096])
@pytest.mark.parametrize("what", ["WRITE", "LOOKUP", "SETXATTR", "GETATTR"])
def test_oversized_request(world: World, c: Client, what: str, excess: int) -> None:
    """Contract: requests larger than max_write + 4 KiB are refused with EINVAL (excess 1:
    the boundary as documented; 4096: well past it)."""
    f = c.lookup(ROOT, "file.txt").nodeid
    fh = c.open(f, os.O_RDWR)
    limit = c.max_write + 4096
    assert c.max_write > 0
    over = limit + excess - IN_HEADER_SIZE  # body bytes that make the request limit + excess
    if what == "WRITE":
        data = b"A" * (over - 40)
        attack(c, Op.WRITE, f, write_in(fh, 0, len(data)) + data, MALFORMED)
    elif what == "LOOKUP":
        attack(c, Op.LOOKUP, ROOT, b"a" * (over - 1) + b"\0", MALFORMED)
    elif what == "SETXATTR":
        name = cstr("user.big")
        value = b"v" * (over - 8 - len(name))
        attack(c, Op.SETXATTR, f, setxattr_in(len(value)) + name + value, MALFORMED)
    else:
        attack(c, Op.GETATTR, f, getattr_in() + b"\0" * (over - 16), MALFORMED)
    assert (world.share / "file.txt").read_bytes() == SHARE_FILE
    assert "user.big" not in os.listxattr(world.share / "file.txt")
    # The control: a write of exactly max_write fits.
    ok = b"B" * c.max_write
    assert c.write(f, fh, 0, ok) == len(ok)
    c.release(f, fh)


@pytest.mark.parametrize("opcode", [0, 7, 19, 53, 60, 100, 1000, 4096, 2**31, 2**32 - 1])
def test_garbage_opcode_enosys(world: World, c: Client, opcode: int) -> None:
    attack(c, opcode, ROOT, b"\0" * 64, {E.ENOSYS})


def test_init_twice(world: World, c: Client) -> None:
    attack(c, Op.INIT, 0, init_in(), ANY_ERROR)


def test_requests_before_init(world: World) -> None:
    c = world.client(init=False)
    # The contract says nothing: any error reply will do, and INIT still works after.
    for opcode, nodeid, body in [
        (Op.GETATTR, ROOT, getattr_in()),
        (Op.LOOKUP, ROOT, cstr("file.txt")),
        (Op.OPENDIR, ROOT, open_in(0)),
        (Op.MKDIR, ROOT, mkdir_in(0o755) + cstr(PLANTED)),
    ]:
        expect_error(c.call(opcode, nodeid, body), ANY_ERROR, describe(opcode, nodeid, body))
    assert not list(world.share.glob(f"{PLANTED}*"))
    c.init()
    alive(c)


def test_init_old_major_refused(world: World) -> None:
    c = world.client(init=False)
    expect_error(c.call(Op.INIT, 0, init_in(major=6)), ANY_ERROR, "INIT 6.x")
    c.init()
    alive(c)


def test_read_size_huge(world: World, c: Client) -> None:
    f = c.lookup(ROOT, "file.txt").nodeid
    fh = c.open(f, os.O_RDONLY)
    for size in (2**32 - 1, 2**31, 2**28):
        reply = c.call(Op.READ, f, read_in(fh, 0, size))
        assert (reply.ok and reply.body == SHARE_FILE) or reply.errno in MALFORMED, reply
    alive(c)


HUGE = [2**63 - 1, 2**63, 2**64 - 1, 10**15]


def test_huge_offsets_and_sizes(world: World, c: Client) -> None:
    """Values a Python server could choke on (OverflowError): any answer, no raise."""
    f = c.lookup(ROOT, "file.txt").nodeid
    fh = c.open(f, os.O_RDWR)
    dfh = c.opendir(ROOT)
    for off in HUGE:
        r = c.call(Op.READ, f, read_in(fh, off, 4096))
        assert r.errno in MALFORMED or r.body == b"", r
        r = c.call(Op.WRITE, f, write_in(fh, off, 1) + b"Z")
        assert not r.ok and r.errno in {E.EINVAL, E.EFBIG}, r
        for op in (Op.READDIR, Op.READDIRPLUS):
            r = c.call(op, ROOT, read_in(dfh, off, 4096))
            assert r.errno in MALFORMED or r.body == b"", r
        for whence in (os.SEEK_SET, os.SEEK_DATA, os.SEEK_HOLE, 99):
            c.call(Op.LSEEK, f, lseek_in(fh, off, whence))
        c.call(Op.FALLOCATE, f, fallocate_in(fh, off, off))
        c.call(Op.FALLOCATE, f, fallocate_in(fh, 0, off))
        c.call(Op.COPY_FILE_RANGE, f, copy_file_range_in(fh, off, f, fh, 0, off))
        r = c.call(Op.SETATTR, f, setattr_in(FATTR_SIZE, size=off))
        assert not r.ok and r.errno in {E.EINVAL, E.EFBIG}, r
        c.call(Op.SETATTR, f, setattr_in(FATTR_ATIME | FATTR_MTIME, atime=off, mtime=off))
        c.call(Op.SETATTR, f, setattr_in(FATTR_ATIME, atime=1, atimensec=2**32 - 1))
        c.call(Op.GETXATTR, f, getxattr_in(2**32 - 1) + cstr("user.x"))
        c.call(Op.LISTXATTR, f, getxattr_in(2**32 - 1))
        c.call(Op.ACCESS, f, access_in(2**32 - 1))
    for size in (0, 1, 2**32 - 1):
        for op in (Op.READDIR, Op.READDIRPLUS):
            c.call(op, ROOT, read_in(dfh, 0, size))
    assert (world.share / "file.txt").read_bytes() == SHARE_FILE
    c.release(f, fh)
    c.releasedir(ROOT, dfh)
    alive(c)


@pytest.mark.parametrize("claimed", ["more", "less", "zero", "max"])
def test_write_size_disagrees_with_payload(world: World, c: Client, claimed: str) -> None:
    f = c.lookup(ROOT, "file.txt").nodeid
    fh = c.open(f, os.O_RDWR)
    data = b"PAYLOAD!"
    size = {"more": len(data) + 10, "less": len(data) - 2, "zero": 0, "max": 2**32 - 1}[claimed]
    attack(c, Op.WRITE, f, write_in(fh, 0, size) + data, MALFORMED)
    assert (world.share / "file.txt").read_bytes() == SHARE_FILE


@pytest.mark.parametrize("claimed", ["more", "less", "max"])
def test_setxattr_size_disagrees_with_value(world: World, c: Client, claimed: str) -> None:
    f = c.lookup(ROOT, "file.txt").nodeid
    value = b"value-bytes"
    size = {"more": len(value) + 5, "less": len(value) - 3, "max": 2**32 - 1}[claimed]
    attack(c, Op.SETXATTR, f, setxattr_in(size) + cstr("user.new") + value, MALFORMED)
    assert "user.new" not in os.listxattr(world.share / "file.txt")


def test_xattr_size_probes(world: World, c: Client) -> None:
    f = c.lookup(ROOT, "file.txt").nodeid
    probe = c.call(Op.GETXATTR, f, getxattr_in(0) + cstr("user.x"))
    assert probe.ok and parse_getxattr_out(probe.body) == len(b"value")
    assert c.getxattr(f, "user.x", 5) == b"value"
    attack(c, Op.GETXATTR, f, getxattr_in(4) + cstr("user.x"), {E.ERANGE})
    attack(c, Op.GETXATTR, f, getxattr_in(0) + cstr("user.none"), {E.ENODATA})
    listed = c.listxattr(f)
    probe = c.call(Op.LISTXATTR, f, getxattr_in(0))
    assert probe.ok and parse_getxattr_out(probe.body) == len(listed)
    attack(c, Op.LISTXATTR, f, getxattr_in(1), {E.ERANGE})


TRUNCATED: list[tuple[str, int, bytes]] = [
    ("OPEN", Op.OPEN, b"\0" * 4),
    ("OPENDIR", Op.OPENDIR, b"\0" * 4),
    ("READ", Op.READ, b"\0" * 39),
    ("WRITE", Op.WRITE, b"\0" * 39),
    ("SETATTR", Op.SETATTR, b"\0" * 87),
    ("MKNOD-no-name", Op.MKNOD, mknod_in(stat.S_IFREG | 0o644)[:12]),
    ("MKNOD-compat-8", Op.MKNOD, mknod_in(stat.S_IFREG | 0o644)[:8]),
    ("MKDIR", Op.MKDIR, b"\0" * 4),
    ("CREATE", Op.CREATE, create_in(os.O_CREAT, 0o644)[:8]),
    ("RENAME", Op.RENAME, b"\0" * 4),
    ("RENAME-one-name", Op.RENAME, rename_in(ROOT) + cstr("clean.txt")),
    ("RENAME2", Op.RENAME2, rename2_in(ROOT)[:12]),
    ("LINK", Op.LINK, b"\0" * 4),
    ("SYMLINK-one-name", Op.SYMLINK, cstr(PLANTED)),
    ("GETXATTR", Op.GETXATTR, b"\0" * 4),
    ("LISTXATTR", Op.LISTXATTR, b"\0" * 4),
    ("SETXATTR", Op.SETXATTR, b"\0" * 4),
    ("SETXATTR-no-name", Op.SETXATTR, setxattr_in(0)),
    ("RELEASE", Op.RELEASE, b"\0" * 8),
    ("RELEASEDIR", Op.RELEASEDIR, b"\0" * 8),
    ("FLUSH", Op.FLUSH, b"\0" * 8),
    ("FSYNC", Op.FSYNC, b"\0" * 8),
    ("ACCESS", Op.ACCESS, b"\0" * 4),
    ("LSEEK", Op.LSEEK, b"\0" * 16),
    ("FALLOCATE", Op.FALLOCATE, b"\0" * 24),
    ("COPY_FILE_RANGE", Op.COPY_FILE_RANGE, b"\0" * 48),
    ("READDIR", Op.READDIR, b"\0" * 20),
    ("INIT", Op.INIT, b"\0" * 4),
    ("LOOKUP-empty", Op.LOOKUP, b""),
]


@pytest.mark.parametrize("case", TRUNCATED, ids=[t[0] for t in TRUNCATED])
def test_truncated_arguments(world: World, c: Client, case: tuple[str, int, bytes]) -> None:
    _, opcode, body = case
    before = share_state(world)
    nodeid = ROOT if opcode not in (Op.INIT,) else 0
    allowed = MALFORMED
    if opcode == Op.INIT:
        allowed = ANY_ERROR  # INIT twice, and short: any error
    attack(c, opcode, nodeid, body, allowed)
    assert share_state(world) == before


def test_forgets_with_lies_get_no_reply(world: World, c: Client) -> None:
    d = c.lookup(ROOT, "dir").nodeid
    for body in (
        b"",
        b"\0" * 4,
        batch_forget_in([(d, 1)], count=1000),
        batch_forget_in([(d, 1)], count=2**32 - 1),
        batch_forget_in([(2**64 - 1, 2**64 - 1), (0, 1), (world.secret_fd, 1)]),
    ):
        reply = c.send(Op.BATCH_FORGET, 0, body)
        assert reply is None or not reply.ok
    for body in (b"", b"\0" * 4):
        reply = c.send(Op.FORGET, d, body)
        assert reply is None or not reply.ok
    c.raw(request(Op.INTERRUPT, 0, interrupt_in(12345), unique=c.next_unique() | 1))
    alive(c)


def test_destroy_then_more_requests(world: World) -> None:
    c = world.client()
    c.lookup(ROOT, "dir")
    before = open_fds()
    fh = c.open(c.lookup(ROOT, "file.txt").nodeid, os.O_RDONLY)
    assert fh is not None
    reply = c.call(Op.DESTROY, 0)
    assert reply.ok
    # After DESTROY anything may be refused, but nothing may raise and the fds are gone.
    for opcode, nodeid, body in [
        (Op.GETATTR, ROOT, getattr_in()),
        (Op.LOOKUP, ROOT, cstr("file.txt")),
        (Op.READ, 2, read_in(fh, 0, 100)),
        (Op.DESTROY, 0, b""),
    ]:
        c.call(opcode, nodeid, body)
    assert open_fds() < before


# --- descriptor exhaustion (CVE-2020-10717) -------------------------------------------


def test_open_handle_cap(world: World) -> None:
    c = world.client(max_handles=16, max_inodes=64)
    f = c.lookup(ROOT, "file.txt").nodeid
    d = c.lookup(ROOT, "dir").nodeid
    fhs = [c.open(f, os.O_RDONLY) for _ in range(16)]
    fds = open_fds()
    for _ in range(2000):
        expect_error(c.call(Op.OPEN, f, open_in(os.O_RDONLY)), {E.EMFILE}, "OPEN over the cap")
    expect_error(c.call(Op.OPENDIR, d, open_in(0)), {E.EMFILE}, "OPENDIR over the cap")
    reply = c.call(Op.CREATE, ROOT, create_in(os.O_CREAT | os.O_RDWR, 0o644) + cstr(PLANTED))
    expect_error(reply, {E.EMFILE}, "CREATE over the cap")
    assert open_fds() <= fds + 2, "refused opens leaked descriptors"
    alive(c)  # lookups do not need handles
    c.release(f, fhs.pop())
    fhs.append(c.open(f, os.O_RDONLY))
    for fh in fhs:
        c.release(f, fh)
    dirs = [c.opendir(d) for _ in range(16)]
    expect_error(c.call(Op.OPEN, f, open_in(os.O_RDONLY)), {E.EMFILE}, "OPEN over the cap")
    for fh in dirs:
        c.releasedir(d, fh)
    assert read_file(c, f) == SHARE_FILE


def test_inode_cap(world: World) -> None:
    for i in range(100):
        (world.share / f"n{i:03}").write_bytes(b"")
    fds0 = open_fds()
    c = world.client(max_handles=16, max_inodes=64)
    known: list[int] = []
    first_refused = None
    for i in range(100):
        reply = c.call(Op.LOOKUP, ROOT, cstr(f"n{i:03}"))
        if reply.ok:
            assert first_refused is None, f"n{i:03} found after n{first_refused:03} was refused"
            known.append(parse_entry(reply.body).nodeid)
        else:
            expect_error(reply, {E.ENFILE}, f"LOOKUP n{i:03} over the inode cap")
            first_refused = i if first_refused is None else first_refused
    assert first_refused is not None, "100 inodes known with max_inodes=64"
    assert 56 <= len(known) <= 64, f"{len(known)} inodes known with max_inodes=64"
    for i in range(3000):
        name = f"n{first_refused + i % (100 - first_refused):03}"
        expect_error(c.call(Op.LOOKUP, ROOT, cstr(name)), {E.ENFILE}, "LOOKUP over the cap")
    for opcode, body in [
        (Op.MKDIR, mkdir_in(0o755) + cstr(f"{PLANTED}-d")),
        (Op.SYMLINK, cstr(f"{PLANTED}-s") + cstr("x")),
        (Op.MKNOD, mknod_in(stat.S_IFREG | 0o644) + cstr(f"{PLANTED}-n")),
        (Op.CREATE, create_in(os.O_CREAT | os.O_RDWR, 0o644) + cstr(f"{PLANTED}-c")),
    ]:
        expect_error(c.call(opcode, ROOT, body), {E.ENFILE}, describe(opcode, ROOT, body))
    assert open_fds() <= fds0 + 64 + 4, "more descriptors than the caps allow"
    assert c.getattr(ROOT)
    assert c.lookup(ROOT, "n000").nodeid == known[0]  # a known inode needs no new slot
    c.forget(known[0], 2)
    assert c.lookup(ROOT, f"n{first_refused:03}")  # a FORGET gave one back
    assert c.send(Op.BATCH_FORGET, 0, batch_forget_in([(n, 1) for n in known[1:11]])) is None
    for i in range(10):
        assert c.lookup(ROOT, f"n{first_refused + 1 + i:03}")
    dfh = c.opendir(ROOT)
    c.call(Op.READDIRPLUS, ROOT, read_in(dfh, 0, 1 << 16))  # at the cap: well-formed, no leak
    c.releasedir(ROOT, dfh)
    assert open_fds() <= fds0 + 64 + 4


def test_repeated_lookups_do_not_leak(world: World) -> None:
    c = world.client(max_handles=16, max_inodes=64)
    fds0 = open_fds()
    ids = {c.lookup(ROOT, "file.txt").nodeid for _ in range(5000)}
    assert len(ids) == 1, "one inode, one node id while it is known"
    assert open_fds() <= fds0 + 1
    (node,) = ids
    c.forget(node, 4999)
    assert c.getattr(node)
    c.forget(node, 1)
    attack(c, Op.GETATTR, node, getattr_in(), UNKNOWN_NODE)
    assert open_fds() <= fds0 + 1


# --- read-only shares --------------------------------------------------------------------


@dataclass
class RO:
    file: int
    dir: int
    empty: int
    fh: int
    link: int


RO_MUTATIONS: dict[str, Callable[[RO], tuple[int, int, bytes]]] = {
    "SETATTR-size": lambda n: (Op.SETATTR, n.file, setattr_in(FATTR_SIZE, size=0)),
    "SETATTR-mode": lambda n: (Op.SETATTR, n.file, setattr_in(FATTR_MODE, mode=0o4777)),
    "SETATTR-uid": lambda n: (Op.SETATTR, n.file, setattr_in(FATTR_UID, uid=4242)),
    "SETATTR-gid": lambda n: (Op.SETATTR, n.file, setattr_in(FATTR_GID, gid=4242)),
    "SETATTR-times": lambda n: (
        Op.SETATTR,
        n.file,
        setattr_in(FATTR_ATIME | FATTR_MTIME, atime=1, mtime=1),
    ),
    "SETATTR-dir-mode": lambda n: (Op.SETATTR, n.dir, setattr_in(FATTR_MODE, mode=0o777)),
    "SETATTR-link-owner": lambda n: (
        Op.SETATTR,
        n.link,
        setattr_in(FATTR_UID | FATTR_GID, uid=4242, gid=4242),
    ),
    "SETATTR-link-mode": lambda n: (Op.SETATTR, n.link, setattr_in(FATTR_MODE, mode=0o755)),
    "SYMLINK": lambda n: (Op.SYMLINK, ROOT, cstr(PLANTED) + cstr("x")),
    "MKNOD": lambda n: (Op.MKNOD, ROOT, mknod_in(stat.S_IFREG | 0o644) + cstr(PLANTED)),
    "MKNOD-chr": lambda n: (
        Op.MKNOD,
        ROOT,
        mknod_in(stat.S_IFCHR | 0o644, new_encode_dev(1, 3)) + cstr(PLANTED),
    ),
    "MKDIR": lambda n: (Op.MKDIR, ROOT, mkdir_in(0o755) + cstr(PLANTED)),
    "UNLINK": lambda n: (Op.UNLINK, ROOT, cstr("file.txt")),
    "RMDIR": lambda n: (Op.RMDIR, ROOT, cstr("empty")),
    "RENAME": lambda n: (Op.RENAME, ROOT, rename_in(ROOT) + cstr("file.txt") + cstr(PLANTED)),
    "RENAME2": lambda n: (
        Op.RENAME2,
        ROOT,
        rename2_in(ROOT, 2) + cstr("file.txt") + cstr("clean.txt"),
    ),
    "LINK": lambda n: (Op.LINK, ROOT, link_in(n.file) + cstr(PLANTED)),
    "CREATE": lambda n: (Op.CREATE, ROOT, create_in(os.O_CREAT | os.O_RDWR, 0o644) + cstr(PLANTED)),
    "CREATE-existing": lambda n: (
        Op.CREATE,
        ROOT,
        create_in(os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644) + cstr("file.txt"),
    ),
    "WRITE": lambda n: (Op.WRITE, n.file, write_in(n.fh, 0, 3) + b"XYZ"),
    "FALLOCATE": lambda n: (Op.FALLOCATE, n.file, fallocate_in(n.fh, 0, 1 << 20)),
    "COPY_FILE_RANGE": lambda n: (
        Op.COPY_FILE_RANGE,
        n.file,
        copy_file_range_in(n.fh, 0, n.file, n.fh, 5, 5),
    ),
    "SETXATTR": lambda n: (Op.SETXATTR, n.file, setxattr_in(1) + cstr("user.new") + b"v"),
    "SETXATTR-replace": lambda n: (Op.SETXATTR, n.file, setxattr_in(1) + cstr("user.x") + b"v"),
    "REMOVEXATTR": lambda n: (Op.REMOVEXATTR, n.file, cstr("user.x")),
}


@pytest.mark.parametrize("op", list(RO_MUTATIONS))
def test_readonly_share_refuses_mutation(world: World, op: str) -> None:
    link = world.share / "link"
    os.symlink("file.txt", link)
    os.setxattr(link, LINK_XATTR, stat_record(flags=REC_UID | REC_GID, uid=7, gid=8),
                follow_symlinks=False)  # fmt: skip
    before = share_state(world)
    c = world.client(readonly=True)
    f = c.lookup(ROOT, "file.txt").nodeid
    n = RO(f, c.lookup(ROOT, "dir").nodeid, c.lookup(ROOT, "empty").nodeid, c.open(f, os.O_RDONLY),
           c.lookup(ROOT, "link").nodeid)  # fmt: skip
    opcode, nodeid, body = RO_MUTATIONS[op](n)
    attack(c, opcode, nodeid, body, {E.EROFS})
    c.release(f, n.fh)
    assert share_state(world) == before


@pytest.mark.parametrize(
    "flags",
    [
        os.O_WRONLY,
        os.O_RDWR,
        os.O_RDONLY | os.O_TRUNC,
        os.O_WRONLY | os.O_APPEND,
        os.O_RDWR | os.O_APPEND,
        os.O_RDONLY | os.O_CREAT,
        os.O_WRONLY | os.O_TRUNC,
    ],
    ids=lambda f: f"{f:#o}",
)
def test_readonly_share_refuses_write_open(world: World, flags: int) -> None:
    before = share_state(world)
    c = world.client(readonly=True)
    f = c.lookup(ROOT, "file.txt").nodeid
    attack(c, Op.OPEN, f, open_in(flags), {E.EROFS})
    assert share_state(world) == before


def test_readonly_share_still_reads(world: World) -> None:
    c = world.client(readonly=True)
    f = c.lookup(ROOT, "file.txt").nodeid
    assert read_file(c, f) == SHARE_FILE
    assert b"inner.txt" in c.listdir(c.lookup(ROOT, "dir").nodeid)
    assert c.getxattr(f, "user.x") == b"value"


# --- identity virtualization --------------------------------------------------------------


def test_setattr_never_changes_host_identity(world: World, c: Client) -> None:
    host = world.share / "file.txt"
    st0 = os.lstat(host)
    f = c.lookup(ROOT, "file.txt").nodeid
    attr = c.setattr(f, FATTR_MODE | FATTR_UID | FATTR_GID, mode=0o6777, uid=1234, gid=5678)
    assert (attr.uid, attr.gid, stat.S_IMODE(attr.mode)) == (1234, 5678, 0o6777)
    assert stat.S_ISREG(attr.mode)
    c.call(Op.SETATTR, f, setattr_in(FATTR_MODE, mode=0o170777))  # type bits: garbage
    attr = c.getattr(f)
    assert stat.S_ISREG(attr.mode), "the guest changed a file's type with chmod"
    d = c.lookup(ROOT, "dir").nodeid
    c.setattr(d, FATTR_MODE | FATTR_UID, mode=0o7777, uid=0)
    for path, st in ((host, st0), (world.share / "dir", None)):
        now = os.lstat(path)
        want_mode = st.st_mode if st else stat.S_IFDIR | 0o755
        assert (now.st_mode, now.st_uid, now.st_gid) == (want_mode, 0, 0), path
    raw = os.getxattr(host, STAT_XATTR)
    version, flags, _, uid, gid, _, _ = STAT_RECORD.unpack(raw)
    assert version == 1 and flags & (REC_UID | REC_GID | REC_MODE) == REC_UID | REC_GID | REC_MODE
    assert (uid, gid) == (1234, 5678)


@pytest.mark.parametrize("op", ["CREATE", "MKNOD", "MKDIR"])
def test_guest_cannot_plant_setuid_on_host(world: World, c: Client, op: str) -> None:
    name = f"{PLANTED}-{op}"
    if op == "CREATE":
        entry, fh = c.create(ROOT, name, os.O_CREAT | os.O_RDWR, 0o6755)
        c.release(entry.nodeid, fh)
    elif op == "MKNOD":
        entry = c.mknod(ROOT, name, stat.S_IFREG | 0o6755)
    else:
        entry = c.mkdir(ROOT, name, 0o7777)
    st = os.lstat(world.share / name)
    assert st.st_mode & (stat.S_ISUID | stat.S_ISGID) == 0, f"host mode {oct(st.st_mode)}"
    assert st.st_uid == 0  # the broker's own, i.e. root: that is why suid must not land
    assert stat.S_IMODE(entry.attr.mode) & 0o777  # the guest's view is the guest's business


def test_identity_xattr_is_hidden(world: World, c: Client) -> None:
    f = c.lookup(ROOT, "file.txt").nodeid
    c.setattr(f, FATTR_MODE, mode=0o640)
    host = world.share / "file.txt"
    record = os.getxattr(host, STAT_XATTR)
    forged = stat_record(uid=0, gid=0, mode=stat.S_IFREG | 0o4755)
    hidden_names = [STAT_XATTR, "user.vmruntime.other", "user.vmruntime."]
    for name in hidden_names:
        attack(c, Op.GETXATTR, f, getxattr_in(4096) + cstr(name), ANY_ERROR)
        attack(c, Op.GETXATTR, f, getxattr_in(0) + cstr(name), ANY_ERROR)
        for flags in (0, 1, 2):  # XATTR_CREATE, XATTR_REPLACE
            body = setxattr_in(len(forged), flags) + cstr(name) + forged
            attack(c, Op.SETXATTR, f, body, ANY_ERROR)
        attack(c, Op.REMOVEXATTR, f, cstr(name), ANY_ERROR)
    listed = c.listxattr(f)
    assert b"user.vmruntime" not in listed
    probe = c.call(Op.LISTXATTR, f, getxattr_in(0))
    assert parse_getxattr_out(probe.body) == len(listed), "the size probe counts a hidden name"
    assert os.getxattr(host, STAT_XATTR) == record
    assert "user.vmruntime.other" not in os.listxattr(host)
    assert stat.S_IMODE(c.getattr(f).mode) == 0o640


# --- identity of symlinks (trusted.vmruntime.stat) -----------------------------------------

LINK_MODE = stat.S_IFLNK | 0o777


def host_link_record(path: Path) -> tuple[int, ...]:
    """(version, flags, uid, gid, mode, rdev) of the record on the host symlink itself."""
    raw = os.getxattr(path, LINK_XATTR, follow_symlinks=False)
    version, flags, _, uid, gid, mode, rdev = STAT_RECORD.unpack(raw)
    return version, flags, uid, gid, mode, rdev


def readdirplus_entry(c: Client, parent: int, name: bytes) -> Any:
    """``name``'s entry in a READDIRPLUS of ``parent`` (one request: the share is small)."""
    fh = c.opendir(parent)
    reply = c.call(Op.READDIRPLUS, parent, read_in(fh, 0, 65536))
    c.releasedir(parent, fh)
    assert reply.ok, reply
    entries = {d.name: d.entry for d in parse_dirents(reply.body, plus=True)}
    return entries[name]


def owner_and_mode(attr: Any) -> tuple[int, int, int]:
    return attr.uid, attr.gid, attr.mode


def test_symlink_lchown_is_recorded_not_applied(world: World, c: Client) -> None:
    link, target = world.share / "link", world.share / "file.txt"
    os.symlink("file.txt", link)
    link_before, target_before = os.lstat(link), os.lstat(target)
    node = c.lookup(ROOT, "link").nodeid
    assert owner_and_mode(c.getattr(node)) == (GUEST_UID, GUEST_GID, LINK_MODE)
    attr = c.setattr(node, FATTR_UID | FATTR_GID, uid=4242, gid=4343)
    assert owner_and_mode(attr) == (4242, 4343, LINK_MODE)
    replies = {
        "GETATTR": c.getattr(node),
        "LOOKUP": c.lookup(ROOT, "link").attr,
        "READDIRPLUS": readdirplus_entry(c, ROOT, b"link").attr,
    }
    assert {k: owner_and_mode(a) for k, a in replies.items()} == dict.fromkeys(
        replies, (4242, 4343, LINK_MODE)
    )
    c.setattr(node, FATTR_GID, gid=1)  # a later chown keeps what it does not name
    assert owner_and_mode(c.getattr(node)) == (4242, 1, LINK_MODE)
    file_attr = c.getattr(c.lookup(ROOT, "file.txt").nodeid)
    assert (file_attr.uid, file_attr.gid) == (GUEST_UID, GUEST_GID)  # not the target's
    for path, st in ((link, link_before), (target, target_before)):
        now = os.lstat(path)
        assert (now.st_mode, now.st_uid, now.st_gid) == (st.st_mode, st.st_uid, st.st_gid)
    assert host_link_record(link) == (1, REC_UID | REC_GID, 4242, 1, 0, 0)
    assert os.listxattr(target) == ["user.x"]


def test_symlink_record_mode_and_rdev_are_ignored(world: World) -> None:
    """A link is 0777 and no device, whatever a record on the host says."""
    link = world.share / "link"
    os.symlink("file.txt", link)
    forged = stat_record(uid=5, gid=6, mode=stat.S_IFCHR | 0o4755, rdev=new_encode_dev(1, 1))
    os.setxattr(link, LINK_XATTR, forged, follow_symlinks=False)
    c = world.client()
    attr = c.getattr(c.lookup(ROOT, "link").nodeid)
    assert (*owner_and_mode(attr), attr.rdev) == (5, 6, LINK_MODE, 0)


@pytest.mark.parametrize("identity", ["virtual", "passthrough"])
def test_symlink_chmod_is_eopnotsupp(world: World, identity: str) -> None:
    """As Linux answers fchmodat(AT_SYMLINK_NOFOLLOW); with an owner change in the same
    request, that is not done either."""
    os.symlink("file.txt", world.share / "link")
    c = world.client(identity=identity)
    node = c.lookup(ROOT, "link").nodeid
    before = share_state(world)
    attack(c, Op.SETATTR, node, setattr_in(FATTR_MODE, mode=0o4755), {E.EOPNOTSUPP})
    body = setattr_in(FATTR_MODE | FATTR_UID | FATTR_GID, mode=0o755, uid=4242, gid=4242)
    attack(c, Op.SETATTR, node, body, {E.EOPNOTSUPP})
    assert share_state(world) == before


def test_guest_symlink_records_its_creator(world: World, c: Client) -> None:
    c.uid, c.gid = 4321, 4322
    theirs = c.symlink(ROOT, "theirs", "file.txt")
    assert owner_and_mode(theirs.attr) == (4321, 4322, LINK_MODE)
    assert owner_and_mode(c.getattr(theirs.nodeid)) == (4321, 4322, LINK_MODE)
    assert host_link_record(world.share / "theirs") == (1, REC_UID | REC_GID, 4321, 4322, 0, 0)
    c.uid, c.gid = GUEST_UID, GUEST_GID  # the share's owner: nothing to record
    mine = c.symlink(ROOT, "mine", "file.txt")
    assert owner_and_mode(mine.attr) == (GUEST_UID, GUEST_GID, LINK_MODE)
    assert LINK_XATTR not in os.listxattr(world.share / "mine", follow_symlinks=False)
    for name in ("theirs", "mine"):
        host = os.lstat(world.share / name)
        assert (host.st_uid, host.st_gid) == (0, 0), name  # the broker's, i.e. root's


@pytest.mark.parametrize("target", ["file.txt", "link"])
def test_private_xattrs_refused_on_files_and_links(world: World, c: Client, target: str) -> None:
    """Every *.vmruntime.* name is EPERM for the guest, whatever it tries and on whatever
    inode, and never listed: the records stay the broker's."""
    os.symlink("file.txt", world.share / "link")
    for name in ("file.txt", "link"):
        c.setattr(c.lookup(ROOT, name).nodeid, FATTR_UID | FATTR_GID, uid=7, gid=8)
    node = c.lookup(ROOT, target).nodeid
    before = share_state(world)
    forged = stat_record(uid=0, gid=0, mode=stat.S_IFREG | 0o4755)
    for name in PRIVATE_XATTRS:
        attack(c, Op.GETXATTR, node, getxattr_in(4096) + cstr(name), {E.EPERM})
        attack(c, Op.GETXATTR, node, getxattr_in(0) + cstr(name), {E.EPERM})
        for flags in (0, 1, 2):  # XATTR_CREATE, XATTR_REPLACE
            body = setxattr_in(len(forged), flags) + cstr(name) + forged
            attack(c, Op.SETXATTR, node, body, {E.EPERM})
        attack(c, Op.REMOVEXATTR, node, cstr(name), {E.EPERM})
    listed = c.listxattr(node)
    assert b"vmruntime" not in listed
    probe = c.call(Op.LISTXATTR, node, getxattr_in(0))
    assert parse_getxattr_out(probe.body) == len(listed), "the size probe counts a hidden name"
    assert share_state(world) == before
    assert (c.getattr(node).uid, c.getattr(node).gid) == (7, 8)


def test_unprivileged_broker_refuses_link_owners_it_cannot_record(world: World) -> None:
    """docs/broker.md: without CAP_SYS_ADMIN a link record cannot be written. A change the
    guest would see is EOPNOTSUPP (a SYMLINK leaves no link behind); one it would not see
    succeeds; files keep their user.* records."""
    os.symlink("file.txt", world.share / "link")
    with WithoutSysAdmin(world.handler()) as served:
        c = Client(served.handle, guard=world.guard)
        c.init()
        node = c.lookup(ROOT, "link").nodeid
        before, fds = share_state(world), open_fds()
        owners = setattr_in(FATTR_UID | FATTR_GID, uid=4242, gid=4343)
        attack(c, Op.SETATTR, node, owners, {E.EOPNOTSUPP})
        attack(c, Op.SETATTR, node, setattr_in(FATTR_GID, gid=4343), {E.EOPNOTSUPP})
        same = c.setattr(node, FATTR_UID | FATTR_GID, uid=GUEST_UID, gid=GUEST_GID)
        assert owner_and_mode(same) == (GUEST_UID, GUEST_GID, LINK_MODE)
        c.uid, c.gid = 4321, 4322
        attack(c, Op.SYMLINK, ROOT, cstr("theirs") + cstr("file.txt"), {E.EOPNOTSUPP})
        assert share_state(world) == before and open_fds() == fds  # no link, no held inode
        c.uid, c.gid = GUEST_UID, GUEST_GID
        mine = c.symlink(ROOT, "mine", "file.txt")
        assert owner_and_mode(mine.attr) == (GUEST_UID, GUEST_GID, LINK_MODE)
        f = c.lookup(ROOT, "file.txt").nodeid
        assert c.setattr(f, FATTR_UID, uid=7).uid == 7


MALFORMED_RECORDS: dict[str, bytes] = {
    "short": stat_record(uid=4242, gid=4343, mode=stat.S_IFCHR | 0o4777)[:19],
    "long": stat_record(uid=4242, gid=4343, mode=stat.S_IFCHR | 0o4777) + b"\0",
    "version-99": stat_record(version=99, uid=4242, gid=4343, mode=stat.S_IFCHR | 0o4777),
    "version-0": stat_record(version=0, uid=4242, gid=4343, mode=stat.S_IFCHR | 0o4777),
    "empty": b"",
    "huge": b"\x01" * 4000,
}


@pytest.mark.parametrize("variant", list(MALFORMED_RECORDS))
def test_malformed_identity_record_is_ignored(world: World, variant: str) -> None:
    os.setxattr(world.share / "file.txt", STAT_XATTR, MALFORMED_RECORDS[variant])
    os.chmod(world.share / "clean.txt", 0o644)
    c = world.client()
    bad = c.getattr(c.lookup(ROOT, "file.txt").nodeid)
    clean = c.getattr(c.lookup(ROOT, "clean.txt").nodeid)
    assert (bad.mode, bad.uid, bad.gid, bad.rdev) == (clean.mode, clean.uid, clean.gid, 0)
    assert (bad.uid, bad.gid) == (GUEST_UID, GUEST_GID)
    alive(c)


def test_wellformed_identity_record_is_used(world: World) -> None:
    """The control for the test above: this record layout is the contract's."""
    os.setxattr(
        world.share / "file.txt",
        STAT_XATTR,
        stat_record(uid=4242, gid=4343, mode=stat.S_IFREG | 0o4755, flags=REC_UID | REC_GID | 4),
    )
    c = world.client()
    attr = c.getattr(c.lookup(ROOT, "file.txt").nodeid)
    assert (attr.uid, attr.gid, attr.mode) == (4242, 4343, stat.S_IFREG | 0o4755)


# --- namespaces and flags the host kernel would honour for root ---------------------------


@pytest.mark.parametrize(
    "name",
    ["security.capability", "system.posix_acl_access", "trusted.overlay.opaque", "security.ima"],
)
def test_privileged_xattrs_never_reach_the_host(world: World, c: Client, name: str) -> None:
    """The broker runs as root: a file capability or an ACL set by the guest would be
    honoured by the host (an ACL also rewrites the host's group mode bits). The contract
    only names user.vmruntime.*; the handler allows user.* alone and this pins that."""
    f = c.lookup(ROOT, "file.txt").nodeid
    host = world.share / "file.txt"
    before = os.lstat(host)
    values = {
        "security.capability": bytes.fromhex("0100000200002000") + bytes(12),
        "system.posix_acl_access": bytes.fromhex("02000000" "01000700ffffffff"
                                                 "04000700ffffffff" "20000700ffffffff"),
    }  # fmt: skip
    value = values.get(name, b"y")
    for flags in (0, 1):
        attack(c, Op.SETXATTR, f, setxattr_in(len(value), flags) + cstr(name) + value, ANY_ERROR)
    after = os.lstat(host)
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, 0, 0)
    assert os.listxattr(host) == ["user.x"]


def test_rename_whiteout_plants_no_device(world: World, c: Client) -> None:
    """RENAME_WHITEOUT leaves a 0:0 character device behind on the host."""
    c.call(Op.RENAME2, ROOT, rename2_in(ROOT, 4) + cstr("clean.txt") + cstr(PLANTED))
    c.call(Op.RENAME2, ROOT, rename2_in(ROOT, 4 | 1) + cstr("secret.txt") + cstr("file.txt"))
    for entry in os.scandir(world.share):
        st = entry.stat(follow_symlinks=False)
        assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode), (entry.name, oct(st.st_mode))
    alive(c)


@pytest.mark.parametrize(
    "flags",
    [os.O_TMPFILE | os.O_RDWR, os.O_WRONLY, os.O_RDWR | os.O_CREAT, os.O_PATH, os.O_RDONLY],
    ids=["O_TMPFILE", "O_WRONLY", "O_CREAT", "O_PATH", "O_RDONLY"],
)
def test_open_of_a_directory(world: World, c: Client, flags: int) -> None:
    """OPEN (not OPENDIR) of a directory: never a writable or unnamed file inside it."""
    d = c.lookup(ROOT, "dir").nodeid
    before = share_state(world)
    attack(c, Op.OPEN, d, open_in(flags), {E.EISDIR})
    assert share_state(world) == before


# --- the handler after close() ------------------------------------------------------------


def test_requests_after_close_never_reach_reused_descriptors(world: World) -> None:
    """A transport thread still serving a queue while the broker shuts down: the root's
    descriptor number is free after close() and the next open() in the process takes it.
    Nothing may then be looked up or read through that number."""
    handler = world.handler()
    c = Client(handler.handle, guard=world.guard)
    c.init()
    d = c.lookup(ROOT, "dir").nodeid
    f = c.lookup(ROOT, "file.txt").nodeid
    fh = c.open(f, os.O_RDONLY)
    handler.close()
    world.handlers.remove(handler)
    # Take the freed numbers, as any later open in the broker process would.
    squatters = [os.open(world.outside, os.O_RDONLY | os.O_DIRECTORY) for _ in range(4)]
    squatters += [os.open(world.outside / "secret.txt", os.O_RDONLY) for _ in range(4)]
    try:
        for opcode, nodeid, body in [
            (Op.LOOKUP, ROOT, cstr(CANARY_NAME)),
            (Op.LOOKUP, ROOT, cstr("secret.txt")),
            (Op.LOOKUP, d, cstr(CANARY_NAME)),
            (Op.GETATTR, f, getattr_in()),
            (Op.READ, f, read_in(fh, 0, 4096)),
            (Op.OPENDIR, ROOT, open_in(0)),
            (Op.CREATE, ROOT, create_in(os.O_CREAT | os.O_RDWR, 0o644) + cstr(PLANTED)),
            (Op.MKDIR, ROOT, mkdir_in(0o755) + cstr(PLANTED)),
        ]:
            expect_error(c.call(opcode, nodeid, body), ANY_ERROR, describe(opcode, nodeid, body))
    finally:
        # The squatters were opened after the canary watch started: drop their events.
        for fd in squatters:
            os.close(fd)
        world.outside_events()


# --- the scatter-gather entry point: the guest also chooses the buffer sizes ------------------


def sg_call(handler: Any, req: bytes, cuts: list[int], reply_sizes: list[int]) -> bytes | None:
    """handle_sg with the request split at ``cuts`` and reply buffers of the given sizes."""
    edges = [0, *cuts, len(req)]
    views = [memoryview(bytearray(req[a:b])) for a, b in itertools.pairwise(edges)]
    replies = [memoryview(bytearray(n)) for n in reply_sizes]
    n = handler.handle_sg(views, replies)
    if n is None:
        return None
    room = sum(reply_sizes)
    assert 0 <= n <= room, f"handle_sg says {n} bytes into {room}"
    return b"".join(bytes(v) for v in replies)[:n]


def test_sg_reply_buffers_too_small(world: World) -> None:
    handler = world.handler()
    c = Client(handler.handle, guard=world.guard)
    c.init()
    f = c.lookup(ROOT, "file.txt").nodeid
    fh = c.open(f, os.O_RDONLY)
    dfh = c.opendir(ROOT)
    for opcode, nodeid, body in [
        (Op.GETATTR, ROOT, getattr_in()),
        (Op.LOOKUP, ROOT, cstr("file.txt")),
        (Op.READ, f, read_in(fh, 0, 4096)),
        (Op.READDIR, ROOT, read_in(dfh, 0, 4096)),
        (Op.GETXATTR, f, getxattr_in(4096) + cstr("user.x")),
    ]:
        for sizes in ([], [0], [1], [15], [16], [17], [8, 8], [20, 3], [16, 0, 1]):
            unique = c.next_unique()
            raw = sg_call(handler, request(opcode, nodeid, body, unique=unique), [], sizes)
            if not raw:
                continue  # no room even for an error: nothing written, nothing raised
            world.guard(raw)
            reply = parse_reply(raw)
            assert reply.unique == unique, reply
    alive(c)


def test_sg_split_anywhere_matches_handle(world: World) -> None:
    handler = world.handler()
    c = Client(handler.handle, guard=world.guard)
    c.init()
    f = c.lookup(ROOT, "file.txt").nodeid
    fh = c.open(f, os.O_RDWR)
    data = b"sg-bytes!"
    req = request(Op.WRITE, f, write_in(fh, 0, len(data)) + data, unique=0x5151)
    for cut in range(1, len(req)):
        raw = sg_call(handler, req, [cut], [7, 100])
        assert raw is not None
        reply = parse_reply(raw)
        assert reply.ok and reply.unique == 0x5151 and reply.body[:4] == b"\x09\0\0\0", reply
    assert (world.share / "file.txt").read_bytes()[: len(data)] == data
    req = request(Op.READ, f, read_in(fh, 0, 64), unique=0x5252)
    for cut in range(1, len(req)):
        raw = sg_call(handler, req, [cut], [3, 13, 5, 200])
        assert raw is not None and parse_reply(raw).body == data + SHARE_FILE[len(data) :]
    over = request(Op.WRITE, f, write_in(fh, 0, c.max_write + 8192) + bytes(c.max_write + 8192),
                   unique=0x5353)  # fmt: skip
    raw = sg_call(handler, over, [40, 80, 4096], [64])
    assert raw is not None and parse_reply(raw).error == -E.EINVAL
    assert (world.share / "file.txt").read_bytes()[: len(data)] == data


def test_sg_request_and_reply_share_memory(world: World) -> None:
    """A guest may point a request's readable and writable descriptors at the same
    memory: the reply overwrites the request while the broker works on it."""
    handler = world.handler()
    c = Client(handler.handle, guard=world.guard)
    c.init()
    f = c.lookup(ROOT, "file.txt").nodeid
    fh = c.open(f, os.O_RDWR)
    for req in (
        request(Op.READ, f, read_in(fh, 0, 200), unique=0x6161),
        request(Op.WRITE, f, write_in(fh, 100, 16) + b"0123456789abcdef", unique=0x6262),
        request(Op.LOOKUP, ROOT, cstr("file.txt"), unique=0x6363),
    ):
        buf = bytearray(4096)
        buf[: len(req)] = req
        whole = memoryview(buf)
        n = handler.handle_sg([whole[: len(req)]], [whole])
        assert n is not None
        reply = parse_reply(bytes(buf[:n]))
        assert reply.unique == IN_HEADER.unpack_from(req)[2], reply
    alive(c)
