"""A client for the OCI distribution API v2, just enough to pull images.

Who calls it: :func:`vmruntime.images.pull`.

What it promises: plain HTTP only for loopback registries (HTTPS elsewhere);
the anonymous bearer-token flow and basic auth from a credentials file; retries
with backoff on connection errors, timeouts, 429 and 5xx answers and truncated
blob transfers; bounded manifest sizes; :meth:`RegistryClient.cancel` ends every
transfer in flight at once, even one waiting for a stalled server. It does not
verify digests: the blob sink it writes into does (see
:class:`~vmruntime.images.store.StagedBlob`).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from vmruntime._streams import CHUNK
from vmruntime.errors import AuthenticationError, RegistryError, SizeMismatchError
from vmruntime.images.auth import Credentials, find_credentials
from vmruntime.images.ingest import BlobSink, Progress, TransferCancelled
from vmruntime.images.manifest import ACCEPT_MANIFESTS, MAX_JSON_DOCUMENT, Descriptor
from vmruntime.images.reference import Reference, is_loopback_host

if TYPE_CHECKING:  # imported on first use: processes that never pull skip the HTTP stack
    import requests

_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


@functools.cache
def _transient_errors() -> tuple[type[BaseException], ...]:
    import requests

    return (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_USER_AGENT = "vmruntime/0.1"


class _Transient(Exception):
    """A failure worth another attempt."""


class RegistryClient:
    """Talks to one registry about one repository."""

    def __init__(
        self,
        ref: Reference,
        *,
        credentials: Credentials | None = None,
        retries: int = 4,
        backoff: float = 0.25,
        timeout: float = 60.0,
        session: requests.Session | None = None,
    ) -> None:
        self.ref = ref
        scheme = "http" if ref.is_loopback else "https"
        self.base = f"{scheme}://{ref.api_host}/v2/{ref.repository}"
        self.credentials = (
            credentials if credentials is not None else find_credentials(ref.registry)
        )
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        if session is None:
            import requests

            session = requests.Session()
        self.session = session
        self.session.headers["User-Agent"] = _USER_AGENT
        self._authorization: str | None = None
        self._cancelled = threading.Event()
        self._open: set[requests.Response] = set()
        self._open_lock = threading.Lock()

    # --- public ----------------------------------------------------------

    def get_manifest(self, reference: str) -> tuple[bytes, str, str | None]:
        """The manifest or index at a tag or digest: (body, content type, digest header)."""
        url = f"{self.base}/manifests/{reference}"

        def attempt() -> tuple[bytes, str, str | None]:
            with self._get(url, {"Accept": ACCEPT_MANIFESTS}, stream=True) as response:
                body = _read_bounded(response, MAX_JSON_DOCUMENT, url)
                return (
                    body,
                    response.headers.get("Content-Type", ""),
                    response.headers.get("Docker-Content-Digest"),
                )

        return self._with_retries(url, attempt)

    def copy_blob(self, desc: Descriptor, sink: BlobSink, progress: Progress) -> None:
        """Stream a blob into ``sink``; a short transfer is retried from the start."""
        url = f"{self.base}/blobs/{desc.digest}"

        def attempt() -> None:
            sink.reset()
            progress.reset()
            # identity: the blob's bytes are what the digest covers, never re-encoded.
            response = self._get(url, {"Accept-Encoding": "identity"}, stream=True)
            with response, self._tracked(response):
                for chunk in response.iter_content(CHUNK):
                    sink.write(chunk)
                    progress.advance(len(chunk))
            if sink.written != desc.size:
                raise _Transient(
                    SizeMismatchError(f"blob {desc.digest} from {url}", desc.size, sink.written)
                )

        self._with_retries(url, attempt)

    def cancel(self) -> None:
        """End every transfer in flight (from any thread): each raises TransferCancelled.

        A read blocked on a silent server does not notice a closed file descriptor, so
        the connections are shut down, which wakes it.
        """
        self._cancelled.set()
        with self._open_lock:
            responses = list(self._open)
        for response in responses:
            sock = _socket_of(response)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    # --- plumbing --------------------------------------------------------

    @contextlib.contextmanager
    def _tracked(self, response: requests.Response) -> Iterator[None]:
        with self._open_lock:
            self._open.add(response)
        try:
            yield
        finally:
            with self._open_lock:
                self._open.discard(response)

    def _with_retries(self, url: str, attempt: Callable[[], Any]) -> Any:
        last: BaseException | None = None
        for number in range(self.retries + 1):
            if number:
                self._cancelled.wait(self.backoff * 2 ** (number - 1))
            if self._cancelled.is_set():
                raise TransferCancelled
            try:
                return attempt()
            except _Transient as exc:
                last = exc.args[0] if exc.args else exc
            except _transient_errors() as exc:
                last = exc
        if isinstance(last, RegistryError | SizeMismatchError):
            raise last
        raise RegistryError(
            url, f"failed after {self.retries + 1} attempts: {_describe(last)}"
        ) from last

    def _get(self, url: str, headers: dict[str, str], *, stream: bool) -> requests.Response:
        response = self._send(url, headers, stream)
        if response.status_code == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            self._authorize(url, challenge)
            response = self._send(url, headers, stream)
        if response.status_code == 200:
            return response
        status, text = response.status_code, response.text[:300]
        response.close()
        if status in _TRANSIENT_STATUS:
            raise _Transient(RegistryError(url, f"HTTP {status}: {text}", status))
        if status == 401:
            raise AuthenticationError(url, "authentication refused", status)
        if status == 404:
            raise RegistryError(url, "not found (HTTP 404)", status)
        raise RegistryError(url, f"HTTP {status}: {text}", status)

    def _send(self, url: str, headers: dict[str, str], stream: bool) -> requests.Response:
        all_headers = dict(headers)
        if self._authorization:
            all_headers["Authorization"] = self._authorization
        return self.session.get(url, headers=all_headers, stream=stream, timeout=self.timeout)

    def _authorize(self, url: str, challenge: str) -> None:
        scheme, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        if scheme.lower() == "basic":
            if self.credentials is None:
                raise AuthenticationError(url, "the registry wants credentials and none are set")
            self._authorization = _basic(self.credentials)
        elif scheme.lower() == "bearer" and params.get("realm"):
            self._authorization = f"Bearer {self._fetch_token(url, params)}"
        else:
            raise AuthenticationError(url, f"unsupported authentication challenge {challenge!r}")

    def _fetch_token(self, url: str, params: dict[str, str]) -> str:
        realm = params["realm"]
        if not realm.startswith("https://") and not _is_loopback_url(realm):
            raise AuthenticationError(url, f"refusing a token realm over plain HTTP: {realm}")
        query = {"scope": f"repository:{self.ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        auth = (self.credentials.username, self.credentials.password) if self.credentials else None
        try:
            response = self.session.get(realm, params=query, auth=auth, timeout=self.timeout)
        except _transient_errors() as exc:
            raise _Transient(RegistryError(realm, f"token request failed: {exc}")) from exc
        if response.status_code != 200:
            raise AuthenticationError(
                realm, f"token request refused (HTTP {response.status_code})", response.status_code
            )
        try:
            body = response.json()
        except ValueError:
            raise AuthenticationError(realm, "token response is not JSON") from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthenticationError(realm, "token response has no token")
        return token


def _socket_of(response: requests.Response) -> socket.socket | None:
    """The socket a streamed response reads from (urllib3 keeps it on the connection,
    or, for a connection that closes after this response, only on the body's reader)."""
    raw = response.raw
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is None:
        reader = getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None)
        sock = getattr(reader, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _basic(credentials: Credentials) -> str:
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def _is_loopback_url(url: str) -> bool:
    host = url.split("://", 1)[-1].split("/", 1)[0]
    return is_loopback_host(host)


def _read_bounded(response: requests.Response, limit: int, url: str) -> bytes:
    chunks, total = [], 0
    for chunk in response.iter_content(64 * 1024):
        total += len(chunk)
        if total > limit:
            raise RegistryError(url, f"manifest larger than {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) != len(body):
        raise _Transient(SizeMismatchError(f"manifest from {url}", int(declared), len(body)))
    return body


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, _transient_errors()[0]):
        return f"cannot connect ({exc.__class__.__name__}: {str(exc)[:200]})"
    return f"{exc.__class__.__name__}: {str(exc)[:200]}"
