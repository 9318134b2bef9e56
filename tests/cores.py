"""The cores, taken in turn by the tests that need more than their share.

`make test` runs one test file per core. A test that starts several training processes uses
more than its core, and a test that times wall clock needs its core to itself: run together,
the first makes the second read a slow machine. Both take `cores()`, a file lock shared by
the workers of one pytest run, so neither ever runs beside another of them.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def cores() -> Iterator[None]:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", f"solo-{os.getpid()}")
    path = Path(tempfile.gettempdir()) / f"sdtune-tests-cores-{run}.lock"
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def free_port() -> int:
    """A TCP port free on this machine now, for a multi-process run's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
