"""Named volumes, disk attach locks and `vmr volume` (fast tier, no VM)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import small_tmpfs

from vmruntime.cli import main
from vmruntime.errors import DiskInUseError, MountError, VolumeError, VolumeNotFoundError
from vmruntime.volumes import DiskAttachment, Volume, VolumeStore, parse_size

MiB = 1 << 20


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> VolumeStore:
    """A private state root (the default store's) and runtime directory."""
    monkeypatch.setenv("VMRUNTIME_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    return VolumeStore()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A user's own raw disk image (contents do not matter to the locks)."""
    path = tmp_path / "user disk.img"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    return path


class Child:
    """A python child process running ``code``; it prints "ready" and waits for EOF."""

    def __init__(self, code: str, pass_fds: tuple[int, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=pass_fds,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def finish(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    spawned: list[Child] = []
    yield spawned
    for child in spawned:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


def holding_child(path: Path, holder: str) -> str:
    return f"""
        import sys
        from pathlib import Path
        from vmruntime.volumes import DiskAttachment
        attachment = DiskAttachment.acquire(Path({str(path)!r}), readonly=False, holder={holder!r})
        print("ready", flush=True)
        sys.stdin.read()
    """


WAITING_CHILD = """
    import sys
    print("ready", flush=True)
    sys.stdin.read()
"""


# --- create, list, inspect, remove ------------------------------------------------------


def test_directory_volume_layout_and_record(store: VolumeStore, tmp_path: Path) -> None:
    volume = store.create("data")
    root = tmp_path / "state" / "volumes"
    assert store.root == root
    assert volume == Volume(
        name="data", kind="directory", path=root / "data" / "data", size=None,
        created=volume.created,
    )  # fmt: skip
    assert volume.path.is_dir() and not any(volume.path.iterdir())
    record = json.loads((root / "data" / "volume.json").read_text())
    assert record == {"version": 1, "name": "data", "kind": "directory", "created": volume.created}
    assert sorted(p.name for p in (root / "data").iterdir()) == [
        "attach.lock", "data", "holders", "volume.json",
    ]  # fmt: skip
    assert oct(root.stat().st_mode & 0o777) == "0o700"
    assert not volume.in_use()
    assert sorted(os.listdir(root)) == ["data"]  # no temporaries left


def test_list_get_remove(store: VolumeStore) -> None:
    assert store.list() == []
    store.create("b")
    store.create("a.1_x-y", disk_size=16 * MiB)
    assert [v.name for v in store.list()] == ["a.1_x-y", "b"]
    assert store.get("b").kind == "directory"
    disk = store.get("a.1_x-y")
    assert (disk.kind, disk.size, disk.path.name) == ("disk", 16 * MiB, "disk.img")
    store.remove("b")
    with pytest.raises(VolumeNotFoundError, match="'b'"):
        store.get("b")
    with pytest.raises(VolumeNotFoundError):
        store.remove("b")
    store.remove("a.1_x-y")
    assert store.list() == [] and os.listdir(store.root) == []


@pytest.mark.parametrize(
    "name", ["", "-x", ".x", "_x", "a/b", "..", "a b", "é", "x\n", "a" * 65, "a:b"]
)
def test_bad_names_are_refused(store: VolumeStore, name: str) -> None:
    for call in (lambda: store.create(name), lambda: store.get(name), lambda: store.remove(name)):
        with pytest.raises(VolumeError, match="invalid volume name") as info:
            call()
        assert info.value.name == name
    assert not store.root.exists() or os.listdir(store.root) == []


def test_longest_name_is_accepted(store: VolumeStore) -> None:
    assert store.create("a" * 64).name == "a" * 64


def test_duplicate_is_refused(store: VolumeStore) -> None:
    first = store.create("dup")
    (first.path / "keep").write_text("mine")
    for disk_size in (None, 16 * MiB):
        with pytest.raises(VolumeError, match="'dup': already exists"):
            store.create("dup", disk_size=disk_size)
    assert (store.get("dup").path / "keep").read_text() == "mine"


def test_concurrent_creates_of_one_name_make_one_volume(store: VolumeStore) -> None:
    outcomes: list[str] = []

    def create() -> None:
        try:
            store.create("race")
            outcomes.append("created")
        except VolumeError as exc:
            outcomes.append(exc.reason)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["already exists"] * 7 + ["created"]
    assert os.listdir(store.root) == ["race"]


def test_unknown_record_version_is_an_error_and_skipped_by_list(store: VolumeStore) -> None:
    store.create("old")
    store.create("ok")
    record = store.root / "old" / "volume.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "version": 2}))
    with pytest.raises(VolumeError, match="record version 2"):
        store.get("old")
    assert [v.name for v in store.list()] == ["ok"]


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", MiB), ("512M", 512 * MiB), ("1G", 1 << 30), ("1g", 1 << 30),
     ("1GiB", 1 << 30), ("64k", 64 << 10), ("2MB", 2 * MiB), ("1T", 1 << 40), ("7b", 7)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1M", "1X", "1 G B", "0x10"])
def test_parse_size_errors_name_the_text(text: str) -> None:
    with pytest.raises(ValueError, match=f"invalid size {text!r}"):
        parse_size(text)


@pytest.mark.parametrize("size", [0, 15 * MiB, 16 * MiB + 1, -MiB])
def test_disk_size_must_be_whole_mib_of_at_least_16(store: VolumeStore, size: int) -> None:
    with pytest.raises(VolumeError, match="whole number of MiB, at least 16 MiB"):
        store.create("d", disk_size=size)
    assert not (store.root / "d").exists()


# --- disk volumes -------------------------------------------------------------------------


def test_disk_volume_is_a_sparse_ext4_with_a_journal(store: VolumeStore) -> None:
    volume = store.create("db", disk_size=parse_size("1G"))
    info = volume.path.stat()
    assert info.st_size == 1 << 30
    # Sparse: a few hundred KiB for 1 GiB, journal included (it is not zeroed).
    assert info.st_blocks * 512 < 2 * MiB, info.st_blocks * 512
    assert volume.disk_usage() == info.st_blocks * 512
    header = subprocess.run(
        ["dumpe2fs", "-h", str(volume.path)], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    assert "has_journal" in fields["Filesystem features"]
    assert "extent" in fields["Filesystem features"]
    assert int(fields["Block count"]) * int(fields["Block size"]) == 1 << 30
    assert int(fields["Reserved block count"]) == 0
    fsck = subprocess.run(["e2fsck", "-fn", str(volume.path)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    root_dir = subprocess.run(
        ["debugfs", "-R", "stat /", str(volume.path)], capture_output=True, text=True, check=True
    ).stdout
    assert "User:     0   Group:     0" in root_dir
    assert json.loads((volume.directory / "volume.json").read_text()) == {
        "version": 1, "name": "db", "kind": "disk", "created": volume.created,
        "size": 1 << 30, "format": "ext4",
    }  # fmt: skip


def test_full_disk_during_create_leaves_nothing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "256k") as mount:
        store = VolumeStore(mount / "volumes")
        with pytest.raises(VolumeError, match=r"'big'.*(mkfs.ext4 failed|No space left)"):
            store.create("big", disk_size=256 * MiB)
        assert os.listdir(store.root) == []
        # Fill what is left, then even a directory volume cannot be made.
        with open(mount / "filler", "wb") as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        with pytest.raises(VolumeError, match=r"'dir'.*No space left"):
            store.create("dir")
        assert os.listdir(store.root) == []


def test_missing_mkfs_leaves_nothing(store: VolumeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create("first")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(VolumeError, match=r"mkfs.ext4 not found.*e2fsprogs"):
        store.create("d", disk_size=16 * MiB)
    assert os.listdir(store.root) == ["first"]


def test_stale_temporaries_are_pruned(store: VolumeStore) -> None:
    store.create("x")
    removed = store.root / ".rm-old-1234"
    (removed / "data").mkdir(parents=True)
    crashed = store.root / ".create-y-1234"
    crashed.mkdir()
    (crashed / "attach.lock").touch()
    busy = store.root / ".create-z-1234"
    busy.mkdir()
    (busy / "attach.lock").touch()
    with open(busy / "attach.lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # its creator is still at work
        store.create("w")
        assert sorted(os.listdir(store.root)) == [".create-z-1234", "w", "x"]


# --- attach locks -------------------------------------------------------------------------


def test_second_writer_is_refused_reader_allowed(image: Path, store: VolumeStore) -> None:
    with DiskAttachment.acquire(image, readonly=False, holder="sandbox aaa") as first:
        assert len(first.fds) == 1
        with pytest.raises(DiskInUseError) as info:
            DiskAttachment.acquire(image, readonly=False, holder="sandbox bbb")
        assert info.value.path == image and info.value.holder == "sandbox aaa"
        assert f"disk {image} is attached writable elsewhere (held by sandbox aaa)" in str(
            info.value
        )
        # Through another path to the same file too.
        link = image.with_name("link.img")
        link.symlink_to(image)
        with pytest.raises(DiskInUseError):
            DiskAttachment.acquire(link, readonly=False, holder="sandbox bbb")
        reader = DiskAttachment.acquire(image, readonly=True, holder="sandbox ccc")
        assert reader.fds == ()
        reader.release()
    assert first.released
    first.release()  # idempotent
    with DiskAttachment.acquire(image, readonly=False, holder="sandbox ddd"):
        pass


def test_a_writer_in_another_process_is_named(
    image: Path, store: VolumeStore, children: list[Child]
) -> None:
    child = Child(holding_child(image, "sandbox child1"))
    children.append(child)
    with pytest.raises(DiskInUseError, match="held by sandbox child1"):
        DiskAttachment.acquire(image, readonly=False, holder="sandbox parent")
    DiskAttachment.acquire(image, readonly=True, holder="sandbox parent").release()
    child.finish()
    DiskAttachment.acquire(image, readonly=False, holder="sandbox parent").release()
    # The last holder's note went with its lock: nothing is left in the runtime dir.
    notes = Path(os.environ["XDG_RUNTIME_DIR"]) / "vmruntime" / "disk-holders"
    assert list(notes.iterdir()) == []


def test_an_inherited_lock_lives_as_long_as_the_child(
    image: Path, store: VolumeStore, children: list[Child]
) -> None:
    attachment = DiskAttachment.acquire(image, readonly=False, holder="sandbox vm1")
    child = Child(WAITING_CHILD, pass_fds=attachment.fds)  # as QEMU would get them
    children.append(child)
    attachment.release()
    with pytest.raises(DiskInUseError, match="held by sandbox vm1"):
        DiskAttachment.acquire(image, readonly=False, holder="sandbox vm2")
    child.finish()
    DiskAttachment.acquire(image, readonly=False, holder="sandbox vm2").release()


def test_volume_in_use_follows_an_inherited_lock(store: VolumeStore, children: list[Child]) -> None:
    volume = store.create("shared")
    attachment = volume.attach(readonly=False, holder="sandbox broker1")
    assert attachment.path == volume.path
    child = Child(WAITING_CHILD, pass_fds=attachment.fds)  # as the broker would get them
    children.append(child)
    attachment.release()
    assert volume.in_use() and volume.holders() == ["sandbox broker1"]
    with pytest.raises(VolumeError, match="'shared': in use by sandbox broker1; stop it first"):
        store.remove("shared")
    child.finish()
    assert not volume.in_use() and volume.holders() == []
    assert list((volume.directory / "holders").iterdir()) == []
    store.remove("shared")


def test_directory_volume_is_shared_by_many_writers(store: VolumeStore) -> None:
    volume = store.create("shared")
    with (
        volume.attach(readonly=False, holder="sandbox a"),
        volume.attach(readonly=False, holder="sandbox b"),
        volume.attach(readonly=True, holder="sandbox c"),
    ):
        assert sorted(volume.holders()) == ["sandbox a", "sandbox b", "sandbox c"]
        with pytest.raises(VolumeError, match=r"in use by .*sandbox c; stop them first"):
            store.remove("shared")
    assert not volume.in_use()
    assert list((volume.directory / "holders").iterdir()) == []


def test_disk_volume_has_one_writer(store: VolumeStore, children: list[Child]) -> None:
    volume = store.create("db", disk_size=16 * MiB)
    writer = volume.attach(readonly=False, holder="sandbox w1")
    assert writer.path == volume.path and len(writer.fds) == 3
    with pytest.raises(DiskInUseError, match="held by sandbox w1") as info:
        volume.attach(readonly=False, holder="sandbox w2")
    assert info.value.path == volume.path
    # The refused attach did not leave an "in use" mark behind.
    assert volume.holders() == ["sandbox w1"]
    # The image attached by its path (--disk PATH) obeys the same lock.
    with pytest.raises(DiskInUseError):
        DiskAttachment.acquire(volume.path, readonly=False, holder="sandbox w3")
    reader = volume.attach(readonly=True, holder="sandbox r1")
    writer.release()
    with pytest.raises(VolumeError, match="in use by sandbox r1"):
        store.remove("db")
    reader.release()
    # A writer that attached the image by path keeps the volume from removal.
    child = Child(holding_child(volume.path, "sandbox bypath"))
    children.append(child)
    with pytest.raises(VolumeError, match="is attached writable"):
        store.remove("db")
    child.finish()
    store.remove("db")


def test_attaching_a_removed_volume_fails(store: VolumeStore) -> None:
    volume = store.create("gone")
    store.remove("gone")
    with pytest.raises(VolumeNotFoundError):
        volume.attach(readonly=False, holder="sandbox x")


def test_not_a_disk_image(tmp_path: Path, store: VolumeStore) -> None:
    with pytest.raises(MountError, match="regular file or a block device"):
        DiskAttachment.acquire(tmp_path, readonly=False, holder="x")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(MountError, match="regular file or a block device"):
        DiskAttachment.acquire(tmp_path / "fifo", readonly=True, holder="x")
    with pytest.raises(MountError, match="No such file"):
        DiskAttachment.acquire(tmp_path / "missing.img", readonly=True, holder="x")


# --- the CLI -----------------------------------------------------------------------------


def test_cli_create_ls_inspect_rm(store: VolumeStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["volume", "create", "web"]) == 0
    assert main(["volume", "create", "db", "--disk", "64M"]) == 0
    assert capsys.readouterr().out == "web\ndb\n"

    assert main(["volume", "ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SIZE", "IN", "USE", "CREATED"]
    assert lines[1].split()[:5] == ["db", "disk", "64", "MiB", "no"]
    assert lines[2].split()[:4] == ["web", "directory", "-", "no"]

    with store.get("web").attach(readonly=False, holder="sandbox s1"):
        assert main(["volume", "ls", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [(r["name"], r["kind"], r["size"], r["in_use"]) for r in rows] == [
            ("db", "disk", 64 * MiB, False), ("web", "directory", None, True),
        ]  # fmt: skip
        assert main(["volume", "inspect", "web"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["holders"] == ["sandbox s1"]
        assert doc["path"] == str(store.root / "web" / "data")

        assert main(["volume", "rm", "web", "db"]) == 1
        captured = capsys.readouterr()
        assert captured.out == "db\n"
        assert captured.err == "vmr: error: volume 'web': in use by sandbox s1; stop it first\n"

    assert main(["volume", "inspect", "db"]) == 1
    assert "volume 'db': no such volume" in capsys.readouterr().err
    assert main(["volume", "rm", "nope"]) == 1
    assert "volume 'nope': no such volume" in capsys.readouterr().err
    assert main(["volume", "rm", "-f", "nope", "web"]) == 0
    assert capsys.readouterr().out == "web\n"
    assert os.listdir(store.root) == []


def test_cli_errors(store: VolumeStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["volume", "create", "../x"]) == 1
    assert "volume '../x': invalid volume name" in capsys.readouterr().err
    assert main(["volume", "create", "v"]) == 0
    assert main(["volume", "create", "v"]) == 1
    assert capsys.readouterr().err == "vmr: error: volume 'v': already exists\n"
    assert main(["volume", "create", "d", "--disk", "8M"]) == 1
    assert "at least 16 MiB" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["volume", "create", "d", "--disk", "lots"])
    assert exit_info.value.code == 2
    assert "invalid size 'lots'" in capsys.readouterr().err
    assert main(["volume"]) == 2
    assert [v.name for v in store.list()] == ["v"]


def test_nothing_else_is_left_in_the_state_root(store: VolumeStore, tmp_path: Path) -> None:
    store.create("a")
    store.create("b", disk_size=16 * MiB)
    for name in ("a", "b"):
        store.get(name).attach(readonly=False, holder="s").release()
        store.remove(name)
    assert [p.name for p in (tmp_path / "state").rglob("*")] == ["volumes"]
    shutil.rmtree(tmp_path / "state")
