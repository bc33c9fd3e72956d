"""A streaming reader for uncompressed tar archives (ustar, GNU and PAX).

It exists for :mod:`vmruntime.rootfs.erofs`, which turns OCI layer tars into
filesystem images on the hot path of ``vmr image pull``.  :mod:`tarfile` in
stream mode cost over half of that build: it copies its buffer on every small
read and creates several objects per member.  This reader reads the stream
strictly front to back through one reused buffer (filled with ``readinto``),
slices each 512-byte header out of it and hands member data out as views into
that same buffer.  No member's data is ever held in memory whole.

What it reads:

- ustar headers, with the ``prefix`` field when the magic is POSIX
  ``ustar\\0`` (GNU headers keep other data there), pre-POSIX (v7) headers,
  and a type ``\\0`` entry whose name ends in ``/`` as a directory;
- numeric fields in octal (leading and trailing spaces, cut at the first NUL,
  as :mod:`tarfile` reads them) and in GNU base-256 (positive and negative);
- the header checksum, as an unsigned or a signed byte sum (old Sun and NeXT
  tars used signed bytes), as :mod:`tarfile` accepts it;
- PAX extended headers (``x``, and Solaris ``X``) and global headers (``g``,
  whose records apply to every later entry unless a local record overrides
  them), with the keys ``path``, ``linkpath``, ``size``, ``uid``, ``gid``,
  ``uname``, ``gname`` and ``mtime`` (fractional, exact to the nanosecond)
  applied; every record is kept in :attr:`TarEntry.pax`, and xattrs from
  ``SCHILY.xattr.NAME`` and ``LIBARCHIVE.xattr.NAME`` (URL-encoded name,
  base64 value) are decoded into :attr:`TarEntry.xattrs`;
- GNU long names (``L``) and long link targets (``K``);
- GNU sparse members, old style (type ``S``) and PAX formats 0.0, 0.1 and 1.0:
  their data reads back expanded, holes as zeros;
- every other type flag is returned as it is, with its data skippable.

Precedence, lowest first: header fields, global PAX records, ``L``/``K``,
local PAX records.  Names and link targets are raw bytes; nothing is decoded
except for error messages.

Errors: anything malformed raises :class:`~vmruntime.errors.LayerError` naming
the member as far as it is known: a bad checksum or number, a malformed PAX
record, an extended header not followed by an entry, a stream that ends inside
a header, data or padding, an empty stream, and non-zero bytes after the
end-of-archive marker.  A stream that simply ends after a member, without the
marker, is accepted (as :mod:`tarfile` does).
"""

from __future__ import annotations

import base64
import binascii
import struct
import urllib.parse
import zlib
from collections.abc import Iterator
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import BinaryIO, NoReturn

from vmruntime.errors import LayerError

__all__ = [
    "AREGTYPE",
    "BLKTYPE",
    "CHRTYPE",
    "CONTTYPE",
    "DIRTYPE",
    "FIFOTYPE",
    "GNUTYPE_SPARSE",
    "LNKTYPE",
    "REGTYPE",
    "REGULAR_TYPES",
    "SYMTYPE",
    "TarEntry",
    "TarReader",
]

BLOCK = 512
BUFFER_SIZE = 1 << 20

REGTYPE = b"0"
AREGTYPE = b"\0"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
CONTTYPE = b"7"
GNUTYPE_SPARSE = b"S"
_GNU_LONGNAME = b"L"
_GNU_LONGLINK = b"K"
_PAX_LOCAL = (b"x", b"X")  # X: Solaris' name for the same thing
_PAX_GLOBAL = b"g"

#: Types whose data is file content; a reader returns it from :meth:`TarReader.read`.
REGULAR_TYPES = frozenset({REGTYPE, AREGTYPE, CONTTYPE, GNUTYPE_SPARSE})
# Types that never have data blocks, whatever their size field says (as in
# tarfile and Go's archive/tar); any other type is followed by `size` bytes.
_HEADER_ONLY_TYPES = frozenset({LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE})

