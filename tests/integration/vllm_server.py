"""Start and stop real vLLM (CPU build) OpenAI-compatible servers for the integration tier.

vLLM lives in its own venv (``scripts/setup_vllm_venv.sh``): it pins versions the application's venv must not
have. A server is one process group, led by a small watchdog started in a new session: the API server, its
engine core and the worker are all in it, so ``kill()`` takes the whole group down at once, as a crash would,
and the watchdog takes it down if the test process dies without cleaning up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support import free_port

__all__ = [
    "SETUP_HINT",
    "ServerSpec",
    "VLLMServer",
    "VLLMServerError",
    "start_all",
    "vllm_python",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_HINT = "run `scripts/setup_vllm_venv.sh` (VLLM_VENV picks another place than .venv-vllm)"
# A cold start is ~25 s alone with --enforce-eager; two at once on two busy cores took up to 70 s here.
READY_TIMEOUT_S = float(os.environ.get("MOE_VLLM_READY_TIMEOUT_S", "240"))
# SIGTERM gives vLLM the chance to shut its engine core down cleanly before the group is killed.
STOP_GRACE_S = 20.0
# How long a SIGKILLed group may take to vanish: under load an engine core has taken 9.5 s to be torn down.
KILL_WAIT_S = 30.0

# The group leader: it runs vLLM as its child and watches its stdin, a pipe only the test process holds. If the
# test process dies (even by SIGKILL), the pipe closes and the leader takes the group down: SIGTERM first, so
# vLLM unlinks its shared memory, then SIGKILL. Without it an engine core orphaned by a killed pytest keeps
# ~2 GB of RAM forever (it does not notice its API server is gone). Only the stdlib, so any Python runs it.
#
# It also lowers the group's CPU priority (SERVER_NICE) before it starts vLLM, so every vLLM process inherits it.
# These servers share two cores with the router and the tests that drive them, and vLLM binds its worker to one of
# them; at equal priority, on this 2-vCPU VM, the test process's event loop was measured kept off the CPU for
# 3-13 s at a time while a server streamed (a send to the server returned seconds late, then every piece came at
# once), in about half the runs. Lowered, it was never held up, and the server streamed as fast. With the kernel's
# autogroups each session is weighed as one, so the session's group is lowered too (/proc/self/autogroup); a
# failure to do so is written to the server's log. Inside a non-root cgroup (most containers) autogroups do not
# apply, and the nice value alone weighs.
SERVER_NICE = 10
_WATCHDOG = """
import errno, os, signal, subprocess, sys, threading, time
nice = os.environ.get("MOE_VLLM_NICE", "0")
os.nice(int(nice))
for attempt in range(20):  # the kernel takes one autogroup change per ~100 ms from a non-root user (EAGAIN)
    try:
        with open("/proc/self/autogroup", "w") as group:
            group.write(nice)
        break
    except FileNotFoundError:
        break  # no autogroups: the nice value alone weighs
    except OSError as exc:
        if exc.errno != errno.EAGAIN or attempt == 19:
            print(f"watchdog: the server's autogroup keeps its priority ({exc})", file=sys.stderr, flush=True)
            break
        time.sleep(0.12)
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
signal.signal(signal.SIGTERM, lambda *_: None)  # the group's SIGTERM is for vLLM; stop() ends us after it
def orphaned():
    sys.stdin.buffer.read()
    os.killpg(0, signal.SIGTERM)
    time.sleep(float(os.environ.get("MOE_WATCHDOG_GRACE_S", "10")))
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=orphaned, daemon=True).start()
sys.exit(child.wait())
"""


class VLLMServerError(RuntimeError):
    """A server could not be started or died while starting; the message ends with its log's tail."""


def _proc_stat(pid: int) -> tuple[str, list[str]] | None:
    """A process's name and the fields after it in /proc/<pid>/stat (state, parent pid, ...); None once gone."""
    try:
        name, rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
    except (OSError, ValueError):
        return None
    return name.split("(", 1)[-1], rest.split()


def _proc_state(pid: int) -> str:
    """A process's state letter and name from /proc (``D`` is uninterruptible sleep in the kernel)."""
    stat = _proc_stat(pid)
    return "gone" if stat is None else f"{stat[1][0]} {stat[0]}"


