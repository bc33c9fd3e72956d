"""A real local OCI registry, and ways to make it misbehave, for the image-pull tests.

Who calls this: ``tests/conftest.py`` fixtures (see the recommended ones in the report /
``tests/test_registry_support.py``) and the image-pull tests. It drives:

* ``docker-registry`` on PATH (Debian ``docker-registry``, CNCF distribution 2.8) as
  ``LocalRegistry``, with no auth, htpasswd basic auth, or bearer-token auth backed by the
  in-process ``TokenServer`` (JWTs signed with the ``openssl`` command line tool);
* ``skopeo`` (Debian ``skopeo``) in ``push_layout`` to push layouts made by
  ``tests/imagefactory.py``;
* ``TruncatingProxy``, an in-process reverse proxy that injects truncated bodies, 503s or
  connection resets in front of the registry.

Every server binds 127.0.0.1 only, on a free port, and every object with a ``stop()`` is
also a context manager; ``stop()`` is idempotent, so fixtures can call it in finalizers
unconditionally. Basic auth needs a bcrypt hasher: the ``bcrypt`` Python module if it is
importable, else ``htpasswd`` from Debian ``apache2-utils``. Every tool is found on PATH;
a test that needs one that is absent is skipped, naming the package (``require_tool``).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
import requests

# Every manifest type a pull client may ask for; used for digest look-ups after a push.
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
_DOCKER_TYPES_SKOPEO_CANNOT_READ = {
    # containers/image's oci: transport ignores index.json entries of these types.
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

AuthMode = Literal["none", "basic", "token"]


def require_tool(name: str, package: str) -> str:
    """The path of ``name`` on PATH; skips the calling test if it is not there."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH (apt-get install {package})")
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    There is a race between closing the probe socket and the real server binding; callers
    that start external servers (``LocalRegistry``) retry with a new port on EADDRINUSE.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, timeout: float, alive: Any = None) -> None:
    """Poll ``url`` until any HTTP answer arrives (401 counts: the server is up)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"server behind {url} exited during start-up")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last}")


class _QuietServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that does not print tracebacks for clients hanging up on it
    (which the failure-injection tests do on purpose)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _LoopbackServer:
    """An HTTP server on 127.0.0.1 serving from a daemon thread.

    Handlers reach the object that owns the server as ``self.server.owner``.
    """

    def __init__(self, handler: type[BaseHTTPRequestHandler], owner: Any, name: str) -> None:
        self.httpd = _QuietServer(("127.0.0.1", 0), handler)
        self.httpd.owner = owner  # type: ignore[attr-defined]
        self.port = int(self.httpd.server_address[1])
        # A short poll interval: shutdown() waits for the serve loop to notice (default 0.5 s).
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), name=name, daemon=True
        )
        self._thread.start()
        self._stopped = False

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.httpd.shutdown()
        self.httpd.server_close()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bcrypt_htpasswd_line(username: str, password: str) -> str:
    """Return ``user:$2...`` for an htpasswd file (the registry accepts bcrypt only).

    Uses the ``bcrypt`` module when present, else ``htpasswd -B`` (Debian apache2-utils),
    with the password on stdin so it never shows in a process list. Cost 5 keeps it fast.
    """
    try:
        import bcrypt  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
        return f"{username}:{hashed}"
    htpasswd = shutil.which("htpasswd")
    if htpasswd is None:
        raise RuntimeError(
            "basic auth needs a bcrypt hasher: apt-get install apache2-utils (or pip bcrypt)"
        )
    out = subprocess.run(
        [htpasswd, "-niB", "-C", "5", username],
        input=password + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


# --------------------------------------------------------------------------------------------
# Bearer token server
# --------------------------------------------------------------------------------------------


@dataclass
class TokenRequest:
    """One request the token server answered (for assertions on the client's auth flow)."""

    username: str | None
    scopes: list[str]
    status: int
    granted: list[dict[str, Any]] = field(default_factory=list)


class TokenServer:
    """A Docker-style token endpoint (``GET /token?service=..&scope=..``) for the registry.

    Who calls it: ``LocalRegistry(auth="token")`` creates and owns one; tests read its
    ``requests`` and ``issued`` and may call ``issue()`` to mint tokens directly.

    Promises: requests carrying the right basic credentials get every action they ask for;
    anonymous requests get "pull" only if ``allow_anonymous_pull`` else a 401; wrong
    credentials always get a 401. Tokens are RS256 JWTs whose ``x5c`` header carries a
    self-signed certificate that the registry trusts through ``rootcertbundle``.
    """

    service = "vmr-test-registry"
    issuer = "vmr-test-token-issuer"

    def __init__(
        self,
        workdir: Path,
        *,
        username: str,
        password: str,
        allow_anonymous_pull: bool = False,
        ttl: int = 300,
    ) -> None:
        self.username = username
        self.password = password
        self.allow_anonymous_pull = allow_anonymous_pull
        self.ttl = ttl
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self.key_path = workdir / "token-key.pem"
        self.cert_path = workdir / "token-cert.pem"
        # openssl rather than the cryptography package: it is on every Debian machine.
        subprocess.run(
            [
                require_tool("openssl", "openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                "-keyout", str(self.key_path), "-out", str(self.cert_path),
                "-days", "7", "-subj", "/CN=vmr-test-token-issuer",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        pem = self.cert_path.read_text()
        der_b64 = "".join(
            line for line in pem.splitlines() if line and not line.startswith("-----")
        )
        self._x5c = [der_b64]  # x5c is standard (not URL-safe) base64 DER
        self._server = _LoopbackServer(_TokenHandler, self, "vmr-token-server")
        self.port = self._server.port

    @property
    def realm(self) -> str:
        """The URL the registry advertises in ``WWW-Authenticate: Bearer realm=...``."""
        return f"http://127.0.0.1:{self.port}/token"

    def issue(self, scopes: Iterable[str], *, username: str | None = None) -> str:
        """Mint a token granting exactly ``scopes`` ("repository:NAME:pull,push", ...)."""
        access = [_parse_scope(scope) for scope in scopes]
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": username or "",
            "aud": self.service,
            "exp": now + self.ttl,
            "nbf": now - 30,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [a for a in access if a is not None],
        }
        header = {"typ": "JWT", "alg": "RS256", "x5c": self._x5c}
        signing_input = ".".join(_b64url(json.dumps(part).encode()) for part in (header, claims))
        signature = subprocess.run(
            [require_tool("openssl", "openssl"), "dgst", "-sha256", "-sign", str(self.key_path)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def _answer(self, authorization: str | None, query: dict[str, list[str]]) -> tuple[int, Any]:
        """Decide a token request; runs on the server thread."""
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        username: str | None = None
        if authorization and authorization.lower().startswith("basic "):
            try:
                user, _, pw = base64.b64decode(authorization[6:]).decode().partition(":")
            except ValueError:
                user, pw = "", ""
            if (user, pw) != (self.username, self.password):
                self._record(TokenRequest(user, scopes, 401))
                return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
            username = user
        elif not self.allow_anonymous_pull:
            self._record(TokenRequest(None, scopes, 401))
            return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "credentials needed"}]}
        else:
            scopes = [_restrict_to_pull(s) for s in scopes]
        token = self.issue(scopes, username=username)
        self._record(
            TokenRequest(username, scopes, 200, [a for a in map(_parse_scope, scopes) if a])
        )
        issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {"token": token, "access_token": token, "expires_in": self.ttl}
        return 200, {**body, "issued_at": issued_at}

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def stop(self) -> None:
        """Shut the HTTP server down (idempotent)."""
        self._server.stop()


def _parse_scope(scope: str) -> dict[str, Any] | None:
    # "repository:some/name:pull,push" - the name never holds ':', the type might not be
    # "repository" (e.g. "registry:catalog:*").
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2:
        return None
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


def _restrict_to_pull(scope: str) -> str:
    parsed = _parse_scope(scope)
    if parsed is None:
        return scope
    actions = "pull" if "pull" in parsed["actions"] or "*" in parsed["actions"] else ""
    return f"{parsed['type']}:{parsed['name']}:{actions}"


class _TokenHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/token":
            self._send(404, {"errors": [{"code": "NOT_FOUND"}]})
            return
        server: TokenServer = self.server.owner  # type: ignore[attr-defined]
        status, body = server._answer(self.headers.get("Authorization"), parse_qs(url.query))
        self._send(status, body)

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="vmr-test-token"')
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean; TokenServer.requests records what matters


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessLogRecord:
    """One line of the registry's access log."""

    method: str
    path: str
    status: int


_ACCESS_RE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')


class LocalRegistry:
    """A CNCF distribution registry serving plain HTTP on 127.0.0.1:<free port>.

    Who calls it: session/module fixtures (one registry per auth mode is enough: every test
    pushes to its own repository name). Promises after construction: the process is
    running and ``GET /v2/`` has answered (200, or 401 with auth). ``stop()`` terminates it
    (kill after 5 s) and is idempotent; the temporary directory it created is removed
    unless ``base_dir`` was given (then the caller owns it, e.g. pytest's tmp_path_factory,
    which keeps the log around for post-mortems).

    ``auth``: "none"; "basic" (htpasswd, bcrypt); "token" (Docker bearer-token flow against
    ``self.token_server``). ``username``/``password`` are the one valid account for both.
    Storage is content-addressed across repositories: tamper only blobs no other test uses.
    """

    def __init__(
        self,
        *,
        auth: AuthMode = "none",
        username: str = "vmr-tester",
        password: str = "correct horse battery staple",
        allow_anonymous_pull: bool = False,
        token_ttl: int = 300,
        base_dir: str | os.PathLike[str] | None = None,
        log_level: str = "warn",
        startup_timeout: float = 20.0,
    ) -> None:
        self.auth_mode: AuthMode = auth
        self.username = username
        self.password = password
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="vmr-registry-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.base_dir / "storage"
        self.storage_dir.mkdir(exist_ok=True)
        self.config_path = self.base_dir / "config.yml"
        self.log_path = self.base_dir / "registry.log"
        self.token_server: TokenServer | None = None
        self.port = 0  # set by _start() once a port is bound
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._stopped = False
        try:
            auth_cfg = self._auth_config(allow_anonymous_pull, token_ttl)
            self._start(auth_cfg, log_level, startup_timeout)
        except BaseException:
            self.stop()
            raise

    # -- start-up ------------------------------------------------------------------------

    def _auth_config(self, allow_anonymous_pull: bool, token_ttl: int) -> dict[str, Any]:
        if self.auth_mode == "none":
            return {}
        if self.auth_mode == "basic":
            htpasswd = self.base_dir / "htpasswd"
            htpasswd.write_text(bcrypt_htpasswd_line(self.username, self.password) + "\n")
            return {"htpasswd": {"realm": "vmr-test-registry", "path": str(htpasswd)}}
        if self.auth_mode == "token":
            self.token_server = TokenServer(
                self.base_dir,
                username=self.username,
                password=self.password,
                allow_anonymous_pull=allow_anonymous_pull,
                ttl=token_ttl,
            )
            ts = self.token_server
            return {
                "token": {
                    "realm": ts.realm,
                    "service": ts.service,
                    "issuer": ts.issuer,
                    "rootcertbundle": str(ts.cert_path),
                }
            }
        raise ValueError(f"unknown auth mode {self.auth_mode!r}")

    def _start(self, auth_cfg: dict[str, Any], log_level: str, timeout: float) -> None:
        registry_bin = require_tool("docker-registry", "docker-registry")
        for _attempt in range(5):
            self.port = free_port()
            config: dict[str, Any] = {
                "version": "0.1",
                # The access log (one combined-format line per request) is written at every
                # log level; blob_get_count() reads it.
                "log": {"level": log_level, "formatter": "text", "accesslog": {"disabled": False}},
                "storage": {
                    "filesystem": {"rootdirectory": str(self.storage_dir)},
                    "delete": {"enabled": True},
                    # No background goroutine touching storage while tests tamper with it.
                    "maintenance": {"uploadpurging": {"enabled": False}},
                },
                # A fixed secret silences the "No HTTP secret provided" warning.
                "http": {"addr": self.host, "secret": secrets.token_hex(16)},
            }
            if auth_cfg:
                config["auth"] = auth_cfg
            # JSON is YAML, and this avoids depending on PyYAML.
            self.config_path.write_text(json.dumps(config, indent=2))
            log_offset = len(self.log_text())  # judge this attempt by its own log lines
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._proc = subprocess.Popen(
                [registry_bin, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
            )
            try:
                _wait_http(f"{self.url}/v2/", timeout, alive=lambda: self._proc.poll() is None)
                return
            except RuntimeError:
                self._reap()
                attempt_log = self.log_text()[log_offset:]
                if "address already in use" not in attempt_log:
                    raise RuntimeError(
                        f"docker-registry failed to start:\n{attempt_log[-3000:]}"
                    ) from None
        raise RuntimeError("docker-registry: no free port after 5 attempts")

    # -- properties ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://{self.host}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """``(username, password)`` when auth is on, for ``requests`` or a pull client."""
        return None if self.auth_mode == "none" else (self.username, self.password)

    def auth_headers(self, repo: str, actions: str = "pull") -> dict[str, str]:
        """Headers that authorise direct API calls on ``repo`` (skipping any token dance).

        Tests use this to read back what was pushed; it is not a model for the client.
        """
        if self.auth_mode == "basic":
            raw = f"{self.username}:{self.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        if self.auth_mode == "token":
            assert self.token_server is not None
            token = self.token_server.issue([f"repository:{repo}:{actions}"])
            return {"Authorization": f"Bearer {token}"}
        return {}

    def blob_path(self, digest: str) -> Path:
        """The file where the registry stores ``digest``'s bytes."""
        alg, _, hexpart = digest.partition(":")
        return self.storage_dir / "docker/registry/v2/blobs" / alg / hexpart[:2] / hexpart / "data"

    # -- the access log --------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything the registry wrote so far (stdout and stderr interleaved)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _sync_log(self, timeout: float = 5.0) -> None:
        # The access-log line is written after the response is sent, so a client may have
        # its bytes before the line exists. A marker request sent now is logged after every
        # request whose response the caller has already received: wait for it.
        # That holds per connection only: a request answered on another connection may
        # still be logging when the marker's line appears, so also wait for the log to
        # stay the same for a moment.
        marker = uuid.uuid4().hex
        requests.get(f"{self.url}/v2/?vmr-log-sync={marker}", timeout=5)
        deadline = time.monotonic() + timeout
        while marker not in self.log_text():
            if time.monotonic() > deadline:
                raise TimeoutError("registry access log did not show the sync marker")
            time.sleep(0.02)
        self._wait_for_quiet_log(deadline)

    def _wait_for_quiet_log(self, deadline: float, quiet: float = 0.1) -> None:
        size, since = len(self.log_text()), time.monotonic()
        while time.monotonic() - since < quiet and time.monotonic() < deadline:
            time.sleep(0.02)
            if (now := len(self.log_text())) != size:
                size, since = now, time.monotonic()

    def access_log(self) -> list[AccessLogRecord]:
        """All requests answered so far, oldest first (marker requests excluded)."""
        self._sync_log()
        records = []
        for match in _ACCESS_RE.finditer(self.log_text()):
            if "vmr-log-sync=" in match["path"]:
                continue
            records.append(AccessLogRecord(match["method"], match["path"], int(match["status"])))
        return records

    def blob_get_count(self, digest: str, *, repo: str | None = None) -> int:
        """How many ``GET .../blobs/<digest>`` the registry answered (any status, any repo
        unless ``repo`` is given). HEAD requests are not counted."""
        suffix = f"/blobs/{digest}"
        return sum(
            1
            for rec in self.access_log()
            if rec.method == "GET"
            and rec.path.split("?")[0].endswith(suffix)
            and (repo is None or rec.path.startswith(f"/v2/{repo}/blobs/"))
        )

    # -- shutdown --------------------------------------------------------------------------

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        """Stop the registry (and token server); idempotent, safe after a failed start."""
        if self._stopped:
            return
        self._stopped = True
        self._reap()
        if self.token_server is not None:
            self.token_server.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Pushing
# --------------------------------------------------------------------------------------------


def _layout_descriptor(layout_dir: Path, tag: str) -> dict[str, Any]:
    index = json.loads((layout_dir / "index.json").read_text())
    for desc in index.get("manifests", []):
        if desc.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag:
            return desc
    raise KeyError(f"{layout_dir} has no image tagged {tag!r}")


def manifest_digest(registry: LocalRegistry, repo: str, reference: str) -> str:
    """``Docker-Content-Digest`` of ``repo:reference`` as the registry serves it."""
    resp = requests.head(
        f"{registry.url}/v2/{repo}/manifests/{reference}",
        headers={"Accept": MANIFEST_ACCEPT, **registry.auth_headers(repo)},
        timeout=10,
    )
    resp.raise_for_status()
    return resp.headers["Docker-Content-Digest"]


def push_layout(
    registry: LocalRegistry,
    layout_dir: str | os.PathLike[str],
    repo: str,
    tag: str = "latest",
    *,
    src_tag: str | None = None,
    all_platforms: bool | None = None,
    method: Literal["auto", "skopeo", "http"] = "auto",
) -> str:
    """Push the layout's image ``src_tag`` (default: ``tag``) to ``registry/repo:tag``.

    Returns the manifest (or index) digest the registry serves for ``repo:tag``, which
    equals the layout's: skopeo runs with ``--preserve-digests`` and the http path uploads
    the bytes as they are. ``all_platforms`` (default: on when the tag names an index) adds
    ``--all`` so every platform manifest is pushed. ``method="auto"`` uses skopeo, except
    for Docker media types, which skopeo's ``oci:`` transport cannot read from index.json;
    those go through ``push_layout_http``. Uses the registry's credentials when it has auth.
    """
    root = Path(layout_dir)
    src_tag = src_tag or tag
    desc = _layout_descriptor(root, src_tag)
    if method == "auto":
        method = "http" if desc["mediaType"] in _DOCKER_TYPES_SKOPEO_CANNOT_READ else "skopeo"
    if method == "http":
        return push_layout_http(registry, root, repo, tag, src_tag=src_tag)
    if all_platforms is None:
        all_platforms = desc["mediaType"] in _INDEX_TYPES
    skopeo = require_tool("skopeo", "skopeo")
    cmd = [skopeo, "--insecure-policy", "copy", "--quiet", "--preserve-digests"]
    cmd += ["--dest-tls-verify=false", "--retry-times", "2"]
    if all_platforms:
        cmd.append("--all")
    creds = registry.credentials
    # --dest-no-creds keeps skopeo away from the invoking user's auth.json.
    cmd += ["--dest-creds", f"{creds[0]}:{creds[1]}"] if creds else ["--dest-no-creds"]
    cmd += [f"oci:{root}:{src_tag}", f"docker://{registry.host}/{repo}:{tag}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"skopeo copy failed ({result.returncode}): {result.stderr}")
    digest = manifest_digest(registry, repo, tag)
    if digest != desc["digest"]:
        raise RuntimeError(f"registry digest {digest} != layout digest {desc['digest']}")
    return digest


def push_layout_http(
    registry: LocalRegistry,
    layout_dir: str | os.PathLike[str],
    repo: str,
    tag: str = "latest",
    *,
    src_tag: str | None = None,
) -> str:
    """Push with plain distribution-API calls: blobs (POST + PUT), then manifests by digest,
    then the top manifest by tag. Works for any media type (Docker lists included) and
    never rewrites anything; returns the registry's digest for ``repo:tag``."""
    root = Path(layout_dir)
    desc = _layout_descriptor(root, src_tag or tag)
    headers = registry.auth_headers(repo, "pull,push")

    def blob(digest: str) -> bytes:
        alg, _, hexpart = digest.partition(":")
        return (root / "blobs" / alg / hexpart).read_bytes()

    def put_blob(digest: str) -> None:
        base = f"{registry.url}/v2/{repo}/blobs"
        if requests.head(f"{base}/{digest}", headers=headers, timeout=10).status_code == 200:
            return
        start = requests.post(f"{base}/uploads/", headers=headers, timeout=10)
        start.raise_for_status()
        location = urljoin(registry.url, start.headers["Location"])
        sep = "&" if "?" in location else "?"
        done = requests.put(
            f"{location}{sep}digest={digest}",
            data=blob(digest),
            headers={**headers, "Content-Type": "application/octet-stream"},
            timeout=60,
        )
        done.raise_for_status()

    def put_manifest(mdesc: dict[str, Any], reference: str) -> None:
        data = blob(mdesc["digest"])
        if mdesc["mediaType"] in _INDEX_TYPES:
            for child in json.loads(data)["manifests"]:
                put_manifest(child, child["digest"])
        else:
            parsed = json.loads(data)
            for ref in [parsed["config"], *parsed.get("layers", [])]:
                put_blob(ref["digest"])
        resp = requests.put(
            f"{registry.url}/v2/{repo}/manifests/{reference}",
            data=data,
            headers={**headers, "Content-Type": mdesc["mediaType"]},
            timeout=30,
        )
        if resp.status_code >= 400:
            raise RuntimeError(f"manifest PUT {reference}: {resp.status_code} {resp.text}")

    put_manifest(desc, tag)
    return manifest_digest(registry, repo, tag)


# --------------------------------------------------------------------------------------------
# Breaking things
# --------------------------------------------------------------------------------------------


def tamper_blob(
    registry: LocalRegistry, digest: str, *, offset: int | None = None, count: int = 16
) -> Path:
    """Corrupt the registry's stored copy of ``digest`` in place, keeping its size.

    XORs ``count`` bytes at ``offset`` (default: the middle) with 0xFF, so the registry
    keeps serving the blob under the old digest with the old Content-Length but wrong
    bytes. XOR is its own inverse: calling again with the same arguments restores it.
    Returns the data file's path. The registry shares blobs between repositories: tamper
    only with a blob pushed for this test alone.
    """
    path = registry.blob_path(digest)
    data = bytearray(path.read_bytes())
    if not data:
        raise ValueError(f"{digest} is empty; nothing to flip")
    count = min(count, len(data))
    start = len(data) // 2 - count // 2 if offset is None else offset
    start = max(0, min(start, len(data) - count))
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@dataclass(frozen=True)
class ProxyRecord:
    """One request seen by ``TruncatingProxy`` and what it did with it."""

    method: str
    path: str
    action: Literal["forwarded", "truncated", "503", "reset"]
    status: int | None


_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


class TruncatingProxy:
    """A threaded HTTP/1.1 reverse proxy to ``upstream_host`` that injects failures.

    Who calls it: pull tests for retry/resume/verification paths; point the client at
    ``proxy.host`` instead of ``registry.host``. The Host header is passed through, so the
    registry's Location headers and the token realm keep working through the proxy.

    Modes, each applied to the first ``fail_first_n`` matching requests, then everything is
    forwarded untouched:

    * ``"truncate"``: matching = GET whose path contains ``path_contains`` (default
      ``/blobs/sha256:``). Sends the upstream status and headers, including the real
      Content-Length, then only ``truncate_at`` body bytes (default half; always at least
      one byte short), then closes the connection.
    * ``"503"``: matching = any request whose path contains ``path_contains`` (default: every
      request). Answers 503 with a distribution-style JSON error and ``Retry-After`` if
      ``retry_after`` is set; the request never reaches the registry.
    * ``"reset"``: like "503" but closes the connection without any response.
    * ``"stall"``: like "truncate", but instead of closing the connection after the cut it
      keeps it open and silent (a stalled network) until ``stop()`` or two minutes;
      ``stalled`` is set once it does.

    Counters (thread-safe): ``records``, ``blob_gets`` (GETs of blob paths seen, failed or
    not), ``failures_injected``. ``rearm(n)`` starts a new round of failures.
    """

    def __init__(
        self,
        upstream_host: str,
        fail_first_n: int = 1,
        truncate_at: int | None = None,
        *,
        mode: Literal["truncate", "503", "reset", "stall"] = "truncate",
        path_contains: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        self.upstream_host = upstream_host
        self.mode = mode
        self.truncate_at = truncate_at
        self.retry_after = retry_after
        if path_contains is None:
            path_contains = "/blobs/sha256:" if mode in ("truncate", "stall") else ""
        self.path_contains = path_contains
        self.records: list[ProxyRecord] = []
        self.blob_gets = 0
        self.failures_injected = 0
        self._remaining = fail_first_n
        self._lock = threading.Lock()
        self.stalled = threading.Event()
        self._stopped = threading.Event()
        self._server = _LoopbackServer(_ProxyHandler, self, "vmr-truncating-proxy")
        self.port = self._server.port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` to use in image references instead of the registry's."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}"

    def rearm(self, fail_first_n: int = 1) -> None:
        """Fail the next ``fail_first_n`` matching requests again; counters are kept."""
        with self._lock:
            self._remaining = fail_first_n

    def _decide(self, method: str, path: str) -> str:
        """Consume one failure if this request matches; return the action to take."""
        with self._lock:
            if method == "GET" and "/blobs/" in path:
                self.blob_gets += 1
            on_body = self.mode in ("truncate", "stall")  # these act on GET bodies only
            matches = self.path_contains in path and (not on_body or method == "GET")
            if matches and self._remaining > 0:
                self._remaining -= 1
                self.failures_injected += 1
                return "truncated" if self.mode == "truncate" else self.mode
            return "forwarded"

    def _record(self, rec: ProxyRecord) -> None:
        with self._lock:
            self.records.append(rec)

    def stop(self) -> None:
        """Stop serving (idempotent). Connections still open are daemon threads and die."""
        self._stopped.set()
        self._server.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the registry, so clients reuse sockets

    def _proxy(self) -> TruncatingProxy:
        return self.server.owner  # type: ignore[attr-defined, no-any-return]

    def _read_request_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _handle(self) -> None:
        proxy = self._proxy()
        body = self._read_request_body()
        action = proxy._decide(self.command, self.path)
        if action == "reset":
            proxy._record(ProxyRecord(self.command, self.path, "reset", None))
            self._abort()
            return
        if action == "503":
            proxy._record(ProxyRecord(self.command, self.path, "503", 503))
            payload = json.dumps(
                {"errors": [{"code": "UNAVAILABLE", "message": "injected by TruncatingProxy"}]}
            ).encode()
            self.send_response_only(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if proxy.retry_after is not None:
                self.send_header("Retry-After", str(proxy.retry_after))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return

        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(proxy.upstream_host, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            # Registry answers in these tests are small: buffering keeps this simple and
            # lets a truncated response still announce the real length.
            data = resp.read()
            upstream_headers = resp.getheaders()
        except OSError as exc:
            # Upstream gone (e.g. a test stopped the registry): say so instead of hanging up,
            # so the failure is not mistaken for an injected one.
            proxy._record(ProxyRecord(self.command, self.path, "forwarded", 502))
            payload = f"upstream {proxy.upstream_host}: {exc}".encode()
            self.send_response_only(502)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        finally:
            conn.close()

        self.send_response_only(resp.status, resp.reason)
        declared = None
        for name, value in upstream_headers:
            if name.lower() in _HOP_BY_HOP:
                continue
            if name.lower() == "content-length":
                declared = value
                continue
            self.send_header(name, value)
        # HEAD keeps the upstream length; otherwise the length of what upstream really sent.
        if self.command == "HEAD":
            self.send_header("Content-Length", declared or "0")
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()

        if action == "stall" and data:
            cut = len(data) // 2 if proxy.truncate_at is None else proxy.truncate_at
            proxy._record(ProxyRecord(self.command, self.path, "stall", resp.status))
            self.wfile.write(data[: max(0, min(cut, len(data) - 1))])
            self.wfile.flush()
            proxy.stalled.set()
            proxy._stopped.wait(120)
            self._abort()
            return
        if action == "truncated" and data:
            cut = len(data) // 2 if proxy.truncate_at is None else proxy.truncate_at
            cut = max(0, min(cut, len(data) - 1))
            proxy._record(ProxyRecord(self.command, self.path, "truncated", resp.status))
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self._abort()
            return
        proxy._record(ProxyRecord(self.command, self.path, "forwarded", resp.status))
        if self.command != "HEAD":
            self.wfile.write(data)

    def _abort(self) -> None:
        # Close without a clean end of message: the client sees EOF mid-body (or before
        # the status line for "reset").
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the proxy's own records are the log


def blob_digests(manifest: bytes | str) -> list[str]:
    """Config + layer digests of an image manifest, in manifest order (config first)."""
    parsed = json.loads(manifest)
    return [parsed["config"]["digest"], *(layer["digest"] for layer in parsed["layers"])]


__all__: Sequence[str] = [
    "MANIFEST_ACCEPT",
    "AccessLogRecord",
    "LocalRegistry",
    "ProxyRecord",
    "TokenRequest",
    "TokenServer",
    "TruncatingProxy",
    "bcrypt_htpasswd_line",
    "blob_digests",
    "free_port",
    "manifest_digest",
    "push_layout",
    "push_layout_http",
    "require_tool",
    "tamper_blob",
]
