"""The guest agent's frame protocol, version 1 (spec: ``docs/agent-protocol.md``).

Who calls it: the host's agent client (:mod:`vmruntime.vm.client`) and the tests
that drive the real agent binary. What it promises: frames and field lists are
encoded exactly as the spec says, and every byte that comes from a guest is
checked against the spec's bounds before it is used; anything else raises
:class:`AgentProtocolError`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from vmruntime.errors import AgentProtocolError

VERSION = 1
MAX_BODY = 1 << 20
WINDOW = 262144
MAX_DATA = 65536
U64_MAX = (1 << 64) - 1
HEADER = struct.Struct("<IBBHI")
_FIELD = struct.Struct("<HI")
_U64 = struct.Struct("<Q")
RLIMIT = struct.Struct("<QQQ")


class MsgType(IntEnum):
    HELLO = 1
    EXEC = 2
    STARTED = 3
    STDIN = 4
    STDOUT = 5
    STDERR = 6
    STDIN_EOF = 7
    WINDOW = 8
    SIGNAL = 9
    RESIZE = 10
    EXIT = 11
    ERROR = 12
    FILE_READ = 13
    FILE_WRITE = 14
    PORT_CONNECT = 15
    SHUTDOWN = 16
    MOUNT = 17
    ABORT = 18
    FREEZE = 19
    THAW = 20
    ADOPT = 21
    IDENTITY = 22


class Tag(IntEnum):
    VERSION_MIN = 1
    VERSION_MAX = 2
    VERSION = 3
    AGENT = 4
    KERNEL = 5
    UPTIME_MS = 6
    ARG = 10
    ENV = 11
    CWD = 12
    USER = 13
    TTY = 14
    ROWS = 15
    COLS = 16
    RLIMIT = 17
    TIMEOUT_MS = 18
    STDIN = 19
    PID = 20
    CODE = 21
    SIGNAL = 22
    CORE_DUMPED = 23
    TIMED_OUT = 24
    OOM_KILLED = 25
    ERRNO = 26
    MESSAGE = 27
    PATH = 28
    MODE = 29
    BYTES = 30
    GROUP = 31
    PORT = 32
    SOURCE = 33
    FSTYPE = 34
    READONLY = 35
    DETACHED = 36
    DROPPED = 37
    ENTROPY = 38
    TIME_NS = 39
    HOSTNAME = 40
    MACHINE_ID = 41


_STRING_TAGS = frozenset(
    {Tag.AGENT, Tag.KERNEL, Tag.ARG, Tag.ENV, Tag.CWD, Tag.USER, Tag.MESSAGE, Tag.PATH,
     Tag.SOURCE, Tag.FSTYPE, Tag.HOSTNAME, Tag.MACHINE_ID}
)  # fmt: skip
_DATA_TYPES = frozenset({MsgType.STDIN, MsgType.STDOUT, MsgType.STDERR})
FieldValue = int | bytes | str


@dataclass(frozen=True)
class Frame:
    type: int
    channel: int
    body: bytes = b""


def _violation(reason: str) -> AgentProtocolError:
    return AgentProtocolError("agent", reason)


def encode_frame(type: int, channel: int, body: bytes = b"") -> bytes:
    if len(body) > MAX_BODY:
        raise ValueError(f"frame body of {len(body)} bytes exceeds {MAX_BODY}")
    return HEADER.pack(len(body), int(type), 0, 0, channel) + body


def encode_fields(fields: Iterable[tuple[int, FieldValue]]) -> bytes:
    """Field list body: ints become u64, strs UTF-8, bytes go as they are."""
    parts: list[bytes] = []
    for tag, value in fields:
        if isinstance(value, bool | int):
            raw = _U64.pack(int(value))
        elif isinstance(value, str):
            raw = value.encode()
        else:
            raw = bytes(value)
        parts.append(_FIELD.pack(int(tag), len(raw)) + raw)
    return b"".join(parts)


def decode_fields(body: bytes) -> list[tuple[int, bytes]]:
    """Split a field-list body into (tag, raw value) pairs, checking every bound."""
    fields: list[tuple[int, bytes]] = []
    view = memoryview(body)
    offset = 0
    while offset < len(view):
        if len(view) - offset < _FIELD.size:
            raise _violation(f"truncated field header at byte {offset}")
        tag, length = _FIELD.unpack_from(view, offset)
        offset += _FIELD.size
        if length > len(view) - offset:
            raise _violation(f"field {tag} claims {length} bytes, {len(view) - offset} remain")
        fields.append((tag, bytes(view[offset : offset + length])))
        offset += length
    return fields


class Fields:
    """Typed access to a decoded field list; each accessor validates the value."""

    def __init__(self, body: bytes, allowed: frozenset[Tag]) -> None:
        self._values: dict[int, list[bytes]] = {}
        for tag, raw in decode_fields(body):
            if tag not in allowed:
                raise _violation(f"unexpected field tag {tag}")
            self._values.setdefault(tag, []).append(raw)

    def __contains__(self, tag: Tag) -> bool:
        return tag in self._values

    def u64(self, tag: Tag, default: int | None = None) -> int:
        raws = self._values.get(tag)
        if not raws:
            if default is None:
                raise _violation(f"missing field {tag.name}")
            return default
        if len(raws) > 1:
            raise _violation(f"field {tag.name} repeated")
        if len(raws[0]) != _U64.size:
            raise _violation(f"field {tag.name} is {len(raws[0])} bytes, not 8")
        return _U64.unpack(raws[0])[0]

    def text(self, tag: Tag, default: str | None = None, limit: int = 4096) -> str:
        raws = self._values.get(tag)
        if not raws:
            if default is None:
                raise _violation(f"missing field {tag.name}")
            return default
        raw = raws[0]
        if len(raws) > 1 or len(raw) > limit:
            raise _violation(f"field {tag.name} repeated or longer than {limit} bytes")
        return raw.decode("utf-8", "replace")


def check_frame(frame: Frame) -> None:
    """Reject a guest frame whose type or body size the spec does not allow."""
    try:
        kind = MsgType(frame.type)
    except ValueError:
        raise _violation(f"unknown frame type {frame.type}") from None
    if kind in _DATA_TYPES and len(frame.body) > MAX_DATA:
        raise _violation(f"{kind.name} frame of {len(frame.body)} bytes exceeds {MAX_DATA}")


class FrameDecoder:
    """Incremental splitter of a byte stream into frames (hostile input)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        offset = 0
        # Frames are cut at an offset and the buffer is compacted once per feed, so a
        # guest sending many tiny frames costs linear, not quadratic, host time.
        while len(self._buffer) - offset >= HEADER.size:
            length, kind, flags, reserved, channel = HEADER.unpack_from(self._buffer, offset)
            if length > MAX_BODY:
                raise _violation(f"frame length {length} exceeds {MAX_BODY}")
            if flags or reserved:
                raise _violation(f"frame with nonzero flags {flags} / reserved {reserved}")
            start = offset + HEADER.size
            if len(self._buffer) < start + length:
                break
            frames.append(Frame(kind, channel, bytes(self._buffer[start : start + length])))
            offset = start + length
        del self._buffer[:offset]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)


