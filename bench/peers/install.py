"""The peers' own virtual environments: whether one is installed yet, and installing it (``install_*.sh``).

Each install script is idempotent and leaves a stamp naming the version it installed
(``.installed-<name>-<version>`` in the venv); with the stamp there, running the script does nothing. Knowing
that before running it lets ``python -m bench`` say when a first-use install (minutes) is about to start.
Standard library only.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LITELLM", "SEMANTIC_ROUTER", "PeerInstall"]

PEERS = Path(__file__).resolve().parent
BENCH = PEERS.parent


@dataclass(frozen=True)
class PeerInstall:
    """One peer's install script, the venv it makes, and the stamp that marks a finished install."""

    name: str
    script: Path
    venv: Path
    stamp_name: str  # the stamp is ``.installed-<stamp_name>-<version>``
    version_var: str  # the environment variable the script reads its version from

    def version(self) -> str | None:
        """The version the script would install: the environment's, else the script's default."""
        if os.environ.get(self.version_var):
            return os.environ[self.version_var]
        try:
            text = self.script.read_text(encoding="utf-8")
        except OSError:
            return None
        found = re.search(r"\$\{" + re.escape(self.version_var) + r":-([^}]+)\}", text)
        return found.group(1).strip() if found else None

    def installed(self) -> bool:
        """True when the stamp for this version is there (the script would do nothing)."""
        version = self.version()
        return version is not None and (self.venv / f".installed-{self.stamp_name}-{version}").exists()

    def install(self, timeout_s: float = 900.0) -> str | None:
        """Run the install script; return why the peer is unavailable, or None when it is ready."""
        try:
            done = subprocess.run(["bash", str(self.script)], capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"install took over {timeout_s:.0f} s"
        except OSError as exc:
            return f"install could not start: {exc}"
        if done.returncode != 0:
            tail = (done.stderr.strip() or done.stdout.strip())[-300:]
            return f"install failed (exit {done.returncode}): {tail}"
        return None


LITELLM = PeerInstall("LiteLLM", PEERS / "install_litellm.sh",
                      Path(os.environ.get("LITELLM_VENV", str(BENCH / ".venv-litellm"))),
                      "litellm", "LITELLM_VERSION")
SEMANTIC_ROUTER = PeerInstall("semantic-router", PEERS / "install_semantic_router.sh",
                              Path(os.environ.get("SEMANTIC_ROUTER_VENV", str(BENCH / ".venv-semantic-router"))),
                              "semantic-router", "SEMANTIC_ROUTER_VERSION")