_POSIX_MAGIC = b"ustar\0"
_ZERO_BLOCK = bytes(BLOCK)
_ZEROS = memoryview(bytes(64 << 10))  # what holes of sparse members read as, a piece at a time
_EMPTY = memoryview(b"")
_LOW_BYTES = bytes(range(0x80))
# Extended headers and long names are read into memory: bound them.  The
# largest legitimate ones carry an inode's xattrs (about 256 KiB).
_MAX_EXTENDED = 16 << 20
_MAX_SPARSE_REGIONS = 1 << 20
_MAX_DIGITS = 30  # far beyond any id, size or time a filesystem can hold
# Any of these marks a PAX sparse member (format 0.0 and 0.1: map or size; 1.0: version).
_PAX_SPARSE_KEYS = (b"GNU.sparse.map", b"GNU.sparse.size", b"GNU.sparse.major", b"GNU.sparse.minor")


class TarEntry:
    """One archive member, with its extended headers applied.

    ``name`` and ``linkname`` are raw bytes (directories lose trailing
    slashes).  ``size`` is the size of the content: for sparse members, the
    expanded size.  ``mtime`` is in whole seconds, with ``mtime_nsec`` from a
    fractional PAX mtime.  ``pax`` holds every PAX record that applies (global
    then local; None if none) and ``xattrs`` the decoded xattrs (None if none).
    """

    __slots__ = (
        "devmajor",
        "devminor",
        "gid",
        "gname",
        "linkname",
        "mode",
        "mtime",
        "mtime_nsec",
        "name",
        "pax",
        "size",
        "type",
        "uid",
        "uname",
        "xattrs",
    )

    name: bytes
    linkname: bytes
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_nsec: int
    devmajor: int
    devminor: int
    uname: bytes
    gname: bytes
    pax: dict[bytes, bytes] | None
    xattrs: dict[bytes, bytes] | None

    @property
    def path(self) -> str:
        """The name as :mod:`tarfile` shows it (undecodable bytes as surrogates)."""
        return self.name.decode("utf-8", "surrogateescape")

    def __repr__(self) -> str:
        return f"<TarEntry {self.name!r} type={self.type!r} size={self.size}>"


class _Pending:
    """What extended headers said about the entry still to come."""

    __slots__ = ("long_link", "long_name", "pax", "sparse_pairs")

    def __init__(self) -> None:
        self.long_name: bytes | None = None
        self.long_link: bytes | None = None
        self.pax: dict[bytes, bytes] | None = None
        self.sparse_pairs: list[bytes] | None = None  # PAX 0.0 offset/numbytes values


