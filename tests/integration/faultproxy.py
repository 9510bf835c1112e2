"""A fault-injecting HTTP proxy to put between ocistore and a real ``docker-registry``.

``FaultProxy(upstream)`` is a ``ThreadingHTTPServer`` on 127.0.0.1 in a daemon thread. Each
request (method, path, headers) is forwarded to the upstream registry with ``http.client``
and the answer streamed back, unless a fault says otherwise. Faults, set per test:

* ``fail(status, times=K, match=..., retry_after=...)``: answer ``status`` (500, 502, 503,
  429...) instead of forwarding, for the first K matching requests (``times=None``: always);
* ``cut(after=N, times=K, match=..., reset=False)``: send the full ``Content-Length`` header,
  then close the connection after N body bytes (FIN, or RST with ``reset``);
* ``stall(after=N, times=K, match=..., timeout=...)``: stop sending after N body bytes until
  ``release()`` (or the bounded timeout), then close;
* ``corrupt(match=..., at=OFFSET)``: serve the blob with its bytes changed (same length);
* ``rewrite(match=..., body=..., headers=..., length=True)``: a registry that lies about
  what it serves: the upstream's status and headers, but ``body`` instead of its body
  (``Content-Length`` follows the new body; ``length=False`` sends none, so the body ends
  with the connection) and ``headers`` instead of the upstream's (``None`` drops one);
* ``ignore_range = True``: drop ``Range`` upstream, so blobs come back whole with 200;
* ``throttle(chunk, delay)``: a slow registry (``delay`` seconds per ``chunk`` bytes);
* ``pause_after(N)``: every blob response stops once N blob body bytes were sent in total
  (``paused`` is set) until ``resume()``: a deterministic moment to kill a client.

It records every request (``requests``: method, path, headers, status, body bytes sent) and
counts blob body bytes, so tests assert what was fetched, with which ``Range``, how often.

ocistore probes HTTPS first for loopback hosts (Docker's rule); a TLS ClientHello is
answered with a plain-text 400 and the connection closed, so the client falls back to HTTP.
Every response closes its connection (``Connection: close``), which keeps cuts simple.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
_CHUNK = 64 * 1024
#: The longest any fault keeps a handler thread waiting (stall, pause).
MAX_WAIT = 30.0

Matcher = Callable[[str, str], bool]  # (method, path) -> applies


def matcher(match: str | Matcher | None) -> Matcher:
    """``None``: every blob GET; a string: GETs whose path contains it; or a callable."""
    if callable(match):
        return match
    needle = "/blobs/" if match is None else match
    return lambda method, path: method == "GET" and needle in path


@dataclass
class Fault:
    kind: str  # "status", "cut", "stall", "corrupt", "rewrite"
    match: Matcher
    times: int | None  # None: every matching request
    status: int = 0
    retry_after: str | None = None
    after: int = 0
    reset: bool = False
    timeout: float = 10.0
    at: int = 0
    body: bytes | None = None  # rewrite: served instead of the upstream's body
    headers: dict[str, str | None] = field(default_factory=dict)  # rewrite: None drops
    length: bool = True  # rewrite: send Content-Length
    applied: int = 0

    def take(self, method: str, path: str) -> bool:
        """Whether this fault applies to the request; counts it if so (call under lock)."""
        if not self.match(method, path):
            return False
        if self.times is not None and self.applied >= self.times:
            return False
        self.applied += 1
        return True


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    status: int = 0
    sent: int = 0  # body bytes sent
    fault: str = ""  # which fault acted on it, if any

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class _Throttle:
    chunk: int = _CHUNK
    delay: float = 0.0


@dataclass
class _Pause:
    after: int | None = None
    paused: threading.Event = field(default_factory=threading.Event)
    resume: threading.Event = field(default_factory=threading.Event)


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        """``upstream``: the registry's ``HOST:PORT`` (plain HTTP)."""
        self.upstream = upstream
        self.ignore_range = False
        self.requests: list[Request] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()  # ends every wait at shutdown
        self._release = threading.Event()
        self._throttle = _Throttle()
        self._pause = _Pause()
        self.blob_bytes = 0  # blob body bytes sent, all requests together
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> FaultProxy:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.proxy = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._release.set()
        self._pause.resume.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        assert self._server is not None, "start() the proxy first"
        return f"127.0.0.1:{self._server.server_address[1]}"

    # --- faults --------------------------------------------------------------------------
    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def fail(
        self,
        status: int,
        *,
        times: int | None = 1,
        match: str | Matcher | None = None,
        retry_after: str | None = None,
    ) -> Fault:
        return self._add(
            Fault("status", matcher(match), times, status=status, retry_after=retry_after)
        )

    def cut(
        self,
        after: int,
        *,
        times: int | None = None,
        match: str | Matcher | None = None,
        reset: bool = False,
    ) -> Fault:
        return self._add(Fault("cut", matcher(match), times, after=after, reset=reset))

    def stall(
        self,
        after: int,
        *,
        times: int | None = 1,
        match: str | Matcher | None = None,
        timeout: float = 10.0,
    ) -> Fault:
        self._release.clear()
        return self._add(
            Fault("stall", matcher(match), times, after=after, timeout=min(timeout, MAX_WAIT))
        )

    def release(self) -> None:
        """End every stall now (and later ones, until the next ``stall()``)."""
        self._release.set()

    def corrupt(
        self, *, match: str | Matcher | None = None, at: int = 0, times: int | None = None
    ) -> Fault:
        return self._add(Fault("corrupt", matcher(match), times, at=at))

    def rewrite(
        self,
        *,
        match: str | Matcher,
        body: bytes | None = None,
        headers: dict[str, str | None] | None = None,
        length: bool = True,
        times: int | None = None,
    ) -> Fault:
        """Answer matching requests with the upstream's status and headers, but ``body`` in
        place of its body (if given) and ``headers`` in place of its headers (case-insensitive
        names; a ``None`` value removes the header). ``length=False``: no ``Content-Length``,
        the body is delimited by closing the connection."""
        return self._add(
            Fault(
                "rewrite",
                matcher(match),
                times,
                body=body,
                headers=dict(headers or {}),
                length=length,
            )
        )

    def clear(self) -> None:
        """Remove every fault, throttle and pause (records are kept)."""
        with self._lock:
            self._faults.clear()
        self.ignore_range = False
        self._throttle = _Throttle()
        self._pause.resume.set()
        self._pause = _Pause()

    def throttle(self, chunk: int, delay: float) -> None:
        self._throttle = _Throttle(chunk, delay)

    def pause_after(self, total_blob_bytes: int) -> threading.Event:
        """Stop all blob responses once this many blob body bytes were sent (in total, from
        now on counted as ``blob_bytes``); returns the event set when that happens."""
        self._pause.resume.set()  # free anything held by a previous pause
        with self._lock:
            self.blob_bytes = 0
            self._pause = _Pause(after=total_blob_bytes)
        return self._pause.paused

    def resume(self) -> None:
        self._pause.resume.set()

    # --- records -------------------------------------------------------------------------
    def reset_records(self) -> None:
        with self._lock:
            self.requests = []
            self.blob_bytes = 0

    def blob_requests(self, digest: str | None = None) -> list[Request]:
        """GETs of blobs (of one digest if given), in arrival order."""
        with self._lock:
            records = list(self.requests)
        return [
            r
            for r in records
            if r.method == "GET"
            and "/blobs/" in r.path
            and (digest is None or r.path.endswith("/blobs/" + digest))
        ]

    def bytes_sent(self, path_contains: str = "/blobs/") -> int:
        with self._lock:
            return sum(r.sent for r in self.requests if path_contains in r.path)

    def fetched_digests(self) -> list[str]:
        """Digests of the blobs GET answered with a body (200/206), in order."""
        return [
            r.path.rsplit("/blobs/", 1)[1]
            for r in self.blob_requests()
            if r.status in (200, 206) and r.sent > 0
        ]

    # --- used by the handler -------------------------------------------------------------
    def _record(self, method: str, path: str, headers: dict[str, str]) -> Request:
        record = Request(method, path, headers)
        with self._lock:
            self.requests.append(record)
        return record

    def _take(self, method: str, path: str) -> list[Fault]:
        with self._lock:
            return [f for f in self._faults if f.take(method, path)]

    def _wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait for ``event`` at most ``timeout`` (capped); ``stop()`` sets every event."""
        return event.wait(min(timeout, MAX_WAIT))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def handle(self) -> None:
        # A TLS ClientHello starts with 0x16: answer the way Go's http server does (400 in
        # clear text) instead of waiting for a request line that never ends.
        try:
            first = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if first == b"\x16":
            with contextlib.suppress(OSError):
                self.connection.sendall(
                    b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an "
                    b"HTTPS server.\n"
                )
            self.close_connection = True
            return
        # The client may go away at any moment (killed, timed out): nothing to answer then.
        with contextlib.suppress(OSError):
            super().handle()

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_GET
    do_POST = do_GET
    do_PUT = do_GET
    do_PATCH = do_GET
    do_DELETE = do_GET

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy
        self.close_connection = True
        method, path = self.command, self.path
        headers = {k.lower(): v for k, v in self.headers.items()}
        record = proxy._record(method, path, headers)
        length = int(headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        faults = proxy._take(method, path)
        status_fault = next((f for f in faults if f.kind == "status"), None)
        if status_fault is not None:
            self._answer_status(record, status_fault)
            return
        forward = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        is_blob = "/blobs/" in path and method == "GET"
        if is_blob and proxy.ignore_range:
            forward = {k: v for k, v in forward.items() if k.lower() != "range"}
        forward["Host"] = proxy.upstream
        forward["Connection"] = "close"
        host, port = proxy.upstream.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(method, path, body=body, headers=forward)
            resp = conn.getresponse()
            self._relay(proxy, record, resp, faults, is_blob)
        finally:
            conn.close()

    def _answer_status(self, record: Request, fault: Fault) -> None:
        body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected by the fault proxy"}]}\n'
        record.status = fault.status
        record.fault = f"status {fault.status}"
        self.send_response(fault.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if fault.retry_after is not None:
            self.send_header("Retry-After", fault.retry_after)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        record.sent = len(body)

    def _relay(
        self,
        proxy: FaultProxy,
        record: Request,
        resp: http.client.HTTPResponse,
        faults: list[Fault],
        is_blob: bool,
    ) -> None:
        declared: str | None = resp.getheader("Content-Length")
        buffered: bytes | None = None
        rewrite = next((f for f in faults if f.kind == "rewrite"), None)
        overrides = {k.lower(): v for k, v in rewrite.headers.items()} if rewrite else {}
        if rewrite is not None:
            upstream = resp.read() if self.command != "HEAD" else None
            buffered = rewrite.body if rewrite.body is not None else upstream
            if buffered is not None:  # (a HEAD keeps the upstream's length unless replaced)
                declared = str(len(buffered))
            if not rewrite.length:
                declared = None
            record.fault = "rewrite"
        elif declared is None:
            buffered = resp.read() if self.command != "HEAD" else b""
            declared = str(len(buffered))
        record.status = resp.status
        self.send_response(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() in _HOP_BY_HOP or name.lower() in ("content-length", "date", "server"):
                continue
            if name.lower() in overrides:
                continue
            self.send_header(name, value)
        for name, override in overrides.items():
            if override is not None:
                self.send_header(name, override)
        if declared is not None:
            self.send_header("Content-Length", declared)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        with_body = resp.status in (200, 206)
        cut = next((f for f in faults if f.kind == "cut"), None) if with_body else None
        stall = next((f for f in faults if f.kind == "stall"), None) if with_body else None
        corrupt = next((f for f in faults if f.kind == "corrupt"), None) if with_body else None
        if cut:
            record.fault = f"cut after {cut.after}"
        elif stall:
            record.fault = f"stall after {stall.after}"
        elif corrupt:
            record.fault = f"corrupt at {corrupt.at}"
        sent = 0
        pending = buffered
        while True:
            throttle = proxy._throttle if is_blob else _Throttle()
            want = throttle.chunk
            for limit in (cut.after if cut else None, stall.after if stall else None):
                if limit is not None:
                    want = min(want, max(limit - sent, 0))
            if is_blob:
                want = self._await_pause(proxy, want)
            if want == 0:
                chunk = b""
            elif pending is not None:
                chunk, pending = pending[:want], pending[want:]
            else:
                chunk = resp.read(want)
            if chunk and corrupt and sent <= corrupt.at < sent + len(chunk):
                i = corrupt.at - sent
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
            if chunk:
                self.wfile.write(chunk)
                sent += len(chunk)
                record.sent = sent
                if is_blob:
                    with proxy._lock:
                        proxy.blob_bytes += len(chunk)
                if throttle.delay:
                    proxy._stop.wait(throttle.delay)
            if cut and sent >= cut.after:
                self._drop(cut.reset)
                return
            if stall and sent >= stall.after:
                proxy._wait(proxy._release, stall.timeout)
                self._drop(False)
                return
            if not chunk:
                return

    def _await_pause(self, proxy: FaultProxy, want: int) -> int:
        """How much of ``want`` may be sent now: up to the pause threshold, then nothing
        until ``resume()`` (bounded)."""
        pause = proxy._pause
        if pause.after is None:
            return want
        with proxy._lock:
            room = pause.after - proxy.blob_bytes
        if room > 0:
            return min(want, room)
        pause.paused.set()
        proxy._wait(pause.resume, MAX_WAIT)
        return want

    def _drop(self, reset: bool) -> None:
        self.wfile.flush()
        if reset:  # SO_LINGER 0: close sends RST instead of FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
