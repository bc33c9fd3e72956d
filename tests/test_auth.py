"""Registry credentials from docker-style auth files; malformed files are named."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from vmruntime.errors import AuthenticationError
from vmruntime.images.auth import Credentials, find_credentials


def write(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_finds_credentials_by_host_and_docker_hub_alias(tmp_path: Path) -> None:
    encoded = base64.b64encode(b"alice:s3:cret").decode()
    auth = write(
        tmp_path / "a.json",
        {
            "auths": {
                "localhost:5000": {"auth": encoded},
                "https://index.docker.io/v1/": {"username": "bob", "password": "pw"},
            }
        },
    )
    assert find_credentials("localhost:5000", [auth]) == Credentials("alice", "s3:cret")
    assert find_credentials("docker.io", [auth]) == Credentials("bob", "pw")
    assert find_credentials("quay.io", [auth]) is None
    assert find_credentials("quay.io", [tmp_path / "missing.json"]) is None


def test_first_file_that_knows_the_host_wins(tmp_path: Path) -> None:
    first = write(tmp_path / "1.json", {"auths": {"other": {"username": "x", "password": "y"}}})
    second = write(tmp_path / "2.json", {"auths": {"h:1": {"username": "u", "password": "p"}}})
    assert find_credentials("h:1", [first, second]) == Credentials("u", "p")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "unreadable credentials file"),
        (json.dumps({"auths": {"h:1": {"auth": "!!!not-base64"}}}), "not base64"),
        (
            json.dumps({"auths": {"h:1": {"auth": base64.b64encode(b"nocolon").decode()}}}),
            "not user:password",
        ),
        (json.dumps({"auths": {"h:1": {}}}), "no credentials"),
        (json.dumps({"auths": {"h:1": "string"}}), "malformed entry"),
    ],
)
def test_malformed_files_are_named(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "auth.json"
    path.write_text(content)
    with pytest.raises(AuthenticationError, match=fragment) as caught:
        find_credentials("h:1", [path])
    assert str(path) in str(caught.value)