class TarReader:
    """Iterates over the members of an uncompressed tar stream, front to back.

    ``stream`` needs only ``readinto`` (or ``read``); it may be a pipe.
    Iterating yields a :class:`TarEntry` per member; between two steps,
    :meth:`read` returns that member's data, and whatever is left unread is
    skipped by the next step.  When the iteration ends without an error the
    stream has been read to its very end (callers hash every byte) and what
    followed the end-of-archive marker was all zeros.  ``layer`` only appears
    in the :class:`~vmruntime.errors.LayerError` raised for malformed input;
    ``buffer_size`` (the most read from the stream at once, and the longest
    view :meth:`read` returns) is there for tests.  After an error the reader
    is unusable and the stream is left where the error was found.
    """

    def __init__(
        self, stream: BinaryIO, layer: str = "<layer>", *, buffer_size: int = BUFFER_SIZE
    ) -> None:
        if buffer_size < BLOCK:
            raise ValueError(f"buffer_size must be at least {BLOCK}")
        self._stream = stream
        self._layer = layer
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._pos = 0  # next unread byte in the buffer
        self._end = 0  # end of the valid bytes in the buffer
        self._base = 0  # stream offset of the buffer's first byte
        self._globals: dict[bytes, bytes] = {}
        self._current: TarEntry | None = None
        self._data_left = 0  # stored (not expanded) data bytes of the current entry
        self._padding = 0  # zero bytes after the current entry's data
        self._sparse: _SparseMap | None = None
        self._done = False
        readinto = getattr(stream, "readinto", None)
        self._readinto = readinto if readinto is not None else self._readinto_via_read

    def __iter__(self) -> Iterator[TarEntry]:
        while (entry := self.next()) is not None:
            yield entry

    # --- entries ----------------------------------------------------------------

    def next(self) -> TarEntry | None:
        """The next member, or None at the end (the stream then read to its end)."""
        if self._done:
            return None
        if self._current is not None:
            self._skip_rest_of_member()
        pending = _Pending()
        while True:
            header = self._read_header(pending)
            if header is None:
                self._finish(pending)
                return None
            kind = header[156:157]
            if kind in _PAX_LOCAL or kind == _PAX_GLOBAL:
                self._read_pax(header, kind, pending)
            elif kind in (_GNU_LONGNAME, _GNU_LONGLINK):
                self._read_long_name(header, kind, pending)
            else:
                return self._start_member(header, kind, pending)

    def read(self, limit: int = BUFFER_SIZE) -> memoryview:
        """Up to ``limit`` bytes of the current member's content; empty at its end.

        The view points into the reader's buffer and is only valid until the
        next call on the reader.  It is shorter than ``limit`` whenever the
        buffer runs out; a stream that ends inside the data is an error.
        """
        if self._sparse is not None:
            return self._read_sparse(limit)
        return self._read_stored(limit)

    def _start_member(self, header: bytes, kind: bytes, pending: _Pending) -> TarEntry:
        entry = self._parse_header(header, kind)
        if self._globals or pending.pax is not None:
            self._apply_pax(entry, pending)
        if pending.long_name is not None and (pending.pax is None or b"path" not in pending.pax):
            entry.name = pending.long_name
        if pending.long_link is not None and (
            pending.pax is None or b"linkpath" not in pending.pax
        ):
            entry.linkname = pending.long_link
        if entry.type == DIRTYPE:
            entry.name = entry.name.rstrip(b"/")
        stored = 0 if entry.type in _HEADER_ONLY_TYPES else entry.size
        if stored < 0:
            raise self._error(f"negative size {entry.size}", entry.path)
        self._current = entry
        self._data_left = stored
        self._padding = -stored % BLOCK
        self._sparse = None
        if kind == GNUTYPE_SPARSE or (entry.type in REGULAR_TYPES and _is_pax_sparse(entry.pax)):
            self._sparse = self._read_sparse_map(header, kind, entry, pending)
        return entry

    def _parse_header(self, header: bytes, kind: bytes) -> TarEntry:
        """The entry as the header alone describes it (checksum already verified)."""
        (name, mode, uid, gid, size, mtime, linkname, magic, uname, gname, major, minor, prefix) = (
            _HEADER.unpack(header)
        )
        entry = TarEntry()
        try:
            entry.mode = _parse_number(mode)
            entry.uid = _parse_number(uid)
            entry.gid = _parse_number(gid)
            entry.size = _parse_number(size)
            entry.mtime = _parse_number(mtime)
            entry.devmajor = _parse_number(major)
            entry.devminor = _parse_number(minor)
        except ValueError:
            self._bad_number(header)
        name = _cstring(name)
        # v7 tars marked directories only by a trailing slash.
        if kind == AREGTYPE and name.endswith(b"/"):
            kind = DIRTYPE
        if magic == _POSIX_MAGIC and prefix[0]:
            name = _cstring(prefix) + b"/" + name
        entry.name = name
        entry.type = kind
        entry.linkname = _cstring(linkname)
        entry.uname = _cstring(uname)
        entry.gname = _cstring(gname)
        entry.mtime_nsec = 0
        entry.pax = None
        entry.xattrs = None
        return entry

    def _bad_number(self, header: bytes) -> NoReturn:
        """Raise the error for the first numeric field of ``header`` that does not parse."""
        for start, (end, field) in _NUMBER_FIELDS.items():
            self._number(header, start, end, field)
        raise AssertionError("a field failed to parse once but not twice")

    def _number(self, header: bytes, start: int, end: int, field: str) -> int:
        try:
            return _parse_number(header[start:end])
        except ValueError:
            raise self._error(
                f"invalid number {header[start:end]!r} in the {field} field of the header at "
                f"byte {self._header_offset()}",
                _shown(_cstring(header[0:100])),
            ) from None

    # --- extended headers ---------------------------------------------------------

    def _read_pax(self, header: bytes, kind: bytes, pending: _Pending) -> None:
        """Parse a PAX header's records into the pending (or global) records."""
        member = _shown(_cstring(header[0:100]))
        data = self._read_extended_data(header, member)
        global_header = kind == _PAX_GLOBAL
        target = self._globals if global_header else pending.pax
        if target is None:
            target = pending.pax = {}
        pos = 0
        while pos < len(data):
            if data[pos] == 0 and data.count(0, pos) == len(data) - pos:
                break  # NUL padding after the last record
            key, value, pos = self._pax_record(data, pos, member)
            if not global_header and key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
                # Sparse format 0.0 repeats these keys: their order matters.
                if pending.sparse_pairs is None:
                    pending.sparse_pairs = []
                pending.sparse_pairs.append(value)
            target[key] = value

    def _pax_record(self, data: bytes, pos: int, member: str) -> tuple[bytes, bytes, int]:
        """One ``"<length> <key>=<value>\\n"`` record at ``pos``: (key, value, next pos)."""
        space = data.find(b" ", pos, pos + _MAX_DIGITS)
        digits = data[pos:space]
        end = pos + int(digits) if space > pos and digits.isdigit() else pos
        equals = data.find(b"=", space + 1, end)  # keys have no "=", values may
        if end <= pos or end > len(data) or data[end - 1 : end] != b"\n" or equals <= space + 1:
            raise self._error(f"malformed PAX record at byte {pos} of the extended header", member)
        return data[space + 1 : equals], data[equals + 1 : end - 1], end

    def _apply_pax(self, entry: TarEntry, pending: _Pending) -> None:
        """Apply the global records, then the entry's own, to the header's values."""
        if pending.pax is None:
            records = self._globals.copy()
        elif self._globals:
            records = {**self._globals, **pending.pax}
        else:
            records = pending.pax
        entry.pax = records
        get = records.get
        if (path := get(b"path")) is not None:
            entry.name = path.rstrip(b"/")
        if (linkpath := get(b"linkpath")) is not None:
            entry.linkname = linkpath
        if (size := get(b"size")) is not None:
            entry.size = self._pax_decimal(b"size", size, entry)
        if (uid := get(b"uid")) is not None:
            entry.uid = self._pax_decimal(b"uid", uid, entry)
        if (gid := get(b"gid")) is not None:
            entry.gid = self._pax_decimal(b"gid", gid, entry)
        if (uname := get(b"uname")) is not None:
            entry.uname = uname
        if (gname := get(b"gname")) is not None:
            entry.gname = gname
        if (mtime := get(b"mtime")) is not None:
            entry.mtime, entry.mtime_nsec = self._pax_time(mtime, entry)
        entry.xattrs = self._xattrs(records, entry)

    def _pax_decimal(self, key: bytes, value: bytes, entry: TarEntry) -> int:
        if not value.isdigit() or len(value) > _MAX_DIGITS:
            raise self._error(f"bad PAX {key.decode()} {value!r}", entry.path)
        return int(value)

    def _pax_time(self, value: bytes, entry: TarEntry) -> tuple[int, int]:
        """(seconds, nanoseconds), parsed exactly rather than through a float."""
        whole, _, fraction = value.partition(b".")
        if whole.isdigit() and len(whole) <= _MAX_DIGITS and (fraction.isdigit() or not fraction):
            # The common cases ("1700000000", "1700000000.123"), without Decimal:
            # nanoseconds are truncated, which for positive times is the floor.
            return int(whole), int(fraction[:9].ljust(9, b"0")) if fraction else 0
        text = value.decode("utf-8", "surrogateescape")
        try:
            exact = Decimal(text)
            # Refuse huge exponents before int() would build a huge number.
            if not exact.is_finite() or exact.adjusted() > _MAX_DIGITS:
                raise ValueError(text)
            seconds = int(exact.to_integral_value(rounding=ROUND_FLOOR))
            nsec = int((exact - seconds) * 1_000_000_000)
        except (InvalidOperation, ValueError) as exc:
            raise self._error(f"bad PAX mtime {text!r}", entry.path) from exc
        return seconds, nsec

    def _xattrs(self, records: dict[bytes, bytes], entry: TarEntry) -> dict[bytes, bytes] | None:
        """xattr name -> value from SCHILY.xattr.* and LIBARCHIVE.xattr.* records."""
        found: dict[bytes, bytes] | None = None
        for key, value in records.items():
            if key.startswith(b"SCHILY.xattr."):
                name = key[13:]
            elif key.startswith(b"LIBARCHIVE.xattr."):
                # bsdtar URL-encodes the name and base64-encodes the value.
                name = urllib.parse.unquote_to_bytes(key[17:])
                value = self._base64(value, entry)
            else:
                continue
            if found is None:
                found = {}
            found[name] = value
        return found

    def _base64(self, text: bytes, entry: TarEntry) -> bytes:
        try:
            return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
        except binascii.Error as exc:
            raise self._error("bad base64 in LIBARCHIVE.xattr value", entry.path) from exc

    def _read_long_name(self, header: bytes, kind: bytes, pending: _Pending) -> None:
        name = _cstring(self._read_extended_data(header, _shown(_cstring(header[0:100]))))
        if kind == _GNU_LONGNAME:
            pending.long_name = name
        else:
            pending.long_link = name

    def _read_extended_data(self, header: bytes, member: str) -> bytes:
        """The data of an extended header (PAX or GNU long name), padding skipped."""
        size = self._number(header, 124, 136, "size")
        if not 0 <= size <= _MAX_EXTENDED:
            raise self._error(
                f"extended header of {size} bytes (at most {_MAX_EXTENDED} are accepted)", member
            )
        data = self._read_bytes(size, member)
        self._skip(-size % BLOCK, member)
        return data

    # --- sparse members ------------------------------------------------------------

    def _read_sparse_map(
        self, header: bytes, kind: bytes, entry: TarEntry, pending: _Pending
    ) -> _SparseMap:
        """Read the member's sparse map; set ``entry.size`` to the expanded size."""
        pax = entry.pax or {}
        if kind == GNUTYPE_SPARSE:
            regions, real_size = self._old_gnu_sparse_map(header, entry)
        elif b"GNU.sparse.major" in pax or b"GNU.sparse.minor" in pax:
            version = (pax.get(b"GNU.sparse.major"), pax.get(b"GNU.sparse.minor"))
            if version != (b"1", b"0"):
                raise self._error(f"unsupported GNU sparse format {version}", entry.path)
            regions = self._sparse_map_in_data(entry)
            real_size = self._sparse_number(pax, b"GNU.sparse.realsize", entry)
        else:
            if b"GNU.sparse.map" in pax:  # format 0.1
                numbers = pax[b"GNU.sparse.map"].split(b",") if pax[b"GNU.sparse.map"] else []
            else:  # format 0.0
                numbers = pending.sparse_pairs or []
            regions = self._sparse_pairs(numbers, entry)
            real_size = self._sparse_number(pax, b"GNU.sparse.size", entry)
        if (real_name := pax.get(b"GNU.sparse.name")) is not None:
            entry.name = real_name
        sparse = _SparseMap(regions, real_size)
        if reason := sparse.check(self._data_left):
            raise self._error(f"bad sparse map: {reason}", entry.path)
        entry.size = real_size
        return sparse

    def _sparse_number(self, pax: dict[bytes, bytes], key: bytes, entry: TarEntry) -> int:
        value = pax.get(key)
        if value is None:
            raise self._error(f"sparse member without {key.decode()}", entry.path)
        return self._pax_decimal(key, value, entry)

    def _old_gnu_sparse_map(
        self, header: bytes, entry: TarEntry
    ) -> tuple[list[tuple[int, int]], int]:
        """Up to 4 regions in the header, 21 more per extension block."""
        regions: list[tuple[int, int]] = []
        more = self._sparse_regions(header, 386, 4, regions, entry)
        real_size = self._number(header, 483, 495, "sparse size")
        while more:
            block = self._read_bytes(BLOCK, entry.path)
            more = self._sparse_regions(block, 0, 21, regions, entry)
        return regions, real_size

    def _sparse_regions(
        self, block: bytes, start: int, count: int, regions: list[tuple[int, int]], entry: TarEntry
    ) -> bool:
        """Append the (offset, size) pairs at ``start``; return the isextended flag."""
        for pos in range(start, start + 24 * count, 24):
            if block[pos] == 0:
                break  # an empty slot ends the list
            regions.append(
                (
                    self._number(block, pos, pos + 12, "sparse offset"),
                    self._number(block, pos + 12, pos + 24, "sparse length"),
                )
            )
        if len(regions) > _MAX_SPARSE_REGIONS:
            raise self._error("sparse map too large", entry.path)
        return block[start + 24 * count] != 0

    def _sparse_map_in_data(self, entry: TarEntry) -> list[tuple[int, int]]:
        """Format 1.0: decimal numbers, one a line, at the start of the data.

        The map is padded to whole blocks, so reading it a block at a time
        stops exactly where the content starts.
        """
        text = b""
        used = 0

        def number() -> int:
            nonlocal text, used
            while (newline := text.find(b"\n", used)) < 0:
                if len(text) - used > _MAX_DIGITS or self._data_left < BLOCK:
                    raise self._error("bad sparse map: truncated or malformed", entry.path)
                text = text[used:] + self._read_stored_exact(BLOCK)
                used = 0
            digits = text[used:newline]
            used = newline + 1
            if not digits.isdigit() or len(digits) > _MAX_DIGITS:
                raise self._error(f"bad sparse map: {digits!r} is not a number", entry.path)
            return int(digits)

        count = number()
        if count > _MAX_SPARSE_REGIONS:
            raise self._error("sparse map too large", entry.path)
        return [(number(), number()) for _ in range(count)]

    def _read_stored_exact(self, size: int) -> bytes:
        parts = []
        while size:
            chunk = self._read_stored(size)
            parts.append(bytes(chunk))
            size -= len(chunk)
        return b"".join(parts)

    def _sparse_pairs(self, numbers: list[bytes], entry: TarEntry) -> list[tuple[int, int]]:
        if len(numbers) % 2 or len(numbers) > 2 * _MAX_SPARSE_REGIONS:
            raise self._error("bad sparse map: odd or too many numbers", entry.path)
        values = [self._pax_decimal(b"GNU.sparse.map", n, entry) for n in numbers]
        return list(zip(values[::2], values[1::2], strict=True))

    def _read_sparse(self, limit: int) -> memoryview:
        sparse = self._sparse
        assert sparse is not None
        if limit <= 0 or sparse.position >= sparse.size:
            return _EMPTY
        hole = sparse.hole_ahead()
        if hole:
            return sparse.advance(_ZEROS[: min(limit, hole, len(_ZEROS))])
        return sparse.advance(self._read_stored(min(limit, sparse.data_ahead())))

    # --- the buffer ------------------------------------------------------------

    def _read_header(self, pending: _Pending) -> bytes | None:
        """The next verified header block; None at the end-of-archive marker or stream end."""
        available = self._fill(BLOCK)
        if available < BLOCK:
            if available == 0 and self._base + self._pos > 0:
                return None  # the stream ends without the marker: accepted, like tarfile
            raise self._error(
                "empty stream, not a tar archive"
                if available == 0
                else "tar stream truncated inside a header",
                _pending_name(pending),
            )
        start = self._pos
        self._pos = start + BLOCK
        header = bytes(self._view[start : start + BLOCK])
        if header == _ZERO_BLOCK:
            return None
        self._verify_checksum(header)
        return header

    def _verify_checksum(self, header: bytes) -> None:
        try:
            stored = _parse_number(header[148:156])
        except ValueError:
            stored = -1
        unsigned = _byte_sum(header) - sum(header[148:156]) + 8 * ord(" ")
        if stored == unsigned:
            return
        # Signed chars count the bytes >= 0x80 as 256 less each.
        high = len(header.translate(None, _LOW_BYTES)) - len(
            header[148:156].translate(None, _LOW_BYTES)
        )
        if stored != unsigned - 256 * high:
            raise self._error(
                f"bad header checksum at byte {self._header_offset()} (not a tar stream?)",
                _shown(_cstring(header[0:100])) or None,
            )

    def _fill(self, size: int) -> int:
        """Make ``size`` (at most a block) bytes available at the read position if the
        stream has them; return how many are available."""
        available = self._end - self._pos
        if available >= size:
            return available
        if self._pos + size > len(self._buf):
            # Too close to the buffer's end: move the few leftover bytes to its start.
            self._buf[:available] = bytes(self._view[self._pos : self._end])
            self._base += self._pos
            self._pos, self._end = 0, available
        while self._end - self._pos < size:
            got = self._readinto(self._view[self._end :]) or 0
            if not got:
                break
            self._end += got
        return self._end - self._pos

    def _refill(self) -> int:
        """Read the next chunk into the (fully consumed) buffer; return its size."""
        self._base += self._end
        self._pos = self._end = 0
        self._end = self._readinto(self._view) or 0
        return self._end

    def _readinto_via_read(self, target: memoryview) -> int:
        data = self._stream.read(len(target))
        target[: len(data)] = data
        return len(data)

    def _read_stored(self, limit: int) -> memoryview:
        """Up to ``limit`` of the current member's stored data bytes, as a view."""
        size = min(limit, self._data_left)
        if size <= 0:
            return _EMPTY
        available = self._end - self._pos
        if not available:
            available = self._refill()
            if not available:
                raise self._error("tar stream ends inside the entry's data", self._current_path())
        size = min(size, available)
        start = self._pos
        self._pos = start + size
        self._data_left -= size
        return self._view[start : start + size]

    def _read_bytes(self, size: int, member: str | None) -> bytes:
        """Exactly ``size`` bytes (an extended header's data) as a bytes object."""
        parts = []
        while size:
            available = self._end - self._pos or self._refill()
            if not available:
                raise self._error("tar stream ends inside an extended header", member)
            take = min(size, available)
            parts.append(bytes(self._view[self._pos : self._pos + take]))
            self._pos += take
            size -= take
        return b"".join(parts)

    def _skip(self, size: int, member: str | None) -> None:
        while size:
            available = self._end - self._pos or self._refill()
            if not available:
                raise self._error("tar stream ends inside an entry's data or padding", member)
            take = min(size, available)
            self._pos += take
            size -= take

    def _skip_rest_of_member(self) -> None:
        self._skip(self._data_left + self._padding, self._current_path())
        self._data_left = self._padding = 0
        self._current = None
        self._sparse = None

    def _finish(self, pending: _Pending) -> None:
        """After the last member: nothing may be pending and the rest must be zeros."""
        if (pending.pax, pending.long_name, pending.long_link) != (None, None, None):
            raise self._error(
                "tar stream ends after an extended header, without its entry",
                _pending_name(pending),
            )
        while True:
            if self._buf.count(0, self._pos, self._end) != self._end - self._pos:
                raise self._error(
                    f"non-zero bytes after the end-of-archive marker (near byte "
                    f"{self._base + self._pos})"
                )
            if not self._refill():
                break
        self._done = True

    # --- errors ---------------------------------------------------------------------

    def _header_offset(self) -> int:
        return self._base + self._pos - BLOCK

    def _current_path(self) -> str | None:
        return self._current.path if self._current is not None else None

    def _error(self, reason: str, member: str | None = None) -> LayerError:
        return LayerError(self._layer, reason, member)


