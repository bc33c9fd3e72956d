"""Property tests: whatever bytes a hostile guest sends, FuseHandler.handle never raises,
answers with a well-formed reply (or None for the no-reply opcodes), and nothing
outside the share is read, changed or created.

Requests are built and replies parsed with tests/broker_wire.py (from Linux's fuse.h,
independent of the broker's codec). Each example gets a fresh handler on a fresh
share, so one example's DESTROY or FORGET cannot hide another's result; the canary
beside the share is checked after every example so Hypothesis shrinks to the request
that escaped.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from broker_wire import (
    FUSE_ROOT_ID,
    IN_HEADER,
    IN_HEADER_SIZE,
    NO_REPLY_OPS,
    Client,
    Op,
    World,
    check_reply_shape,
    create_in,
    cstr,
    getattr_in,
    getxattr_in,
    link_in,
    mkdir_in,
    mknod_in,
    new_encode_dev,
    open_in,
    parse_entry,
    parse_reply,
    read_in,
    release_in,
    rename2_in,
    rename_in,
    setattr_in,
    setxattr_in,
    write_in,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = FUSE_ROOT_ID
CONTAINMENTS = ["openat2", "walk"]
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
U64_EDGES = [0, 1, 2, 3, 0xFFFF, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


@contextmanager
def session(world: World, rebuild: bool = True) -> Iterator[Client]:
    """A fresh, initialized handler for one example, on a fresh share unless the example
    cannot have changed it (or did not change what the next one relies on)."""
    if rebuild or not (world.share / "file.txt").is_file() or not (world.share / "dir").is_dir():
        world.build_share()
    handler = world.handler()
    try:
        client = Client(handler.handle, guard=world.guard)
        client.init()
        yield client
    finally:
        world.handlers.remove(handler)
        handler.close()


def check_answer(c: Client, data: bytes) -> None:
    """Send raw bytes; the answer must be what a guest kernel accepts."""
    out = c.raw(data)  # the guard has already looked for canary data
    opcode = unique = None
    if len(data) >= IN_HEADER_SIZE:
        _, opcode, unique, *_ = IN_HEADER.unpack_from(data)
    if out is None:
        assert opcode in NO_REPLY_OPS, f"no reply to {len(data)} bytes, opcode {opcode}"
        return
    reply = parse_reply(out)  # framing: len matches, errno sane, error replies bodiless
    if unique is None:
        # Contract: an unusable header gets EIO with unique 0.
        assert (reply.error, reply.unique) == (-errno.EIO, 0), reply
        return
    if reply.error == -errno.EIO:
        assert reply.unique in (0, unique), reply
    else:
        assert reply.unique == unique, f"unique {reply.unique:#x} for {unique:#x}"
    check_reply_shape(data, reply)


def assert_contained(world: World) -> None:
    events = world.outside_events()
    assert not events, f"the guest touched the canary: {events}"
    errors = world.internal_errors()
    assert not errors, f"the handler hit an unexpected exception: {errors}"


def alive(c: Client) -> None:
    assert stat.S_ISDIR(c.getattr(ROOT).mode)


# --- 1. arbitrary bytes ------------------------------------------------------------------


@st.composite
def framed(draw: st.DrawFn) -> bytes:
    """A header whose len is right (so it gets past framing) over random everything."""
    body = draw(st.binary(max_size=200))
    opcode = draw(st.integers(0, 60) | st.sampled_from([4096, 2**31, 2**32 - 1]))
    unique = draw(st.sampled_from([0, 1, 2**64 - 1]) | st.integers(0, 2**64 - 1))
    nodeid = draw(st.sampled_from(U64_EDGES) | st.integers(0, 2**64 - 1))
    header = IN_HEADER.pack(
        IN_HEADER_SIZE + len(body),
        opcode,
        unique,
        nodeid,
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**16 - 1)),  # total_extlen: 7.31 has no extensions
        draw(st.integers(0, 2**16 - 1)),
    )
    return header + body


@pytest.mark.timeout(120)
@pytest.mark.parametrize("containment", CONTAINMENTS)
def test_arbitrary_bytes(tmp_path: Path, containment: str) -> None:
    with World(tmp_path, containment) as world:

        @FUZZ
        @given(data=st.binary(max_size=300) | framed())
        def run(data: bytes) -> None:
            # Random bytes almost never form a valid mutating request; when they do,
            # session() notices the missing file and rebuilds.
            with session(world, rebuild=False) as c:
                check_answer(c, data)
                if len(data) < IN_HEADER_SIZE or IN_HEADER.unpack_from(data)[1] != Op.DESTROY:
                    alive(c)
            assert_contained(world)

        run()


# --- 2. a valid header, a random opcode, plausible arguments -------------------------------

NAMES = [
    "file.txt",
    "secret.txt",
    "dir",
    "sub",
    "a",
    "new",
    "..",
    ".",
    "",
    "a/b",
    "../outside",
    "/tmp",
    "x" * 256,
    "user.x",
    "user.vmruntime.stat",
]


@st.composite
def plausible_args(draw: st.DrawFn, handles: tuple[int, ...]) -> bytes:
    """Fixed-size fields drawn from edge values and live handles, then names."""
    words = draw(
        st.lists(
            st.sampled_from([*U64_EDGES, *handles]) | st.integers(0, 2**64 - 1),
            max_size=11,
        )
    )
    body = b"".join(struct.pack("<Q", w) for w in words)
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]  # cut anywhere, mid-field included
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=2)):
        body += cstr(name)
    return body + draw(st.binary(max_size=16))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("containment", CONTAINMENTS)
def test_random_opcode_and_arguments(tmp_path: Path, containment: str) -> None:
    with World(tmp_path, containment) as world:

        @FUZZ
        @given(data=st.data())
        def run(data: st.DataObject) -> None:
            with session(world, rebuild=False) as c:
                f = c.lookup(ROOT, "file.txt").nodeid
                d = c.lookup(ROOT, "dir").nodeid
                fh = c.open(f, os.O_RDWR)
                dfh = c.opendir(d)
                opcode = data.draw(st.integers(0, 60), label="opcode")
                nodeid = data.draw(st.sampled_from([0, ROOT, f, d, 2**64 - 1]), label="nodeid")
                body = data.draw(plausible_args((f, d, fh, dfh)), label="body")
                header = IN_HEADER.pack(
                    IN_HEADER_SIZE + len(body), opcode, c.next_unique(), nodeid, 0, 0, 0, 0, 0
                )
                check_answer(c, header + body)
                if opcode not in (Op.DESTROY,):
                    alive(c)
            assert_contained(world)

        run()


# --- 3. sequences of operations on a small tree -------------------------------------------

SEQ_NAMES = ["a", "b", "file.txt", "secret.txt", "dir", "sub", "lnk", "..", ".", "x/y", ""]
FILE_TYPES = [stat.S_IFREG, stat.S_IFDIR, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK]
OPEN_FLAGS = [
    os.O_RDONLY,
    os.O_WRONLY,
    os.O_RDWR,
    os.O_RDWR | os.O_TRUNC,
    os.O_WRONLY | os.O_APPEND,
    os.O_RDONLY | os.O_CREAT,
    os.O_RDONLY | os.O_DIRECTORY,
    os.O_RDWR | os.O_NOFOLLOW,
]
SETATTR_BITS = st.integers(0, 0x7FF)
INDEX = st.integers(0, 255)
_PICKS: dict[tuple[Any, ...], st.SearchStrategy[Any]] = {}


def pick(draw: Callable[[st.SearchStrategy[Any]], Any], values: Sequence[Any]) -> Any:
    """``draw(st.sampled_from(values))`` with the strategy built once: building one per
    draw cost more than the broker's whole work in these examples."""
    key = tuple(values)
    strategy = _PICKS.get(key)
    if strategy is None:
        strategy = _PICKS[key] = st.sampled_from(key)
    return draw(strategy)


