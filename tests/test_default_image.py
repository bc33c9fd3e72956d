"""Tests of the OCI layout writer and the default image builder.

Nothing here is faked: layouts are checked with skopeo and by re-hashing blobs,
the default image is really built with mmdebstrap from the host's mirrors
(``slow``), and the cache protocol is exercised with a loader that stores the
layout and an ``is_current`` that reads the label back from what was stored.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import small_tmpfs

from vmruntime.errors import ImageBuildError
from vmruntime.images import default_image
from vmruntime.images.default_image import (
    DEFAULT_IMAGE,
    INPUTS_LABEL,
    DefaultImageRecipe,
    ensure_default_image,
    host_debian_mirrors,
    plan_default_image,
)
from vmruntime.images.oci_layout import (
    ANNOTATION_REF_NAME,
    MEDIA_TYPE_LAYER_TAR,
    MEDIA_TYPE_LAYER_TAR_GZIP,
    ImageConfigSpec,
    write_image_layout,
)

# --- helpers ---------------------------------------------------------------------


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def read_json_blob(layout: Path, digest: str) -> dict:
    return json.loads(blob(layout, digest).read_bytes())


def verify_layout(layout: Path) -> tuple[dict, dict]:
    """Check every digest and size the layout claims; return (manifest, config)."""
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    [entry] = index["manifests"]
    manifest_path = blob(layout, entry["digest"])
    assert sha256_file(manifest_path) == entry["digest"]
    assert manifest_path.stat().st_size == entry["size"]
    manifest = json.loads(manifest_path.read_bytes())
    descriptors = [manifest["config"], *manifest["layers"]]
    for desc in descriptors:
        path = blob(layout, desc["digest"])
        assert sha256_file(path) == desc["digest"], desc
        assert path.stat().st_size == desc["size"], desc
    config = read_json_blob(layout, manifest["config"]["digest"])
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])
    assert not list((layout / "blobs" / "sha256").glob(".tmp-*"))
    return manifest, config


def skopeo_inspect(layout: Path, *extra: str) -> dict:
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo is needed to validate OCI layouts (apt-get install skopeo)")
    out = subprocess.run(
        ["skopeo", "inspect", *extra, f"oci:{layout}"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "tiny", "1m") as mount_point:
        yield mount_point


# --- the OCI layout writer ------------------------------------------------------


def test_layout_from_tar_path_is_valid_and_links_the_tar(tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "layer.tar", {"hello.txt": b"hello\n", "bin/tool": b"\x7fELF"})
    result = write_image_layout(
        tmp_path / "layout",
        [tar],
        tag=DEFAULT_IMAGE,
        config=ImageConfigSpec(cmd=["python3"], labels={"a": "b"}),
        annotations={"org.example": "yes"},
    )

    manifest, config = verify_layout(result.path)
    digest = sha256_file(tar)
    assert result.layer_digests == (digest,)
    assert result.diff_ids == (digest,)  # uncompressed: the blob is the tar
    assert manifest["layers"][0]["mediaType"] == MEDIA_TYPE_LAYER_TAR
    assert manifest["annotations"] == {"org.example": "yes"}
    assert config["config"]["Cmd"] == ["python3"]
    assert config["config"]["WorkingDir"] == "/"
    assert "LANG=C.UTF-8" in config["config"]["Env"]
    assert config["history"][0]["created"] == config["created"]
    # Same filesystem: hard-linked, not copied.
    assert blob(result.path, digest).stat().st_ino == tar.stat().st_ino

    index = json.loads((result.path / "index.json").read_text())
    assert index["manifests"][0]["annotations"] == {ANNOTATION_REF_NAME: DEFAULT_IMAGE}
    assert index["manifests"][0]["digest"] == result.manifest_digest

    inspected = skopeo_inspect(result.path)
    assert inspected["Digest"] == result.manifest_digest
    assert inspected["Layers"] == [digest]
    assert inspected["Labels"] == {"a": "b"}
    assert inspected["Architecture"] == "amd64"
    assert inspected["Os"] == "linux"


def test_layout_from_stream_compressed(tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "layer.tar", {"data": os.urandom(3 << 20)})  # > one chunk
    with tar.open("rb") as stream:
        result = write_image_layout(
            tmp_path / "layout",
            [stream],
            tag="example/gz:1",
            config={"config": {"Cmd": ["sh"]}},
            compress=True,
        )

    manifest, config = verify_layout(result.path)
    [layer] = result.layers
    assert layer.media_type == MEDIA_TYPE_LAYER_TAR_GZIP
    assert manifest["layers"][0]["mediaType"] == MEDIA_TYPE_LAYER_TAR_GZIP
    assert layer.diff_id == sha256_file(tar) != layer.digest
    assert config["rootfs"]["diff_ids"] == [layer.diff_id]
    assert gzip.decompress(blob(result.path, layer.digest).read_bytes()) == tar.read_bytes()
    assert config["architecture"] == "amd64" and config["created"]
    assert skopeo_inspect(result.path)["Layers"] == [layer.digest]


def test_layout_is_reproducible_and_shares_blobs(tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "layer.tar", {"a": b"1"})
    spec = ImageConfigSpec(cmd=["true"], created=None)
    os.environ["SOURCE_DATE_EPOCH"] = "1700000000"
    try:
        first = write_image_layout(tmp_path / "one", [tar], tag="t:1", config=spec)
        second = write_image_layout(tmp_path / "two", [tar], tag="t:1", config=spec)
        # A second image in the same layout: both tags stay resolvable.
        third = write_image_layout(tmp_path / "one", [tar, tar], tag="t:2", config=spec)
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]
    assert first.manifest_digest == second.manifest_digest
    index = json.loads((tmp_path / "one" / "index.json").read_text())
    refs = {m["annotations"][ANNOTATION_REF_NAME]: m["digest"] for m in index["manifests"]}
    assert refs == {"t:1": first.manifest_digest, "t:2": third.manifest_digest}
    assert read_json_blob(tmp_path / "one", first.config_digest)["created"] == (
        "2023-11-14T22:13:20Z"
    )


def test_layout_rejects_config_with_rootfs(tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "layer.tar", {"a": b"1"})
    with pytest.raises(ValueError, match="rootfs"):
        write_image_layout(tmp_path / "l", [tar], tag="t", config={"rootfs": {}})


def test_layout_on_a_full_disk_names_the_path(tmp_path: Path, tiny: Path) -> None:
    # The tar is on another filesystem, so it is copied, and the copy hits ENOSPC.
    tar = make_tar(tmp_path / "layer.tar", {"big": os.urandom(4 << 20)})
    with pytest.raises(ImageBuildError) as caught:
        write_image_layout(tiny / "layout", [tar], tag="t", config=ImageConfigSpec())
    message = str(caught.value)
    assert "no space left on device" in message
    assert str(tiny / "layout" / "blobs" / "sha256") in message
    assert not list((tiny / "layout" / "blobs" / "sha256").iterdir())
    assert not (tiny / "layout" / "index.json").exists()


# --- mirrors and inputs ------------------------------------------------------------


def test_mirrors_from_apt_sources(tmp_path: Path) -> None:
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian trixie main contrib\n"
        "deb-src http://mirror.example/debian trixie main\n"
        "deb http://mirror.example/debian trixie-backports main\n"
    )
    (parts / "debian.sources").write_text(
        "Types: deb deb-src\n"
        "URIs: http://a.example/debian\n"
        "  http://b.example/debian\n"
        "Suites: trixie trixie-updates\n"
        "Components: main\n"
        "\n"
        "# security\n"
        "Types: deb\n"
        "URIs: http://a.example/debian-security\n"
        "Suites: trixie-security\n"
        "Components: main\n"
        "\n"
        "Enabled: no\n"
        "Types: deb\n"
        "URIs: http://disabled.example/debian\n"
        "Suites: trixie\n"
    )
    (parts / "vendor.list").write_text("deb https://vendor.example/apt cloud-sdk-trixie main\n")
    (parts / "node.sources.disabled").write_text("Types: deb\nURIs: http://x/\nSuites: sid\n")

    assert host_debian_mirrors("bookworm", apt_etc=tmp_path) == (
        "deb http://mirror.example/debian bookworm main",
        "deb http://a.example/debian bookworm main",
        "deb http://a.example/debian bookworm-updates main",
        "deb http://b.example/debian bookworm main",
        "deb http://b.example/debian bookworm-updates main",
        "deb http://a.example/debian-security bookworm-security main",
    )
    assert host_debian_mirrors("bookworm", apt_etc=tmp_path / "nothing") == ()


def test_plan_for_this_host_uses_its_mirrors() -> None:
    plan = plan_default_image()
    assert plan.mirrors, "this host's apt sources should give at least one Debian mirror"
    for line in plan.mirrors:
        kind, _uri, suite, component = line.split()
        assert (kind, component) == ("deb", "main")
        assert suite in ("bookworm", "bookworm-updates", "bookworm-security")
    argv = plan.mmdebstrap_argv(Path("/out.tar"))
    assert argv[-len(plan.mirrors) :] == list(plan.mirrors)
    assert argv[argv.index("--") + 1 : argv.index("--") + 3] == ["bookworm", "/out.tar"]
    assert plan.input_hash.startswith("sha256:") and len(plan.input_hash) == 71


def test_input_hash_follows_the_inputs() -> None:
    plan = plan_default_image()
    assert plan_default_image().input_hash == plan.input_hash
    more = DefaultImageRecipe(packages=(*default_image.PACKAGES, "python3-scipy"))
    assert plan_default_image(more).input_hash != plan.input_hash
    bumped = DefaultImageRecipe(recipe_version=default_image.BUILD_RECIPE_VERSION + 1)
    assert plan_default_image(bumped).input_hash != plan.input_hash
    other_mirror = dataclasses.replace(plan, mirrors=("deb http://x/ bookworm main",))
    assert other_mirror.input_hash != plan.input_hash


# --- ensure: cache short-circuit and failures -------------------------------------------


def test_ensure_returns_fast_when_current(tmp_path: Path) -> None:
    asked: list[str] = []

    def is_current(input_hash: str) -> bool:
        asked.append(input_hash)
        return True

    def load(path: Path, tag: str) -> None:
        raise AssertionError("nothing must be built or loaded when the image is current")

    started = time.monotonic()
    ref = ensure_default_image(
        load=load, is_current=is_current, workdir=tmp_path / "work", log=lambda _: None
    )
    assert time.monotonic() - started < 1.0
    assert ref == DEFAULT_IMAGE
    assert asked == [plan_default_image().input_hash]
    assert not (tmp_path / "work").exists()


def test_ensure_checks_free_space_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # More than any disk has: the real statvfs check must refuse before mmdebstrap runs.
    monkeypatch.setattr(default_image, "REQUIRED_FREE_BYTES", 1 << 60)
    lines: list[str] = []
    with pytest.raises(ImageBuildError, match="not enough space left on device") as caught:
        ensure_default_image(
            load=lambda p, t: None, is_current=lambda h: False, workdir=tmp_path, log=lines.append
        )
    assert str(tmp_path) in str(caught.value)
    assert "check free space" in str(caught.value)
    assert not any("mmdebstrap" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == [default_image.LOCK_NAME]


def test_ensure_removes_stale_build_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / (default_image.BUILD_DIR_PREFIX + "killed")
    (stale / "layout").mkdir(parents=True)
    monkeypatch.setattr(default_image, "REQUIRED_FREE_BYTES", 1 << 60)  # stop right after
    with pytest.raises(ImageBuildError):
        ensure_default_image(
            load=lambda p, t: None, is_current=lambda h: False, workdir=tmp_path, log=print
        )
    assert not stale.exists()


@pytest.mark.slow
def test_mmdebstrap_failure_names_step_and_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = DefaultImageRecipe(packages=("python3", "vmruntime-no-such-package"))
    monkeypatch.setattr(default_image, "DEFAULT_RECIPE", broken)
    with pytest.raises(ImageBuildError) as caught:
        ensure_default_image(
            load=lambda p, t: None, is_current=lambda h: False, workdir=tmp_path, log=print
        )
    message = str(caught.value)
    assert "step 'mmdebstrap' failed" in message
    assert "Unable to locate package vmruntime-no-such-package" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [default_image.LOCK_NAME]


@pytest.mark.slow
def test_full_disk_during_mmdebstrap_names_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with small_tmpfs(tmp_path / "small", "200m") as workdir:
        monkeypatch.setattr(default_image, "REQUIRED_FREE_BYTES", 0)  # let it run into the wall
        with pytest.raises(ImageBuildError) as caught:
            ensure_default_image(
                load=lambda p, t: None, is_current=lambda h: False, workdir=workdir, log=print
            )
        message = str(caught.value)
        assert "no space left on device" in message
        assert str(workdir) in message
        assert sorted(p.name for p in workdir.iterdir()) == [default_image.LOCK_NAME]


# --- the real default image ---------------------------------------------------------


REQUIRED_IN_LAYER = (
    "./usr/bin/python3",
    "./usr/lib/python3/dist-packages/ipykernel/kernelapp.py",
    "./usr/lib/python3/dist-packages/cloudpickle/__init__.py",
    "./usr/lib/python3/dist-packages/numpy/__init__.py",
    "./usr/lib/python3/dist-packages/pandas/__init__.py",
    "./usr/lib/python3/dist-packages/matplotlib/__init__.py",
)


@pytest.mark.slow
def test_build_real_default_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Build for real, validate the layout as handed to the cache, load it into a real
    (empty, private) image cache, then check that a second call costs no build."""
    import vmruntime.images as images
    import vmruntime.rootfs as rootfs

    monkeypatch.setenv("VMRUNTIME_CACHE", str(tmp_path / "cache"))
    loaded: list[tuple[Path, str]] = []

    def validating_load(layout: Path, tag: str) -> object:
        loaded.append((layout, tag))
        check_default_layout(layout)
        return rootfs.load(layout, tag)  # as the CLI loads it: layer images built too

    started = time.monotonic()
    ref = ensure_default_image(load=validating_load, log=print)
    print(f"first ensure_default_image: {time.monotonic() - started:.1f} s")
    assert ref == DEFAULT_IMAGE
    [(layout, tag)] = loaded
    assert tag == DEFAULT_IMAGE
    assert not layout.exists(), "the build directory must be removed after loading"
    workdir = tmp_path / "cache" / "build"
    assert sorted(p.name for p in workdir.iterdir()) == [default_image.LOCK_NAME]
    assert images.default_image_is_current(plan_default_image().input_hash)

    # Second run: the real cache says current, nothing is built or loaded.
    started = time.monotonic()
    assert ensure_default_image(load=validating_load, log=print) == DEFAULT_IMAGE
    elapsed = time.monotonic() - started
    print(f"second ensure_default_image: {elapsed:.3f} s")
    assert elapsed < 1.0
    assert len(loaded) == 1
    check_cached_rootfs(rootfs.resolve(DEFAULT_IMAGE).layer_paths, tmp_path / "mnt")


