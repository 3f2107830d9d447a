"""A real Triton Inference Server on a model repository (`tome-deploy triton-repo`): found, started on free
loopback ports, ready when `/v2/health/ready` answers, stopped by its PID. The tests and
benchmarks/serve_vs_triton.py run Triton through it.

The binary comes from `.ci/tritonserver.sh` (the nvidia-pytriton wheel, unpacked): $TOME_TRITONSERVER
names it, else the script's default cache folder ($TOME_TRITON_HOME, or ~/.cache/tome-deploy/pytriton-0.7.0)
is tried.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tome_deploy.errors import MissingDependencyError

DEFAULT_HOME = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tome-deploy" / "pytriton-0.7.0"
HOW_TO_GET = (
    "run .ci/tritonserver.sh (downloads the nvidia-pytriton wheel and unpacks tritonserver) or set TOME_TRITONSERVER"
)
# The folder tome_deploy is imported from: Triton's Python stub puts it on sys.path (see triton_python.py).
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


@dataclass
class TritonServer:
    process: subprocess.Popen
    http_url: str  # host:port, as tritonclient takes it
    grpc_url: str
    metrics_url: str
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def tritonserver_binary(named: str | None) -> Path:
    """The tritonserver at `named` (a path), or else in the default cache folder; MissingDependencyError
    when there is none with its Python backend stub."""
    binary = (
        Path(named)
        if named
        else Path(os.environ.get("TOME_TRITON_HOME", DEFAULT_HOME))
        / "pytriton"
        / "tritonserver"
        / "bin"
        / "tritonserver"
    )
    stub = binary.parent.parent / "backends" / "python" / "triton_python_backend_stub"
    if binary.is_file() and stub.is_file():
        return binary
    raise MissingDependencyError(f"no tritonserver with the Python backend stub at {binary}; {HOW_TO_GET}")


def check_shared_libpython() -> None:
    """Triton's Python stub embeds this interpreter's libpython: MissingDependencyError when there is none."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise MissingDependencyError(
            f"this Python ({sys.executable}) has no shared libpython for Triton's Python stub to load; use a --enable-shared build"
        )


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def server_environment() -> dict[str, str]:
    """The stub embeds libpython: it must load this interpreter's (numpy 2, our packages), and it ignores
    PYTHONPATH, so model.py reads the folder this tome_deploy comes from in TOME_DEPLOY_PYTHONPATH."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    env["TOME_DEPLOY_PYTHONPATH"] = str(PACKAGE_PARENT)
    return env


def start_tritonserver(binary: Path, repository: Path, log: Path, timeout_s: float = 60.0) -> TritonServer:
    """`binary` serving `repository` on free loopback ports (HTTP, gRPC, metrics), its output in `log`;
    returns once it is ready, or stops it and raises RuntimeError (with the log's tail)."""
    check_shared_libpython()
    http_port, grpc_port, metrics_port = free_ports(3)
    command = [
        str(binary),
        f"--model-repository={repository}",
        f"--backend-directory={binary.parent.parent / 'backends'}",
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        "--allow-cpu-metrics=false",
        f"--metrics-port={metrics_port}",
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--exit-timeout-secs=5",
    ]
    with open(log, "wb") as stream:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=server_environment())
    server = TritonServer(process, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", f"127.0.0.1:{metrics_port}", log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tritonserver exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=2).status == 200:
                return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    stop_tritonserver(server)
    raise RuntimeError(f"tritonserver was not ready within {timeout_s:.0f}s:\n{server.log_tail()}")


def stop_tritonserver(server: TritonServer) -> None:
    """SIGTERM to its PID, SIGKILL after 30 s."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
