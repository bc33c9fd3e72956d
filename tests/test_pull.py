"""Pulling from a real registry (Debian's docker-registry on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from helpers import cache_contents, unpack_workers, vmr_env
from imagefactory import (
    directory,
    file,
    make_layer_tar,
    opaque_whiteout,
    symlink,
    whiteout,
    write_oci_index_multiplatform,
    write_oci_layout,
)
from registry_support import LocalRegistry, TruncatingProxy, push_layout, tamper_blob

from vmruntime.errors import (
    AuthenticationError,
    DigestMismatchError,
    PlatformNotFoundError,
    RegistryError,
    SizeMismatchError,
)
from vmruntime.images import ImageStore, inspect
from vmruntime.images.reference import parse_reference
from vmruntime.images.registry import RegistryClient
from vmruntime.rootfs import ErofsLayers, load, pull, resolve


def no_unpacker_threads_left() -> bool:
    return not [t for t in threading.enumerate() if t.name == "unpack"]


def unique_layer(label: str, size: int = 20_000) -> bytes:
    """A layer no other test pushes, so registry-side blob counts and tampering are ours."""
    salt = uuid.uuid4().hex
    return make_layer_tar(
        [
            directory(f"{label}"),
            file(f"{label}/id", salt),
            file(f"{label}/data.bin", os.urandom(size)),
        ]
    )


def base_layers() -> list[bytes]:
    return [
        make_layer_tar(
            [
                directory("etc"),
                file("etc/os-release", "ID=test\n"),
                directory("bin"),
                file("bin/tool", b"#!/bin/sh\necho hi\n", mode=0o4755),
                symlink("bin/sh", "tool"),
                file("big.bin", os.urandom(300_000)),
                file("salt", uuid.uuid4().hex),
            ]
        ),
        unique_layer("second"),
    ]


def push(registry: LocalRegistry, tmp_path: Path, layers: list[bytes], **kw) -> tuple[str, object]:
    repo = f"test/{uuid.uuid4().hex[:12]}"
    layout = tmp_path / f"layout-{uuid.uuid4().hex[:6]}"
    info = write_oci_layout(layout, layers, **kw)
    push_layout(registry, layout, repo, "v1", src_tag="latest")
    return f"{registry.host}/{repo}:v1", info


def test_pull_multi_layer_image(local_registry, store, tmp_path, mount_erofs) -> None:
    ref, info = push(local_registry, tmp_path, base_layers())
    record = pull(ref, store=store)
    assert record.reference == ref
    assert record.manifest_digest == info.manifest_digest
    assert [layer.digest for layer in record.manifest.layers] == info.layer_digests
    assert list(record.config.diff_ids) == info.diff_ids
    assert set(record.report.fetched) == {info.config_digest, *info.layer_digests}
    for layer_digest in info.layer_digests:
        assert store.has_blob(layer_digest)
    for path in record.layer_paths:
        assert path.is_file() and path.stat().st_size > 0
    root = mount_erofs(record.layer_paths[0])
    assert (root / "etc/os-release").read_text() == "ID=test\n"
    assert os.readlink(root / "bin/sh") == "tool"
    assert (root / "bin/tool").stat().st_mode & 0o7777 == 0o4755
    assert resolve(ref, store).manifest_digest == info.manifest_digest
    assert inspect(ref, store)["layers"][1]["diffId"] == info.diff_ids[1]
    assert list(store.tmp_dir.iterdir()) == []


def test_shared_layers_are_downloaded_once(local_registry, store, tmp_path) -> None:
    base = base_layers()
    ref_a, info_a = push(local_registry, tmp_path, base)
    ref_b, info_b = push(local_registry, tmp_path, [*base, unique_layer("third")])
    pull(ref_a, store=store)
    inodes = {d: ErofsLayers(store).path(d).stat().st_ino for d in info_a.diff_ids}
    record_b = pull(ref_b, store=store)
    assert record_b.report.fetched == [info_b.config_digest, info_b.layer_digests[2]]
    assert set(record_b.report.reused) == set(info_a.layer_digests)
    for digest in info_a.layer_digests:
        assert local_registry.blob_get_count(digest) == 1
    assert local_registry.blob_get_count(info_b.layer_digests[2]) == 1
    # one file per layer, whatever the number of images using it
    assert {d: ErofsLayers(store).path(d).stat().st_ino for d in info_a.diff_ids} == inodes
    assert len(list(ErofsLayers(store).directory.iterdir())) == 3


def test_tampered_blob_is_refused_and_cache_unchanged(local_registry, store, tmp_path) -> None:
    layers = base_layers()
    ref, info = push(local_registry, tmp_path, layers)
    tamper_blob(local_registry, info.layer_digests[1])
    before = cache_contents(store)
    with pytest.raises(DigestMismatchError) as caught:
        pull(ref, store=store)
    assert caught.value.expected == info.layer_digests[1]
    assert caught.value.actual != info.layer_digests[1]
    assert info.layer_digests[1] in str(caught.value)
    after = cache_contents(store)
    assert not store.has_blob(info.layer_digests[1])
    assert not ErofsLayers(store).ready(info.diff_ids[1])
    assert store.get_ref(ref) is None
    assert all(name.startswith(("blobs", "rootfs")) for name in set(after) - set(before))
    assert not [n for n in after if n.startswith("tmp")]
    assert no_unpacker_threads_left()


def test_diff_id_mismatch_is_refused(local_registry, store, tmp_path) -> None:
    layers = [unique_layer("only")]
    wrong = "sha256:" + "1" * 64
    ref, info = push(
        local_registry,
        tmp_path,
        layers,
        config_overrides={"rootfs": {"type": "layers", "diff_ids": [wrong]}},
    )
    with pytest.raises(DigestMismatchError) as caught:
        pull(ref, store=store)
    assert caught.value.expected == wrong
    assert caught.value.actual == info.diff_ids[0]
    assert "diff_id" in str(caught.value)
    assert not store.has_blob(info.layer_digests[0])
    assert list(ErofsLayers(store).directory.iterdir()) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_truncated_transfer_is_retried(local_registry, store, tmp_path) -> None:
    ref, info = push(local_registry, tmp_path, [unique_layer("trunc", 200_000)])
    with TruncatingProxy(local_registry.host, fail_first_n=1) as proxy:
        proxied = ref.replace(local_registry.host, proxy.host)
        record = pull(proxied, store=store)
        assert proxy.failures_injected == 1
    assert record.manifest_digest == info.manifest_digest
    assert ErofsLayers(store).ready(info.diff_ids[0])
    assert list(store.tmp_dir.iterdir()) == []
    assert no_unpacker_threads_left()


def test_truncation_that_persists_fails_clearly_then_a_retry_succeeds(
    local_registry, store, tmp_path
) -> None:
    ref, info = push(local_registry, tmp_path, [unique_layer("trunc2", 200_000)])
    with TruncatingProxy(local_registry.host, fail_first_n=100) as proxy:
        proxied = ref.replace(local_registry.host, proxy.host)
        client = RegistryClient(parse_reference(proxied), retries=2, backoff=0.01)
        before = cache_contents(store)
        with pytest.raises((SizeMismatchError, RegistryError)) as caught:
            pull(proxied, store=store, client=client)
        assert info.layer_digests[0] in str(caught.value) or "blobs" in str(caught.value)
        assert not store.has_blob(info.layer_digests[0])
        assert {k for k in cache_contents(store) if k.startswith("tmp")} == set()
        assert store.get_ref(proxied) is None
        assert set(cache_contents(store)) - set(before) <= {
            f"blobs/sha256/{info.config_digest[7:]}"
        }
        proxy.rearm(0)
        record = pull(proxied, store=store)
    assert record.manifest_digest == info.manifest_digest


def test_transient_503_is_retried(local_registry, store, tmp_path) -> None:
    ref, info = push(local_registry, tmp_path, [unique_layer("flaky")])
    with TruncatingProxy(local_registry.host, fail_first_n=2, mode="503") as proxy:
        record = pull(ref.replace(local_registry.host, proxy.host), store=store)
        assert proxy.failures_injected == 2
    assert record.manifest_digest == info.manifest_digest


def test_pin_by_digest(local_registry, store, tmp_path) -> None:
    ref, info = push(local_registry, tmp_path, [unique_layer("pinned")])
    name = ref.rsplit(":", 1)[0]
    record = pull(f"{name}@{info.manifest_digest}", store=store)
    assert record.manifest_digest == info.manifest_digest
    assert record.reference == f"{name}@{info.manifest_digest}"
    with pytest.raises(RegistryError, match="404"):
        pull(f"{name}@sha256:{'0' * 64}", store=store)


def test_platform_selection_from_an_index(local_registry, store, tmp_path) -> None:
    repo = f"test/{uuid.uuid4().hex[:12]}"
    multi = write_oci_index_multiplatform(
        tmp_path / "multi",
        {"linux/amd64": [unique_layer("amd")], "linux/arm64/v8": [unique_layer("arm")]},
    )
    push_layout(local_registry, tmp_path / "multi", repo, "latest")
    ref = f"{local_registry.host}/{repo}:latest"
    amd = pull(ref, store=store)
    assert amd.manifest_digest == multi.images["linux/amd64"].manifest_digest
    assert store.get_ref(ref).index == multi.index_digest
    arm = pull(ref, store=store, platform="linux/arm64")
    assert arm.manifest_digest == multi.images["linux/arm64/v8"].manifest_digest
    with pytest.raises(PlatformNotFoundError) as caught:
        pull(ref, store=store, platform="linux/s390x")
    assert "linux/amd64" in caught.value.available


@pytest.mark.parametrize(
    ("compression", "docker"), [("none", False), ("zstd", False), ("gzip", True), ("none", True)]
)
def test_media_types_and_compressions(local_registry, store, tmp_path, compression, docker):
    ref, info = push(
        local_registry,
        tmp_path,
        [unique_layer("mt")],
        compression=compression,
        docker_media_types=docker,
    )
    record = pull(ref, store=store)
    assert record.manifest.media_type == info.manifest_media_type
    assert ErofsLayers(store).ready(info.diff_ids[0])


def test_whiteouts_and_opaque_dirs_through_overlayfs(
    local_registry, store, tmp_path, mount_erofs
) -> None:
    lower = make_layer_tar(
        [
            directory("etc"),
            file("etc/keep", "k"),
            file("etc/gone", "g"),
            directory("opt"),
            directory("opt/app"),
            file("opt/app/old", "o"),
            file("salt", uuid.uuid4().hex),
        ]
    )
    upper = make_layer_tar(
        [
            directory("etc"),
            whiteout("etc/gone"),
            directory("opt/app"),
            opaque_whiteout("opt/app"),
            file("opt/app/new", "n"),
        ]
    )
    ref, _ = push(local_registry, tmp_path, [lower, upper])
    record = pull(ref, store=store)
    lower_dir, upper_dir = (mount_erofs(p) for p in record.layer_paths)
    merged = tmp_path / "merged"
    merged.mkdir()
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={upper_dir}:{lower_dir}",
            str(merged),
        ],
        check=True,
    )
    try:
        assert sorted(os.listdir(merged / "etc")) == ["keep"]
        assert sorted(os.listdir(merged / "opt/app")) == ["new"]
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_basic_auth_from_a_credentials_file(basic_auth_registry, store, tmp_path, monkeypatch):
    ref, info = push(basic_auth_registry, tmp_path, [unique_layer("auth")])
    with pytest.raises(AuthenticationError, match="wants credentials"):
        pull(ref, store=store)
    user, password = basic_auth_registry.credentials
    auth_file = write_auth_file(tmp_path / "auth.json", basic_auth_registry.host, user, password)
    monkeypatch.setenv("VMRUNTIME_AUTH_FILE", str(auth_file))
    assert pull(ref, store=store).manifest_digest == info.manifest_digest
    auth_file.write_text(
        json.dumps({"auths": {basic_auth_registry.host: {"username": user, "password": "wrong"}}})
    )
    with pytest.raises(AuthenticationError, match="refused"):
        pull(ref, store=ImageStore(tmp_path / "other-cache"))


def test_anonymous_bearer_token_flow(token_auth_registry, store, tmp_path) -> None:
    ref, info = push(token_auth_registry, tmp_path, [unique_layer("token")])
    record = pull(ref, store=store)
    assert record.manifest_digest == info.manifest_digest
    assert token_auth_registry.token_server.requests, "no token was requested"


def test_unknown_repository_and_unreachable_registry(local_registry, store) -> None:
    with pytest.raises(RegistryError, match="404"):
        pull(f"{local_registry.host}/no/such:thing", store=store)
    client = RegistryClient(parse_reference("127.0.0.1:9/x:1"), retries=1, backoff=0.01)
    with pytest.raises(RegistryError, match="cannot connect"):
        pull("127.0.0.1:9/x:1", store=store, client=client)
    assert store.list_refs() == []


_PULL_SCRIPT = "import sys; from vmruntime.rootfs import pull; pull(sys.argv[1])"


def test_concurrent_pulls_download_each_blob_once(local_registry, store, tmp_path) -> None:
    layers = [unique_layer(f"c{i}", 2_000_000) for i in range(3)]
    ref, info = push(local_registry, tmp_path, layers)
    env = vmr_env(store)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PULL_SCRIPT, ref], env=env, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    for digest in [info.config_digest, *info.layer_digests]:
        assert local_registry.blob_get_count(digest) == 1, digest
    assert resolve(ref, store).manifest_digest == info.manifest_digest


def test_cli_pull_ls_inspect_rm_prune(local_registry, store, tmp_path) -> None:
    ref, info = push(local_registry, tmp_path, [unique_layer("cli")])
    env = vmr_env(store)

    def vmr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vmruntime", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    pulled = vmr("image", "pull", ref)
    assert pulled.returncode == 0, pulled.stderr
    assert info.manifest_digest in pulled.stdout
    assert pulled.stderr == ""  # no progress bars when not a terminal
    listing = json.loads(vmr("image", "ls", "--json").stdout)
    assert [row["reference"] for row in listing] == [ref]
    assert json.loads(vmr("image", "inspect", ref).stdout)["manifestDigest"] == info.manifest_digest
    assert vmr("image", "rm", ref).returncode == 0
    assert store.has_blob(info.layer_digests[0])
    pruned = vmr("image", "prune")
    assert pruned.returncode == 0 and "removed" in pruned.stdout
    assert list(store.blobs_dir.iterdir()) == []
    assert list(ErofsLayers(store).directory.iterdir()) == []
    bad = vmr("image", "pull", "Not/Valid")
    assert bad.returncode == 1
    assert "invalid image reference 'Not/Valid'" in bad.stderr
    missing = vmr("image", "inspect", "nothing/here:1")
    assert missing.returncode == 1 and "vmr image pull" in missing.stderr


def test_progress_bars_on_a_terminal(local_registry, store, tmp_path) -> None:
    import pty

    ref, info = push(local_registry, tmp_path, [unique_layer("tty", 500_000)])
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmruntime", "image", "pull", ref],
        env=vmr_env(store),
        stdin=terminal,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert proc.wait(timeout=60) == 0
    text = output.decode(errors="replace")
    assert info.layer_digests[0][7:19] in text  # one bar per layer, labelled by digest
    assert "100%" in text


_SLOW_PULL = """
import sys, time
from vmruntime.rootfs import pull
from vmruntime.images import ingest

