"""The tar -> EROFS writer, checked by three independent readers.

Every image built here goes through ``fsck.erofs`` (erofs-utils' own checker),
then ``fsck.erofs --extract`` (its own reader), then the host kernel: it is
loop-mounted and the tree seen through the mount is compared, attribute by
attribute, with a model of what the tar describes.  Whiteouts and opaque
directories are also checked through a real overlayfs mount.

The tars are built with :mod:`tarfile` the way any user can (ids, modes and
device numbers set in the headers), so building them needs no privileges;
mounting does (root), and the mount-based tests skip with the reason if the
host cannot mount.  A few tests also feed archives written by GNU tar (its
formats, sparse members), compared with the directory they were made from.
The tar reader itself is tested in ``test_tarstream.py``.
"""

from __future__ import annotations

import io
import itertools
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
from helpers import ShortReads, pattern
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmruntime.errors import LayerError
from vmruntime.rootfs.erofs import BLOCK_SIZE, ErofsStats, build_erofs_from_tar

FSCK = shutil.which("fsck.erofs")
needs_fsck = pytest.mark.skipif(FSCK is None, reason="fsck.erofs (erofs-utils) is not installed")


# --- a tar builder that also models the tree the tar describes ---------------


@dataclass
class Spec:
    """What one path of the image must look like."""

    kind: int  # stat.S_IFREG, S_IFDIR, ...
    perm: int  # the 12 permission bits, setuid/setgid/sticky included
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    data: bytes = b""
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    link: int | None = None  # paths sharing a value are hard links of one inode


class LayerTar:
    """Writes a tar (PAX unless told) in memory and keeps ``expected``: path -> Spec.

    The model applies the extraction semantics the writer promises (later
    entries replace earlier ones, restated directories keep their children,
    whiteouts hide earlier entries) on a plain dict, independently of the
    writer's tree.
    """

    def __init__(self, default_mtime: int = 0, tar_format: int = tarfile.PAX_FORMAT) -> None:
        self._buffer = io.BytesIO()
        self._tar = tarfile.TarFile(fileobj=self._buffer, mode="w", format=tar_format)
        self._default_mtime = default_mtime
        self._links = itertools.count()
        self.expected: dict[str, Spec] = {"": Spec(stat.S_IFDIR, 0o755, mtime_ns=self._ns(None))}

    def _ns(self, mtime: int | str | None) -> int:
        if mtime is None:
            return self._default_mtime * 1_000_000_000
        return int(Decimal(mtime) * 1_000_000_000)

    # entries

    def dir(self, path: str, mode: int = 0o755, **meta) -> None:
        spec = self._spec(stat.S_IFDIR, mode, meta)
        self._emit(self._info(path, tarfile.DIRTYPE, mode, meta))
        key = self._key(path)
        existing = self.expected.get(key)
        if existing is not None and existing.kind == stat.S_IFDIR:
            spec.xattrs = {**meta.get("xattrs", {})}
            if existing.xattrs.get(b"trusted.overlay.opaque") == b"y":
                spec.xattrs[b"trusted.overlay.opaque"] = b"y"
            self.expected[key] = spec
        else:
            self._replace(key, spec)

    def file(self, path: str, data: bytes = b"", mode: int = 0o644, **meta) -> None:
        info = self._info(path, tarfile.REGTYPE, mode, meta)
        info.size = len(data)
        self._emit(info, data)
        spec = self._spec(stat.S_IFREG, mode, meta)
        spec.data = data
        self._replace(self._key(path), spec)

    def symlink(self, path: str, target: str, mode: int = 0o777, **meta) -> None:
        info = self._info(path, tarfile.SYMTYPE, mode, meta)
        info.linkname = target
        self._emit(info)
        spec = self._spec(stat.S_IFLNK, mode, meta)
        spec.target = target.encode("utf-8", "surrogateescape")
        self._replace(self._key(path), spec)

    def hardlink(self, path: str, target: str) -> None:
        info = self._info(path, tarfile.LNKTYPE, 0o644, {})
        info.linkname = target
        self._emit(info)
        original = self.expected[self._key(target)]
        if original.link is None:
            original.link = next(self._links)
        self._replace(self._key(path), original)

    def device(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600, **meta):
        tar_type = tarfile.CHRTYPE if kind == "chr" else tarfile.BLKTYPE
        info = self._info(path, tar_type, mode, meta)
        info.devmajor, info.devminor = major, minor
        self._emit(info)
        spec = self._spec(stat.S_IFCHR if kind == "chr" else stat.S_IFBLK, mode, meta)
        spec.rdev = (major, minor)
        self._replace(self._key(path), spec)

    def fifo(self, path: str, mode: int = 0o644, **meta) -> None:
        self._emit(self._info(path, tarfile.FIFOTYPE, mode, meta))
        self._replace(self._key(path), self._spec(stat.S_IFIFO, mode, meta))

    def whiteout(self, path: str, uid: int = 0, gid: int = 0) -> None:
        """``dir/.wh.NAME`` for ``path`` = ``dir/NAME``."""
        parent, _, name = path.rpartition("/")
        marker = f"{parent}/.wh.{name}" if parent else f".wh.{name}"
        self._emit(self._info(marker, tarfile.REGTYPE, 0o644, {"uid": uid, "gid": gid}))
        self._replace(self._key(path), Spec(stat.S_IFCHR, 0, uid, gid))

    def opaque(self, directory: str) -> None:
        marker = f"{directory}/.wh..wh..opq" if directory else ".wh..wh..opq"
        self._emit(self._info(marker, tarfile.REGTYPE, 0o644, {}))
        key = self._key(directory)
        self._ensure_parents(key + "/x" if key else "x")
        self._drop_children(key)
        self.expected[key].xattrs[b"trusted.overlay.opaque"] = b"y"

    def raw(self, info: tarfile.TarInfo, data: bytes = b"") -> None:
        """An entry the model does not follow (for error cases)."""
        self._emit(info, data)

    def getvalue(self) -> bytes:
        self._tar.close()
        return self._buffer.getvalue()

    # helpers

    def _info(self, path: str, tar_type: bytes, mode: int, meta: dict) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        info.type = tar_type
        info.mode = mode
        info.uid = meta.get("uid", 0)
        info.gid = meta.get("gid", 0)
        info.uname = info.gname = ""
        mtime = meta.get("mtime")
        pax: dict[str, str] = {}
        if isinstance(mtime, str):
            pax["mtime"] = mtime
        else:
            info.mtime = 0 if mtime is None else mtime
        for name, value in meta.get("xattrs", {}).items():
            key = "SCHILY.xattr." + name.decode("utf-8", "surrogateescape")
            pax[key] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = {**pax, **meta.get("pax", {})}
        return info

    def _spec(self, kind: int, mode: int, meta: dict) -> Spec:
        mtime = meta.get("mtime")
        return Spec(
            kind,
            mode,
            meta.get("uid", 0),
            meta.get("gid", 0),
            int(Decimal(mtime if mtime is not None else 0) * 1_000_000_000),
            xattrs=dict(meta.get("xattrs", {})),
        )

    def _emit(self, info: tarfile.TarInfo, data: bytes = b"") -> None:
        self._tar.addfile(info, io.BytesIO(data) if info.isreg() else None)

    @staticmethod
    def _key(path: str) -> str:
        return "/".join(part for part in path.split("/") if part not in ("", "."))

    def _replace(self, key: str, spec: Spec) -> None:
        self._ensure_parents(key)
        self._drop_children(key)
        self.expected[key] = spec

    def _drop_children(self, key: str) -> None:
        prefix = key + "/" if key else ""
        for path in [p for p in self.expected if p.startswith(prefix) and p != key]:
            del self.expected[path]

    def _ensure_parents(self, key: str) -> None:
        parts = key.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            parent = "/".join(parts[:depth])
            if parent not in self.expected:
                self.expected[parent] = Spec(stat.S_IFDIR, 0o755, mtime_ns=self._ns(None))


