"""What a warm pool and a restored clone need from a real guest (slow tier, one VM for
the module): IDENTITY really changes the guest's hostname, machine-id and clock, and a
detached process outlives its connection and is adopted by the next one.

The agent's decoding and refusals are covered fast by tests/test_agent_detached.py.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import VmSession
from vm_support import sh

from vmruntime import AsyncSandbox, Sandbox
from vmruntime.errors import AdoptError
from vmruntime.vm.sync import Process, run

pytestmark = pytest.mark.slow

COUNTER = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done"


@dataclass
class Shared:
    box: Sandbox  # replaced when a test detaches and attaches again


@pytest.fixture(scope="module")
def shared(vm_session: VmSession) -> Iterator[Shared]:
    holder = Shared(Sandbox.create(vm_session.image, detached=True))
    try:
        yield holder
    finally:
        holder.box.stop()



def test_renew_identity_changes_hostname_machine_id_and_clock(shared: Shared) -> None:
    box = shared.box
    before = sh(box, "cat /etc/machine-id 2>/dev/null; true").strip()
    box.renew_identity(hostname="vmr-clone-7")
    assert sh(box, "hostname").strip() == "vmr-clone-7"
    assert box.fs.read("/etc/hostname") == b"vmr-clone-7\n"
    machine_id = box.fs.read("/etc/machine-id").decode()
    assert re.fullmatch(r"[0-9a-f]{32}\n", machine_id) and machine_id.strip() != before
    assert abs(int(sh(box, "date +%s")) - time.time()) < 3
    box.renew_identity()
    assert sh(box, "hostname").strip() == f"vmr-{box.id}"
    assert box.fs.read("/etc/machine-id").decode() != machine_id


def test_identity_sets_the_guest_clock(shared: Shared) -> None:
    box = shared.box
    client = box.asynchronous._agent()  # the clock alone: renew_identity always sets now
    hour_ahead = time.time_ns() + 3600 * 10**9
    run(client.set_identity(time_ns=hour_ahead))
    assert abs(int(sh(box, "date +%s")) - (time.time() + 3600)) < 3
    box.renew_identity()
    assert abs(int(sh(box, "date +%s")) - time.time()) < 3


def counts(process: Process, wanted: int) -> list[int]:
    """The next ``wanted`` numbers the counter prints."""
    text = b""
    while text.count(b"\n") < wanted:
        item = process.read()
        assert item is not None, "the counter ended"
        assert item[0] == "stdout", item
        text += item[1]
    return [int(line) for line in text.splitlines()]


def test_a_detached_process_survives_detach_and_is_adopted(shared: Shared) -> None:
    box = shared.box
    process = box.exec_stream(["sh", "-c", COUNTER], stdin=False, detached=True)
    pid = process.pid
    assert pid is not None
    seen = counts(process, 3)
    assert seen[:3] == [1, 2, 3]
    box.detach()
    time.sleep(1.5)  # it keeps counting with nobody connected
    shared.box = box = Sandbox(run(AsyncSandbox.attach(box.id)))
    adopted = box.adopt(pid)
    assert adopted.pid == pid and adopted.dropped == 0
    started = time.monotonic()
    parked = counts(adopted, 6)
    # Printed while nobody was connected (about 7 lines in 1.5 s), kept by the agent and
    # delivered at once: six live lines would take 1.2 s.
    assert time.monotonic() - started < 1.0
    after = parked + counts(adopted, 3)  # then live output, without a gap
    assert after[0] > seen[-1]
    assert after == list(range(after[0], after[0] + len(after)))
    with pytest.raises(AdoptError):
        box.adopt(pid)  # it is on this connection now
    adopted.signal(signal.SIGKILL, group=True)
    while adopted.read() is not None:
        pass
    assert adopted.wait().returncode == -signal.SIGKILL