real = ingest.ensure_layer

def slow(store, source, desc, diff_id, report, progress, layers):
    class Slow:
        def __init__(self, inner): self.inner = inner
        def advance(self, n):
            self.inner.advance(n)
            print("progress", flush=True)
            time.sleep(0.05)
        def reset(self): self.inner.reset()
        def done(self, status): self.inner.done(status)
    return real(store, source, desc, diff_id, report, lambda d, l: Slow(progress(d, l)), layers)

ingest.ensure_layer = slow
pull(sys.argv[1])
"""


def test_kill_minus_9_during_a_pull_then_pull_again(local_registry, store, tmp_path) -> None:
    ref, info = push(local_registry, tmp_path, [unique_layer("kill", 8_000_000)])
    victim = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PULL, ref],
        env=vmr_env(store),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(3):  # the transfer is under way, past the first chunks
            assert victim.stdout.readline().startswith("progress")  # type: ignore[union-attr]
    finally:
        victim.kill()
        victim.wait()
    assert not store.has_blob(info.layer_digests[0])
    assert not ErofsLayers(store).ready(info.diff_ids[0])
    assert store.get_ref(ref) is None
    leftovers = list(store.tmp_dir.iterdir())
    assert leftovers, "the killed pull should have left its temp files for the next open"
    # its unpack worker read end-of-file when the feeder died, and quit
    deadline = time.monotonic() + 10
    while unpack_workers(store.root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert unpack_workers(store.root) == []
    record = pull(ref, store=ImageStore(store.root))
    assert record.manifest_digest == info.manifest_digest
    assert list(store.tmp_dir.iterdir()) == []


def test_prune_waits_for_a_pull_in_progress(local_registry, store, tmp_path) -> None:
    from vmruntime.images import prune

    ref, info = push(local_registry, tmp_path, [unique_layer("prune")])
    finished = threading.Event()

    def run_prune() -> None:
        prune(store)
        finished.set()

    with store.writing():  # what a pull holds while it writes
        pruner = threading.Thread(target=run_prune)
        pruner.start()
        assert not finished.wait(0.5), "prune ran while a writer held the cache"
        pull(ref, store=store)  # a writer in the same process shares the lock
    pruner.join(timeout=10)
    assert finished.is_set()
    assert resolve(ref, store).manifest_digest == info.manifest_digest


def write_auth_file(path: Path, host: str, user: str, password: str) -> Path:
    import base64

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


def test_private_bearer_token_flow_with_credentials(tmp_path, store, monkeypatch) -> None:
    with LocalRegistry(base_dir=tmp_path / "private", auth="token") as registry:
        ref, info = push(registry, tmp_path, [unique_layer("private")])
        with pytest.raises(AuthenticationError, match="token request refused"):
            pull(ref, store=store)
        user, password = registry.credentials
        auth = write_auth_file(tmp_path / "auth.json", registry.host, user, password)
        monkeypatch.setenv("VMRUNTIME_AUTH_FILE", str(auth))
        assert pull(ref, store=store).manifest_digest == info.manifest_digest
        assert any(r.username == user for r in registry.token_server.requests)
    assert store.get_ref(ref) is not None


def test_plain_http_only_for_loopback() -> None:
    for name, scheme in [
        ("127.0.0.1:5000/a", "http"),
        ("localhost:5000/a", "http"),
        ("[::1]:5000/a", "http"),
        ("registry.example:5000/a", "https"),
        ("10.0.0.1:5000/a", "https"),
        ("python", "https"),
    ]:
        client = RegistryClient(parse_reference(name))
        assert client.base.startswith(f"{scheme}://"), (name, client.base)


def test_the_default_image_is_never_pulled(store, tmp_path) -> None:
    """Its short name would be docker.io/vmruntime/default: a name anyone can publish."""
    from vmruntime.errors import ImageNotPullableError

    for name in ("vmruntime/default:latest", "localhost/vmruntime/default:latest"):
        with pytest.raises(ImageNotPullableError, match="vmr image build-default"):
            pull(name, store=store)
    cli = subprocess.run([sys.executable, "-m", "vmruntime", "image", "pull", "vmruntime/default"],
                         env=vmr_env(store), capture_output=True, text=True)  # fmt: skip
    assert cli.returncode == 1 and "run `vmr image build-default`" in cli.stderr
    assert store.list_refs() == []
    # A local image loaded under the short name is found under both names.
    info = write_oci_layout(tmp_path / "layout", [make_layer_tar([file("etc/marker", "x")])])
    record = load(info.layout_dir, "vmruntime/default:latest", store=store)
    assert record.reference == "localhost/vmruntime/default:latest"
    assert resolve("vmruntime/default", store).manifest_digest == info.manifest_digest


def test_ctrl_c_during_a_pull_returns_at_once_and_the_next_pull_resumes(
    local_registry, store, tmp_path
) -> None:
    """One layer's server stalls mid-body (a read that would wait a minute); Ctrl-C must
    end `vmr image pull` within a second, keep only verified blobs, and leave nothing
    running; the next pull downloads only what is missing."""
    import hashlib
    import signal

    layers = [unique_layer("small-a"), unique_layer("big", 4_000_000), unique_layer("small-b")]
    ref, info = push(local_registry, tmp_path, layers)
    stalling = info.layer_digests[1]
    with TruncatingProxy(local_registry.host, mode="stall", path_contains=stalling) as proxy:
        pull_cli = subprocess.Popen(
            [sys.executable, "-m", "vmruntime", "image", "pull",
             ref.replace(local_registry.host, proxy.host)],
            env=vmr_env(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # A shell starts background jobs with SIGINT ignored, which children inherit.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        small = [info.layer_digests[0], info.layer_digests[2]]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            proxy.stalled.is_set() and all(store.has_blob(d) for d in small)
        ):
            time.sleep(0.02)
        assert proxy.stalled.is_set(), "the big layer's transfer never stalled"
        interrupted = time.monotonic()
        pull_cli.send_signal(signal.SIGINT)
        _, err = pull_cli.communicate(timeout=10)
        elapsed = time.monotonic() - interrupted
    assert pull_cli.returncode == 130, err.decode()
    assert elapsed < 1.0, f"Ctrl-C took {elapsed:.2f} s to end the pull"
    assert b"interrupted" in err
    for blob in store.blobs_dir.iterdir():  # only verified blobs stay
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert not store.has_blob(stalling) and store.list_refs() == []
    assert list(store.tmp_dir.iterdir()) == []
    assert unpack_workers(store.root) == []
    record = pull(ref, store=store)
    assert record.report is not None
    assert set(small) <= set(record.report.reused)
    assert stalling in record.report.fetched
    assert all(path.is_file() for path in record.layer_paths)


def test_a_cache_from_before_the_local_name_still_finds_its_default_image(store, tmp_path) -> None:
    """Caches filed the built default image under Docker Hub's name; a loaded entry there
    still counts (it was built here), a pulled one never does."""
    from vmruntime.errors import ImageNotFoundError
    from vmruntime.images.store import RefRecord

    info = write_oci_layout(tmp_path / "layout", [make_layer_tar([file("etc/marker", "x")])])
    load(info.layout_dir, "x/built:1", store=store)
    legacy, oci = "docker.io/vmruntime/default:latest", "application/vnd.oci.image.manifest.v1+json"
    store.set_ref(RefRecord(legacy, info.manifest_digest, oci, source="load /old/build"))
    assert resolve("vmruntime/default", store).manifest_digest == info.manifest_digest
    store.set_ref(RefRecord(legacy, info.manifest_digest, oci, source="pull"))
    with pytest.raises(ImageNotFoundError):
        resolve("vmruntime/default", store)