# --- building, checking, mounting --------------------------------------------


def build(tar_bytes: bytes, dest: Path, **kwargs) -> ErofsStats:
    reader = ShortReads(tar_bytes)
    stats = build_erofs_from_tar(reader, dest, **kwargs)
    assert reader.consumed == len(tar_bytes), "the stream must be read to its end"
    assert dest.stat().st_size == stats.bytes_written == stats.blocks * BLOCK_SIZE
    return stats


def fsck(image: Path, extract_to: Path | None = None) -> None:
    assert FSCK is not None
    command = [FSCK]
    if extract_to is not None:
        command += [f"--extract={extract_to}", "--preserve"]
    result = subprocess.run([*command, str(image)], capture_output=True, text=True)
    assert result.returncode == 0, f"fsck.erofs failed:\n{result.stdout}\n{result.stderr}"


def _mount(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=False, capture_output=True)


_MOUNT_PROBLEM: list[str | None] = []


def mount_problem() -> str | None:
    """Why erofs images cannot be mounted here (None if they can); probed once."""
    if not _MOUNT_PROBLEM:
        problem = None
        if os.geteuid() != 0:
            problem = "mounting needs root"
        elif shutil.which("mount") is None:
            problem = "mount(8) is not installed"
        else:
            with tempfile.TemporaryDirectory() as scratch:
                image, target = Path(scratch, "probe.erofs"), Path(scratch, "mnt")
                target.mkdir()
                tar = LayerTar()
                tar.file("probe", b"x")
                build(tar.getvalue(), image)
                result = _mount(["-t", "erofs", "-o", "loop,ro", str(image), str(target)])
                if result.returncode != 0:
                    problem = f"cannot mount an erofs image: {result.stderr.strip()}"
                else:
                    _umount(target)
        _MOUNT_PROBLEM.append(problem)
    return _MOUNT_PROBLEM[0]


@contextmanager
def mounted(image: Path, target: Path) -> Iterator[Path]:
    problem = mount_problem()
    if problem:
        pytest.skip(problem)
    target.mkdir(parents=True, exist_ok=True)
    result = _mount(["-t", "erofs", "-o", "loop,ro", str(image), str(target)])
    assert result.returncode == 0, f"mount failed: {result.stderr}"
    try:
        yield target
    finally:
        _umount(target)


