"""The streaming tar reader, checked against :mod:`tarfile` and GNU tar.

Archives written by :mod:`tarfile` in all three formats must read back exactly
as :mod:`tarfile` reads them; headers crafted byte by byte cover what
:mod:`tarfile` does not write (base-256 sizes, odd octal fields, signed
checksums, v7 directories); GNU tar covers sparse members.  Streams are fed
through readers that return short reads, and the reader's buffer is shrunk,
so that headers and data straddle every kind of boundary.
"""

from __future__ import annotations

import base64
import io
import math
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

import pytest
from helpers import ShortReads, pattern
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmruntime.errors import LayerError
from vmruntime.rootfs import tarstream
from vmruntime.rootfs.tarstream import TarEntry, TarReader

LAYER = "sha256:tarstream-test"
FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


# --- reading archives two ways ----------------------------------------------------


class ReadOnly:
    """A stream with ``read`` but no ``readinto``."""

    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(min(size, 1000))


@dataclass(frozen=True)
class Member:
    """What a reader says about one member (text decoded as tarfile decodes it)."""

    name: str
    type: bytes
    size: int
    mode: int
    uid: int
    gid: int
    mtime: int
    linkname: str
    devmajor: int
    devminor: int
    uname: str
    gname: str
    data: bytes


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def ours(stream: object, **kwargs) -> list[Member]:
    """The archive as TarReader sees it; checks it read the stream to the end."""
    reader = TarReader(stream, LAYER, **kwargs)  # type: ignore[arg-type]
    members = []
    for entry in reader:
        data = b"".join(bytes(chunk) for chunk in iter(lambda: reader.read(1000), b""))
        members.append(_member(entry, data))
    assert reader.next() is None
    if isinstance(stream, ShortReads):
        assert stream.consumed == len(stream._data), "the stream must be read to its end"
    return members


def _member(entry: TarEntry, data: bytes) -> Member:
    return Member(
        _text(entry.name),
        entry.type,
        entry.size,
        entry.mode,
        entry.uid,
        entry.gid,
        entry.mtime,
        _text(entry.linkname),
        entry.devmajor,
        entry.devminor,
        _text(entry.uname),
        _text(entry.gname),
        data,
    )


def theirs(data: bytes) -> list[Member]:
    """The archive as tarfile's stream mode sees it."""
    members = []
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r|", encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info in tar:
            content = b""
            if info.isreg():
                source = tar.extractfile(info)
                assert source is not None
                content = source.read()
            pax_mtime = info.pax_headers.get("mtime")
            # tarfile keeps the mtime as a float: use the exact text when there is one.
            mtime = (
                int(Decimal(pax_mtime).to_integral_value(rounding=ROUND_FLOOR))
                if pax_mtime is not None
                else math.floor(info.mtime)
            )
            members.append(
                Member(
                    info.name,
                    info.type,
                    info.size,
                    info.mode,
                    info.uid,
                    info.gid,
                    mtime,
                    info.linkname,
                    info.devmajor,
                    info.devminor,
                    info.uname,
                    info.gname,
                    content,
                )
            )
    return members


def write_tar(
    entries: list[tuple[tarfile.TarInfo, bytes]],
    fmt: int,
    global_headers: dict[str, str] | None = None,
) -> bytes:
    buffer = io.BytesIO()
    with tarfile.TarFile(
        fileobj=buffer,
        mode="w",
        format=fmt,
        pax_headers=global_headers,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs) -> tuple:
    entry = tarfile.TarInfo(name)
    entry.type = kind
    entry.size = len(data) if kind in (tarfile.REGTYPE, tarfile.CONTTYPE, tarfile.AREGTYPE) else 0
    for key, value in attrs.items():
        setattr(entry, key, value)
    return entry, data


def assert_same_view(data: bytes) -> list[Member]:
    """Every way of feeding the archive gives tarfile's view of it."""
    expected = theirs(data)
    assert ours(io.BytesIO(data)) == expected
    assert ours(ShortReads(data, 777), buffer_size=1000) == expected
    assert ours(ShortReads(data, 512), buffer_size=512) == expected
    assert ours(ReadOnly(data), buffer_size=4096) == expected
    return expected


# --- archives tarfile writes --------------------------------------------------------


