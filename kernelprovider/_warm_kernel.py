"""Runs in the guest (its own Python; stdlib and ipykernel only): an IPython kernel started
ahead of its user, which waits to be claimed.

Who runs it: :mod:`kernelprovider.pool`, which writes this file into a template sandbox
and starts ``python3 _warm_kernel.py CLAIM_PORT -f CONNECTION_FILE [kernel args]`` as a
detached process. What it does: everything a kernel does before its first message
(imports, the IPython shell, the sockets on the guest ports of the connection file,
whose key is a random one no user holds), imports the modules named in
``VMR_WARM_IMPORTS`` (so that a user's ``import`` of them is instant), then serves the
kernel. The template is saved with it in memory; each copy resumed from it is claimed
once, on ``127.0.0.1:CLAIM_PORT``, with one JSON line:
``{"key", "session", "seed", "env", "cwd"}``. The claim gives the kernel the user's key
and a new session id, reseeds ``random`` and numpy's global generator (their state was
copied with the memory), applies the environment and working directory, rewrites the
connection file with the new key, forgets the host's warm-up executions (history and
execution count start afresh), answers ``{"ok": true, "pid"}`` and stops listening:
nothing else in the guest can claim it again. The claim runs on the kernel's thread.
Version 1.
"""

import contextlib
import json
import os
import random
import socket
import sys
import threading
import uuid

VERSION = 1
_MAX_CLAIM = 1 << 20


def main() -> None:
    claim_port, kernel_args = int(sys.argv[1]), sys.argv[2:]
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance()
    app.initialize(kernel_args)
    for name in filter(None, os.environ.pop("VMR_WARM_IMPORTS", "").split(",")):
        with contextlib.suppress(Exception):  # a missing module only means a slower import
            __import__(name)
    listener = socket.create_server(("127.0.0.1", claim_port))
    threading.Thread(target=_serve_claim, args=(listener, app), daemon=True).start()
    app.start()


def _serve_claim(listener: socket.socket, app: object) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                reply = _on_kernel_thread(app, json.loads(_read_line(conn)))
            except Exception as exc:  # the host reads the reason
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            conn.sendall(json.dumps(reply).encode() + b"\n")
        if reply.get("ok"):
            listener.close()
            return


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk or len(data) > _MAX_CLAIM:
            break
        data += chunk
    return data


def _on_kernel_thread(app: object, claim: dict) -> dict:
    """The claim runs on the kernel's own thread (its IOLoop), between messages: the
    shell's history database belongs to that thread."""
    done, result = threading.Event(), {}

    def run() -> None:
        try:
            result["reply"] = _claim(app, claim)
        except Exception as exc:  # the host reads the reason
            result["reply"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            done.set()

    loop = getattr(app, "io_loop", None) or app.kernel.io_loop  # type: ignore[attr-defined]
    loop.add_callback(run)
    if not done.wait(60):
        return {"ok": False, "error": "the kernel's thread did not run the claim in 60 s"}
    return result["reply"]


def _claim(app: object, claim: dict) -> dict:
    session = app.session  # type: ignore[attr-defined]
    session.key = claim["key"].encode("ascii")
    session.session = claim["session"] or str(uuid.uuid4())
    _reseed(bytes.fromhex(claim["seed"]))
    os.environ.update(claim["env"])
    if claim.get("cwd"):
        os.chdir(claim["cwd"])
    _rewrite_connection_file(app, claim["key"])
    _forget_warm_up(app.shell)  # type: ignore[attr-defined]
    return {"ok": True, "pid": os.getpid(), "version": VERSION}


def _forget_warm_up(shell: object) -> None:
    """The host's warm-up executions ran as a user's would (so that their code was loaded
    and translated); the user's first cell is still number 1, with an empty history."""
    shell.history_manager.reset(new_session=True)  # type: ignore[attr-defined]
    shell.execution_count = 1  # type: ignore[attr-defined]
    namespace = shell.user_ns  # type: ignore[attr-defined]
    namespace.update(_i="", _ii="", _iii="")
    for name in [n for n in namespace if n.startswith("_i") and n[2:].isdigit()]:
        del namespace[name]


def _reseed(seed: bytes) -> None:
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(numpy.frombuffer(seed[:32], dtype=numpy.uint32))


def _rewrite_connection_file(app: object, key: str) -> None:
    path = app.abs_connection_file  # type: ignore[attr-defined]
    try:
        with open(path) as file:
            info = json.load(file)
        info["key"] = key
        temp = f"{path}.claim"
        with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
            json.dump(info, file)
        os.replace(temp, path)
    except OSError:
        pass  # %connect_info would show the old key; the kernel itself uses the new one


if __name__ == "__main__":
    main()
