"""HTTP limits below the app: who may call, how much they may send, how long they may take.

A local server is reachable by every process and every web page on the machine, so:

- `Guard` (ASGI middleware): the `Host` header must name this server (the bound host,
  localhost, 127.0.0.1, ::1, or one of `--allowed-hosts`), which defeats DNS rebinding; a
  POST must be `application/json`, which a web page cannot send cross-site without a
  CORS preflight that this server never grants; the body is read whole, within
  `--max-body-bytes` (413, unread past the limit) and `BODY_TIMEOUT_S` (408), before the
  app sees it.
- `guarded_h11(...)`: uvicorn's h11 protocol with a header timeout (a connection that has
  not sent a whole request head in `--header-timeout` seconds is closed) and a cap on
  open connections (more are closed at once), so half-open connections cannot exhaust
  the process's files and lock out `/health`.
"""

import asyncio
import resource
from typing import Iterable, Optional

from . import limits
from .errors import api_of, raw_response

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """The host of a `Host` header, without port or IPv6 brackets, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware: host check, JSON-only POSTs, a bounded body read within a time.

    Args:
        app: the ASGI app.
        allowed_hosts: host names the `Host` header may give ("*": any).
        max_body_bytes: the largest body accepted.
        body_timeout: seconds the whole body may take to arrive.
    """

    def __init__(
        self,
        app,
        allowed_hosts: Iterable[str] = LOCAL_HOSTS,
        max_body_bytes: int = limits.MAX_BODY_BYTES,
        body_timeout: float = limits.BODY_TIMEOUT_S,
    ):
        self.app = app
        self.hosts = {h.lower() for h in allowed_hosts}
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = api_of(scope["path"])
        headers = dict(scope["headers"])
        problem = self._check_head(scope, headers)
        if problem is None and scope["method"] == "POST":
            body, problem = await self._read_body(receive, headers)
            if body is None and problem is None:
                return  # the client left
            receive = _replay(body, receive)
        if problem is not None:
            for message in raw_response(api, *problem):
                await send(message)
            return
        await self.app(scope, receive, send)

    def _check_head(self, scope, headers) -> Optional[tuple]:
        host = headers.get(b"host", b"").decode("latin-1")
        if "*" not in self.hosts and host_name(host) not in self.hosts:
            return (
                403,
                f"Host {host!r} is not allowed; this server answers to "
                f"{', '.join(sorted(self.hosts))} (start it with --allowed-hosts to add one).",
            )
        if scope["method"] == "POST":
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                return (
                    415,
                    f"Content-Type must be application/json (got {kind.decode('latin-1')!r}).",
                )
        return None

    async def _read_body(self, receive, headers):
        """`(body, None)`, `(None, (status, message))`, or `(None, None)` if the client left."""
        length = headers.get(b"content-length")
        too_big = (
            413,
            f"The request body is larger than the server's limit of {self.max_body_bytes} "
            "bytes (--max-body-bytes).",
        )
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return None, too_big
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None, (408, f"The request body took over {self.body_timeout:g} s.")
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None, too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive):
    """A `receive` that gives the body already read, then the connection's own events."""
    done = False

    async def replay():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def guarded_h11(header_timeout: float, max_connections: int):
    """uvicorn's h11 protocol class with a header timeout and a connection cap."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _timer = None
        _waiting = None  # the cycle that was current when the timer was armed

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.abort()
                return
            self._arm()

        def _arm(self):
            self._disarm()
            self._waiting = self.cycle
            self._timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self):
            self._timer = None
            idle = self.cycle is None or self.cycle.response_complete
            if self.cycle is self._waiting and idle and not self.transport.is_closing():
                self.transport.close()  # no whole request head in time

        def data_received(self, data):
            super().data_received(data)
            if self._timer is not None and self.cycle is not self._waiting:
                self._disarm()  # a request head arrived

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request head has the same time

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11


def raise_open_file_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards `wanted` (macOS starts at 256); the limit
    now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