class _SparseMap:
    """Where a sparse member's stored regions go in its expanded content."""

    __slots__ = ("index", "position", "regions", "size")

    def __init__(self, regions: list[tuple[int, int]], size: int) -> None:
        # Empty regions carry nothing (GNU tar ends a map with one at the file size).
        self.regions = [region for region in regions if region[1]]
        self.size = size
        self.position = 0  # in the expanded content
        self.index = 0  # the first region not wholly read

    def check(self, stored: int) -> str | None:
        """Why the map cannot describe ``stored`` data bytes, or None if it can."""
        end = 0
        for offset, length in self.regions:
            if offset < end:
                return "regions overlap or are out of order"
            end = offset + length
        if end > self.size:
            return f"regions end at {end}, beyond the size {self.size}"
        if sum(length for _, length in self.regions) != stored:
            return f"regions hold {sum(n for _, n in self.regions)} bytes but {stored} are stored"
        return None

    def hole_ahead(self) -> int:
        """Bytes of hole from the current position (0 inside a region or at the end)."""
        if self.index < len(self.regions):
            return max(0, self.regions[self.index][0] - self.position)
        return self.size - self.position

    def data_ahead(self) -> int:
        offset, length = self.regions[self.index]
        return offset + length - self.position

    def advance(self, chunk: memoryview) -> memoryview:
        self.position += len(chunk)
        if self.index < len(self.regions):
            offset, length = self.regions[self.index]
            if self.position == offset + length:
                self.index += 1
        return chunk