def vllm_python() -> Path:
    """The vLLM venv's interpreter. Raises ``VLLMServerError`` with the setup hint if it is missing."""
    venv = Path(os.environ.get("VLLM_VENV", ".venv-vllm"))
    if not venv.is_absolute():
        venv = REPO_ROOT / venv
    python = venv / "bin" / "python"
    if not python.exists():
        raise VLLMServerError(f"no vLLM venv at {venv}: {SETUP_HINT}")
    if not (venv / ".moe-vllm-setup").exists():
        raise VLLMServerError(f"the vLLM venv at {venv} is incomplete (no setup marker): {SETUP_HINT}")
    return python


@dataclass(frozen=True)
class ServerSpec:
    """What to serve. ``extra_args`` go after the standard ones, e.g.
    ``("--enable-auto-tool-choice", "--tool-call-parser", "hermes")`` for the tool-calling tests."""

    served_name: str
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


class VLLMServer:
    """One vLLM OpenAI-compatible server serving ``model_dir`` as ``spec.served_name`` on 127.0.0.1."""

    def __init__(self, model_dir: Path, spec: ServerSpec, work_dir: Path, *, python: Path | None = None,
                 port: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.spec = spec
        self.name = spec.served_name
        self.work_dir = Path(work_dir)
        self.python = python or vllm_python()
        self.port = port or free_port()
        self.log_path = self.work_dir / f"vllm-{self.name}.log"
        self.start_seconds: float | None = None
        self.peak_rss_bytes = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._ended = False
        self._shm: set[Path] = set()
        self._started_at = 0.0

    @property
    def url(self) -> str:
        """The OpenAI base URL, as an expert's ``endpoint`` takes it."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pgid(self) -> int | None:
        """The process group: the watchdog that leads it, the API server, engine core and worker."""
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        return [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--dtype", "float32",
            "--max-model-len", "512",
            "--enforce-eager",
            *self.spec.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.update(
            PATH=f"{self.python.parent}{os.pathsep}{env.get('PATH', '')}",
            VLLM_CPU_KVCACHE_SPACE="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            VLLM_CACHE_ROOT=str(self.work_dir / "vllm-cache"),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.spec.env)
        return env

    def start(self) -> None:
        """Launch the server and return at once; ``wait_ready`` waits for it."""
        if self._proc is not None:
            raise VLLMServerError(f"{self.name}: already started")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            # cwd is the scratch folder, not the repo: `python -m` puts cwd first on sys.path.
            self._proc = subprocess.Popen(
                [str(self.python), "-c", _WATCHDOG, *self.command()], cwd=self.work_dir,
                env={**self.environment(), "MOE_VLLM_NICE": str(SERVER_NICE)}, stdin=subprocess.PIPE, stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._started_at = time.monotonic()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until ``GET /v1/models`` answers 200; raise ``VLLMServerError`` with the log tail if not."""
        proc = self._require_proc()
        deadline = self._started_at + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                if proc.poll() is not None:
                    self._fail(f"exited with status {proc.returncode} while starting")
                try:
                    models = client.get(f"{self.url}/models")
                except httpx.TransportError:
                    models = None
                if models is not None and models.status_code == 200:
                    # The port was free when chosen, not necessarily when vLLM bound it: make sure the server
                    # answering is ours, not a concurrent test run's.
                    if self.name not in {m.get("id") for m in models.json().get("data", [])}:
                        self.kill()
                        self._fail("lost its port to another server")
                    self.start_seconds = time.monotonic() - self._started_at
                    self.measure_rss()
                    return
                if time.monotonic() > deadline:
                    self.kill()
                    self._fail(f"not ready after {timeout_s:.0f} s")
                time.sleep(0.5)

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def group_pids(self) -> list[int]:
        """Every live process in the server's process group (API server, engine core, worker)."""
        if self._proc is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                # Field 5 of /proc/PID/stat is the process group; the name in field 2 may hold spaces.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == self._proc.pid and fields[0] != "Z":
                pids.append(int(entry.name))
        return pids

    def api_server_pid(self) -> int | None:
        """The API server: the watchdog's child, and a container's main process (PID 1) in a deployment."""
        if self._proc is None:
            return None
        for pid in self.group_pids():
            stat = _proc_stat(pid)
            if stat is not None and int(stat[1][1]) == self._proc.pid:
                return pid
        return None

    def terminate(self) -> None:
        """SIGTERM the API server alone, as Docker and Kubernetes stop a container: its main process gets the
        signal and shuts its engine core and worker down itself. ``stop()`` still cleans up after."""
        pid = self.api_server_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def rss_bytes(self) -> int:
        """Resident memory of the whole process group."""
        total = 0
        for pid in self.group_pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total

    def measure_rss(self) -> int:
        """``rss_bytes()``, also kept in ``peak_rss_bytes`` (the largest seen) for the session summary."""
        rss = self.rss_bytes()
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        return rss

    @property
    def peak_rss_gib(self) -> float:
        return self.peak_rss_bytes / 2**30

    def shm_paths(self) -> set[Path]:
        """The /dev/shm segments the group has mapped: the engine core's and worker's message queues."""
        paths = set()
        for pid in self.group_pids():
            try:
                maps = Path(f"/proc/{pid}/maps").read_text()
            except OSError:
                continue
            for line in maps.splitlines():
                # The path is the 6th field; a segment already unlinked shows as "... (deleted)".
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/dev/shm/") and not fields[5].endswith(")"):
                    paths.add(Path(fields[5]))
        return paths

    def kill(self, *, wait: bool = True) -> None:
        """SIGKILL the whole process group, as a crash or OOM kill would, and reap the API server.

        With ``wait=False`` it returns as soon as the signal is sent and the API server reaped; the engine core
        and worker can take seconds more to die while the kernel tears down their mappings, so a caller that
        must not block on that (a kill in the middle of a load run) calls ``wait_gone()`` afterwards.
        """
        self.measure_rss()
        self._kill_group(wait=wait)

    def freeze(self) -> None:
        """SIGSTOP the whole process group: generation halts at once, mid-stream, and nothing more is sent.
        A syscall, so it can run on the event loop; ``kill`` (which reads the group's memory and shared-memory
        files first) then takes the frozen group down."""
        self._signal_group(signal.SIGSTOP)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the group, then SIGKILL whatever is left after ``grace_s``. Safe to call twice."""
        if self._proc is None or self._ended:
            return
        deadline = time.monotonic() + grace_s
        self._signal_group(signal.SIGTERM)
        # The engine core and worker outlive the API server by a moment while they release shared memory.
        while self.group_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._kill_group()

    def _kill_group(self, *, wait: bool = True) -> None:
        if self._proc is None:
            return
        # A SIGKILLed group takes its resource tracker down with it, so nobody unlinks the ~400 MB of message
        # queues in /dev/shm (RAM-backed): note them first, unlink them once the group is gone.
        self._shm |= self.shm_paths()
        self._ended = True
        self._signal_group(signal.SIGKILL)
        self._proc.wait()
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        if wait:
            self.wait_gone()

    def wait_gone(self, timeout_s: float = KILL_WAIT_S) -> None:
        """Wait until no process of the group is left, then unlink its /dev/shm queues. Raises if one outlives
        ``timeout_s`` after SIGKILL (a process stuck in the kernel, which the caller should hear about)."""
        deadline = time.monotonic() + timeout_s
        while self.group_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.group_pids()
        if not left:
            for path in self._shm:
                path.unlink(missing_ok=True)
            self._shm.clear()
            return
        states = {pid: _proc_state(pid) for pid in left}
        self._fail(f"still has processes {states} {timeout_s:.0f} s after SIGKILL")

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise VLLMServerError(f"{self.name}: not started")
        return self._proc

    def _fail(self, why: str) -> None:
        raise VLLMServerError(f"vLLM server {self.name} on port {self.port} {why}; log {self.log_path}:\n"
                              f"{self.log_tail()}")

    def __repr__(self) -> str:
        return f"VLLMServer({self.name!r}, url={self.url!r}, alive={self.is_alive()})"


def start_all(model_dir: Path, specs: Sequence[ServerSpec], work_dir: Path,
              timeout_s: float = READY_TIMEOUT_S) -> list[VLLMServer]:
    """Start one server per spec at the same time and wait for all; on any failure stop them all."""
    python = vllm_python()
    servers = [VLLMServer(model_dir, spec, work_dir, python=python) for spec in specs]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(timeout_s)
    except BaseException:
        for server in servers:
            server.stop(grace_s=5.0)
        raise
    return servers


if __name__ == "__main__":
    # Manual use: python -m tests.integration.vllm_server MODEL_DIR [NAME ...]; Ctrl-C stops them.
    names = sys.argv[2:] or ["tiny-a"]
    started = start_all(Path(sys.argv[1]), [ServerSpec(n) for n in names], Path("out/vllm"))
    for s in started:
        print(f"{s.name}: {s.url} ready in {s.start_seconds:.1f} s, rss {s.rss_bytes() / 2**30:.2f} GiB")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for s in started:
            s.stop()
