"""A real S3-compatible server on 127.0.0.1 for tests and benchmarks: moto in server mode.

Who uses it: tests/test_snapshot_remote.py (and bench/snapshot.py may). What it promises:
:func:`running_s3_server` starts moto's ThreadedMotoServer on a free port, sets dummy
credentials in the environment (never the user's: the tests' HOME is a temp dir, and
the AWS config files are pointed at nothing) and stops the server on exit. Nothing is
mocked inside the process: s3fs talks HTTP to the server like to any S3 endpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "vmruntime-test",
    "AWS_SECRET_ACCESS_KEY": "vmruntime-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT

    @property
    def storage_options(self) -> dict[str, str]:
        """What s3fs needs to reach this server (fsspec ``storage_options``)."""
        return {"endpoint_url": self.endpoint}

    def filesystem(self):  # an s3fs.S3FileSystem
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint)

    def new_bucket(self) -> str:
        """A fresh, empty bucket's name."""
        bucket = f"vmr-{uuid.uuid4().hex[:16]}"
        self.filesystem().mkdir(bucket)
        return bucket


@contextlib.contextmanager
def running_s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