def every_kind() -> list[tuple]:
    return [
        info("dir", tarfile.DIRTYPE, mode=0o755, mtime=1_700_000_000),
        info("dir/empty", data=b"", mode=0o4755, uid=1000, gid=100, uname="me", gname="us"),
        info("dir/small", data=pattern(1)),
        info("dir/block", data=pattern(512)),
        info("dir/odd", data=pattern(513)),
        info("dir/big", data=pattern((1 << 20) + 7)),  # longer than the reader's buffer
        info("contiguous", tarfile.CONTTYPE, data=pattern(700)),
        info("old-regular", tarfile.AREGTYPE, data=pattern(10)),
        info("link-to-small", tarfile.LNKTYPE, linkname="dir/small"),
        info("symlink", tarfile.SYMTYPE, linkname="../somewhere/else", mode=0o777),
        info("tty", tarfile.CHRTYPE, devmajor=4, devminor=64),
        info("disk", tarfile.BLKTYPE, devmajor=259, devminor=(1 << 20) - 1),
        info("pipe", tarfile.FIFOTYPE, mode=0o600),
        info("é-ünïcode", data=b"u"),
    ]


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=list(FORMATS))
def test_every_kind_in_every_format(fmt: int) -> None:
    members = assert_same_view(write_tar(every_kind(), fmt))
    assert [m.name for m in members][-1] == "é-ünïcode"
    assert members[5].data == pattern((1 << 20) + 7)


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=list(FORMATS))
def test_long_names(fmt: int) -> None:
    """ustar splits names over ``prefix``; GNU uses L and K; PAX path and linkpath."""
    split = "p" * 150 + "/" + "n" * 99  # fits ustar's prefix + name
    entries = [info(split, data=b"split"), info("d/" + "x" * 98, data=b"exactly 100")]
    if fmt != tarfile.USTAR_FORMAT:
        longer = "/".join(["c" * 200] * 3)  # over 255 bytes in all
        entries += [
            info(longer, data=b"long"),
            info("l", tarfile.SYMTYPE, linkname="t" * 3000),
            info("h" * 120, tarfile.LNKTYPE, linkname=longer),
            info("dir-" + "d" * 300, tarfile.DIRTYPE),
        ]
    members = assert_same_view(write_tar(entries, fmt))
    assert members[0].name == split


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_numbers_beyond_octal_fields(fmt: int) -> None:
    """GNU writes base-256 fields, PAX records; negative mtimes only fit in those."""
    entries = [
        info("big-ids", uid=2**32 - 2, gid=2**40, data=b"x"),
        info("negative-time", mtime=-1_000_000, data=b"y"),
        info("huge-time", mtime=2**40),
        info("big-device", tarfile.CHRTYPE, devmajor=4095, devminor=2**20 - 1),
    ]
    members = assert_same_view(write_tar(entries, fmt))
    assert (members[0].uid, members[0].gid) == (2**32 - 2, 2**40)
    assert members[1].mtime == -1_000_000


def test_pax_records_and_global_headers() -> None:
    """Global records apply to every later entry; local ones override them."""
    xattr_value = "\udcff\udc80 binary"
    entries = [
        info("plain", data=b"1"),
        info(
            "with-records",
            data=b"2",
            pax_headers={
                "mtime": "1700000000.123456789",
                "uname": "local",
                "SCHILY.xattr.user.mine": xattr_value,
                "LIBARCHIVE.xattr.security.%41b": base64.b64encode(b"\x00\x01")
                .decode()
                .rstrip("="),
                "comment": "ignored",
            },
        ),
    ]
    data = write_tar(entries, tarfile.PAX_FORMAT, {"uname": "global", "SCHILY.xattr.user.g": "gv"})
    assert_same_view(data)
    reader = TarReader(io.BytesIO(data))
    plain, with_records = list(reader)
    assert plain.uname == b"global" and plain.xattrs == {b"user.g": b"gv"}
    assert with_records.uname == b"local"
    assert (with_records.mtime, with_records.mtime_nsec) == (1_700_000_000, 123_456_789)
    assert with_records.xattrs == {
        b"user.g": b"gv",
        b"user.mine": xattr_value.encode("utf-8", "surrogateescape"),
        b"security.Ab": b"\x00\x01",
    }
    assert with_records.pax is not None and with_records.pax[b"comment"] == b"ignored"