@contextmanager
def overlay(lowers: list[Path], target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    lowerdir = ":".join(str(p) for p in lowers)
    result = _mount(["-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir}", str(target)])
    if result.returncode != 0:
        pytest.skip(f"cannot mount overlayfs: {result.stderr.strip()}")
    try:
        yield target
    finally:
        _umount(target)


# --- comparing a tree with the model ---------------------------------------------


@dataclass
class Seen:
    st: os.stat_result
    data: bytes = b""
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


def read_tree(root: Path, *, with_xattrs: bool = True) -> dict[str, Seen]:
    seen: dict[str, Seen] = {}

    def visit(path: bytes, key: str) -> None:
        info = os.lstat(path)
        entry = Seen(info)
        if stat.S_ISREG(info.st_mode):
            with open(path, "rb") as handle:
                entry.data = handle.read()
        elif stat.S_ISLNK(info.st_mode):
            entry.target = os.readlink(path)
        if with_xattrs:
            for name in os.listxattr(path, follow_symlinks=False):
                with suppress(OSError):  # user.* cannot be read on special files
                    value = os.getxattr(path, name, follow_symlinks=False)
                    entry.xattrs[name.encode("utf-8", "surrogateescape")] = value
        seen[key] = entry
        if stat.S_ISDIR(info.st_mode):
            for name in os.listdir(path):
                child = name.decode("utf-8", "surrogateescape")
                visit(os.path.join(path, name), f"{key}/{child}" if key else child)

    visit(os.fsencode(root), "")
    return seen


def assert_tree(root: Path, expected: dict[str, Spec]) -> None:
    """The mounted image shows exactly the modelled tree, every attribute of it."""
    seen = read_tree(root)
    assert sorted(seen) == sorted(expected)
    subdirs = {key: 0 for key, spec in expected.items() if spec.kind == stat.S_IFDIR}
    for key, spec in expected.items():
        if key and spec.kind == stat.S_IFDIR:
            subdirs[key.rpartition("/")[0]] += 1
    link_counts: dict[int, int] = {}
    for spec in expected.values():
        if spec.link is not None:
            link_counts[spec.link] = link_counts.get(spec.link, 0) + 1
    inodes: dict[int, int | str] = {}
    for key, spec in expected.items():
        got = seen[key]
        where = f"path {key!r}"
        assert stat.S_IFMT(got.st.st_mode) == spec.kind, where
        assert stat.S_IMODE(got.st.st_mode) == spec.perm, where
        assert (got.st.st_uid, got.st.st_gid) == (spec.uid, spec.gid), where
        assert got.st.st_mtime_ns == spec.mtime_ns, where
        if spec.kind == stat.S_IFDIR:
            assert got.st.st_nlink == 2 + subdirs[key], where
        else:
            assert got.st.st_nlink == link_counts.get(spec.link, 1), where  # type: ignore[arg-type]
        if spec.kind == stat.S_IFREG:
            assert got.st.st_size == len(spec.data), where
            assert got.data == spec.data, where
        if spec.kind == stat.S_IFLNK:
            assert got.target == spec.target, where
            assert got.st.st_size == len(spec.target), where
        if spec.kind in (stat.S_IFCHR, stat.S_IFBLK):
            assert (os.major(got.st.st_rdev), os.minor(got.st.st_rdev)) == spec.rdev, where
        assert got.xattrs == readable_xattrs(spec), where
        # One st_ino per inode: hard links share it, nothing else does.
        owner = spec.link if spec.link is not None else key
        assert inodes.setdefault(got.st.st_ino, owner) == owner, where


def readable_xattrs(spec: Spec) -> dict[bytes, bytes]:
    """The kernel refuses user.* xattrs on anything but files and directories."""
    if spec.kind in (stat.S_IFREG, stat.S_IFDIR):
        return spec.xattrs
    return {k: v for k, v in spec.xattrs.items() if not k.startswith(b"user.")}


def assert_extracted(root: Path, expected: dict[str, Spec]) -> None:
    """What ``fsck.erofs --extract --preserve`` wrote matches the model, as far as
    the extraction can carry it: no xattrs (fsck.erofs 1.5 does not extract
    them), no setuid/setgid on non-directories (its chown after chmod drops
    them), and only the mtimes the host's ext4 stores exactly."""
    seen = read_tree(root, with_xattrs=False)
    assert sorted(seen) == sorted(expected)
    for key, spec in expected.items():
        if not key:
            continue
        got, where = seen[key], f"path {key!r}"
        assert stat.S_IFMT(got.st.st_mode) == spec.kind, where
        assert (got.st.st_uid, got.st.st_gid) == (spec.uid, spec.gid), where
        if spec.kind != stat.S_IFLNK:
            kept = 0o7777 if spec.kind == stat.S_IFDIR else 0o1777
            assert stat.S_IMODE(got.st.st_mode) & kept == spec.perm & kept, where
        # A directory's mtime moves as its children are extracted.
        if spec.kind != stat.S_IFDIR and -(2**31) <= spec.mtime_ns // 10**9 < 2**31:
            assert got.st.st_mtime_ns == spec.mtime_ns, where
        assert got.data == spec.data, where
        assert got.target == spec.target, where
        if spec.kind in (stat.S_IFCHR, stat.S_IFBLK):
            assert (os.major(got.st.st_rdev), os.minor(got.st.st_rdev)) == spec.rdev, where


def check_image(tar: LayerTar, work: Path, **kwargs) -> ErofsStats:
    """Build the tar's image, then check it with fsck, fsck's extractor and the kernel."""
    work.mkdir(parents=True, exist_ok=True)
    image = work / "layer.erofs"
    stats = build(tar.getvalue(), image, **kwargs)
    if FSCK is not None:
        fsck(image)
        extracted = work / "extracted"
        fsck(image, extracted)
        assert_extracted(extracted, tar.expected)
    with mounted(image, work / "mnt") as root:
        assert_tree(root, tar.expected)
    return stats


def test_every_entry_kind_round_trips(tmp_path: Path) -> None:
    tar = LayerTar()
    tar.dir("./", mode=0o755, mtime=1_600_000_000)
    tar.dir("etc", mode=0o755, uid=0, gid=0, mtime=1_600_000_001)
    tar.file("etc/hostname", b"box\n", mode=0o644, mtime="1700000000.123456789")
    tar.file("usr/bin/sudo", pattern(70_001), mode=0o4755, uid=0, gid=0)
    tar.file("usr/bin/wall", pattern(100, 1), mode=0o2755, gid=5)
    tar.dir("tmp", mode=0o1777)
    tar.file("home/user/notes", b"hi", mode=0o600, uid=100_000, gid=200_000)
    tar.file("all-bits", b"", mode=0o7777, uid=4_294_967_294, gid=4_294_967_293)
    tar.file("no-bits", b"x", mode=0o000)
    tar.symlink("usr/bin/sh", "dash")
    tar.symlink("abs", "/etc/hostname")
    tar.symlink("dangling", "../../nowhere/at all", mode=0o777)
    tar.hardlink("usr/bin/sudoedit", "usr/bin/sudo")
    tar.hardlink("etc/also-hostname", "etc/hostname")
    tar.device("dev/null", "chr", 1, 3, mode=0o666)
    tar.device("dev/sda1", "blk", 8, 1, mode=0o660, gid=6)
    tar.device("dev/nvme-big", "blk", 259, 1_000_000)  # minor above 0xff: new_encode_dev
    tar.device("dev/max", "chr", 4095, (1 << 20) - 1)
    tar.fifo("run/initctl", mode=0o600)
    tar.file("old", b"negative time", mtime=-1)
    tar.file("far-future", b"y2106+", mtime=2**33 + 5)
    tar.file("x", b"", xattrs={b"user.comment": b"hello", b"trusted.t": b"\x00\xff\x01"})
    tar.dir("withattrs", xattrs={b"user.dir": b"d", b"security.label": b"s0"})
    stats = check_image(tar, tmp_path)
    assert stats.files == 9 and stats.symlinks == 3 and stats.hardlinks == 2
    assert stats.devices == 4 and stats.fifos == 1 and stats.whiteouts == 0


@pytest.mark.parametrize(
    "sizes",
    [
        [0, 1, 4095, 4096, 4097, 8191, 8192, 8193],
        [5 * 1024 * 1024 + 17, 12288, 3000],
    ],
    ids=["around-block-size", "large"],
)
def test_file_sizes(tmp_path: Path, sizes: list[int]) -> None:
    tar = LayerTar()
    for index, size in enumerate(sizes):
        tar.file(f"f{index}-{size}", pattern(size, index))
    # A big xattr set pushes the tail out of the inode's block: FLAT_PLAIN.
    big = {b"user.pad": pattern(3000, 99)}
    tar.file("tail-not-inline", pattern(4096 + 2000, 7), xattrs=big)
    tar.file("small-not-inline", pattern(1500, 8), xattrs=big)
    # inode 64 + xattr header 12 + entry 16 + tail 4004 = exactly one block
    tar.file("tail-just-fits", pattern(4004, 9), xattrs={b"user.ab": b"12345678"})
    check_image(tar, tmp_path)


def test_large_directory_lookup_and_listing(tmp_path: Path) -> None:
    tar = LayerTar()
    names = [f"entry-{i:05d}-" + "n" * (i % 40) for i in range(2000)]
    names += ["-a", "!", "!!", ".a", "..a", "...", "a.", "~", "A", "_", "0", "é", "a" * 255]
    names += ["\udcff-raw-byte"]  # a non-UTF-8 byte in the name, kept as given
    for index, name in enumerate(names):
        tar.file(f"big/{name}", b"%d" % index)
    image = tmp_path / "big.erofs"
    build(tar.getvalue(), image)
    if FSCK is not None:
        fsck(image)
    with mounted(image, tmp_path / "mnt") as root:
        listed = sorted(os.listdir(os.fsencode(root / "big")))
        assert listed == sorted(n.encode("utf-8", "surrogateescape") for n in names)
        # Lookups go through the kernel's binary search over directory blocks.
        probe = [*names[:3], names[999], names[1000], *names[-16:]]
        for name in probe:
            path = os.fsencode(root / "big") + b"/" + name.encode("utf-8", "surrogateescape")
            with open(path, "rb") as handle:
                assert handle.read() == b"%d" % names.index(name)
        for absent in ["entry-", "entry-01000", "zzz", "-", " ", "entry-01999-" + "n" * 41]:
            assert not (root / "big" / absent).exists()
        assert os.stat(root / "big").st_size > 4 * BLOCK_SIZE
        assert_tree(root, tar.expected)


def test_names_of_255_bytes_and_deep_nesting(tmp_path: Path) -> None:
    tar = LayerTar()
    long_name = "L" * 255
    tar.file(f"{long_name}/{long_name}", b"deep")
    tar.file("a" * 253 + "é", b"255 bytes, the last two one character")
    deep = "/".join(f"d{level}" for level in range(120))
    tar.file(f"{deep}/leaf", b"leaf")
    tar.symlink(f"{deep}/up", "../" * 119 + "leaf")
    check_image(tar, tmp_path)


def test_long_symlink_targets(tmp_path: Path) -> None:
    tar = LayerTar()
    tar.symlink("long", "/".join(["segment"] * 300))  # 2399 bytes, inline
    tar.symlink("longest", "t" * 4095)  # PATH_MAX - 1: needs its own block
    tar.symlink("with-xattr", "x" * 3000, xattrs={b"trusted.big": pattern(1200)})
    tar.symlink("weird", "a\udcfe\n target with spaces and \\ / ..")
    check_image(tar, tmp_path)


def test_many_xattrs(tmp_path: Path) -> None:
    tar = LayerTar()
    many = {b"user.attr-%03d" % i: pattern(i % 70, i) for i in range(200)}  # spans blocks
    tar.file("many", pattern(5000), xattrs=many)
    tar.dir("dir-many", xattrs=dict(list(many.items())[:50]))
    tar.file("dir-many/child", b"c")
    tar.file("empty-value", b"", xattrs={b"user.empty": b""})
    tar.file("big-value", b"v", xattrs={b"user.big": pattern(60_000)})
    capability = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_bind_service+ep
    tar.file("ping", b"\x7fELF", mode=0o755, xattrs={b"security.capability": capability})
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, ident)
        for tag, perm, ident in [
            (1, 6, 0xFFFFFFFF),
            (2, 6, 1000),
            (4, 4, 0xFFFFFFFF),
            (0x10, 6, 0xFFFFFFFF),
            (0x20, 4, 0xFFFFFFFF),
        ]
    )
    tar.file("acl", b"a", mode=0o664, xattrs={b"system.posix_acl_access": acl})
    tar.dir("acl-dir", xattrs={b"system.posix_acl_default": acl})
    tar.symlink("link-with-trusted", "t", xattrs={b"trusted.overlay.origin": b"o"})
    # bsdtar's spelling: URL-encoded name, base64 value
    tar.file("libarchive", b"l", pax={"LIBARCHIVE.xattr.user.with%20space": "dmFsdWU"})
    tar.expected["libarchive"].xattrs[b"user.with space"] = b"value"
    tar.device("dev-with-security", "chr", 5, 1, xattrs={b"security.selinux": b"u:r:t:s0\x00"})
    check_image(tar, tmp_path)