def targets(world: World) -> list[str]:
    return [
        str(world.outside),
        str(world.outside / "secret.txt"),
        "../outside",
        "../outside/secret.txt",
        "/proc/self/root",
        f"/proc/self/fd/{world.secret_fd}",
        f"/proc/self/fd/{world.outside_fd}",
        "dir",
        "../../../../../../../..",
    ]


def run_sequence(world: World, c: Client, data: st.DataObject, steps: int) -> None:
    nodes = [ROOT, 2**64 - 1, 0]
    handles = [0, 2**64 - 1, world.secret_fd]
    draw = data.draw

    def node() -> int:
        return nodes[draw(INDEX) % len(nodes)]  # the list grows: an index, not sampled_from

    def name() -> bytes:
        return cstr(pick(draw, SEQ_NAMES))

    def handle() -> int:
        return handles[draw(INDEX) % len(handles)]

    for _ in range(steps):
        op = pick(draw, SEQ_OP_NAMES)
        opcode, nodeid, body = SEQ_OPS[op](world, node, name, handle, draw)
        reply = c.send(opcode, nodeid, body)
        if reply is None or not reply.ok:
            continue
        if opcode in (Op.LOOKUP, Op.MKDIR, Op.MKNOD, Op.SYMLINK, Op.LINK, Op.CREATE):
            entry = parse_entry(reply.body[:128])
            if entry.nodeid:
                nodes.append(entry.nodeid)
        if opcode in (Op.OPEN, Op.OPENDIR):
            handles.append(struct.unpack_from("<Q", reply.body)[0])
        if opcode == Op.CREATE:
            handles.append(struct.unpack_from("<Q", reply.body, 128)[0])