def test_a_later_global_header_changes_later_entries() -> None:
    first = write_tar([info("a", data=b"a")], tarfile.PAX_FORMAT, {"gname": "one"})
    second_global = tarfile.TarInfo._create_pax_generic_header(  # type: ignore[attr-defined]
        {"gname": "two"}, tarfile.XGLTYPE, "utf-8"
    )
    rest = write_tar([info("b", data=b"b")], tarfile.USTAR_FORMAT)
    data = first[: _end_of_members(first)] + second_global + rest
    members = assert_same_view(data)
    assert [(m.name, m.gname) for m in members] == [("a", "one"), ("b", "two")]


def test_fractional_and_negative_pax_mtimes() -> None:
    entries = [
        info("neg", data=b"", pax_headers={"mtime": "-1.25"}),
        info("exp", data=b"", pax_headers={"mtime": "1e3"}),
        info("long", data=b"", pax_headers={"mtime": "12.0000000019"}),
    ]
    reader = TarReader(io.BytesIO(write_tar(entries, tarfile.PAX_FORMAT)))
    assert [(e.mtime, e.mtime_nsec) for e in reader] == [(-2, 750_000_000), (1000, 0), (12, 1)]


def test_partial_reads_and_skipping() -> None:
    big, small = pattern(100_000, 1), pattern(3000, 2)
    data = write_tar([info("big", data=big), info("small", data=small)], tarfile.GNU_FORMAT)
    reader = TarReader(ShortReads(data, 4000), buffer_size=2048)  # type: ignore[arg-type]
    first = reader.next()
    assert first is not None and first.size == len(big)
    start = bytes(reader.read(10))
    assert start == big[:10]
    assert len(reader.read(100_000)) <= 2048  # never more than the buffer
    second = reader.next()  # skips the rest of "big"
    assert second is not None and second.name == b"small"
    pieces = []
    while chunk := reader.read(7):
        assert len(chunk) <= 7
        pieces.append(bytes(chunk))
    assert b"".join(pieces) == small
    assert reader.next() is None and reader.next() is None


def test_header_only_types_have_no_data_whatever_their_size() -> None:
    """A symlink or directory header with a size is not followed by data (as tarfile)."""
    link = tarfile.TarInfo("link")
    link.type, link.linkname = tarfile.SYMTYPE, "target"
    header = bytearray(link.tobuf(tarfile.USTAR_FORMAT))
    header[124:136] = b"%011o\0" % 4096
    data = _with_checksum(header) + write_tar([info("after", data=b"x")], tarfile.USTAR_FORMAT)
    members = assert_same_view(data)
    assert [(m.name, m.size) for m in members] == [("link", 4096), ("after", 1)]


def test_unknown_types_are_returned_with_their_data() -> None:
    entries = [info("volume", b"V", data=b""), info("next", data=b"n")]
    odd, _ = info("odd", b"Z")
    odd.size = 600
    header = odd.tobuf(tarfile.GNU_FORMAT) + pattern(600) + bytes(-600 % 512)
    data = header + write_tar(entries, tarfile.GNU_FORMAT)
    reader = TarReader(io.BytesIO(data))
    seen = [(e.name, e.type, bytes(reader.read())) for e in reader]
    assert seen == [(b"odd", b"Z", pattern(600)), (b"volume", b"V", b""), (b"next", b"0", b"n")]


def test_the_stream_is_read_to_its_end() -> None:
    data = write_tar([info("a", data=b"a")], tarfile.PAX_FORMAT) + bytes(100_003)
    stream = ShortReads(data, 5000)
    assert [m.name for m in ours(stream)] == ["a"]
    assert stream.consumed == len(data)


def test_a_stream_without_end_marker_is_accepted() -> None:
    data = write_tar([info("a", data=pattern(700)), info("b")], tarfile.USTAR_FORMAT)
    cut = data[: _end_of_members(data)]
    assert [m.name for m in ours(ShortReads(cut, 777))] == ["a", "b"]


def test_pax_data_may_end_in_nul_padding() -> None:
    (entry,) = TarReader(io.BytesIO(_pax_then(_record(b"uname", b"me") + bytes(20))))
    assert entry.uname == b"me"


def test_an_archive_of_zeros_is_empty() -> None:
    assert ours(io.BytesIO(bytes(10240))) == []
    assert ours(io.BytesIO(bytes(512 + 3))) == []  # zeros after the marker need no alignment


# --- headers crafted byte by byte ------------------------------------------------------