def test_metadata_of_implicit_and_root_directories(tmp_path: Path) -> None:
    tar = LayerTar(default_mtime=1_234_567_890)
    tar.file("implicit/parents/file", b"f", uid=7, mtime=5)
    stats = check_image(tar, tmp_path / "implicit", mtime=1_234_567_890)
    assert stats.dirs == 3

    tar = LayerTar()
    tar.dir("/", mode=0o700, uid=5, gid=6, mtime=99, xattrs={b"user.root": b"r"})
    tar.file("/abs/path", b"leading slash stripped")
    tar.file("././dot/slash", b"leading ./ stripped")
    tar.file("a//b/./c", b"empty and . components dropped")
    check_image(tar, tmp_path / "root")


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    tar = LayerTar()
    tar.file("file", b"old content that is longer")
    tar.file("file", b"new", mode=0o600)
    tar.dir("dir", mode=0o700, uid=1)
    tar.file("dir/child", b"kept")
    tar.dir("dir", mode=0o750, uid=2, mtime=42)  # restated: new metadata, same children
    tar.dir("tree/sub")
    tar.file("tree/sub/leaf", pattern(9000))
    tar.file("tree", b"a file replaces the whole subtree")
    tar.file("becomes-dir", b"x")
    tar.dir("becomes-dir")
    tar.file("becomes-dir/inside", b"y")
    tar.symlink("link", "first")
    tar.symlink("link", "second")
    tar.file("orig", pattern(5000, 1))
    tar.hardlink("linked", "orig")
    tar.file("orig", b"replaced after linking")  # the link keeps the old inode
    check_image(tar, tmp_path)