# Message builders the host sends.


def hello() -> bytes:
    return encode_frame(
        MsgType.HELLO, 0, encode_fields([(Tag.VERSION_MIN, VERSION), (Tag.VERSION_MAX, VERSION)])
    )


@dataclass(frozen=True)
class ExecRequest:
    argv: list[str]
    env: dict[str, str]
    cwd: str = "/"
    user: str = ""
    tty: bool = False
    rows: int = 24
    cols: int = 80
    rlimits: tuple[tuple[int, int, int], ...] = ()
    timeout_ms: int = 0
    stdin: bool = False
    detached: bool = False  # outlives the connection: parked for a later ADOPT

    def encode(self, channel: int) -> bytes:
        if not self.argv:
            raise ValueError("exec needs at least one argv element")
        fields: list[tuple[int, FieldValue]] = [(Tag.ARG, a) for a in self.argv]
        fields += [(Tag.ENV, f"{k}={v}") for k, v in self.env.items()]
        fields += [(Tag.CWD, self.cwd)]
        if self.user:
            fields.append((Tag.USER, self.user))
        fields += [(Tag.TTY, int(self.tty)), (Tag.ROWS, self.rows), (Tag.COLS, self.cols)]
        fields += [(Tag.RLIMIT, RLIMIT.pack(*limit)) for limit in self.rlimits]
        fields += [(Tag.TIMEOUT_MS, self.timeout_ms), (Tag.STDIN, int(self.stdin))]
        if self.detached:  # only when asked: an agent older than DETACHED refuses the tag
            fields.append((Tag.DETACHED, 1))
        return encode_frame(MsgType.EXEC, channel, encode_fields(fields))


def window(channel: int, nbytes: int) -> bytes:
    return encode_frame(MsgType.WINDOW, channel, encode_fields([(Tag.BYTES, nbytes)]))


