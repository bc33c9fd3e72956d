"""Conformance with Ray's own sandboxes: one test body, run against
``ray.experimental.sandbox`` (gVisor, the reference) and against ``ray_backend.create``
(our microVMs), must see the same results.

A job moves from gVisor to microVMs by changing one import; everything a job can
observe through that API is checked here: exec of a list and of a shell string, exit
codes, the environment, the working directory, timeouts, file round trips, status, and
what the handle does once its sandbox is terminated. Where Ray's behaviour is an
accident of its implementation rather than a contract (the exit code runsc reports for
a program that does not exist, how long its timeout takes to fire), the check asks for
what a caller can rely on, not for the accident.

Both backends share one Ray session (``ray.init(num_cpus=2)``) and each makes a single
sandbox. Every check runs even when an earlier one failed, and the failure lists every
difference at once, so one run says all there is to match.
"""

from __future__ import annotations

import hashlib
import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.experimental.sandbox import (
    ExecResult,
    SandboxError,
    SandboxNotFoundError,
    SandboxStatus,
    SandboxTimeoutError,
)
from ray_peer import PEER_IMAGE, GVisorPeer, GVisorPeerError, end_runsc, runsc_processes

pytestmark = pytest.mark.slow

BACKENDS = ("gvisor", "microvm")
WORKDIR = "/work"
CREATE_ENV = {"CONF_FROM_CREATE": "create"}
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # its config's
TIMEOUT_COMMAND_SECONDS = 3  # the command a timeout of 1 s must cut short


@pytest.fixture(scope="module")
def conformance_ray(ray_session: object, gvisor_peer: GVisorPeer) -> Iterator[None]:
    """The session's one Ray, started with the gVisor peer's PATH and registry mirror (as
    it is when a test asks for ``gvisor_peer``) and the cache and state our sandboxes use.
    At the end no runsc process of the module's sandboxes may be left."""
    yield
    try:
        end_runsc(runsc_processes(os.getpid()))
    except GVisorPeerError as exc:
        pytest.fail(str(exc), pytrace=False)


def create_sandbox(backend: str, **options: Any) -> Any:
    """A sandbox actor handle from ``backend``'s ``create``, with the same keywords."""
    if backend == "gvisor":
        from ray.experimental import sandbox

        return sandbox.create(image=PEER_IMAGE, **options)
    import ray_backend

    return ray_backend.create(PEER_IMAGE, **options)


class Checks:
    """Runs every check and remembers each failure, so one run lists all differences."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.failures: list[str] = []

    def run(self, name: str, check: Callable[[], None]) -> None:
        try:
            check()
        except Exception:  # a difference, or an error where the reference has none
            self.failures.append(f"{name}:\n{traceback.format_exc(limit=-3)}")

    def assert_all_passed(self) -> None:
        if self.failures:
            pytest.fail(
                f"{self.backend}: {len(self.failures)} check(s) differ from the reference:\n\n"
                + "\n".join(self.failures),
                pytrace=False,
            )


class Handle:
    """Blocking calls on a sandbox actor, as a job makes them (``ray.get`` of each)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def exec(self, command: str | list[str], **options: Any) -> ExecResult:
        result = ray.get(self.actor.exec.remote(command, **options))
        assert isinstance(result, ExecResult), f"exec returned {type(result)!r}"
        return result

    def stdout(self, command: str | list[str], **options: Any) -> str:
        """The stdout of a command that must succeed."""
        result = self.exec(command, **options)
        assert result.exit_code == 0, result
        return result.stdout

    def call(self, method: str, *args: Any) -> Any:
        return ray.get(getattr(self.actor, method).remote(*args))


# --- the checks (the reference's behaviour, measured with gVisor, in each docstring) -------


def check_running(sb: Handle) -> None:
    """get_status of a live sandbox: SandboxStatus.RUNNING."""
    assert sb.call("get_status") == SandboxStatus.RUNNING


def check_exec_list(sb: Handle) -> None:
    """A list runs as argv, no shell: exit 0, stdout and stderr as str, a float duration."""
    result = sb.exec(["echo", "two words", "$HOME", "a;b"])
    assert result.exit_code == 0, result
    assert result.stdout == "two words $HOME a;b\n"
    assert result.stderr == ""
    assert isinstance(result.stdout, str) and isinstance(result.stderr, str)
    assert isinstance(result.duration_seconds, float) and result.duration_seconds >= 0


