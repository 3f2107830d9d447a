"""Running the app under uvicorn on a socket we bind ourselves, so a taken port is a clear error.

Slow or idle clients cannot pin the server: at most `max_connections` connections and requests at once
(more are answered 503 by uvicorn), request headers must be complete within `header_timeout_s` of the
connection opening (or of the previous response) and at most `max_header_bytes` long, and idle keep-alive
connections close after `keep_alive_s`. The body's deadline is the app's (`ServeSettings.body_timeout_s`).
"""

from __future__ import annotations

import signal
import socket
from dataclasses import dataclass

from tome_deploy.errors import InvalidInputError


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free port (read it back with getsockname())."""
    if not 0 <= port <= 65535:
        raise InvalidInputError(f"--port {port} is not a TCP port; pass 0 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise InvalidInputError(
            f"--host {host!r} does not resolve ({err.strerror}); pass an address such as 127.0.0.1"
        ) from None
    family, kind, protocol, _, address = infos[0]
    # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets, and without it every response
    # (headers, then body) stalls on the client's delayed ACK.
    sock = socket.socket(family, kind, protocol or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise InvalidInputError(
            f"cannot listen on {host}:{port} ({err.strerror}); pass another --port (0 picks a free one)"
        ) from None
    sock.listen(2048)
    return sock


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 256
    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_header_bytes: int = 64 << 10


def header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a deadline for the request headers: uvicorn itself waits forever for a
    request that trickles in byte by byte (its keep-alive timer stops at the first byte)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            waiting_after = self.cycle  # the request whose headers came last (None: none yet)
            self.loop.call_later(timeout_s, lambda: self._close_if_no_new_request(waiting_after))

        def _close_if_no_new_request(self, waiting_after) -> None:
            if self.cycle is waiting_after and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineH11Protocol


def uvicorn_server(
    app, *, graceful_timeout_s: float = 30.0, log_level: str = "warning", limits: ConnectionLimits = ConnectionLimits()
):
    """A uvicorn Server for the app: on SIGINT/SIGTERM it stops accepting, lets in-flight requests finish
    (up to graceful_timeout_s), then runs the app's lifespan shutdown, which drains the batcher."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_timeout_s,  # type: ignore[arg-type]  # uvicorn waits float seconds
        lifespan="on",
        access_log=False,
        http=header_timeout_protocol(limits.header_timeout_s),
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )
    return uvicorn.Server(config)


def run_server(
    app,
    sock: socket.socket,
    *,
    graceful_timeout_s: float = 30.0,
    log_level: str = "warning",
    limits: ConnectionLimits = ConnectionLimits(),
) -> None:
    """Serve until SIGINT or SIGTERM (blocks). After its graceful stop uvicorn re-raises the signal it caught;
    SIGTERM, the normal way to stop a service, then returns here instead of killing the process."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn_server(app, graceful_timeout_s=graceful_timeout_s, log_level=log_level, limits=limits).run(
            sockets=[sock]
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