def check_cached_rootfs(layer_paths: tuple[Path, ...], scratch: Path) -> None:
    """The cache's EROFS image of the layer passes fsck and, stacked under a writable
    overlay as the guest stacks it, runs the image's own python3 with the kernel's modules."""
    [rootfs] = layer_paths
    subprocess.run(["fsck.erofs", str(rootfs)], check=True, capture_output=True)
    lower, upper, work, merged = (scratch / name for name in ("lower", "upper", "work", "merged"))
    for directory in (lower, upper, work, merged):
        directory.mkdir(parents=True)
    overlay = f"lowerdir={lower},upperdir={upper},workdir={work}"
    mounts = [
        ["-t", "erofs", "-o", "loop,ro", str(rootfs), str(lower)],
        ["-t", "overlay", "overlay", "-o", overlay, str(merged)],
        ["-t", "proc", "proc", str(merged / "proc")],
        ["-t", "tmpfs", "tmpfs", str(merged / "tmp")],
    ]
    mounted: list[str] = []
    try:
        for args in mounts:
            subprocess.run(["mount", *args], check=True)
            mounted.append(args[-1])
        assert (lower / "tmp").stat().st_mode & 0o7777 == 0o1777  # sticky, as in the tar
        assert (lower / "dev/null").stat().st_rdev == os.makedev(1, 3)
        code = (
            "import sys, ipykernel.kernelapp, cloudpickle, numpy, pandas, matplotlib; "
            "print(sys.version_info[:2])"
        )
        python = ["/usr/bin/python3", "-B", "-c", code]
        env = ["env", "-i", "PYDEVD_DISABLE_FILE_VALIDATION=1"]
        out = subprocess.run(["chroot", str(merged), *env, *python], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "(3, 11)"
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", target], check=False)


def check_default_layout(layout: Path) -> None:
    manifest, config = verify_layout(layout)
    plan = plan_default_image()
    assert config["config"]["Labels"][INPUTS_LABEL] == plan.input_hash
    assert manifest["annotations"][INPUTS_LABEL] == plan.input_hash
    assert config["config"]["Cmd"] == ["python3"]
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["annotations"][ANNOTATION_REF_NAME] == DEFAULT_IMAGE

    inspected = skopeo_inspect(layout)
    [layer_digest] = inspected["Layers"]
    assert inspected["Labels"][INPUTS_LABEL] == plan.input_hash
    assert config["rootfs"]["diff_ids"] == [layer_digest]  # stored uncompressed

    layer = blob(layout, layer_digest)
    print(f"layer: {layer_digest}, {layer.stat().st_size / 1e6:.0f} MB")
    check_layer_contents(layer)


def check_layer_contents(layer: Path) -> None:
    with tarfile.open(layer) as tar:
        members = {m.name: m for m in tar}
    for name in REQUIRED_IN_LAYER:
        assert name in members, name
    assert "./etc/resolv.conf" not in members  # not the build host's DNS setup
    assert "./etc/hostname" not in members
    leftovers = [
        name
        for name, m in members.items()
        if m.isfile()
        and name.startswith(("./var/lib/apt/lists/", "./var/cache/apt/", "./usr/share/doc/"))
        and not name.endswith("/lock")
    ]
    assert leftovers == []
    assert members["./dev"].isdir()
    # python3-munkres satisfies fonttools' "scipy | munkres": no scipy, no compiler.
    assert "./usr/lib/python3/dist-packages/scipy/__init__.py" not in members
    assert "./usr/bin/g++" not in members


def test_another_recipe_builds_another_image_without_moving_the_defaults_hash() -> None:
    # The small Python test image's recipe: its own reference, packages and options.
    from python_image import PYTHON_IMAGE, PYTHON_RECIPE

    default_inputs = plan_default_image().inputs()
    # Keys that did not exist when caches were filled stay out of the default's inputs.
    assert "reference" not in default_inputs and "mmdebstrap_options" not in default_inputs
    plan = plan_default_image(PYTHON_RECIPE)
    assert plan.inputs()["reference"] == PYTHON_IMAGE
    assert plan.input_hash != plan_default_image().input_hash
    argv = plan.mmdebstrap_argv(Path("/out.tar"))
    variant = argv.index("--variant=essential")
    assert argv[variant + 1] == "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr"
    assert "--include=python3" in argv
    hook = plan.recipe.customize_hooks()[-1]
    assert "import pickle, zipimport, struct, io, os, sys, traceback, " in hook
    assert "small Python test image smoke test passed" in hook