def test_whiteouts_and_opaque_directories_in_the_image(tmp_path: Path) -> None:
    tar = LayerTar()
    tar.file("early", b"removed by the whiteout below")
    tar.whiteout("early", uid=3, gid=4)
    tar.whiteout("gone")
    tar.whiteout("sub/gone-dir")
    tar.file("opq/earlier", b"dropped by the opaque marker")
    tar.opaque("opq")
    tar.file("opq/new", b"new")
    tar.whiteout("back")
    tar.file("back", b"restored after the whiteout")
    tar.opaque("implicit-opq")
    tar.dir("opq", mode=0o711)  # restated after the marker: stays opaque
    stats = check_image(tar, tmp_path)
    assert stats.whiteouts == 3 and stats.opaque_dirs == 2


def test_overlayfs_honours_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    for path, content in {
        "gone": "g",
        "kept": "k",
        "gone-dir/inner": "i",
        "opq/old": "o",
        "merged/lower-only": "l",
    }.items():
        (lower / path).parent.mkdir(parents=True, exist_ok=True)
        (lower / path).write_text(content)
    tar = LayerTar()
    tar.whiteout("gone")
    tar.whiteout("gone-dir")
    tar.opaque("opq")
    tar.file("opq/new", b"n")
    tar.file("merged/upper-only", b"u")
    image = tmp_path / "upper.erofs"
    build(tar.getvalue(), image)
    with mounted(image, tmp_path / "mnt") as upper:
        assert os.getxattr(upper / "opq", "trusted.overlay.opaque") == b"y"
        info = os.lstat(upper / "gone")
        assert stat.S_ISCHR(info.st_mode) and info.st_rdev == 0
        with overlay([upper, lower], tmp_path / "merged") as merged:
            assert sorted(os.listdir(merged)) == ["kept", "merged", "opq"]
            assert not (merged / "gone").exists() and not (merged / "gone-dir").exists()
            assert os.listdir(merged / "opq") == ["new"]
            assert sorted(os.listdir(merged / "merged")) == ["lower-only", "upper-only"]
            assert (merged / "kept").read_text() == "k"


