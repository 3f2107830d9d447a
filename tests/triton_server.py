"""tome_deploy/serving/tritonserver.py for the tests: where the binary or a shared libpython is missing,
a test skips with one line saying how to get it, unless $TOME_TRITONSERVER names the binary (CI sets it):
then a missing or broken server fails the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tome_deploy.errors import MissingDependencyError
from tome_deploy.serving.tritonserver import (
    TritonServer,
    check_shared_libpython,
    stop_tritonserver,
    tritonserver_binary,
)
from tome_deploy.serving.tritonserver import start_tritonserver as start_binary

__all__ = ["start_tritonserver", "stop_tritonserver"]


def start_tritonserver(repository: Path, log: Path, timeout_s: float = 60.0) -> TritonServer:
    named = os.environ.get("TOME_TRITONSERVER")
    try:
        binary = tritonserver_binary(named)
        check_shared_libpython()
    except MissingDependencyError as err:
        if named:  # CI asked for a real server: a missing one is a failure, not a skip
            pytest.fail(f"{err} ($TOME_TRITONSERVER)")
        pytest.skip(str(err))
    return start_binary(binary, repository, log, timeout_s)
