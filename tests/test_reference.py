"""Image references are normalised the way docker does, and bad ones are named."""

import pytest

from vmruntime.errors import InvalidReferenceError
from vmruntime.images.reference import parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("python", "docker.io/library/python:latest"),
        ("python:3.12", "docker.io/library/python:3.12"),
        ("library/python:3.12", "docker.io/library/python:3.12"),
        ("docker.io/python", "docker.io/library/python:latest"),
        ("index.docker.io/library/python:3", "docker.io/library/python:3"),
        ("jupyter/base-notebook", "docker.io/jupyter/base-notebook:latest"),
        ("localhost:5000/a/b:tag", "localhost:5000/a/b:tag"),
        ("localhost/a", "localhost/a:latest"),
        ("quay.io/org/img:v1.2.3", "quay.io/org/img:v1.2.3"),
        ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest"),
        ("[::1]:5000/x:1", "[::1]:5000/x:1"),
        (f"name@{DIGEST}", f"docker.io/library/name@{DIGEST}"),
        (f"localhost:5000/name:tag@{DIGEST}", f"localhost:5000/name:tag@{DIGEST}"),
        ("a.b/c__d/e-f--g:T_1.x", "a.b/c__d/e-f--g:T_1.x"),
    ],
)
def test_normalises_like_docker(text: str, normalised: str) -> None:
    assert str(parse_reference(text)) == normalised


def test_parts() -> None:
    ref = parse_reference(f"localhost:5000/a/b@{DIGEST}")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "localhost:5000",
        "a/b",
        None,
        DIGEST,
    )
    assert ref.manifest_ref == DIGEST
    assert ref.is_loopback
    assert not parse_reference("quay.io/a").is_loopback
    assert parse_reference("python").api_host == "registry-1.docker.io"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("Python", "lowercase"),
        ("a b", "white space"),
        ("name@sha256:abc", "sha256:abc"),
        ("name@md5:" + "a" * 32, "md5"),
        ("a//b", "component"),
        ("-a", "'-a'"),
        ("a/", "component"),
        ("x:" + "t" * 129, "invalid tag"),
        ("x:-bad", "invalid tag"),
        ("localhost:99999/a", "port"),
        ("exa_mple.com/a", "registry host"),
        ("a" * 256, "255"),
        (":tag", "missing repository"),
    ],
)
def test_invalid_references_are_named(text: str, fragment: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        parse_reference(text)
    assert info.value.reference == text
    assert fragment in str(info.value)


def test_the_default_image_has_a_name_no_registry_serves() -> None:
    from vmruntime.images.reference import DEFAULT_IMAGE, canonical_reference, local_only_hint

    assert DEFAULT_IMAGE == "localhost/vmruntime/default:latest"
    for alias in ("vmruntime/default:latest", "vmruntime/default", "docker.io/vmruntime/default"):
        assert canonical_reference(alias) == DEFAULT_IMAGE
        assert local_only_hint(parse_reference(alias)) == "vmr image build-default"
    assert local_only_hint(parse_reference("vmruntime/other:latest")) is None
    assert canonical_reference("vmruntime/default:1") == "docker.io/vmruntime/default:1"
