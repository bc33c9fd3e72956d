"""Messages between the host and the guest worker (format version 1; spec in
``docs/ray-worker-protocol.md``).

This module runs on both sides: the host imports it, and it is shipped into the guest
beside the worker, so it uses the standard library only. A message is a fixed header,
the lengths of its out-of-band buffers, the body, then the buffers, so large arrays
travel as they are (pickle protocol 5 buffers) instead of being copied into the body.
The host reads what the guest sends as attacker input: every length is checked
against limits before anything is allocated.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

VERSION = 1
MAGIC = b"VMRW"
HEADER = struct.Struct(">4sBBHIQ")  # magic, version, kind, reserved, buffer count, body length
LENGTH = struct.Struct(">Q")
MAX_BODY = 256 << 20
MAX_BUFFERS = 65536
DEFAULT_MAX_MESSAGE = 4 << 30


class Kind(IntEnum):
    # guest -> host
    HELLO = 1  # body: codec({"protocol", "python", "implementation", "pid"})
    RESULT = 2  # body: codec(value), buffers: its arrays and large bytes
    PICKLED_RESULT = 3  # body: a pickle (only for actors with trust_results=True)
    ERROR = 4  # body: codec({"type", "args", "message", "traceback"})
    REFUSED = 5  # body: codec({"type", "message"}): the result is not plain data
    # host -> guest
    CALL = 16  # body: cloudpickle of (fn, args, kwargs, pickled_result), buffers: protocol 5


class WireError(ValueError):
    """Bytes that are not a well-formed message, or one over the limits."""


@dataclass(frozen=True)
class Header:
    kind: int
    buffer_count: int
    body_length: int


def encode_header(kind: Kind, body: bytes | memoryview, buffers: Sequence[memoryview]) -> bytes:
    lengths = b"".join(LENGTH.pack(memoryview(b).nbytes) for b in buffers)
    return HEADER.pack(MAGIC, VERSION, kind, 0, len(buffers), memoryview(body).nbytes) + lengths


def parse_header(data: bytes) -> Header:
    magic, version, kind, _reserved, count, body_length = HEADER.unpack(data)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}")
    if version != VERSION:
        raise WireError(f"unsupported worker protocol version {version}")
    if count > MAX_BUFFERS:
        raise WireError(f"{count} buffers exceed the limit of {MAX_BUFFERS}")
    if body_length > MAX_BODY:
        raise WireError(f"a body of {body_length} bytes exceeds the limit of {MAX_BODY}")
    return Header(kind, count, body_length)


def parse_lengths(data: bytes, count: int, budget: int) -> list[int]:
    """The buffer lengths, refused if together they exceed ``budget`` bytes."""
    lengths = [LENGTH.unpack_from(data, 8 * i)[0] for i in range(count)]
    if sum(lengths) > budget:
        raise WireError(f"buffers of {sum(lengths)} bytes exceed the limit of {budget}")
    return lengths
