"""The LiteLLM proxy as a peer: the same fast upstream behind it, the same load through it.

It runs from its own virtual environment (``bench/.venv-litellm``, made by ``install_litellm.sh`` on first use),
so nothing of it is imported here: this module only writes its config and starts ``litellm`` as a process.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx
import yaml

from bench.peers.install import LITELLM
from bench.router_bench import free_port

__all__ = ["LiteLLMProxy"]

BENCH = Path(__file__).resolve().parents[1]
VENV = LITELLM.venv
MODEL = "bench-upstream"


class LiteLLMProxy:
    """``litellm --config`` on loopback, one model routed to the upstream; ``pid`` is the proxy's process."""

    model = MODEL

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="moe-bench-litellm-"))
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> LiteLLMProxy:
        config = {
            "model_list": [{"model_name": MODEL, "litellm_params": {
                "model": f"openai/{MODEL}", "api_base": self.upstream_url, "api_key": "sk-bench-not-a-secret"}}],
            "litellm_settings": {"drop_params": True, "set_verbose": False, "telemetry": False},
        }
        path = self.workdir / "litellm.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.port = free_port()
        # No master key: the router under test has no auth either, so neither side pays for checking one.
        # Loopback only, for the length of the run.
        env = {**os.environ, "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
               "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
               "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_DOCS": "True"}
        self._log = open(self.workdir / "litellm.log", "wb")  # closed in __exit__
        self.proc = subprocess.Popen([str(VENV / "bin" / "litellm"), "--config", str(path), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--num_workers", "1"],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"litellm exited with {self.proc.returncode}; see {self.workdir / 'litellm.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health/liveliness", timeout=1).status_code == 200:
                    return self
            time.sleep(0.25)
        self.__exit__()
        raise RuntimeError("litellm did not start within 120 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
