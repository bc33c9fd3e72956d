"""Sandbox creation in steps, through a fake VMM driver (fast tier: no QEMU, no kernel).

The "VM" is the real guest agent on the host (tests/fake_vmm.py), so the success path
runs the real creation, agent client, exec, personalisation and teardown code; the
failure paths make each step fail and check that exactly nothing is left: no state or
runtime directory, no writable layer, no broker, no stand-in VMM process.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import socket
import time
from pathlib import Path

import pytest
from fake_vmm import FakeDriver, exits_during_boot, never_answers
from fake_world import IMAGE, IMAGE_ENV, fake, left_behind
from vm_support import broker_processes

from vmruntime.errors import (
    BootError,
    CommandFailedError,
    ImageNotFoundError,
    InvalidReferenceError,
    MountError,
    SandboxConfigError,
    SandboxError,
    VmmError,
)
from vmruntime.vm import (
    AsyncSandbox,
    CreationPlan,
    ExecDefaults,
    FreshLayer,
    Sandbox,
    SandboxConfig,
    state,
)
from vmruntime.vm.config import SandboxConfig as ConfigClass


def plan(driver: FakeDriver, **steps: object) -> CreationPlan:
    return CreationPlan(driver, **steps)  # type: ignore[arg-type]


# --- the request ----------------------------------------------------------------------


@pytest.mark.parametrize(("options", "error", "words"), [
    ({"cpus": 0}, SandboxConfigError, "cpus=0"),
    ({"cpus": True}, SandboxConfigError, "cpus=True"),
    ({"memory_mib": 32}, SandboxConfigError, "memory_mib=32"),
    ({"writable_size": 1000}, SandboxConfigError, "writable_size=1000"),
    ({"writable_size": (64 << 20) + 1}, SandboxConfigError, "whole number of MiB"),
    ({"detached": True, "ports": [8888]}, SandboxConfigError, "detached sandbox cannot forward"),
    ({"ports": [0]}, SandboxConfigError, "ports="),
    ({"ports": {80: 70000}}, SandboxConfigError, "ports="),
    ({"ports": [80, 80]}, SandboxConfigError, "listed twice"),
    ({"name": "../etc"}, SandboxConfigError, "name="),
    ({"env": {"A=B": "c"}}, SandboxConfigError, "env="),
    ({"env": {"A": 1}}, SandboxConfigError, "env['A']=1"),
    ({"boot_timeout": 0}, SandboxConfigError, "boot_timeout=0"),
    ({"mounts": ["/tmp:relative"]}, MountError, "not absolute"),
    ({"mounts": ["/tmp:/data", "/var:/data"]}, MountError, "already mounted"),
    ({"mounts": ["/tmp:/proc/x"]}, MountError, "under /proc"),
])  # fmt: skip
def test_a_bad_request_is_refused_before_anything_is_made(
    world: Path, options: dict[str, object], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        SandboxConfig(IMAGE, **options)  # type: ignore[arg-type]
    driver = fake()
    with pytest.raises(error):
        Sandbox.create(IMAGE, driver=driver, **options)  # type: ignore[arg-type]
    assert driver.specs == [] and left_behind(driver) == []


def test_a_bad_image_reference_is_refused_by_the_config() -> None:
    with pytest.raises(InvalidReferenceError):
        SandboxConfig("Not A/Reference")
    with pytest.raises(SandboxConfigError, match="image"):
        SandboxConfig("")


def test_the_config_is_frozen_and_round_trips_through_json(world: Path) -> None:
    config = SandboxConfig(IMAGE, cpus=2, env={"A": "1"}, ports=[8888], name="web",
                           mounts=[f"{world}:/data:ro"], keep=True)  # fmt: skip
    with pytest.raises(AttributeError):
        config.cpus = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.env["B"] = "2"  # type: ignore[index]
    assert dict(config.port_map) == {8888: 0}
    assert ConfigClass.from_json(config.to_json()) == config


# --- success, end to end through the real agent ------------------------------------------


def test_create_exec_personalise_and_stop(world: Path) -> None:
    driver = fake()
    with Sandbox.create(IMAGE, driver=driver, env={"WHO": "caller"}, name="box-1",
                        ports=[4321]) as box:  # fmt: skip
        result = box.exec(["sh", "-c", 'echo "$GREETING/$WHO"; pwd'], check=True)
        assert result.stdout == b"hello from the image/caller\n/tmp\n"
        assert box.name == "box-1" and set(box.ports) == {4321}
        record = state.find_record("box-1")
        assert record.config["env"] == {"WHO": "caller"} and record.vmm == "fake"
        assert record.exec_defaults["cwd"] == "/tmp"
        assert record.exec_defaults["env"]["GREETING"] == "hello from the image"
        assert record.ports == {"4321": box.ports[4321]}
        (spec,) = driver.specs
        assert [d.serial for d in spec.disks] == ["L0", "W"]
        assert spec.disks[0].readonly and not spec.disks[1].readonly
        writable = state.SandboxPaths(box.id).writable
        assert writable.stat().st_size == 4 << 30
    assert left_behind(driver) == []


def test_a_kept_sandbox_keeps_its_files_and_attach_keeps_the_image_defaults(world: Path) -> None:
    driver = fake()
    box = Sandbox.create(IMAGE, driver=driver, env={"WHO": "first"}, keep=True)
    box.detach()  # the "VM" runs on; a later process attaches
    again = Sandbox.attach(box.id, driver=driver)
    env = {"PATH": IMAGE_ENV[0][5:], "GREETING": "hello from the image", "WHO": "first"}
    assert again.exec_defaults == ExecDefaults(env, "/tmp", "", (), ("/bin/sh",))
    out = again.exec(["sh", "-c", 'echo "$GREETING/$WHO"; pwd']).stdout
    assert out == b"hello from the image/first\n/tmp\n"
    again.stop()
    record = state.find_record(box.id)
    assert record.stopped and record.status == "stopped"
    assert state.SandboxPaths(box.id).writable.exists()
    state.SandboxPaths(box.id).remove()
    assert left_behind(driver) == []


def test_check_raises_with_the_return_code_and_the_output(world: Path) -> None:
    argv = ["sh", "-c", "echo out; echo err >&2; exit 3"]
    box = Sandbox.create(IMAGE, driver=fake())
    with box, pytest.raises(CommandFailedError) as caught:
        box.exec(argv, check=True)
    error = caught.value
    assert (error.returncode, error.stdout, error.stderr) == (3, b"out\n", b"err\n")
    assert error.sandbox_id == box.id and error.argv == argv
    assert "exited 3: err" in str(error)


def test_the_sync_facade_has_the_async_signatures() -> None:
    pairs = [(Sandbox.create, AsyncSandbox.create), (Sandbox.exec, AsyncSandbox.exec),
             (Sandbox.exec_stream, AsyncSandbox.exec_stream), (Sandbox.attach, AsyncSandbox.attach),
             (Sandbox.personalize, AsyncSandbox.personalize)]  # fmt: skip
    for sync, asynchronous in pairs:
        ours = inspect.signature(sync).parameters
        theirs = inspect.signature(asynchronous).parameters
        assert [(p.name, p.kind, p.default) for p in ours.values()] == [
            (p.name, p.kind, p.default) for p in theirs.values()
        ], sync.__name__


# --- every step that fails undoes exactly what was made ---------------------------------


def test_an_unknown_image_makes_nothing(world: Path) -> None:
    driver = fake()
    with pytest.raises(ImageNotFoundError):
        Sandbox.create("test/absent:1", driver=driver)
    assert driver.specs == [] and left_behind(driver) == []


class FullDisk(FreshLayer):
    def make(self, dest: Path, config: SandboxConfig, cache_root: Path) -> None:
        dest.write_bytes(b"half a layer")
        raise OSError(errno.ENOSPC, "No space left on device", str(dest))


def test_a_full_disk_while_making_the_layer(world: Path) -> None:
    driver = fake()
    config = SandboxConfig(IMAGE)
    with pytest.raises(SandboxError, match=r"cannot prepare the sandbox.*No space left"):
        Sandbox.from_config(config, plan(driver, layer=FullDisk()))
    assert driver.specs == [] and left_behind(driver) == []


def test_a_boot_failure_ends_the_brokers_it_started(world: Path) -> None:
    share = world / "share"
    share.mkdir()
    driver = fake(boot_error=VmmError("cannot start QEMU: out of luck"))
    with pytest.raises(VmmError, match="out of luck"):
        Sandbox.create(IMAGE, driver=driver, mounts=[f"{share}:/data"])
    (spec,) = driver.specs
    assert len(spec.vhost_user_fs) == 1  # a broker was serving the share
    assert left_behind(driver) == [] and broker_processes(str(state.runtime_root())) == []


def test_a_vmm_that_exits_during_boot_is_a_boot_error_with_its_words(world: Path) -> None:
    driver = fake(exits_during_boot("qemu: cannot set up guest memory"))
    with pytest.raises(BootError, match="QEMU exited during boot: qemu: cannot set up guest"):
        Sandbox.create(IMAGE, driver=driver)
    assert left_behind(driver) == []


def test_a_guest_that_never_answers_times_out_and_is_killed(world: Path) -> None:
    driver = fake(never_answers)
    started = time.monotonic()
    with pytest.raises(BootError, match="no agent answer"):
        Sandbox.create(IMAGE, driver=driver, boot_timeout=1.0)
    assert time.monotonic() - started < 10
    assert len(driver.started) == 1 and left_behind(driver) == []


def test_a_port_already_taken_undoes_a_booted_sandbox(world: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    driver = fake()
    try:
        with pytest.raises(SandboxError, match=r"cannot prepare the sandbox.*in use"):
            Sandbox.create(IMAGE, driver=driver, ports={80: port})
    finally:
        taken.close()
    assert len(driver.started) == 1 and left_behind(driver) == []


def test_a_cancelled_creation_leaves_nothing(world: Path) -> None:
    driver = fake(never_answers)

    async def cancel_during_boot() -> None:
        task = asyncio.ensure_future(AsyncSandbox.create(IMAGE, driver=driver))
        while not driver.started:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_during_boot())
    assert left_behind(driver) == []


class SlowLayer(FreshLayer):
    def make(self, dest: Path, config: SandboxConfig, cache_root: Path) -> None:
        time.sleep(1.0)  # as a slow disk would
        super().make(dest, config, cache_root)


def test_creation_never_stalls_the_callers_event_loop(world: Path) -> None:
    """The Jupyter provisioner creates sandboxes on the Jupyter server's loop."""
    driver = fake()

    async def create_while_ticking() -> float:
        worst, last, done = 0.0, time.monotonic(), asyncio.Event()

        async def tick() -> None:
            nonlocal worst, last
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                worst, last = max(worst, now - last), now

        ticker = asyncio.ensure_future(tick())
        box = await AsyncSandbox.from_config(SandboxConfig(IMAGE), plan(driver, layer=SlowLayer()))
        await box.stop()
        done.set()
        await ticker
        return worst

    worst = asyncio.run(create_while_ticking())
    assert worst < 0.5, f"the loop stalled for {worst:.2f} s"
    assert left_behind(driver) == []
