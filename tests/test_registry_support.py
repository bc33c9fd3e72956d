"""Proof that the image-pull test support works against the real tools.

Fast tier (no VM): starts ``docker-registry`` three times (no auth, basic, token)
per module, pushes with ``skopeo`` and reads everything back with plain ``requests`` /
``http.client``, so a pull test failing later can blame the code under test, not the
fixtures. Module-scoped registries stand in for the session fixtures conftest.py will
define; every test pushes to its own repository, and tamper tests use layers no other test
has, because the registry shares blobs between repositories.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import re
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import zstandard

# pytest puts tests/ (no __init__.py) on sys.path, so the support modules import flat,
# as conftest.py will import them.
from imagefactory import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    FIXED_MTIME,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Compression,
    ImageInfo,
    blockdev,
    chardev,
    directory,
    fifo,
    file,
    hardlink,
    make_layer_tar,
    opaque_whiteout,
    sha256_digest,
    symlink,
    whiteout,
    write_docker_save,
    write_oci_archive,
    write_oci_index_multiplatform,
    write_oci_layout,
)
from registry_support import (
    MANIFEST_ACCEPT,
    LocalRegistry,
    TruncatingProxy,
    free_port,
    push_layout,
    tamper_blob,
)

# --------------------------------------------------------------------------------------------
# fixtures (module-scoped here; conftest.py gets session-scoped equivalents)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    reg = LocalRegistry(base_dir=tmp_path_factory.mktemp("registry"))
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    reg = LocalRegistry(auth="basic", base_dir=tmp_path_factory.mktemp("registry-basic"))
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    reg = LocalRegistry(auth="token", base_dir=tmp_path_factory.mktemp("registry-token"))
    try:
        yield reg
    finally:
        reg.stop()


def unique_layers(n: int = 2) -> list[bytes]:
    """Layers with content no other test has, so their blobs are this test's alone."""
    salt = uuid.uuid4().hex
    return [
        make_layer_tar([directory("etc"), file(f"etc/layer{i}", f"{salt}-{i}\n" * (200 + i))])
        for i in range(n)
    ]


def get_manifest(reg: LocalRegistry, repo: str, ref: str) -> requests.Response:
    resp = requests.get(
        f"{reg.url}/v2/{repo}/manifests/{ref}",
        headers={"Accept": MANIFEST_ACCEPT, **reg.auth_headers(repo)},
        timeout=10,
    )
    resp.raise_for_status()
    return resp


def get_blob(reg: LocalRegistry, repo: str, digest: str) -> requests.Response:
    resp = requests.get(
        f"{reg.url}/v2/{repo}/blobs/{digest}", headers=reg.auth_headers(repo), timeout=10
    )
    resp.raise_for_status()
    return resp


def decompress(data: bytes, media_type: str) -> bytes:
    if media_type.endswith("gzip"):
        return gzip.decompress(data)
    if media_type.endswith("zstd"):
        return zstandard.ZstdDecompressor().decompress(data)
    return data