def signal(channel: int, signo: int, group: bool = False) -> bytes:
    body = encode_fields([(Tag.SIGNAL, signo), (Tag.GROUP, int(group))])
    return encode_frame(MsgType.SIGNAL, channel, body)


def resize(channel: int, rows: int, cols: int) -> bytes:
    body = encode_fields([(Tag.ROWS, rows), (Tag.COLS, cols)])
    return encode_frame(MsgType.RESIZE, channel, body)


def file_read(channel: int, path: str) -> bytes:
    return encode_frame(MsgType.FILE_READ, channel, encode_fields([(Tag.PATH, path)]))


def file_write(channel: int, path: str, mode: int) -> bytes:
    body = encode_fields([(Tag.PATH, path), (Tag.MODE, mode)])
    return encode_frame(MsgType.FILE_WRITE, channel, body)


def port_connect(channel: int, port: int) -> bytes:
    return encode_frame(MsgType.PORT_CONNECT, channel, encode_fields([(Tag.PORT, port)]))


def freeze(channel: int, timeout_ms: int = 0) -> bytes:
    """Freeze the writable layer; the agent thaws it by itself after ``timeout_ms`` (0: never)."""
    body = encode_fields([(Tag.TIMEOUT_MS, timeout_ms)]) if timeout_ms else b""
    return encode_frame(MsgType.FREEZE, channel, body)


def thaw(channel: int) -> bytes:
    return encode_frame(MsgType.THAW, channel)


MAX_PID = 1 << 22  # the kernel's PID_MAX_LIMIT


def adopt(channel: int, pid: int) -> bytes:
    """Take over the parked detached exec ``pid`` on ``channel``."""
    if not 0 < pid <= MAX_PID:
        raise ValueError(f"pid {pid} out of range")
    return encode_frame(MsgType.ADOPT, channel, encode_fields([(Tag.PID, pid)]))


ENTROPY_MIN, ENTROPY_MAX = 32, 4096
HOSTNAME_MAX = 64


@dataclass(frozen=True)
class IdentityRequest:
    """A fresh identity for a clone: RNG seed bytes, realtime clock (ns since the epoch),
    hostname, machine-id (32 lowercase hex digits); None leaves that part alone."""

    entropy: bytes | None = None
    time_ns: int | None = None
    hostname: str | None = None
    machine_id: str | None = None

    def __post_init__(self) -> None:
        if self.entropy is not None and not ENTROPY_MIN <= len(self.entropy) <= ENTROPY_MAX:
            raise ValueError(f"entropy of {len(self.entropy)} bytes: want "
                             f"{ENTROPY_MIN} to {ENTROPY_MAX}")  # fmt: skip
        if self.time_ns is not None and not 0 <= self.time_ns < 1 << 63:
            raise ValueError(f"time_ns {self.time_ns} out of range")
        if self.hostname is not None:
            raw = self.hostname.encode()
            if not 0 < len(raw) <= HOSTNAME_MAX or any(c in raw for c in b"\0/\n"):
                raise ValueError(f"hostname {self.hostname!r}: want 1 to {HOSTNAME_MAX} bytes, "
                                 "no NUL, '/' or newline")  # fmt: skip
        if self.machine_id is not None and not _is_machine_id(self.machine_id):
            raise ValueError(f"machine id {self.machine_id!r}: want 32 lowercase hex digits")

    def encode(self, channel: int) -> bytes:
        fields: list[tuple[int, FieldValue]] = []
        if self.entropy is not None:
            fields.append((Tag.ENTROPY, self.entropy))
        if self.time_ns is not None:
            fields.append((Tag.TIME_NS, self.time_ns))
        if self.hostname is not None:
            fields.append((Tag.HOSTNAME, self.hostname))
        if self.machine_id is not None:
            fields.append((Tag.MACHINE_ID, self.machine_id))
        return encode_frame(MsgType.IDENTITY, channel, encode_fields(fields))


def _is_machine_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


MOUNT_FSTYPES = ("virtiofs", "ext4", "bind", "fuse-console")


