"""Worker threads with OS-level names, so `top -H`, `ps -L`, perf and /proc/PID/task/*/comm tell which
tome-serve thread spends the CPU: "tome-infer" (the model), "tome-decode" (request decoding). The event
loop is the process's main thread; threads ONNX Runtime starts itself keep the name of the thread that
created them. Python 3.11 names its threads for itself only, hence prctl(PR_SET_NAME) on Linux.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

PR_SET_NAME = 15
OS_NAME_BYTES = 15  # Linux keeps 15 bytes of a thread name (16 with the NUL)


def name_os_thread(name: str) -> None:
    """Give the calling thread this OS-level name (Linux; elsewhere nothing happens)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:OS_NAME_BYTES], 0, 0, 0)
    except (OSError, AttributeError):  # no prctl in this libc: the thread keeps its inherited name
        pass


def _name_after_python_thread() -> None:
    name_os_thread(threading.current_thread().name)


def named_executor(prefix: str, max_workers: int | None = None) -> ThreadPoolExecutor:
    """A thread pool whose threads carry `prefix`_N as their Python and OS names."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=prefix, initializer=_name_after_python_thread)
