"""Manifests, indexes and configs from outside are validated before anything uses them."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmruntime.errors import InvalidReferenceError, ManifestError, PlatformNotFoundError
from vmruntime.images.manifest import (
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageIndex,
    ImageManifest,
    parse_config,
    parse_manifest_document,
    select_platform,
)
from vmruntime.images.reference import parse_reference

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def manifest(**overrides) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": D1,
            "size": 10,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D2, "size": 20}
        ],
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


def index(entries: list[dict]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


def entry(digest: str, os_: str, arch: str, variant: str | None = None) -> dict:
    platform = {"os": os_, "architecture": arch}
    if variant:
        platform["variant"] = variant
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": 5, "platform": platform}


def test_parses_an_image_manifest() -> None:
    parsed = parse_manifest_document(manifest(), "m")
    assert isinstance(parsed, ImageManifest)
    assert parsed.config.digest == D1 and parsed.layers[0].size == 20


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (manifest(schemaVersion=1), "schema 1"),
        (manifest(mediaType="application/x-evil"), "unsupported manifest media type"),
        (manifest(layers="nope"), "no layers list"),
        (
            manifest(
                layers=[
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": "sha256:../../etc/passwd",
                        "size": 1,
                    }
                ]
            ),
            "digest",
        ),
        (
            manifest(
                layers=[
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": D2,
                        "size": -1,
                    }
                ]
            ),
            "invalid size",
        ),
        (
            manifest(
                layers=[
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": D2,
                        "size": True,
                    }
                ]
            ),
            "invalid size",
        ),
        (manifest(layers=[{"mediaType": "text/html", "digest": D2, "size": 1}]), "media type"),
        (manifest(config={"mediaType": "application/json", "digest": D1, "size": 1}), "config"),
        (b" " * (9 * 1024 * 1024), "too large"),
        (manifest(annotations="ab"), "not an object"),
    ],
)
def test_hostile_manifests_are_refused(doc: bytes, fragment: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest_document(doc, "manifest X")
    assert fragment in str(caught.value)
    assert "manifest X" in str(caught.value)


def test_platform_selection() -> None:
    parsed = parse_manifest_document(
        index(
            [
                entry(D1, "linux", "arm64", "v8"),
                entry(D2, "linux", "amd64"),
                entry(D3, "unknown", "unknown"),
            ]
        ),
        "i",
    )
    assert isinstance(parsed, ImageIndex)
    assert select_platform(parsed, "linux/amd64", "i").digest == D2
    assert select_platform(parsed, "linux/arm64", "i").digest == D1
    assert select_platform(parsed, "linux/arm64/v8", "i").digest == D1
    with pytest.raises(PlatformNotFoundError) as caught:
        select_platform(parsed, "linux/riscv64", "i")
    assert caught.value.available == ["linux/amd64", "linux/arm64/v8", "unknown/unknown"]
    with pytest.raises(ManifestError, match="invalid platform"):
        select_platform(parsed, "amd64", "i")


def test_docker_manifest_list_is_an_index() -> None:
    doc = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_LIST,
            "manifests": [entry(D1, "linux", "amd64")],
        }
    ).encode()
    assert isinstance(parse_manifest_document(doc, "l"), ImageIndex)


def test_config_validation() -> None:
    good = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["A=1"], "Cmd": ["sh"], "Labels": {"k": "v"}},
        "rootfs": {"type": "layers", "diff_ids": [D1]},
    }
    config = parse_config(json.dumps(good).encode(), "c")
    assert config.diff_ids == (D1,) and config.env == ("A=1",) and config.labels == {"k": "v"}
    for broken, fragment in [
        ({**good, "rootfs": {}}, "diff_ids"),
        ({**good, "rootfs": {"diff_ids": ["md5:1"]}}, "malformed diff_id"),
        ({**good, "config": {"Cmd": "sh -c x"}}, "Cmd"),
        ({**good, "config": {"Labels": ["a"]}}, "not an object"),
    ]:
        with pytest.raises(ManifestError, match=fragment):
            parse_config(json.dumps(broken).encode(), "c")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_string_parses_or_is_named_invalid(text: str) -> None:
    try:
        ref = parse_reference(text)
    except InvalidReferenceError as exc:
        assert exc.reference == str(text)
        return
    assert parse_reference(str(ref)) == ref  # normalisation is idempotent


_MANIFEST_KEYS = st.sampled_from(
    [
        "schemaVersion",
        "mediaType",
        "config",
        "layers",
        "manifests",
        "digest",
        "size",
        "platform",
        "annotations",
        "rootfs",
        "diff_ids",
        "Env",
        "Cmd",
        "Labels",
    ]
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from([D1, OCI_MANIFEST, OCI_INDEX, "application/vnd.oci.image.layer.v1.tar"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(_MANIFEST_KEYS | st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_MANIFEST_KEYS, _JSON, max_size=6) | st.binary(max_size=200))
def test_malformed_documents_only_raise_manifest_errors(doc: dict | bytes) -> None:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with contextlib.suppress(ManifestError):
        parse_manifest_document(data, "fuzz")
    with contextlib.suppress(ManifestError):
        parse_config(data, "fuzz")
