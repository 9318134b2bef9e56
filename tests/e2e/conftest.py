import os

import pytest

from tests.e2e.launcher import sdtune


def run_cli(*args, cwd=None, check=True):
    """Run the real `sdtune` CLI in a process of its own (tests/e2e/launcher.py); returns the
    CompletedProcess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = sdtune(*args, env=env, cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"sdtune {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def cli():
    return run_cli