def test_reproducible_and_reads_a_real_pipe(tmp_path: Path) -> None:
    tar = LayerTar()
    for index in range(50):
        tar.file(f"d{index % 5}/f{index}", pattern(index * 300, index))
    data = tar.getvalue() + bytes(10240)  # tar writers pad with zero records

    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as sink:
            sink.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    with os.fdopen(read_fd, "rb") as source:
        stats = build_erofs_from_tar(source, tmp_path / "a.erofs", layer="sha256:abc")
        assert source.read() == b"", "the pipe must be drained"
    writer.join()
    build(data, tmp_path / "b.erofs", layer="sha256:other")  # the name is for messages only
    assert (tmp_path / "a.erofs").read_bytes() == (tmp_path / "b.erofs").read_bytes()
    assert stats.files == 50 and stats.dirs == 6 and stats.inodes == 56


def _same_tree(tar: LayerTar) -> None:
    """Content every tar format can carry (short names, small ids, whole-second times)."""
    tar.dir("etc", mode=0o755, mtime=1_600_000_000)
    tar.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mtime=1_700_000_000)
    tar.file("usr/lib/libbig.so", pattern(3 * BLOCK_SIZE + 5), mode=0o755, uid=7, gid=9)
    tar.file("usr/lib/empty", b"")
    tar.hardlink("usr/lib/libbig.so.1", "usr/lib/libbig.so")
    tar.symlink("usr/lib/libbig.so.0", "libbig.so.1")
    tar.device("dev/zero", "chr", 1, 5, mode=0o666)
    tar.device("dev/loop0", "blk", 7, 0)
    tar.fifo("run/fifo")
    tar.file("p" * 80 + "/" + "n" * 90, b"needs ustar's prefix field")
    tar.whiteout("gone")
    tar.opaque("opaque")
    tar.file("opaque/new", b"n")


def test_every_tar_format_gives_the_same_image(tmp_path: Path) -> None:
    images = []
    for name, tar_format in (
        ("ustar", tarfile.USTAR_FORMAT),
        ("gnu", tarfile.GNU_FORMAT),
        ("pax", tarfile.PAX_FORMAT),
    ):
        tar = LayerTar(tar_format=tar_format)
        _same_tree(tar)
        check_image(tar, tmp_path / name)
        images.append((tmp_path / name / "layer.erofs").read_bytes())
    assert images[0] == images[1] == images[2]


def test_gnu_long_names_and_base256_numbers_match_pax(tmp_path: Path) -> None:
    """GNU L/K records and base-256 fields describe what PAX records do."""
    images = []
    for name, tar_format in (("gnu", tarfile.GNU_FORMAT), ("pax", tarfile.PAX_FORMAT)):
        tar = LayerTar(tar_format=tar_format)
        long_dir = "/".join(["x" * 200] * 2)
        tar.file(f"{long_dir}/file", b"long path", uid=2**31 + 7, gid=4_000_000_000)
        tar.symlink("link", "t/" * 1000 + "target")
        tar.hardlink("h" * 150, f"{long_dir}/file")
        tar.file("before-1970", b"old", mtime=-86_400)
        tar.device("dev/big", "blk", 4095, (1 << 20) - 1)
        check_image(tar, tmp_path / name)
        images.append((tmp_path / name / "layer.erofs").read_bytes())
    assert images[0] == images[1]


GNU_TAR = shutil.which("tar")
_IS_GNU_TAR = (
    GNU_TAR is not None
    and "GNU tar" in subprocess.run([GNU_TAR, "--version"], capture_output=True, text=True).stdout
)


def _make_source_tree(root: Path, long_names: bool) -> None:
    """A small real tree: sizes around the block size, links, a FIFO, sparse files."""
    (root / "sub" / "deeper").mkdir(parents=True)
    for index, size in enumerate([0, 1, 511, 4095, 4096, 4097, 70_000]):
        (root / "sub" / f"f{size}").write_bytes(pattern(size, index))
    (root / "sub" / "deeper" / "exec").write_bytes(b"#!/bin/sh\n")
    (root / "sub" / "deeper" / "exec").chmod(0o4755)
    os.symlink("../sub/f1", root / "sub" / "deeper" / "link")
    os.link(root / "sub" / "f4096", root / "hardlink")
    os.mkfifo(root / "fifo")
    with open(root / "sparse", "wb") as handle:
        handle.write(b"head")
        handle.seek(3 << 20)
        handle.write(pattern(10_000, 5))
        handle.truncate(5 << 20)
    with open(root / "all-hole", "wb") as handle:
        handle.truncate(1 << 20)
    if long_names:
        long_dir = root / ("d" * 120) / ("e" * 120)
        long_dir.mkdir(parents=True)
        (long_dir / ("f" * 100)).write_bytes(b"long")
        os.symlink("../" * 30 + "x" * 200, root / "long-link")
    for path in sorted(root.rglob("*"), reverse=True):
        os.utime(
            path, ns=(1_650_000_000_123_456_789, 1_650_000_000_123_456_789), follow_symlinks=False
        )


