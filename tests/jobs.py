"""Subprocess jobs (single processes or ``torchrun`` jobs) that cannot hang the suite.

Each job's processes are told apart by a tag in their environment, which every process it starts
inherits (torchrun puts each rank in a session of its own, and a rank whose launcher died is
re-parented, so neither the process tree nor the session finds them all). Output goes to files
rather than pipes: a rank left running would otherwise hold a pipe open, and reading it would
block. A job that outlives
its timeout has the stacks of its processes printed — native ones through ``py-spy`` where that
is installed, and always the Python stacks of every thread, by ``SIGABRT`` under
``PYTHONFAULTHANDLER`` — then all its processes are killed and :class:`JobHung` is raised with
those stacks. A job whose launcher exited but left one of its processes running fails too
(:class:`JobLeftProcesses`): on a cluster such a rank would hold its GPU.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STACK_DUMP_WAIT_S = 2.0  # for faulthandler to write the stacks after SIGABRT
LEFTOVER_GRACE_S = 5.0  # how long processes of a finished job may take to exit
JOB_TAG_VAR = "DIFFMOE_TEST_JOB"  # set to a tag of its own in each job's environment


class JobHung(AssertionError):
    """The job did not end within its timeout; the message holds its processes' stacks."""


class JobLeftProcesses(AssertionError):
    """The job's main process ended but left others of the job running."""


@dataclass
class Job:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1",
                PYTHONUNBUFFERED="1", **extra)


def job_pids(tag: str) -> list[int]:
    """The live processes whose environment holds ``JOB_TAG_VAR=tag`` (Linux /proc): the job's
    launcher and everything it started, also after they were re-parented or, like torchrun's
    ranks, put in sessions of their own."""
    needle = f"{JOB_TAG_VAR}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":  # a zombie: already ended
                continue
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ:
            pids.append(int(entry))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


def _native_stacks(pids: list[int]) -> str:
    spy = shutil.which("py-spy")
    if spy is None:
        return ""
    out = []
    for pid in pids:
        try:
            res = subprocess.run([spy, "dump", "--native", "--pid", str(pid)],
                                 capture_output=True, text=True, timeout=30)
            out.append(f"--- py-spy dump --native --pid {pid}\n{res.stdout}{res.stderr}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            out.append(f"--- py-spy on {pid} failed: {exc}")
    return "\n".join(out)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Running:
    """A started job; :meth:`finish` waits for it under the timeout."""

    def __init__(self, cmd: list[str], env: dict[str, str], timeout_s: float):
        self.cmd, self.timeout_s = cmd, timeout_s
        self.out = tempfile.TemporaryFile(mode="w+")
        self.err = tempfile.TemporaryFile(mode="w+")
        self.start = time.perf_counter()
        self.tag = uuid.uuid4().hex
        self.proc = subprocess.Popen(cmd, env=dict(env, **{JOB_TAG_VAR: self.tag}),
                                     stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def pids(self) -> list[int]:
        return job_pids(self.tag)

    def _read(self) -> tuple[str, str]:
        for fh in (self.out, self.err):
            fh.flush()
            fh.seek(0)
        return self.out.read(), self.err.read()

    def finish(self, check_leftovers: bool = True, leftover_grace_s: float = LEFTOVER_GRACE_S,
               within_s: float | None = None) -> Job:
        """Wait for the job until its timeout (counted from its start), or for ``within_s``
        from now if given."""
        if within_s is not None:
            self.timeout_s = time.perf_counter() - self.start + within_s
        try:
            self.proc.wait(timeout=max(0.0, self.timeout_s - (time.perf_counter() - self.start)))
        except subprocess.TimeoutExpired:
            self._hung()
        seconds = time.perf_counter() - self.start
        left = self._wait_for_job_to_end(leftover_grace_s)
        if left and check_leftovers:
            what = "; ".join(f"{pid}: {_cmdline(pid)}" for pid in left)
            stacks = _native_stacks(left)
            self._abort_all(left)
            out, err = self._read()
            raise JobLeftProcesses(f"{self.cmd[:6]} exited ({self.proc.returncode}) but left "
                                   f"{len(left)} process(es) running: {what}\n{stacks}\n"
                                   f"stderr:\n{err[-6000:]}")
        kill_all(left)
        out, err = self._read()
        return Job(self.proc.returncode, out, err, seconds)

    def _wait_for_job_to_end(self, seconds: float) -> list[int]:
        deadline = time.monotonic() + seconds
        while (left := self.pids()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def _abort_all(self, pids: list[int]) -> None:
        """SIGABRT each process in turn (faulthandler prints every thread's stack; one at a
        time, so that stacks written to a shared stderr do not interleave), then kill all."""
        for pid in pids:
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + STACK_DUMP_WAIT_S
            while pid in self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
        kill_all(self.pids())

    def _hung(self) -> None:
        pids = self.pids()
        listing = "\n".join(f"  {pid}: {_cmdline(pid)}" for pid in pids)
        stacks = _native_stacks(pids)
        self._abort_all(pids)
        self.proc.wait()
        _, err = self._read()
        raise JobHung(f"{' '.join(self.cmd[:8])} ... did not end within {self.timeout_s:.0f} s; "
                      f"its processes:\n{listing}\n{stacks}\nstderr (Python stacks after "
                      f"SIGABRT at the end):\n{err[-40000:]}")


def run(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> Job:
    return Running(cmd, env or job_env(), timeout_s).finish()


def torchrun_cmd(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]


def torchrun(args: list[str], timeout_s: float, env: dict[str, str] | None = None,
             nproc: int = 2) -> Job:
    """``args`` (a script and its arguments, or ``-m module ...``) under ``nproc``-process
    torchrun."""
    return run(torchrun_cmd(args, nproc), timeout_s, env)
