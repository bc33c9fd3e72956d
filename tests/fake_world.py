"""The fast tier's world for sandboxes on the fake VMM (tests/fake_vmm.py).

conftest.py loads it as a plugin, so its fixtures are everywhere; a test module
imports the rest: ``from fake_world import IMAGE, fake, left_behind``.
``world`` gives private cache, state and runtime directories with a small image
(``IMAGE``, with ``IMAGE_ENV``, working directory /tmp) loaded; at its end a virtio-fs
broker still running fails the test. ``fake()`` is a fake driver whose guest agent is
compiled once per session (the autouse ``agent_cache`` fixture only makes a folder).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_vmm import FakeDriver
from imagefactory import directory, file, make_layer_tar, write_oci_layout
from vm_support import broker_processes

from vmruntime import images
from vmruntime.vm import state

IMAGE = "test/fake:1"
IMAGE_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "GREETING=hello from the image"]  # fmt: skip

_agent_cache: list[Path] = []


def fake(*args: Any, **options: Any) -> FakeDriver:
    """A fake driver whose agent is compiled once per session."""
    return FakeDriver(*args, agent_cache=_agent_cache[0], **options)


@pytest.fixture(scope="session", autouse=True)
def agent_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    if not _agent_cache:
        _agent_cache.append(tmp_path_factory.mktemp("fake-vmm-agent"))


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Private cache, state and runtime dirs with a small image loaded."""
    monkeypatch.setenv("VMRUNTIME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VMRUNTIME_STATE", str(tmp_path / "state"))
    runtime = Path(f"/tmp/vmr-fake-{os.getpid()}-{time.monotonic_ns()}")
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    layer = make_layer_tar([directory("etc"), file("etc/marker", "x")])
    layout = write_oci_layout(tmp_path / "layout", [layer], config_overrides={
        "config": {"Env": IMAGE_ENV, "WorkingDir": "/tmp", "User": ""}})  # fmt: skip
    images.load(layout.layout_dir, IMAGE)
    yield tmp_path
    leftover = broker_processes(str(runtime))
    shutil.rmtree(runtime, ignore_errors=True)
    assert not leftover, "a broker outlived its test"


def left_behind(driver: FakeDriver) -> list[str]:
    """What a failed creation left: sandbox directories, runtime dirs, VMM processes."""
    found = [str(p) for p in (state.state_root() / "sandboxes").glob("*")]
    found += [str(p) for p in state.runtime_root().glob("*") if p.name != "disk-holders"]
    found += [f"pid {pid}" for pid in driver.started if state.process_start_time(pid)]
    return found
