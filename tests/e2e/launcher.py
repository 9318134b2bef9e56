"""`python -m sdtune ...` for the end-to-end tests, without paying the imports on every run.

Each CLI run in a fresh interpreter spends most of a tiny preset's run importing torch,
diffusers, transformers and accelerate (about 8 s of the 10 to 20 s of a test's run on 2 cores,
and the e2e tests start the CLI about a hundred times). So each pytest process keeps one
*zygote*: a Python process that has imported those libraries once and then forks a child per
run. The child is a new process as far as the test can tell: its own pid (a crash hook's
SIGKILL kills it alone, and its return code is -9 as a subprocess's is), its own environment,
working directory, arguments and output files, and no state shared with other runs (each fork
copies the zygote, which itself runs nothing).

The zygote never runs a torch operation, so no OpenMP thread pool exists when it forks (a pool
inherited across fork() is what deadlocks); each child builds its own. Variables read only at
import (HF_HUB_OFFLINE, OMP_NUM_THREADS, ...) are the zygote's, which it took from the test
process: a run whose environment differs from it in any variable but SDTUNE_* and
PYTHONUNBUFFERED runs in a plain subprocess instead, as does everything when
SDTUNE_TEST_SUBPROCESS=1.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

PRELOAD = (
    "sdtune.cli",
    "sdtune.train.loop",
    "sdtune.checkpoint.export",
    "sdtune.evaluate.sampling",
    "sdtune.evaluate.judge",
    "accelerate",
)
PER_RUN = ("SDTUNE_", "PYTHONUNBUFFERED")
ROOT = Path(__file__).resolve().parents[2]


def _serve() -> None:  # the zygote's loop: one request per line on stdin
    import importlib
    import importlib.util
    import runpy

    for name in PRELOAD:
        importlib.import_module(name)
    gpu_devices = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL2
    if importlib.util.find_spec("deepspeed") is not None and not any(
        Path(d).exists() for d in gpu_devices
    ):
        # installed (the dev extra), DeepSpeed is imported by every transformers save_pretrained
        # (a run's final model): once here, not in every run. Told the CPU, as sdtune's CLI
        # tells it without a GPU, it runs no torch operation and says nothing on this pipe.
        # (Where a GPU may be, its detection would start CUDA, which a fork cannot inherit.)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        importlib.import_module("deepspeed")
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(req["cwd"])
                os.environ.clear()
                os.environ.update(req["env"])
                fd_in = os.open(os.devnull, os.O_RDONLY)
                os.dup2(fd_in, 0)
                os.close(fd_in)
                for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.argv = ["sdtune", *req["args"]]
                try:
                    runpy.run_module("sdtune", run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                    if isinstance(exc.code, str):
                        print(exc.code, file=sys.stderr)
                except BaseException:  # noqa: BLE001 - what an interpreter would print
                    import traceback

                    traceback.print_exc()
                    code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    # what wrote through the zygote's streams (a library's log handler made
                    # at its import here) goes to this child's files too
                    sys.__stdout__.flush()
                    sys.__stderr__.flush()
                finally:
                    os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
        out.flush()


class _Zygote:
    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.e2e.launcher import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=ROOT,
            env={**self.env, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])},
        )
        self._buffer = b""
        if self._line(300) != "ready":
            raise RuntimeError("the test zygote did not start")

    def _line(self, timeout: float) -> str:
        """The zygote's next line, read from its pipe unbuffered (two lines may come at once)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                raise TimeoutError
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("the test zygote exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode().strip()

    def fits(self, env: dict) -> bool:
        keys = set(env) | set(self.env)
        differ = [k for k in keys if env.get(k) != self.env.get(k)]
        return self.proc.poll() is None and all(k.startswith(PER_RUN) for k in differ)

    def run(self, args: list[str], env: dict, cwd, timeout: float):
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"args": args, "env": env, "cwd": str(cwd or os.getcwd())}
            request |= {"stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self._line(60))["pid"]
            try:
                status = json.loads(self._line(timeout))["status"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._line(60)
                raise subprocess.TimeoutExpired(["sdtune", *args], timeout) from None
            return status, out.read_text(errors="replace"), err.read_text(errors="replace")


_zygote: _Zygote | None = None
_lock = threading.Lock()


def sdtune(*args, env: dict | None = None, cwd=None, timeout: float = 600):
    """`python -m sdtune *args` as a CompletedProcess (text output captured)."""
    global _zygote
    args = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    command = [sys.executable, "-m", "sdtune", *args]
    with _lock:
        if os.environ.get("SDTUNE_TEST_SUBPROCESS") != "1":
            if _zygote is None or _zygote.proc.poll() is not None:
                _zygote = _Zygote()
            if _zygote.fits(env):
                code, out, err = _zygote.run(args, env, cwd, timeout)
                return subprocess.CompletedProcess(command, code, out, err)
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout, check=False
    )
