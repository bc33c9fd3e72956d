"""A real memory snapshot moved by export and import resumes (slow tier: one boot of the
busybox test image, ``vm_session``, and one resume).

The archive and shared-store checks themselves are in test_memory_snapshot_transfer.py
(fast tier); this is the end-to-end proof that what import rebuilds is a machine QEMU
resumes: state that lived only in the guest's RAM (a file in the tmpfs ``/dev/shm``)
is there in a sandbox made from the imported copy, with the original's snapshot gone.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
from conftest import VmSession
from vm_support import sh

from vmruntime import Sandbox
from vmruntime.snapshots import SnapshotStore, export_snapshot, import_snapshot
from vmruntime.snapshots.remote import pull, push

pytestmark = pytest.mark.slow
MEMORY = 256



def test_an_imported_memory_snapshot_resumes(vm_session: VmSession, tmp_path: Path) -> None:
    store = SnapshotStore()
    with Sandbox.create(vm_session.image, memory_mib=MEMORY) as original:
        sh(original, "echo travelled-in-ram > /dev/shm/marker")
        snapshot = original.snapshot("transfer-source", memory=True)
    memory = snapshot.manifest.memory
    assert memory is not None

    started = time.monotonic()
    exported = export_snapshot(snapshot, tmp_path / "machine.vmrsnap")
    exported_in = time.monotonic() - started
    started = time.monotonic()
    imported = import_snapshot(exported.path, store, "transfer-imported")
    imported_in = time.monotonic() - started
    print(f"\nexport {exported_in:.2f} s, import {imported_in:.2f} s, archive "
          f"{exported.size / 2**20:.1f} MiB for {MEMORY} MiB of RAM")  # fmt: skip
    assert imported.manifest.memory == memory
    ram = imported.path / memory.ram.file
    assert os.stat(ram).st_mode & 0o777 == 0o600
    assert os.stat(ram).st_blocks * 512 < (MEMORY << 20) // 2  # rebuilt sparse
    # The same files through a shared store too (pull checks every digest).
    pushed = push(imported, f"file://{tmp_path / 'shared'}")
    pulled = pull(pushed.url, "transfer-pulled", store)
    assert pulled.manifest == dataclasses.replace(imported.manifest, name="transfer-pulled")
    store.remove("transfer-pulled")

    store.remove("transfer-source")  # the imported copy stands alone
    with Sandbox.create(from_snapshot="transfer-imported") as resumed:
        assert sh(resumed, "cat /dev/shm/marker") == "travelled-in-ram\n"
    store.remove("transfer-imported")