SEQ_OPS = {
    "lookup": lambda w, node, name, fh, draw: (Op.LOOKUP, node(), name()),
    "getattr": lambda w, node, name, fh, draw: (Op.GETATTR, node(), getattr_in()),
    "readlink": lambda w, node, name, fh, draw: (Op.READLINK, node(), b""),
    "create": lambda w, node, name, fh, draw: (
        Op.CREATE,
        node(),
        create_in(pick(draw, OPEN_FLAGS) | os.O_CREAT, 0o7777) + name(),
    ),
    "mkdir": lambda w, node, name, fh, draw: (Op.MKDIR, node(), mkdir_in(0o7777) + name()),
    "mknod": lambda w, node, name, fh, draw: (
        Op.MKNOD,
        node(),
        mknod_in(pick(draw, FILE_TYPES) | 0o7777, new_encode_dev(1, 3)) + name(),
    ),
    "symlink": lambda w, node, name, fh, draw: (
        Op.SYMLINK,
        node(),
        name() + cstr(pick(draw, targets(w))),
    ),
    "link": lambda w, node, name, fh, draw: (Op.LINK, node(), link_in(node()) + name()),
    "rename": lambda w, node, name, fh, draw: (
        Op.RENAME,
        node(),
        rename_in(node()) + name() + name(),
    ),
    "rename2": lambda w, node, name, fh, draw: (
        Op.RENAME2,
        node(),
        rename2_in(node(), pick(draw, [0, 1, 2, 4, 7])) + name() + name(),
    ),
    "unlink": lambda w, node, name, fh, draw: (Op.UNLINK, node(), name()),
    "rmdir": lambda w, node, name, fh, draw: (Op.RMDIR, node(), name()),
    "open": lambda w, node, name, fh, draw: (
        Op.OPEN,
        node(),
        open_in(pick(draw, OPEN_FLAGS)),
    ),
    "opendir": lambda w, node, name, fh, draw: (Op.OPENDIR, node(), open_in(0)),
    "read": lambda w, node, name, fh, draw: (
        Op.READ,
        node(),
        read_in(fh(), pick(draw, [0, 1, 4096, 2**63]), 4096),
    ),
    "write": lambda w, node, name, fh, draw: (Op.WRITE, node(), write_in(fh(), 0, 3) + b"W!\n"),
    "readdir": lambda w, node, name, fh, draw: (
        pick(draw, [Op.READDIR, Op.READDIRPLUS]),
        node(),
        read_in(fh(), pick(draw, [0, 1, 2, 2**63]), 4096),
    ),
    "release": lambda w, node, name, fh, draw: (
        pick(draw, [Op.RELEASE, Op.RELEASEDIR]),
        node(),
        release_in(fh()),
    ),
    "setattr": lambda w, node, name, fh, draw: (
        Op.SETATTR,
        node(),
        setattr_in(
            draw(SETATTR_BITS),
            fh=fh(),
            size=pick(draw, [0, 5, 2**63]),
            mode=pick(draw, [0o7777, 0o170777, stat.S_IFCHR | 0o644]),
            uid=pick(draw, [0, 1000, 2**32 - 1]),
            gid=pick(draw, [0, 1000, 2**32 - 1]),
        ),
    ),
    "setxattr": lambda w, node, name, fh, draw: (
        Op.SETXATTR,
        node(),
        setxattr_in(2) + cstr(pick(draw, ["user.a", "user.vmruntime.stat"])) + b"ab",
    ),
    "getxattr": lambda w, node, name, fh, draw: (
        Op.GETXATTR,
        node(),
        getxattr_in(pick(draw, [0, 64]))
        + cstr(pick(draw, ["user.a", "user.x", "user.vmruntime.stat"])),
    ),
    "listxattr": lambda w, node, name, fh, draw: (Op.LISTXATTR, node(), getxattr_in(4096)),
    "forget": lambda w, node, name, fh, draw: (
        Op.FORGET,
        node(),
        struct.pack("<Q", pick(draw, [1, 2**64 - 1])),
    ),
}


SEQ_OP_NAMES = list(SEQ_OPS)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("containment", CONTAINMENTS)
def test_operation_sequences_stay_inside(tmp_path: Path, containment: str) -> None:
    with World(tmp_path, containment) as world:

        @FUZZ
        @given(data=st.data())
        def run(data: st.DataObject) -> None:
            with session(world) as c:
                os.symlink(world.outside, world.share / "lnk")
                run_sequence(world, c, data, steps=data.draw(st.integers(1, 25), label="steps"))
                alive(c)
            assert_contained(world)

        run()
