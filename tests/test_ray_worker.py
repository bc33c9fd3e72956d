"""The guest worker in a real VM without Ray (slow tier): an image without Python is a
clear error when the worker starts, and the hello's version check refuses another
minor version."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from ray_backend import _codec, _wire
from ray_backend.errors import PythonMismatchError, WorkerProtocolError
from ray_backend.worker import GuestWorker, Reply
from vmruntime.vm import AsyncSandbox

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_an_image_without_python_is_a_python_mismatch(vm_session: Any) -> None:
    async with await AsyncSandbox.create(vm_session.image) as sandbox:
        worker = GuestWorker(sandbox, vm_session.image, on_output=lambda data: None)
        with pytest.raises(PythonMismatchError) as caught:
            await worker.start()
        assert caught.value.guest.startswith("none") and vm_session.image in str(caught.value)
        assert not worker.running


def hello(python: object) -> Reply:
    body, _ = _codec.encode({"protocol": 1, "python": python, "implementation": "cpython"})
    return Reply(_wire.Kind.HELLO, bytearray(body), [])


async def test_the_hello_must_carry_the_hosts_python_minor_version(vm_session: Any) -> None:
    async with await AsyncSandbox.create(vm_session.image) as sandbox:
        worker = GuestWorker(sandbox, "test/image:1", on_output=lambda data: None)
        major, minor = sys.version_info[:2]
        assert worker._check_hello(hello([major, minor, 99]))["python"][1] == minor
        with pytest.raises(PythonMismatchError, match=f"Python {major}.{minor + 1}.0"):
            worker._check_hello(hello([major, minor + 1, 0]))
        for bad in (None, [3], ["3", "11"], "3.11"):
            with pytest.raises(WorkerProtocolError):
                worker._check_hello(hello(bad))
        with pytest.raises(WorkerProtocolError, match="expected a hello"):
            worker._check_hello(Reply(_wire.Kind.RESULT, bytearray(b"N"), []))