def raw_header(
    name: bytes = b"file",
    *,
    kind: bytes = b"0",
    size: bytes = b"00000000000\0",
    fields: dict[int, bytes] | None = None,
    magic: bytes = b"ustar\x0000",
    signed: bool = False,
) -> bytes:
    """A ustar header with the given raw fields, and a valid checksum."""
    header = bytearray(512)
    header[0 : len(name)] = name
    header[100:108] = b"0000644\0"
    header[108:124] = b"0000000\0" * 2
    header[124:136] = size
    header[136:148] = b"14400000000\0"
    header[156:157] = kind
    header[257:265] = magic
    for offset, value in (fields or {}).items():
        header[offset : offset + len(value)] = value
    return _with_checksum(header, signed=signed)


def _with_checksum(header: bytearray, *, signed: bool = False) -> bytes:
    header[148:156] = b" " * 8
    total = sum(b - 256 if signed and b >= 128 else b for b in header)
    header[148:156] = b"%06o\0 " % total
    return bytes(header)


def _end_of_members(data: bytes) -> int:
    """Where the end-of-archive marker of a tarfile-written archive starts."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
        return last.offset_data + -(-last.size // 512) * 512


END = bytes(1024)


def test_base256_sizes_and_numbers() -> None:
    """A 9 GiB size in base-256 (header only: the data would be 9 GiB)."""
    nine_gib = 9 << 30
    header = raw_header(
        b"huge",
        size=b"\x80" + nine_gib.to_bytes(11, "big"),
        fields={108: b"\x80" + (2**40).to_bytes(7, "big"), 136: b"\xff" * 11 + b"\xfe"},
    )
    reader = TarReader(io.BytesIO(header + pattern(1000)), LAYER)
    entry = reader.next()
    assert entry is not None
    assert (entry.size, entry.uid, entry.mtime) == (nine_gib, 2**40, -2)
    assert bytes(reader.read(1000)) == pattern(1000)
    with pytest.raises(LayerError, match="ends inside the entry's data") as caught:
        reader.read(1000)
    assert caught.value.member == "huge"


def test_size_from_pax_record_beyond_octal() -> None:
    """Files over 8 GiB get a PAX size record; the header's field says 0."""
    big = tarfile.TarInfo("big")
    big.size = 9 << 30
    header = big.tobuf(tarfile.PAX_FORMAT)
    reader = TarReader(io.BytesIO(header))
    entry = reader.next()
    assert entry is not None and entry.size == 9 << 30 and entry.pax == {b"size": b"9663676416"}


@pytest.mark.parametrize(
    "field, value",
    [
        (b"   644 \0", 0o644),
        (b"644\0\0\0\0\0", 0o644),
        (b"0000644 ", 0o644),
        (b"644 \0junk", 0o644),  # cut at the first NUL, like tarfile
        (b"\0" * 8, 0),
        (b" " * 7 + b"\0", 0),
        (b"\0\0\0\0644 ", 0),  # tarfile too reads nothing before the first NUL
    ],
)
def test_octal_fields_with_spaces_and_nuls(field: bytes, value: int) -> None:
    data = raw_header(fields={100: field[:8]}) + END
    (entry,) = TarReader(io.BytesIO(data))
    assert entry.mode == value == tarfile.nti(field[:8])


@pytest.mark.parametrize(
    "field", [b"0000648\0", b"-000001\0", b"0o00017\0", b"12 34\0\0\0", b"\x81abc"]
)
def test_bad_octal_fields_are_errors(field: bytes) -> None:
    data = raw_header(b"bad-mode", fields={100: field}) + END
    with pytest.raises(LayerError, match="mode field") as caught:
        list(TarReader(io.BytesIO(data), LAYER))
    assert caught.value.member == "bad-mode"


def test_signed_checksums_are_accepted() -> None:
    """Some old tars summed signed chars; it only differs with bytes >= 0x80."""
    header = raw_header("naïve".encode(), signed=True)
    assert header[148:156] != raw_header("naïve".encode())[148:156]
    (entry,) = TarReader(io.BytesIO(header + END))
    assert entry.name == "naïve".encode()


def test_byte_sum_matches_sum() -> None:
    for block in (bytes(512), b"\xff" * 512, pattern(512), bytes(range(256)) * 2):
        assert tarstream._byte_sum(block) == sum(block)


