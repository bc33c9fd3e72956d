"""One real local Ray for the session's Ray tests (``ray.init(num_cpus=2)``), started in
the default image's session environment so that its actors use the session's private
sandbox state and runtime directories; conftest.py loads it as a plugin.

Extra environment for Ray's workers (for example Ray's own gVisor sandboxes) goes in
``RAY_WORKER_ENV`` before the session starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

RAY_WORKER_ENV: dict[str, str] = {}


@pytest.fixture(scope="session")
def ray_session(default_image_session: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A local Ray with 2 CPUs; every actor it ran is gone (and so its VMs) at the end."""
    import ray

    if any("gvisor_peer" in item.fixturenames for item in request.session.items):
        # Ray's own gVisor sandboxes run in this session too (tests/ray_peer.py): their
        # workers need runsc on PATH and the registry mirror, and Ray starts only once.
        RAY_WORKER_ENV.update(request.getfixturevalue("gvisor_peer").env)
    # Ray's workers take the environment that Ray starts with: it is set for ray.init
    # only, since other session fixtures (vm_session) own this process's environment.
    with pytest.MonkeyPatch.context() as patch:
        # Ray's workers import the test modules whose functions the tests send (Ray pickles
        # them by reference, as it does a job's own modules on its PYTHONPATH).
        patch.setenv("PYTHONPATH", os.pathsep.join(
            filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])))  # fmt: skip
        patch.setenv("VMRUNTIME_CACHE", str(default_image_session.cache))
        patch.setenv("VMRUNTIME_STATE", str(default_image_session.state))
        patch.setenv("XDG_RUNTIME_DIR", str(default_image_session.runtime))
        for name, value in RAY_WORKER_ENV.items():
            patch.setenv(name, value)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield default_image_session
    finally:
        ray.shutdown()
    assert os.environ.get("RAY_ADDRESS") is None
