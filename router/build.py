"""Building the serving objects from a validated config: experts, the trained gate, the orchestrator."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from experts.base import Expert, ExpertContext
from experts.registry import build_expert
from router.config import RouterConfig
from router.orchestrator import Orchestrator

if TYPE_CHECKING:
    from router.gate import Gate

__all__ = ["GateNotTrained", "build_experts", "build_orchestrator", "load_gate"]


class GateNotTrained(FileNotFoundError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"no trained gate at {path}; train one with: moe train --config <this config>")
        self.path = path


def build_experts(config: RouterConfig, context: ExpertContext | None = None) -> dict[str, Expert]:
    context = context or ExpertContext(base_dir=Path(config.base_dir))
    return {e.name: build_expert(e, context) for e in config.experts}


def load_gate(config: RouterConfig) -> Gate:
    """The trained gate named by the config, refused when its encoder or experts do not match the config."""
    from router.encoders import build_encoder
    from router.gate import Gate

    path = config.resolve(config.gate.artifact)
    if not (path / "gate.json").exists():
        raise GateNotTrained(path)
    gate = Gate.load(path, build_encoder(config.gate.encoder))
    gate.check_experts(config.expert_names)
    return gate


def build_orchestrator(config: RouterConfig, *, context: ExpertContext | None = None,
                       gate: Gate | None = None) -> Orchestrator:
    return Orchestrator(config, gate or load_gate(config), build_experts(config, context))