def test_v7_directory_and_gnu_header_fields() -> None:
    """A type \\0 entry ending in / is a directory; GNU headers have no prefix."""
    v7 = raw_header(b"olddir/", kind=b"\0", magic=bytes(8))
    gnu = raw_header(
        b"gnu-file",
        magic=b"ustar  \0",
        fields={345: b"14633215443\0", 357: b"14633215443\0"},  # atime, ctime
    )
    entries = list(TarReader(io.BytesIO(v7 + gnu + END)))
    assert [(e.name, e.type) for e in entries] == [(b"olddir", b"5"), (b"gnu-file", b"0")]


def test_ustar_prefix_is_joined() -> None:
    header = raw_header(b"name", fields={345: b"some/prefix"})
    (entry,) = TarReader(io.BytesIO(header + END))
    assert entry.name == b"some/prefix/name"


# --- malformed streams -----------------------------------------------------------------


def _valid() -> bytes:
    return write_tar([info("a", data=pattern(3000)), info("b", data=b"b")], tarfile.PAX_FORMAT)


def _record(key: bytes, value: bytes) -> bytes:
    """A well-formed PAX record (its length counts its own digits)."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length += 1
    return b"%d" % length + body


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1 :]


def _pax_then(records: bytes, name: bytes = b"victim") -> bytes:
    size = b"%011o\0" % len(records)
    pax = raw_header(b"PaxHeader", kind=b"x", size=size)
    return pax + records + bytes(-len(records) % 512) + raw_header(name) + END


CORRUPT = {
    "empty": (b"", "empty stream", None),
    "not-a-tar": (b"this is not a tar stream at all" * 40, "bad header checksum", "this is"),
    "random-bytes": (pattern(5000, 9), "bad header checksum", None),
    "half-a-header": (_valid()[:300], "truncated inside a header", None),
    "cut-in-data": (_valid()[:2000], "ends inside the entry's data", "a"),
    "cut-in-padding": (_valid()[: 512 + 3000 + 10], "padding", "a"),
    "cut-in-pax": (_pax_then(_record(b"path", b"x" * 100))[:600], "inside an extended", None),
    "bad-checksum": (_flip(_valid(), 512 + 3072 + 1), "bad header checksum", "b"),
    "garbage-after-end": (_valid() + b"junk", "after the end-of-archive marker", None),
    "header-after-end": (_valid() + raw_header(b"late"), "after the end-of-archive marker", None),
    "pax-bad-length": (_pax_then(b"99 path=x\n"), "malformed PAX record", "PaxHeader"),
    "pax-no-equals": (_pax_then(b"8 pathx\n"), "malformed PAX record", "PaxHeader"),
    "pax-zero-length": (_pax_then(b"0 path=x\n"), "malformed PAX record", "PaxHeader"),
    "pax-no-newline": (_pax_then(b"10 path=xy"), "malformed PAX record", "PaxHeader"),
    "pax-bad-uid": (_pax_then(_record(b"uid", b"1000x")), "bad PAX uid", "victim"),
    "pax-negative-size": (_pax_then(_record(b"size", b"-10")), "bad PAX size", "victim"),
    "pax-bad-mtime": (_pax_then(_record(b"mtime", b"soon")), "bad PAX mtime", "victim"),
    "pax-huge-mtime": (_pax_then(_record(b"mtime", b"1e999999")), "bad PAX mtime", "victim"),
    "pax-bad-base64": (
        _pax_then(_record(b"LIBARCHIVE.xattr.user.a", b"!")),
        "bad base64",
        "victim",
    ),
    "pax-without-entry": (
        _pax_then(_record(b"path", b"lost"))[:1024] + END,
        "without its entry",
        "lost",
    ),
    "negative-size": (raw_header(b"neg", size=b"\xff" * 12) + END, "negative size", "neg"),
    "longname-without-entry": (
        raw_header(b"././@LongLink", kind=b"L", size=b"00000000005\0") + b"long\0" + bytes(507),
        "ends after an extended header",
        "long",
    ),
    "huge-extended-header": (
        raw_header(b"p", kind=b"x", size=b"%011o\0" % (1 << 30)),
        "extended header of",
        "p",
    ),
}


@pytest.mark.parametrize("data, reason, member", CORRUPT.values(), ids=list(CORRUPT))
def test_malformed_streams_raise_layer_error(data: bytes, reason: str, member: str | None) -> None:
    for stream in (io.BytesIO(data), ShortReads(data, 100)):
        with pytest.raises(LayerError, match=reason) as caught:
            ours(stream)
        assert caught.value.layer == LAYER
        if member is not None:
            assert caught.value.member is not None and caught.value.member.startswith(member)


# --- sparse members ----------------------------------------------------------------------

GNU_TAR = shutil.which("tar")
_GNU_TAR_OK = (
    GNU_TAR is not None
    and "GNU tar" in subprocess.run([GNU_TAR, "--version"], capture_output=True, text=True).stdout
)
needs_gnu_tar = pytest.mark.skipif(not _GNU_TAR_OK, reason="GNU tar is not installed")

SPARSE_LAYOUTS = {
    "head-mid-tail": ([(0, b"head"), (1 << 20, b"mid" * 3000), ((5 << 20) - 3, b"end")], 5 << 20),
    "one-region": ([(8192, pattern(5000))], 3 << 20),
    "all-hole": ([], 2 << 20),
    "many-regions": ([(i * 65536, pattern(100, i)) for i in range(40)], 40 * 65536),
}


def make_sparse_files(root: Path) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (regions, size) in SPARSE_LAYOUTS.items():
        with open(root / name, "wb") as handle:
            for offset, data in regions:
                handle.seek(offset)
                handle.write(data)
            handle.truncate(size)
        expected[name] = (root / name).read_bytes()
    return expected


def gnu_tar(root: Path, *options: str) -> bytes:
    assert GNU_TAR is not None
    result = subprocess.run(
        [GNU_TAR, "-C", str(root), "--sparse", *options, "-cf", "-", *sorted(os.listdir(root))],
        capture_output=True,
        check=True,
    )
    return result.stdout


SPARSE_FORMATS = {
    "gnu": ["--format=gnu"],
    "oldgnu": ["--format=oldgnu"],
    "pax-0.0": ["--format=posix", "--sparse-version=0.0"],
    "pax-0.1": ["--format=posix", "--sparse-version=0.1"],
    "pax-1.0": ["--format=posix", "--sparse-version=1.0"],
}


@needs_gnu_tar
@pytest.mark.parametrize("options", SPARSE_FORMATS.values(), ids=list(SPARSE_FORMATS))
def test_sparse_members_read_expanded(tmp_path: Path, options: list[str]) -> None:
    expected = make_sparse_files(tmp_path / "src")
    data = gnu_tar(tmp_path / "src", *options)
    for stream, size in ((io.BytesIO(data), 1 << 20), (ShortReads(data, 300), 1000)):
        got = {m.name: m.data for m in ours(stream, buffer_size=size)}
        assert got == expected
    assert {m.name: m.data for m in theirs(data)} == expected


def _sparse_pax(records: dict[str, str], stored: bytes) -> bytes:
    entry = tarfile.TarInfo("holey")
    entry.size = len(stored)
    entry.pax_headers = records
    return entry.tobuf(tarfile.PAX_FORMAT) + stored + bytes(-len(stored) % 512) + END


BAD_SPARSE = {
    "overlap": {"GNU.sparse.map": "0,10,5,10", "GNU.sparse.size": "20"},
    "beyond-size": {"GNU.sparse.map": "0,10,15,10", "GNU.sparse.size": "20"},
    "stored-mismatch": {"GNU.sparse.map": "0,5", "GNU.sparse.size": "20"},
    "odd-map": {"GNU.sparse.map": "0,10,5", "GNU.sparse.size": "20"},
    "no-size": {"GNU.sparse.map": "0,20"},
    "unknown-version": {"GNU.sparse.major": "2", "GNU.sparse.minor": "0"},
}


_VERSION_1_0 = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "9"}
BAD_SPARSE_1_0 = {
    "not-a-number": b"1\nzero\n5\n" + bytes(500) + b"stored",
    "truncated": b"1\n0",
    "too-many-regions": b"99999999\n" + bytes(503),
}


@pytest.mark.parametrize("records", BAD_SPARSE.values(), ids=list(BAD_SPARSE))
def test_bad_sparse_maps_are_errors(records: dict[str, str]) -> None:
    with pytest.raises(LayerError, match="sparse") as caught:
        ours(io.BytesIO(_sparse_pax(records, pattern(20))))
    assert caught.value.member == "holey"


@pytest.mark.parametrize("stored", BAD_SPARSE_1_0.values(), ids=list(BAD_SPARSE_1_0))
def test_bad_sparse_maps_in_data_are_errors(stored: bytes) -> None:
    with pytest.raises(LayerError, match="sparse") as caught:
        ours(io.BytesIO(_sparse_pax(_VERSION_1_0, stored)))
    assert caught.value.member == "holey"


def test_sparse_pax_1_0_crafted() -> None:
    stored = b"2\n1\n3\n6\n2\n".ljust(512, b"\0") + b"abcde"
    (member,) = ours(ShortReads(_sparse_pax(_VERSION_1_0, stored), 100), buffer_size=600)
    assert member.data == b"\0abc\0\0de\0" and member.size == 9


def test_sparse_pax_0_1_crafted() -> None:
    records = {"GNU.sparse.map": "4,3,10,2", "GNU.sparse.size": "16", "GNU.sparse.name": "real"}
    (member,) = ours(io.BytesIO(_sparse_pax(records, b"abcde")))
    assert (member.name, member.size) == ("real", 16)
    assert member.data == b"\0\0\0\0abc\0\0\0de\0\0\0\0"


# --- random archives against tarfile -------------------------------------------------------

NAME_PARTS = st.text(
    st.sampled_from([*"abcXYZ019-_. é", "\udc80"]), min_size=1, max_size=60
).filter(lambda n: n not in (".", ".."))
KINDS = [
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.CONTTYPE,
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.FIFOTYPE,
]


@st.composite
def random_archives(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from(list(FORMATS.values())))
    octal_only = fmt == tarfile.USTAR_FORMAT
    entries = []
    for index in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(KINDS))
        name = "/".join(draw(st.lists(NAME_PARTS, min_size=1, max_size=5)))
        size = draw(st.one_of(st.integers(0, 1100), st.sampled_from([4096, 70_000])))
        attrs = {
            "mode": draw(st.integers(0, 0o7777)),
            "uid": draw(st.integers(0, 2**21 - 1 if octal_only else 2**40)),
            "gid": draw(st.integers(0, 2**21 - 1 if octal_only else 2**40)),
            "mtime": draw(st.integers(0 if octal_only else -(2**40), 8**11 - 1)),
            "uname": draw(st.sampled_from(["", "root", "ünï"])),
            "linkname": draw(NAME_PARTS) if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else "",
            "devmajor": draw(st.integers(0, 4095)),
            "devminor": draw(st.integers(0, 2**20 - 1)),
        }
        if fmt == tarfile.PAX_FORMAT and draw(st.booleans()):
            attrs["pax_headers"] = {
                "SCHILY.xattr.user.k": draw(st.text(max_size=20)),
                "mtime": str(draw(st.decimals(-(10**10), 10**10, places=9))),
            }
        data = pattern(size, index) if kind in (tarfile.REGTYPE, tarfile.CONTTYPE) else b""
        if kind == tarfile.AREGTYPE:  # a trailing slash would make it a directory
            name = name.rstrip("/") or "x"
            data = pattern(size, index)
        entry = info(name, kind, data, **attrs)
        try:
            entry[0].tobuf(fmt, "utf-8", "surrogateescape")
        except ValueError:
            continue  # does not fit this format
        entries.append(entry)
    global_headers = None
    # tarfile, the reference here, cannot read an archive holding only a global header.
    if entries and fmt == tarfile.PAX_FORMAT and draw(st.booleans()):
        global_headers = {"gname": draw(st.text(max_size=8)), "SCHILY.xattr.user.g": "1"}
    return write_tar(entries, fmt, global_headers)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=random_archives(),
    chunk=st.sampled_from([1, 100, 512, 4096, 1 << 20]),
    buffer_size=st.sampled_from([512, 700, 1536, 1 << 20]),
)
def test_random_archives_read_as_tarfile_reads_them(
    data: bytes, chunk: int, buffer_size: int
) -> None:
    assert ours(ShortReads(data, chunk), buffer_size=buffer_size) == theirs(data)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(b"0123456789 \0"), min_size=8, max_size=8).map(bytes)
    | st.binary(min_size=1, max_size=7).map(lambda b: b"\x80" + bytes(7 - len(b)) + b)
    | st.binary(min_size=7, max_size=7).map(lambda b: b"\xff" + b)
)
def test_numbers_parse_as_tarfile_parses_them(field: bytes) -> None:
    try:
        expected: int | None = tarfile.nti(field)
    except tarfile.InvalidHeaderError:
        expected = None
    try:
        got: int | None = tarstream._parse_number(field)
    except ValueError:
        got = None
    assert got == expected