def check_exec_shell_string(sb: Handle) -> None:
    """A string runs through ``/bin/bash -c`` (``shell=`` picks another shell); stdout and
    stderr are kept apart."""
    result = sb.exec("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert sb.stdout("echo $0") == "/bin/bash\n"
    assert sb.stdout('[ -n "$BASH_VERSION" ] && echo bash') == "bash\n"
    assert sb.stdout("echo $0", shell="/bin/sh") == "/bin/sh\n"


def check_exit_codes(sb: Handle) -> None:
    """Exit codes as the process gave them (mod 256), 128+N for a death by signal N, 127
    from the shell for an unknown command; a program that does not exist is a nonzero
    exit_code naming it in stderr (runsc says 128), not an exception."""
    assert sb.exec(["false"]).exit_code == 1
    assert sb.exec(["sh", "-c", "exit 7"]).exit_code == 7
    assert sb.exec("exit 300").exit_code == 44
    assert sb.exec(["sh", "-c", "kill -9 $$"]).exit_code == 137
    assert sb.exec(["sh", "-c", "kill -TERM $$"]).exit_code == 143
    unknown = sb.exec("no-such-command-here")
    assert unknown.exit_code == 127 and "command not found" in unknown.stderr, unknown
    missing = sb.exec(["/no/such/program"])
    assert missing.exit_code != 0 and missing.stdout == "", missing
    assert "/no/such/program" in missing.stderr, missing


def check_env(sb: Handle) -> None:
    """The image's env, then create's ``env``, then exec's ``env`` (each wins over the one
    before); exec's ``env`` is for that command only."""
    both = 'echo "$CONF_FROM_CREATE|$CONF_FROM_EXEC"'
    assert sb.stdout(["sh", "-c", both], env={"CONF_FROM_EXEC": "exec"}) == "create|exec\n"
    assert sb.stdout(both, env={"CONF_FROM_CREATE": "exec"}) == "exec|\n"
    assert sb.stdout(both) == "create|\n"
    image_env = sb.stdout(["sh", "-c", 'echo "$PATH|$LANG|$HOME"'])
    assert image_env == f"{IMAGE_PATH}|C.UTF-8|/root\n"


def check_cwd(sb: Handle) -> None:
    """Commands start in create's ``workdir`` (writable), or in exec's ``cwd``; a ``cwd``
    that does not exist is a nonzero exit_code (runsc says 128), not an exception."""
    assert sb.stdout(["pwd"]) == f"{WORKDIR}\n"
    assert sb.stdout("pwd") == f"{WORKDIR}\n"
    assert sb.stdout(["pwd"], cwd="/tmp") == "/tmp\n"
    assert sb.stdout("pwd", cwd="/etc") == "/etc\n"
    assert sb.stdout("echo written > made-here && cat made-here") == "written\n"
    assert sb.stdout(["cat", f"{WORKDIR}/made-here"]) == "written\n"
    nowhere = sb.exec(["pwd"], cwd="/no/such/dir")
    assert nowhere.exit_code != 0 and nowhere.stdout == "", nowhere


def check_timeout(sb: Handle) -> None:
    """A command that outlives ``timeout`` raises a SandboxTimeoutError (list or string);
    one that ends in time returns normally; the sandbox answers the next exec."""
    with pytest.raises(SandboxTimeoutError):
        sb.exec(["sleep", str(TIMEOUT_COMMAND_SECONDS)], timeout=1)
    with pytest.raises(SandboxTimeoutError):
        sb.exec(f"sleep {TIMEOUT_COMMAND_SECONDS}; echo late", timeout=1)
    assert sb.exec(["sleep", "0.2"], timeout=30).exit_code == 0
    assert sb.stdout(["echo", "after"]) == "after\n"


def check_file_round_trips(sb: Handle) -> None:
    """write_file takes bytes or str (UTF-8), makes parent directories, truncates, takes
    paths relative to the workdir; read_file returns bytes; exec sees the same files."""
    binary = bytes(range(256)) * 64
    assert sb.call("write_file", f"{WORKDIR}/data.bin", binary) is None
    assert sb.call("read_file", f"{WORKDIR}/data.bin") == binary
    text = "héllo\nwörld"
    sb.call("write_file", f"{WORKDIR}/text.txt", text)
    assert sb.call("read_file", f"{WORKDIR}/text.txt") == text.encode()
    assert sb.stdout(["cat", f"{WORKDIR}/text.txt"]) == text
    sb.call("write_file", "/tmp/deep/er/file.txt", b"nested")
    assert sb.call("read_file", "/tmp/deep/er/file.txt") == b"nested"
    sb.call("write_file", "relative/r.txt", "relative")
    assert sb.call("read_file", f"{WORKDIR}/relative/r.txt") == b"relative"
    assert sb.call("read_file", "relative/r.txt") == b"relative"
    sb.call("write_file", f"{WORKDIR}/text.txt", b"short")
    assert sb.call("read_file", f"{WORKDIR}/text.txt") == b"short"
    sb.call("write_file", f"{WORKDIR}/empty", b"")
    assert sb.call("read_file", f"{WORKDIR}/empty") == b""
    sb.exec("printf 'from exec' > /tmp/from-exec")
    assert sb.call("read_file", "/tmp/from-exec") == b"from exec"
    assert b"root:x:0:0" in sb.call("read_file", "/etc/passwd")  # the image's own files


def check_read_errors(sb: Handle) -> None:
    """read_file of a missing file or of a directory raises a SandboxError."""
    with pytest.raises(SandboxError):
        sb.call("read_file", "/no/such/file")
    with pytest.raises(SandboxError):
        sb.call("read_file", "/etc")


def check_upload_download(sb: Handle, local: Path) -> None:
    """upload_file/download_file copy a host file in and out unchanged; download makes
    the local parent directories; downloading a missing file raises a SandboxError and
    creates nothing."""
    payload = os.urandom(300_000)
    source = local / "up.bin"
    source.write_bytes(payload)
    assert sb.call("upload_file", str(source), f"{WORKDIR}/up.bin") is None
    digest = sb.stdout(["sha256sum", f"{WORKDIR}/up.bin"]).split()[0]
    assert digest == hashlib.sha256(payload).hexdigest()
    target = local / "new" / "dir" / "down.bin"
    assert sb.call("download_file", f"{WORKDIR}/up.bin", str(target)) is None
    assert target.read_bytes() == payload
    absent = local / "absent.bin"
    with pytest.raises(SandboxError):
        sb.call("download_file", f"{WORKDIR}/no-such-file", str(absent))
    assert not absent.exists()


def check_terminate(sb: Handle, local: Path) -> None:
    """terminate returns None; then get_status says TERMINATED, every sandbox method
    raises SandboxNotFoundError, and terminate and delete again are no-ops."""
    assert sb.call("terminate") is None
    assert sb.call("get_status") == SandboxStatus.TERMINATED
    for method, args in (
        ("exec", (["true"],)),
        ("read_file", ("/etc/passwd",)),
        ("write_file", ("/tmp/x", b"x")),
        ("download_file", ("/etc/passwd", str(local / "after.bin"))),
    ):
        with pytest.raises(SandboxNotFoundError):
            sb.call(method, *args)
    assert sb.call("terminate") is None
    assert sb.call("delete") is None
    assert sb.call("get_status") == SandboxStatus.TERMINATED


@pytest.mark.parametrize("backend", BACKENDS)
def test_sandbox_api_conformance(backend: str, conformance_ray: None,
                                        tmp_path: Path) -> None:  # fmt: skip
    actor = create_sandbox(backend, env=dict(CREATE_ENV), workdir=WORKDIR)
    sb, checks = Handle(actor), Checks(backend)
    try:
        checks.run("status while running", lambda: check_running(sb))
        checks.run("exec of a list", lambda: check_exec_list(sb))
        checks.run("exec of a shell string", lambda: check_exec_shell_string(sb))
        checks.run("exit codes", lambda: check_exit_codes(sb))
        checks.run("env", lambda: check_env(sb))
        checks.run("cwd and workdir", lambda: check_cwd(sb))
        checks.run("timeout", lambda: check_timeout(sb))
        checks.run("write_file/read_file", lambda: check_file_round_trips(sb))
        checks.run("read_file errors", lambda: check_read_errors(sb))
        checks.run("upload_file/download_file", lambda: check_upload_download(sb, tmp_path))
        checks.run("terminate", lambda: check_terminate(sb, tmp_path))
    finally:
        ray.kill(actor)  # frees its CPU for the other backend, whatever happened
    checks.assert_all_passed()
