"""Running the app under uvicorn on a socket we bind ourselves, so a taken port is a clear error."""

from __future__ import annotations

import signal
import socket

from tome_deploy.errors import InvalidInputError


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free port (read it back with getsockname())."""
    if not 0 <= port <= 65535:
        raise InvalidInputError(f"--port {port} is not a TCP port; pass 0 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise InvalidInputError(f"--host {host!r} does not resolve ({err.strerror}); pass an address such as 127.0.0.1") from None
    family, kind, protocol, _, address = infos[0]
    # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets, and without it every response
    # (headers, then body) stalls on the client's delayed ACK.
    sock = socket.socket(family, kind, protocol or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise InvalidInputError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port (0 picks a free one)") from None
    sock.listen(2048)
    return sock


def uvicorn_server(app, *, graceful_timeout_s: float = 30.0, log_level: str = "warning"):
    """A uvicorn Server for the app: on SIGINT/SIGTERM it stops accepting, lets in-flight requests finish
    (up to graceful_timeout_s), then runs the app's lifespan shutdown, which drains the batcher."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s, lifespan="on", access_log=False)
    return uvicorn.Server(config)


def run_server(app, sock: socket.socket, *, graceful_timeout_s: float = 30.0, log_level: str = "warning") -> None:
    """Serve until SIGINT or SIGTERM (blocks). After its graceful stop uvicorn re-raises the signal it caught;
    SIGTERM, the normal way to stop a service, then returns here instead of killing the process."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn_server(app, graceful_timeout_s=graceful_timeout_s, log_level=log_level).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
