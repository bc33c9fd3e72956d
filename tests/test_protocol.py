"""The agent protocol codec (fast tier): framing and fields survive any chunking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmruntime.guest import protocol as p

frames = st.lists(
    st.tuples(
        st.sampled_from(list(p.MsgType)),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=300),
    ),
    max_size=30,
)


@given(frames, st.lists(st.integers(1, 64), min_size=1, max_size=50))
def test_frames_survive_any_chunking(items: list[tuple[int, int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(p.encode_frame(kind, channel, body) for kind, channel, body in items)
    decoder = p.FrameDecoder()
    decoded: list[p.Frame] = []
    offset, index = 0, 0
    while offset < len(stream):
        size = cuts[index % len(cuts)]
        decoded += decoder.feed(stream[offset : offset + size])
        offset += size
        index += 1
    assert decoded == [p.Frame(kind, channel, body) for kind, channel, body in items]
    assert decoder.pending == 0


@given(st.lists(st.tuples(st.integers(0, 65535), st.binary(max_size=100)), max_size=20))
def test_fields_round_trip(fields: list[tuple[int, bytes]]) -> None:
    assert p.decode_fields(p.encode_fields(fields)) == fields


def test_exec_request_encodes_every_field() -> None:
    request = p.ExecRequest(
        argv=["sh", "-c", "true"], env={"A": "1"}, cwd="/w", user="app", tty=True, rows=30,
        cols=90, rlimits=((7, 64, 128),), timeout_ms=1500, stdin=True,
    )  # fmt: skip
    [frame] = p.FrameDecoder().feed(request.encode(9))
    assert (frame.type, frame.channel) == (p.MsgType.EXEC, 9)
    fields = p.decode_fields(frame.body)
    assert [v for t, v in fields if t == p.Tag.ARG] == [b"sh", b"-c", b"true"]
    assert (p.Tag.ENV, b"A=1") in fields and (p.Tag.USER, b"app") in fields
    assert (p.Tag.RLIMIT, p.RLIMIT.pack(7, 64, 128)) in fields
    assert (p.Tag.TIMEOUT_MS, (1500).to_bytes(8, "little")) in fields


def test_mount_request_encodes_every_field() -> None:
    request = p.MountRequest("D3", "ext4", "/data/disk", readonly=True)
    [frame] = p.FrameDecoder().feed(request.encode(5))
    assert (frame.type, frame.channel) == (p.MsgType.MOUNT, 5)
    assert p.decode_fields(frame.body) == [
        (p.Tag.SOURCE, b"D3"), (p.Tag.FSTYPE, b"ext4"), (p.Tag.PATH, b"/data/disk"),
        (p.Tag.READONLY, (1).to_bytes(8, "little")),
    ]  # fmt: skip
    assert (p.MsgType.MOUNT, p.Tag.SOURCE, p.Tag.FSTYPE, p.Tag.READONLY) == (17, 33, 34, 35)


@pytest.mark.parametrize(("fstype", "path"), [("nfs", "/mnt"), ("virtiofs", "mnt")])
def test_mount_request_refuses_what_the_agent_would(fstype: str, path: str) -> None:
    with pytest.raises(ValueError):
        p.MountRequest("vmr0", fstype, path).encode(1)