# --- field helpers --------------------------------------------------------------------

# name, mode, uid, gid, size, mtime, (checksum), linkname, magic, (version),
# uname, gname, devmajor, devminor, prefix
_HEADER = struct.Struct("100s8s8s8s12s12s8x1x100s6s2x32s32s8s8s155s12x")
_NUMBER_FIELDS = {  # start: (end, name)
    100: (108, "mode"),
    108: (116, "uid"),
    116: (124, "gid"),
    124: (136, "size"),
    136: (148, "mtime"),
    329: (337, "devmajor"),
    337: (345, "devminor"),
}


def _cstring(field: bytes) -> bytes:
    """A NUL-terminated (or field-filling) string."""
    end = field.find(0)
    return field if end < 0 else field[:end]


def _parse_number(field: bytes) -> int:
    """A numeric header field: GNU base-256, or octal as tarfile reads it.

    Octal is cut at the first NUL and may have surrounding spaces; an empty
    field is 0.  Raises ValueError for anything else.
    """
    digits = field.rstrip(b"\0 ")
    if digits.isdigit():  # the usual zero-padded octal: the fast path
        return int(digits, 8)  # ValueError for 8 and 9
    lead = field[0] if field else 0
    if lead == 0x80:
        return int.from_bytes(field[1:], "big")
    if lead == 0xFF:
        return int.from_bytes(field[1:], "big") - (1 << (8 * (len(field) - 1)))
    digits = _cstring(field).strip()
    if not digits:
        return 0
    if not digits.isdigit():  # int() would also take signs, "0o" and "_"
        raise ValueError(field)
    return int(digits, 8)  # ValueError for 8 and 9


def _byte_sum(block: bytes) -> int:
    """The sum of a 512-byte block's bytes.

    Adler-32's low half is 1 + the byte sum modulo 65521, and the sum of 256
    bytes is at most 65280: so two Adler-32s give the exact sum, four times
    faster than ``sum(block)``.
    """
    view = memoryview(block)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


def _shown(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def _pending_name(pending: _Pending) -> str | None:
    if pending.pax is not None and b"path" in pending.pax:
        return _shown(pending.pax[b"path"])
    if pending.long_name is not None:
        return _shown(pending.long_name)
    return None


def _is_pax_sparse(pax: dict[bytes, bytes] | None) -> bool:
    return pax is not None and any(key in pax for key in _PAX_SPARSE_KEYS)