@dataclass(frozen=True)
class MountRequest:
    """Mount a share (``virtiofs``, by its device tag; ``fuse-console``, by its console port's
    name, relayed by the agent), a disk (``ext4``, by its serial), or
    a directory of the root again (``bind``, by its path; ``/`` on ``/`` read-only makes
    the root read-only while the mounts under it keep their flags)."""

    source: str
    fstype: str
    path: str
    readonly: bool = False

    def encode(self, channel: int) -> bytes:
        if self.fstype not in MOUNT_FSTYPES:
            raise ValueError(f"fstype {self.fstype!r}: want one of {MOUNT_FSTYPES}")
        if not self.path.startswith("/"):
            raise ValueError(f"mount path {self.path!r} is not absolute")
        fields: list[tuple[int, FieldValue]] = [
            (Tag.SOURCE, self.source), (Tag.FSTYPE, self.fstype), (Tag.PATH, self.path),
            (Tag.READONLY, int(self.readonly)),
        ]  # fmt: skip
        return encode_frame(MsgType.MOUNT, channel, encode_fields(fields))


# Guest messages, parsed and validated.


@dataclass(frozen=True)
class Hello:
    version: int
    agent: str
    kernel: str
    uptime_ms: int


@dataclass(frozen=True)
class Exit:
    code: int | None
    signal: int | None
    core_dumped: bool = False
    timed_out: bool = False
    oom_killed: bool = False


@dataclass(frozen=True)
class GuestError:
    errno: int
    message: str


_HELLO_TAGS = frozenset({Tag.VERSION, Tag.AGENT, Tag.KERNEL, Tag.UPTIME_MS})
_EXIT_TAGS = frozenset({Tag.CODE, Tag.SIGNAL, Tag.CORE_DUMPED, Tag.TIMED_OUT, Tag.OOM_KILLED})


def parse_hello(body: bytes) -> Hello:
    fields = Fields(body, _HELLO_TAGS)
    version = fields.u64(Tag.VERSION)
    if version != VERSION:
        raise _violation(f"agent chose protocol version {version}, we speak {VERSION}")
    return Hello(
        version=version,
        agent=fields.text(Tag.AGENT, "", limit=256),
        kernel=fields.text(Tag.KERNEL, "", limit=256),
        uptime_ms=fields.u64(Tag.UPTIME_MS, 0),
    )


@dataclass(frozen=True)
class Started:
    pid: int
    dropped: int = 0  # ADOPT: output bytes dropped while the exec was parked


# An exec parks at most 1 MiB; anything near 2^62 dropped bytes is a lie, not a count.
_MAX_DROPPED = 1 << 62


def parse_started_info(body: bytes) -> Started:
    fields = Fields(body, frozenset({Tag.PID, Tag.DROPPED}))
    pid = fields.u64(Tag.PID)
    if pid > MAX_PID:
        raise _violation(f"pid {pid} out of range")
    dropped = fields.u64(Tag.DROPPED, 0)
    if dropped > _MAX_DROPPED:
        raise _violation(f"dropped byte count {dropped} is absurd")
    return Started(pid, dropped)


def parse_started(body: bytes) -> int:
    return parse_started_info(body).pid


def _flag(fields: Fields, tag: Tag) -> bool:
    value = fields.u64(tag, 0)
    if value > 1:
        raise _violation(f"flag {tag.name} is {value}, not 0 or 1")
    return bool(value)


def parse_exit(body: bytes) -> Exit:
    fields = Fields(body, _EXIT_TAGS)
    has_code, has_signal = Tag.CODE in fields, Tag.SIGNAL in fields
    if has_code == has_signal:
        raise _violation("EXIT needs exactly one of CODE and SIGNAL")
    code = fields.u64(Tag.CODE) if has_code else None
    signo = fields.u64(Tag.SIGNAL) if has_signal else None
    if code is not None and code > 255:
        raise _violation(f"exit code {code} out of range")
    if signo is not None and not 0 < signo < 65:
        raise _violation(f"signal {signo} out of range")
    return Exit(
        code=code,
        signal=signo,
        core_dumped=_flag(fields, Tag.CORE_DUMPED),
        timed_out=_flag(fields, Tag.TIMED_OUT),
        oom_killed=_flag(fields, Tag.OOM_KILLED),
    )


def parse_error(body: bytes) -> GuestError:
    fields = Fields(body, frozenset({Tag.ERRNO, Tag.MESSAGE}))
    errno = fields.u64(Tag.ERRNO, 0)
    if errno > 4095:
        raise _violation(f"errno {errno} out of range")
    return GuestError(errno, fields.text(Tag.MESSAGE, "", limit=4096))


def parse_window(body: bytes) -> int:
    nbytes = Fields(body, frozenset({Tag.BYTES})).u64(Tag.BYTES)
    if nbytes > MAX_BODY * 64:
        raise _violation(f"window increment {nbytes} is absurd")
    return nbytes