def _assert_same_tree(mounted_root: Path, source: Path, exact_mtimes: bool) -> None:
    seen = read_tree(mounted_root, with_xattrs=False)
    want = read_tree(source, with_xattrs=False)
    assert sorted(seen) == sorted(want)
    for key in want:
        got, expected, where = seen[key].st, want[key].st, f"path {key!r}"
        assert stat.S_IFMT(got.st_mode) == stat.S_IFMT(expected.st_mode), where
        assert stat.S_IMODE(got.st_mode) == stat.S_IMODE(expected.st_mode) or not key, where
        assert seen[key].data == want[key].data, where
        assert seen[key].target == want[key].target, where
        if key and not stat.S_ISDIR(expected.st_mode):
            assert got.st_nlink == expected.st_nlink, where
            mtime = expected.st_mtime_ns if exact_mtimes else expected.st_mtime_ns // 10**9 * 10**9
            assert got.st_mtime_ns == mtime, where


GNU_TAR_FORMATS = {
    "gnu": (["--format=gnu", "--sparse"], True, False),
    "oldgnu": (["--format=oldgnu", "--sparse"], True, False),
    "posix": (["--format=posix"], True, True),
    "posix-sparse-0.0": (["--format=posix", "--sparse", "--sparse-version=0.0"], True, True),
    "posix-sparse-0.1": (["--format=posix", "--sparse", "--sparse-version=0.1"], True, True),
    "posix-sparse-1.0": (["--format=posix", "--sparse", "--sparse-version=1.0"], True, True),
    "ustar": (["--format=ustar"], False, False),
    "v7": (["--format=v7"], False, False),
}