def skopeo_inspect(ref: str, *extra: str) -> bytes:
    return subprocess.run(
        ["skopeo", "--insecure-policy", "inspect", *extra, ref],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout


# --------------------------------------------------------------------------------------------
# imagefactory on its own
# --------------------------------------------------------------------------------------------


def test_layer_tar_holds_exactly_the_entries_asked_for() -> None:
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\xff\xff"  # binary, not valid UTF-8
    layer = make_layer_tar(
        [
            directory("usr", uid=0, gid=0),
            file("usr/bin/tool", b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=100,
                 xattrs={"security.capability": cap, "user.note": "hi"}),
            symlink("bin", "usr/bin"),
            hardlink("usr/bin/tool2", "usr/bin/tool"),
            chardev("dev/null", 1, 3),
            blockdev("dev/sda", 8, 0),
            fifo("run/pipe"),
            whiteout("etc/passwd"),
            opaque_whiteout("var/cache/"),
            {"path": "../escape", "data": b"x"},
        ]
    )  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = tar.getmembers()
    by_name = {m.name: m for m in members}
    assert [m.name for m in members] == [
        "usr",
        "usr/bin/tool",
        "bin",
        "usr/bin/tool2",
        "dev/null",
        "dev/sda",
        "run/pipe",
        "etc/.wh.passwd",
        "var/cache/.wh..wh..opq",
        "../escape",
    ]
    tool = by_name["usr/bin/tool"]
    assert (tool.mode, tool.uid, tool.gid, tool.mtime) == (0o4755, 1000, 100, FIXED_MTIME)
    # tarfile decodes hdrcharset=BINARY values with surrogateescape; undo it to compare.
    raw_cap = tool.pax_headers["SCHILY.xattr.security.capability"]
    assert raw_cap.encode("utf-8", "surrogateescape") == cap
    assert tool.pax_headers["SCHILY.xattr.user.note"] == "hi"
    assert by_name["bin"].issym() and by_name["bin"].linkname == "usr/bin"
    assert by_name["usr/bin/tool2"].islnk() and by_name["usr/bin/tool2"].linkname == tool.name
    assert by_name["dev/null"].ischr() and (by_name["dev/null"].devmajor, 3) == (1, 3)
    assert by_name["dev/sda"].isblk() and by_name["dev/sda"].devminor == 0
    assert by_name["run/pipe"].isfifo()
    assert by_name["usr"].isdir()
    assert all(m.uname == "" and m.gname == "" for m in members)


def test_layouts_are_deterministic_and_well_formed(tmp_path: Path) -> None:
    layers = [make_layer_tar([file("a", "1")]), make_layer_tar([file("b", "2")])]
    one = write_oci_layout(tmp_path / "one", layers)
    two = write_oci_layout(tmp_path / "two", layers, tag="other")
    assert one.manifest_digest == two.manifest_digest
    assert one.layer_digests == two.layer_digests
    assert one.diff_ids == [sha256_digest(layer) for layer in layers]
    for digest in [one.manifest_digest, one.config_digest, *one.layer_digests]:
        assert sha256_digest(one.blob_path(digest).read_bytes()) == digest
    # gzip header bytes 4..7 are the mtime: zero, so the blob digest never drifts.
    assert one.blob_path(one.layer_digests[0]).read_bytes()[4:8] == b"\0\0\0\0"

    config = one.config_json
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert config["rootfs"] == {"type": "layers", "diff_ids": one.diff_ids}
    assert config["config"]["Cmd"] and config["config"]["Env"]
    root = tmp_path / "one"
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    (entry,) = json.loads((root / "index.json").read_text())["manifests"]
    assert entry["digest"] == one.manifest_digest
    assert entry["annotations"] == {REF_NAME_ANNOTATION: "latest"}
    assert one.manifest_json["layers"][0]["mediaType"] == OCI_LAYER_GZIP


def test_layout_holds_several_tags_and_overrides_merge(tmp_path: Path) -> None:
    layer = make_layer_tar([file("a", "1")])
    first = write_oci_layout(tmp_path, [layer], tag="a")
    second = write_oci_layout(
        tmp_path, [layer], tag="b", config_overrides={"config": {"Cmd": ["/x"]}, "history": None}
    )
    third = write_oci_layout(tmp_path, [layer], tag="a", platform="linux/arm64")
    index = json.loads((tmp_path / "index.json").read_text())
    tags = {m["annotations"][REF_NAME_ANNOTATION]: m["digest"] for m in index["manifests"]}
    assert tags == {"a": third.manifest_digest, "b": second.manifest_digest}
    assert first.manifest_digest != third.manifest_digest
    assert second.config_json["config"]["Cmd"] == ["/x"]
    assert second.config_json["config"]["Env"]  # kept: "config" merges one level deep
    assert "history" not in second.config_json
    assert third.config_json["architecture"] == "arm64"
    assert first.layer_digests == second.layer_digests  # blobs shared in one layout


def test_docker_save_tar_is_accepted_by_skopeo(tmp_path: Path) -> None:
    layers = [make_layer_tar([file("a", "1")]), make_layer_tar([file("b", "2")])]
    info = write_docker_save(tmp_path / "save.tar", layers, "example.test/app:v1")
    with tarfile.open(info.tar_path) as tar:
        names = tar.getnames()
    assert "manifest.json" in names and all(p in names for p in info.layer_paths)
    inspected = json.loads(skopeo_inspect(f"docker-archive:{info.tar_path}"))
    assert inspected["Layers"] == info.diff_ids  # docker-archive layers are uncompressed
    assert inspected["Architecture"] == "amd64" and inspected["Os"] == "linux"
    raw_config = skopeo_inspect(f"docker-archive:{info.tar_path}", "--config", "--raw")
    assert sha256_digest(raw_config) == info.config_digest


def test_oci_archive_is_accepted_by_skopeo(tmp_path: Path) -> None:
    info = write_oci_layout(tmp_path / "layout", [make_layer_tar([file("a", "1")])], tag="v2")
    tar_path = write_oci_archive(tmp_path / "layout", tmp_path / "image.tar")
    inspected = json.loads(skopeo_inspect(f"oci-archive:{tar_path}:v2"))
    assert inspected["Digest"] == info.manifest_digest
    assert inspected["Layers"] == info.layer_digests
    again = write_oci_archive(tmp_path / "layout", tmp_path / "again.tar")
    assert tar_path.read_bytes() == again.read_bytes()


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------


def test_registry_answers_v2(registry: LocalRegistry) -> None:
    assert re.fullmatch(r"127\.0\.0\.1:\d+", registry.host)
    resp = requests.get(f"{registry.url}/v2/", timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert registry.storage_dir.is_dir() and registry.log_path.is_file()


@pytest.mark.parametrize(
    ("compression", "docker", "manifest_type", "layer_type"),
    [
        ("gzip", False, OCI_MANIFEST, OCI_LAYER_GZIP),
        ("none", False, OCI_MANIFEST, OCI_LAYER_TAR),
        ("zstd", False, OCI_MANIFEST, OCI_LAYER_ZSTD),
        ("gzip", True, DOCKER_MANIFEST, DOCKER_LAYER_GZIP),
    ],
)
def test_pushed_layout_reads_back_byte_for_byte(
    registry: LocalRegistry,
    tmp_path: Path,
    compression: Compression,
    docker: bool,
    manifest_type: str,
    layer_type: str,
) -> None:
    layers = unique_layers()
    info: ImageInfo = write_oci_layout(
        tmp_path,
        layers,
        compression=compression,
        docker_media_types=docker,
    )
    repo = f"pushed/{compression}-{docker}".lower()
    assert push_layout(registry, tmp_path, repo, "latest") == info.manifest_digest

    resp = get_manifest(registry, repo, "latest")
    assert resp.headers["Content-Type"] == manifest_type
    assert resp.headers["Docker-Content-Digest"] == info.manifest_digest
    assert sha256_digest(resp.content) == info.manifest_digest
    manifest = resp.json()
    assert [layer["mediaType"] for layer in manifest["layers"]] == [layer_type] * 2
    if docker:
        assert manifest["config"]["mediaType"] == DOCKER_CONFIG

    config = get_blob(registry, repo, info.config_digest).content
    assert sha256_digest(config) == info.config_digest
    for digest, size, diff_id in zip(
        info.layer_digests, info.layer_sizes, info.diff_ids, strict=True
    ):
        blob = get_blob(registry, repo, digest)
        assert int(blob.headers["Content-Length"]) == size
        assert sha256_digest(blob.content) == digest
        assert sha256_digest(decompress(blob.content, layer_type)) == diff_id
        assert registry.blob_get_count(digest) == 1
        assert registry.blob_get_count(digest, repo="some/other") == 0


@pytest.mark.parametrize("docker", [False, True])
def test_multiplatform_index_push(registry: LocalRegistry, tmp_path: Path, docker: bool) -> None:
    amd, arm = unique_layers(2)
    info = write_oci_index_multiplatform(
        tmp_path, {"linux/amd64": [amd], "linux/arm64/v8": [arm]}, docker_media_types=docker
    )
    repo = f"multi/docker-{docker}".lower()
    assert push_layout(registry, tmp_path, repo, "latest") == info.index_digest

    resp = get_manifest(registry, repo, "latest")
    assert resp.headers["Content-Type"] == (DOCKER_MANIFEST_LIST if docker else OCI_INDEX)
    platforms = {
        (m["platform"]["os"], m["platform"]["architecture"], m["platform"].get("variant")): m
        for m in resp.json()["manifests"]
    }
    assert set(platforms) == {("linux", "amd64", None), ("linux", "arm64", "v8")}
    arm_image = info.images["linux/arm64/v8"]
    arm_desc = platforms[("linux", "arm64", "v8")]
    assert arm_desc["digest"] == arm_image.manifest_digest
    child = get_manifest(registry, repo, arm_desc["digest"])
    config = get_blob(registry, repo, child.json()["config"]["digest"]).json()
    assert (config["architecture"], config["variant"]) == ("arm64", "v8")


def test_tampered_blob_keeps_length_but_not_bytes(registry: LocalRegistry, tmp_path: Path) -> None:
    info = write_oci_layout(tmp_path, unique_layers(1))
    push_layout(registry, tmp_path, "tamper/me", "latest")
    digest, size = info.layer_digests[0], info.layer_sizes[0]
    original = get_blob(registry, "tamper/me", digest).content

    path = tamper_blob(registry, digest)
    assert path.stat().st_size == size
    served = get_blob(registry, "tamper/me", digest)
    assert int(served.headers["Content-Length"]) == size == len(served.content)
    assert served.content != original
    assert sha256_digest(served.content) != digest

    tamper_blob(registry, digest)  # XOR again: restored
    assert get_blob(registry, "tamper/me", digest).content == original


# --------------------------------------------------------------------------------------------
# the failure-injecting proxy
# --------------------------------------------------------------------------------------------


def _raw_get(host: str, path: str) -> tuple[int, int, bytes, bool]:
    """GET with http.client: (status, declared length, body received, complete?)."""
    conn = http.client.HTTPConnection(host, timeout=10)
    try:
        # Without an Accept header the registry 404s OCI manifests (no schema1 fallback).
        conn.request("GET", path, headers={"Accept": MANIFEST_ACCEPT})
        resp = conn.getresponse()
        declared = int(resp.getheader("Content-Length", "-1"))
        try:
            return resp.status, declared, resp.read(), True
        except http.client.IncompleteRead as exc:
            return resp.status, declared, exc.partial, False
    finally:
        conn.close()


def test_truncating_proxy_cuts_first_blob_get_then_passes(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    info = write_oci_layout(tmp_path, unique_layers(1))
    push_layout(registry, tmp_path, "proxy/trunc", "latest")
    digest, size = info.layer_digests[0], info.layer_sizes[0]
    with TruncatingProxy(registry.host, fail_first_n=1, truncate_at=100) as proxy:
        # Manifests are not blobs: forwarded untouched even while a failure is armed.
        status, _, body, complete = _raw_get(proxy.host, "/v2/proxy/trunc/manifests/latest")
        assert (status, complete) == (200, True)

        status, declared, body, complete = _raw_get(proxy.host, f"/v2/proxy/trunc/blobs/{digest}")
        assert (status, declared, complete, len(body)) == (200, size, False, 100)

        status, declared, body, complete = _raw_get(proxy.host, f"/v2/proxy/trunc/blobs/{digest}")
        assert (status, declared, complete) == (200, size, True)
        assert sha256_digest(body) == digest

        assert (proxy.blob_gets, proxy.failures_injected) == (2, 1)
        assert [r.action for r in proxy.records] == ["forwarded", "truncated", "forwarded"]
    assert registry.blob_get_count(digest) == 2  # both reached the registry

    # requests (what the pull code uses) notices the short body as an error too.
    with TruncatingProxy(registry.host) as proxy:
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.get(f"{proxy.url}/v2/proxy/trunc/blobs/{digest}", timeout=10)
        assert requests.get(f"{proxy.url}/v2/proxy/trunc/blobs/{digest}", timeout=10).ok


def test_proxy_503_mode_fails_then_forwards(registry: LocalRegistry) -> None:
    with TruncatingProxy(registry.host, fail_first_n=2, mode="503", retry_after=1) as proxy:
        for _ in range(2):
            resp = requests.get(f"{proxy.url}/v2/", timeout=5)
            assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
        assert requests.get(f"{proxy.url}/v2/", timeout=5).status_code == 200
        proxy.rearm(1)
        assert requests.get(f"{proxy.url}/v2/", timeout=5).status_code == 503
        assert proxy.failures_injected == 3


def test_proxy_reset_mode_drops_the_connection(registry: LocalRegistry) -> None:
    with TruncatingProxy(registry.host, mode="reset") as proxy:
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"{proxy.url}/v2/", timeout=5)
        assert requests.get(f"{proxy.url}/v2/", timeout=5).status_code == 200


# --------------------------------------------------------------------------------------------
# auth
# --------------------------------------------------------------------------------------------


def test_basic_auth_refuses_anonymous_and_accepts_credentials(
    basic_registry: LocalRegistry, tmp_path: Path
) -> None:
    reg = basic_registry
    anonymous = requests.get(f"{reg.url}/v2/", timeout=5)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")
    assert (
        requests.get(f"{reg.url}/v2/", auth=(reg.username, "wrong"), timeout=5).status_code == 401
    )
    assert requests.get(f"{reg.url}/v2/", auth=reg.credentials, timeout=5).status_code == 200

    info = write_oci_layout(tmp_path, unique_layers(1))
    assert push_layout(reg, tmp_path, "private/app", "latest") == info.manifest_digest
    url = f"{reg.url}/v2/private/app/manifests/latest"
    assert requests.get(url, headers={"Accept": MANIFEST_ACCEPT}, timeout=5).status_code == 401
    resp = requests.get(url, headers={"Accept": MANIFEST_ACCEPT}, auth=reg.credentials, timeout=5)
    assert resp.headers["Docker-Content-Digest"] == info.manifest_digest


def _parse_challenge(header: str) -> dict[str, str]:
    scheme, _, params = header.partition(" ")
    assert scheme == "Bearer"
    return dict(re.findall(r'(\w+)="([^"]*)"', params))


def test_token_auth_full_dance(token_registry: LocalRegistry, tmp_path: Path) -> None:
    reg = token_registry
    assert reg.token_server is not None
    info = write_oci_layout(tmp_path, unique_layers(1))
    assert push_layout(reg, tmp_path, "tok/app", "latest") == info.manifest_digest

    url = f"{reg.url}/v2/tok/app/manifests/latest"
    challenge = requests.get(url, headers={"Accept": MANIFEST_ACCEPT}, timeout=5)
    assert challenge.status_code == 401
    params = _parse_challenge(challenge.headers["WWW-Authenticate"])
    assert params == {
        "realm": reg.token_server.realm,
        "service": reg.token_server.service,
        "scope": "repository:tok/app:pull",
    }
    query = {"service": params["service"], "scope": params["scope"]}
    bad = requests.get(params["realm"], params=query, auth=(reg.username, "nope"), timeout=5)
    assert bad.status_code == 401
    assert requests.get(params["realm"], params=query, timeout=5).status_code == 401
    good = requests.get(params["realm"], params=query, auth=reg.credentials, timeout=5)
    token = good.json()["token"]
    assert good.json()["access_token"] == token

    bearer = {"Accept": MANIFEST_ACCEPT, "Authorization": f"Bearer {token}"}
    resp = requests.get(url, headers=bearer, timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Docker-Content-Digest"] == info.manifest_digest
    # The token is scoped to tok/app: another repository is refused with it.
    other = requests.get(f"{reg.url}/v2/tok/other/manifests/latest", headers=bearer, timeout=5)
    assert other.status_code == 401
    assert [r.status for r in reg.token_server.requests][-3:] == [401, 401, 200]


def test_token_registry_with_anonymous_pull(tmp_path: Path) -> None:
    with LocalRegistry(auth="token", allow_anonymous_pull=True, base_dir=tmp_path / "r") as reg:
        assert reg.token_server is not None
        info = write_oci_layout(tmp_path / "img", unique_layers(1))
        push_layout(reg, tmp_path / "img", "pub/app", "latest")
        scope = "repository:pub/app:pull,push"
        resp = requests.get(
            reg.token_server.realm,
            params={"service": reg.token_server.service, "scope": scope},
            timeout=5,
        )
        assert resp.status_code == 200
        assert reg.token_server.requests[-1].granted == [
            {"type": "repository", "name": "pub/app", "actions": ["pull"]}
        ]
        bearer = {"Accept": MANIFEST_ACCEPT, "Authorization": f"Bearer {resp.json()['token']}"}
        got = requests.get(f"{reg.url}/v2/pub/app/manifests/latest", headers=bearer, timeout=5)
        assert got.headers["Docker-Content-Digest"] == info.manifest_digest


def test_stop_is_idempotent_and_frees_the_port(tmp_path: Path) -> None:
    reg = LocalRegistry(base_dir=tmp_path)
    url = reg.url
    reg.stop()
    reg.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v2/", timeout=2)
    assert 0 < free_port() < 65536