@pytest.mark.skipif(not _IS_GNU_TAR, reason="GNU tar is not installed")
@pytest.mark.parametrize(
    "options, long_names, exact", GNU_TAR_FORMATS.values(), ids=list(GNU_TAR_FORMATS)
)
def test_archives_written_by_gnu_tar(
    tmp_path: Path, options: list[str], long_names: bool, exact: bool
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    _make_source_tree(source, long_names)
    assert GNU_TAR is not None
    if "--format=v7" in options:  # v7 has no FIFOs
        (source / "fifo").unlink()
    result = subprocess.run(
        [GNU_TAR, "-C", str(source), *options, "-cf", "-", "."], capture_output=True, check=True
    )
    image = tmp_path / "layer.erofs"
    build(result.stdout, image)
    if FSCK is not None:
        fsck(image)
    with mounted(image, tmp_path / "mnt") as root:
        _assert_same_tree(root, source, exact)


# --- errors --------------------------------------------------------------------------


def _entry(name: str, tar_type: bytes = tarfile.REGTYPE, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tar_type
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


BAD_ENTRIES = {
    "dotdot": ("../escape", _entry("../escape")),
    "dotdot-inside": ("a/../../b", _entry("a/../../b")),
    "nul": ("a\x00b", _entry("x", pax_headers={"path": "a\x00b"})),
    "name-256": ("d/" + "n" * 256, _entry("d/" + "n" * 256)),
    "hardlink-unknown": ("link", _entry("link", tarfile.LNKTYPE, linkname="missing")),
    "hardlink-later": ("first", _entry("first", tarfile.LNKTYPE, linkname="second")),
    "hardlink-dotdot": ("l", _entry("l", tarfile.LNKTYPE, linkname="../etc/shadow")),
    "xattr-prefix": ("x", _entry("x", pax_headers={"SCHILY.xattr.foo.bar": "v"})),
    "xattr-lustre": ("x", _entry("x", pax_headers={"SCHILY.xattr.lustre.lov": "v"})),
    "xattr-empty-user": ("x", _entry("x", pax_headers={"SCHILY.xattr.user.": "v"})),
    "xattrs-too-large": (
        "x",
        _entry("x", pax_headers={f"SCHILY.xattr.user.{i}": "v" * 60_000 for i in range(5)}),
    ),
    "unknown-type": ("odd", _entry("odd", b"Z")),
    "symlink-too-long": ("s", _entry("s", tarfile.SYMTYPE, linkname="t" * 4096)),
    "symlink-empty": ("s", _entry("s", tarfile.SYMTYPE, linkname="")),
    "root-not-dir": ("./", _entry("./", tarfile.SYMTYPE, linkname="x")),
    "uid-too-big": ("u", _entry("u", uid=2**32)),
    "bad-device": ("d", _entry("d", tarfile.CHRTYPE, devmajor=4096, devminor=0)),
}


@pytest.mark.parametrize("member, bad", BAD_ENTRIES.values(), ids=list(BAD_ENTRIES))
def test_bad_entries_raise_layer_error_naming_them(
    tmp_path: Path, member: str, bad: tarfile.TarInfo
) -> None:
    tar = LayerTar()
    tar.file("fine", b"before")
    tar.raw(bad)
    tar.file("second", b"after: too late to be a hard link target")
    with pytest.raises(LayerError) as caught:
        build_erofs_from_tar(ShortReads(tar.getvalue()), tmp_path / "x.erofs", layer="sha256:feed")
    assert caught.value.member == member
    assert caught.value.layer == "sha256:feed"
    assert "sha256:feed" in str(caught.value)


def test_non_directory_parent_is_an_error(tmp_path: Path) -> None:
    tar = LayerTar()
    tar.file("a", b"file")
    tar.raw(_entry("a/b"))
    with pytest.raises(LayerError, match="not one") as caught:
        build_erofs_from_tar(ShortReads(tar.getvalue()), tmp_path / "x.erofs")
    assert caught.value.member == "a/b"


@pytest.mark.parametrize("cut", ["in-data", "in-header", "garbage-after-end", "not-a-tar"])
def test_corrupt_streams(tmp_path: Path, cut: str) -> None:
    tar = LayerTar()
    tar.file("a", pattern(10_000))
    tar.file("b", pattern(100))
    data = tar.getvalue()
    header_of_b = 512 + 10_240  # a's header, then its data rounded up to 512
    assert data[header_of_b : header_of_b + 2] == b"b\x00"
    broken = {
        "in-data": data[:3000],
        "in-header": data[: header_of_b + 100],
        "garbage-after-end": data + b"trailing junk",
        "not-a-tar": b"this is not a tar stream at all" * 40,
    }[cut]
    with pytest.raises(LayerError):
        build_erofs_from_tar(ShortReads(broken), tmp_path / "x.erofs", layer="sha256:1")


# --- random trees ------------------------------------------------------------------

NAME_CHARS = st.sampled_from([*"abcXYZ019-_.!~ é", "\udc80"])  # \udc80: raw byte 0x80
NAMES = st.text(NAME_CHARS, min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..") and not n.startswith(".wh.")
)
SIZES = st.one_of(
    st.sampled_from([0, 1, 4095, 4096, 4097, 8192]), st.integers(0, 3 * BLOCK_SIZE + 7)
)
XATTR_VALUES = st.binary(max_size=120)


@st.composite
def random_layers(draw: st.DrawFn) -> LayerTar:
    tar = LayerTar()
    directories = [""]
    files: list[str] = []
    for index in range(draw(st.integers(1, 40))):
        parent = draw(st.sampled_from(directories))
        name = draw(NAMES)
        path = f"{parent}/{name}" if parent else name
        if path in tar.expected:
            continue
        meta = {
            # 2**32-1 is the kernel's invalid id (shown as the overflow id): left out
            "uid": draw(st.sampled_from([0, 1, 1000, 65534, 65536, 2**32 - 2])),
            "gid": draw(st.integers(0, 2**32 - 2)),
            "mtime": draw(st.integers(-(2**31), 2**34)),
        }
        kind = draw(st.sampled_from(["file", "file", "dir", "symlink", "link", "fifo", "dev"]))
        xattrs = draw(st.dictionaries(st.sampled_from([b"trusted.a", b"security.b"]), XATTR_VALUES))
        if kind in ("file", "dir"):
            user = draw(st.dictionaries(st.sampled_from([b"user.x", b"user.y" * 20]), XATTR_VALUES))
            xattrs.update(user)
        mode = draw(st.integers(0, 0o7777))
        if kind == "file":
            tar.file(path, pattern(draw(SIZES), index), mode, xattrs=xattrs, **meta)
            files.append(path)
        elif kind == "dir":
            tar.dir(path, mode, xattrs=xattrs, **meta)
            directories.append(path)
        elif kind == "symlink":
            target = draw(st.text(NAME_CHARS | st.just("/"), min_size=1, max_size=300))
            tar.symlink(path, target, mode, xattrs=xattrs, **meta)
        elif kind == "link" and files:
            tar.hardlink(path, draw(st.sampled_from(files)))
        elif kind == "fifo":
            tar.fifo(path, mode, xattrs=xattrs, **meta)
        elif kind == "dev":
            major, minor = draw(st.integers(0, 4095)), draw(st.integers(1, (1 << 20) - 1))
            tar.device(path, draw(st.sampled_from(["chr", "blk"])), major, minor, mode, **meta)
    return tar


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=random_layers())
def test_random_trees_round_trip(layer: LayerTar) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as scratch:
        check_image(layer, Path(scratch))


@pytest.mark.skipif(FSCK is None, reason="fsck.erofs (erofs-utils) is not installed")
def test_fsck_accepts_a_last_inode_that_ends_on_a_block_boundary(tmp_path: Path) -> None:
    """fsck.erofs 1.5 reads an xattr header after every inode, even one without
    xattrs; an image whose last record ends exactly at its last byte used to fail.
    Growing a tree one FIFO (one 64-byte inode) at a time walks the end of the
    metadata across every slot of a block, that one included."""
    for count in range(1, 140):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for index in range(count):
                member = tarfile.TarInfo(f"f{index:03d}")
                member.type = tarfile.FIFOTYPE
                tar.addfile(member)
        image = tmp_path / f"{count}.erofs"
        build(buffer.getvalue(), image)
        fsck(image)
        image.unlink()
