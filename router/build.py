"""Building the serving objects from a validated config: experts, the trained gate, the orchestrator."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from experts.base import Expert, ExpertContext
from experts.errors import ExpertConfigError
from experts.registry import build_expert
from router.breaker import Breakers
from router.config import CascadeConfig, ExpertConfig, GateConfig, RouterConfig
from router.config.checks import name_list
from router.expert_types import EXPERT_TYPES
from router.orchestrator import Orchestrator

if TYPE_CHECKING:
    from router.cascade import CascadeGate
    from router.encoders import Encoder
    from router.gate import Gate
    from router.gate_artifact import GateMetadata
    from router.state_redis import SharedState
    from router.vote_weights import VoteWeights

__all__ = ["BuildCommits", "GateNotTrained", "VoteWeightsMismatch", "VoteWeightsNotTrained", "build_breakers",
           "build_experts", "build_nested", "build_orchestrator", "build_shared_state", "config_inputs",
           "deferred_commits", "load_gate", "load_problem", "load_vote_weights", "loading_problems",
           "nested_loading_problems",
           "reset_changed_breakers", "untrained_settings"]


log = logging.getLogger(__name__)

_Stage = TypeVar("_Stage", GateConfig, CascadeConfig)
_K = TypeVar("_K")
_T = TypeVar("_T")
_Key = tuple[str, str]  # a nested router's: the expert's name, and its config file's path


class GateNotTrained(FileNotFoundError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"no trained gate at {path}; train one with: moe train --config <this config>")
        self.path = path


class VoteWeightsMismatch(ValueError):
    """The learned vote weights beside the artifact name none of the config's experts."""


class VoteWeightsNotTrained(FileNotFoundError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"combiner.vote_weights is 'learned' but {path} holds no vote_weights.json; train them "
                         "from outcome records that carry 'answers' with: moe train --config <this config>")
        self.path = path


def build_experts(config: RouterConfig, context: ExpertContext | None = None) -> dict[str, Expert]:
    context = replace(context or ExpertContext(base_dir=Path(config.base_dir)),
                      log_content=config.service.log_content)
    experts = {e.name: build_expert(e, context, EXPERT_TYPES) for e in config.experts}
    if config.tracing.enabled:
        from router.tracing import traced

        experts = {name: traced(expert, config.tracing) for name, expert in experts.items()}
    return experts


def build_shared_state(config: RouterConfig, environ: Mapping[str, str]) -> SharedState:
    """The stores ``state:`` names (``router.state_redis``); per-process ones for ``backend: memory``."""
    from router.state_redis import build_shared_state as build

    return build(config.state, environ)


def build_breakers(config: RouterConfig, state: SharedState | None = None) -> Breakers:
    # A half-open probe outlives no request's deadline: past it, a probe whose end a shared store lost is over.
    # Each breaker is kept under its expert's service identity too: replicas (or a process across a reload) that
    # point one expert at different services never share what they learned of them.
    lease, services = config.fallback.deadline_s, {e.name: e.service_identity() for e in config.experts}
    if state is None:
        return Breakers(config.fallback.breaker, probe_lease_s=lease, services=services)
    if not state.shared:  # this process's store, kept across reloads
        return Breakers(config.fallback.breaker, state.breaker_store, probe_lease_s=lease, services=services)
    # A shared store compares times taken on different hosts: a wall clock, not this process's monotonic one.
    return Breakers(config.fallback.breaker, state.breaker_store, clock=time.time, probe_lease_s=lease,
                    services=services)


def load_gate(config: RouterConfig, encoders: Mapping[str, Encoder] | None = None) -> Gate | CascadeGate:
    """The trained gate named by the config, over the config's experts. ``encoders``: encoders already loaded,
    by their settings (``gate_encoders``); one with a stage's settings is used, any other is built.

    Refused when its encoder differs, or when a config expert has neither training data in the artifact nor
    examples in the config. Experts added with examples are routed by cold start; removed ones are dropped
    (``Gate.for_config``). A two-stage gate fitted for other ``gate.cascade`` targets is fitted again for the
    config's (``CascadeGate.with_targets``).
    """
    from router.files import recover
    from router.gate import Gate
    from router.gate_artifact import GateArtifactMismatch, is_trained

    path = config.resolve(config.gate.artifact)
    if path.exists() and not path.is_dir():
        raise GateArtifactMismatch(f"{path}: exists and is not a folder; a gate artifact is the folder moe train "
                                   "writes (moe train --config <this config>)")
    if path.is_dir():
        recover(path)  # a moe train killed while it renamed its files into place: finished before reading
    if not is_trained(path):
        raise GateNotTrained(path)
    loaded = gate_encoders(config, encoders or {})
    full = loaded[config.gate.encoder.model_dump_json()]
    if config.gate.cascade is not None:
        from router.cascade import CascadeGate

        cascade = config.gate.cascade
        pair = CascadeGate.load(path, loaded[cascade.encoder.model_dump_json()], full)
        _warn_untrained_settings(path, pair.metadata, config, trained=pair.full)
        return pair.with_targets(agreement=cascade.agreement, familiar=cascade.familiar).for_config(config)
    gate = Gate.load(path, full)
    _warn_untrained_settings(path, gate.metadata, config, trained_cost_weight=getattr(gate, "cost_weight", None),
                             trained=gate)
    return gate.for_config(config)


def untrained_settings(metadata: GateMetadata, gate: GateConfig) -> list[str]:
    """The training settings of ``gate`` (a config's) that differ from those the artifact with ``metadata`` was
    trained with, one line each: ``classifier`` and ``balance`` for a label gate, ``success_model`` for an outcome
    gate. They take effect only through ``moe train``; an artifact that does not record one is not compared."""
    if metadata.kind == "label":
        wanted = {"classifier": (gate.classifier, metadata.classifier), "balance": (gate.balance, metadata.balance)}
    else:
        wanted = {"success_model": (gate.success_model, metadata.classifier)}
    drift = [f"gate.{key} is {said!r} but the artifact was trained with {trained!r}"
             for key, (said, trained) in wanted.items() if trained is not None and said != trained]
    if metadata.kind == "label" and gate.cost_weight:
        # The knob of an outcome gate (trained on outcome records): a label gate has no cost term to weigh.
        drift.append(f"gate.cost_weight is {gate.cost_weight:g}, which only an outcome gate reads, but the artifact "
                     "is a label gate (trained on labelled queries), so it routes without cost")
    return drift


def _train_data_kind(config: RouterConfig) -> str | None:
    """``outcome`` or ``label``: the kind of gate ``gate.train_data`` trains, by the first record of its first file
    that holds one; None without training data, or where that file is not here (a serving container holds only
    the artifact)."""
    from router.outcome import train_file_kind

    for entry in config.gate.train_data:
        try:
            kind = train_file_kind(config.resolve(entry))
        except OSError:
            return None
        if kind is not None:
            return kind
    return None


def untrained_examples(config: RouterConfig, trained: tuple[list[str], list[str]]) -> dict[str, int]:
    """For a label gate trained on ``trained`` (its texts and labels): per expert it was trained on, how many of
    the config's ``examples`` for it are not among them (added or edited since ``moe train``, read as the encoder
    reads them, ``router.gate.text_key``). A trained expert is routed as trained: they count only once retrained.
    """
    from router.gate import text_key

    given = {e.name: e.examples for e in config.routed_experts if e.examples}
    known: dict[str, set[str]] = {}
    for text, label in zip(*trained, strict=True):
        if label in given and text is not None:  # only the experts with examples to compare: no other text keyed
            known.setdefault(label, set()).add(text_key(text))
    found = {name: sum(text_key(x) not in known[name] for x in examples)
             for name, examples in given.items() if name in known}
    return {name: n for name, n in found.items() if n}


def _warn_untrained_settings(path: Path, metadata: GateMetadata, config: RouterConfig, *,
                             trained_cost_weight: float | None = None, trained: Gate | None = None) -> None:
    """Log what of ``config`` the artifact was not trained with (``untrained_settings``, the kind of gate its
    training data trains; new ``examples`` of the experts a label gate, ``trained``, was trained on), and,
    for an outcome gate, a cost weight other than the one it was tuned at and panels sized on weights a cost weight
    flattens."""
    drift = untrained_settings(metadata, config.gate)
    if trained is not None:
        drift.extend(_expert_drift(trained.trained_experts, [e.name for e in config.routed_experts]))
    if metadata.kind == "label" and trained is not None:  # an outcome gate's texts are never copied for it
        new = untrained_examples(config, trained.training_examples)
        if new:
            drift.append("the examples of trained expert(s) " + ", ".join(f"{name} ({n} new)" for name, n in
                                                                      new.items())
                         + " are not in the artifact's training data (an expert the artifact was trained on routes "
                           "as trained; only a new expert is routed from its examples at once)")
    lam = config.gate.cost_weight
    if metadata.kind == "outcome" and trained_cost_weight is not None and lam != trained_cost_weight:
        # with_cost_weight re-tunes the margin and temperature on the stored out-of-fold predictions; the success
        # model's own settings (neighbours, shrinkage) were chosen for the trained weight.
        drift.append(f"gate.cost_weight is {lam:g} but the artifact was tuned at {trained_cost_weight:g}: it is "
                     f"served re-tuned (margin and temperature), and moe train at {lam:g} also re-chooses its "
                     "success model (3 points more accurate on RouterBench's test split at 0.2)")
    if metadata.kind == "outcome" and lam > 0 and config.gate.top_k.policy != "fixed":
        log.warning("%s: gate.top_k.policy %r sizes panels on the outcome gate's weights, which flatten as "
                    "gate.cost_weight rises (RouterBench: 2.7 experts a query at 0.5, 3 at 5), so a higher cost weight "
                    "can make each request dearer; policy fixed keeps the panel's size", path,
                    config.gate.top_k.policy)
    data_kind = _train_data_kind(config)
    if data_kind is not None and data_kind != metadata.kind:
        held = "outcome records" if data_kind == "outcome" else "labelled queries"
        drift.insert(0, f"gate.train_data holds {held}, which train {'an' if data_kind == 'outcome' else 'a'} "
                        f"{data_kind} gate, but the artifact is {'an' if metadata.kind == 'outcome' else 'a'} "
                        f"{metadata.kind} gate")
    if drift:
        log.warning("%s: %s; the gate routes as trained until moe train retrains it with this config",
                    path, "; ".join(drift))


def _expert_drift(trained: Sequence[str], routed: Sequence[str]) -> list[str]:
    """What a config dropped of the experts the artifact was trained on: they are not routed, and their queries go
    to the others. A new expert with the same name but for case (or spacing) is named beside it: a rename, which
    routes the renamed expert from its config examples alone until ``moe train``. Experts only added say nothing
    (a cold start, ``router.coldstart``)."""
    from router.gate import respelled

    configured = set(routed)
    gone = [e for e in trained if e not in configured]
    if not gone:
        return []
    known = set(trained)
    renamed = [f"{e!r} as {now!r}" for e, now in respelled(gone, [e for e in routed if e not in known]).items()]
    return [f"the artifact's expert(s) {name_list(gone)} are not among the config's routed experts, so they are not "
            "routed" + (f" (the config now spells {', '.join(renamed)}, routed from its config examples alone)"
                        if renamed else "")]


def gate_encoders(config: RouterConfig, kept: Mapping[str, Encoder]) -> dict[str, Encoder]:
    """The encoders the config's gate uses (its own, and a two-stage gate's fast one), by their settings: those
    in ``kept`` with the same settings reused (a hot reload that leaves ``gate.encoder`` alone keeps the loaded
    model), the rest built."""
    from router.encoders import build_encoder

    used = [config.gate.encoder] + ([config.gate.cascade.encoder] if config.gate.cascade is not None else [])
    return {cfg.model_dump_json(): kept.get(cfg.model_dump_json()) or build_encoder(cfg) for cfg in used}


def load_vote_weights(config: RouterConfig) -> VoteWeights | None:
    """The learned vote weights beside the gate artifact when ``combiner.vote_weights`` is ``learned``, else
    None. Weights of experts no longer in the config are dropped."""
    if config.combiner.vote_weights != "learned":
        return None
    from router.vote_weights import VoteWeights

    path = config.resolve(config.gate.artifact)
    learned = VoteWeights.load(path)
    if learned is None:
        raise VoteWeightsNotTrained(path)
    weights = learned.restrict(config.expert_names)
    if not weights.experts:
        raise VoteWeightsMismatch(f"{path}: the learned vote weights name none of the config's experts "
                                  f"({', '.join(learned.experts)}); retrain with: moe train --config <this config>")
    return weights


def build_orchestrator(config: RouterConfig, *, context: ExpertContext | None = None,
                       gate: Gate | CascadeGate | None = None, state: SharedState | None = None) -> Orchestrator:
    """The orchestrator ``config`` describes. ``state``: what outlives one config (``SharedState``); the routers
    nested in this one (``type: router`` with ``router_config``) get theirs from it, one per nested router
    (``build_nested``), so a reload keeps their breakers, in-flight counts and encoders as it keeps ours.

    What the build changes in ``state`` (the encoders kept, the nested routers' states) is applied once the whole
    build has succeeded, or, inside ``deferred_commits``, when its caller applies it: a refused reload leaves the
    running config's."""
    outer = _commits.get()
    with contextlib.ExitStack() as stack:
        commits = outer if outer is not None else stack.enter_context(deferred_commits())
        encoders = None if state is None or gate is not None else gate_encoders(config, state.encoders)
        loaded = gate or load_gate(config, encoders)
        scope = None if state is None else _Scope(state)
        token = _scope.set(scope)
        try:
            experts = build_experts(config, context)
        finally:
            _scope.reset(token)
        built = Orchestrator(config, loaded, experts, breakers=build_breakers(config, state),
                             in_flight=None if state is None else state.in_flight,
                             limits=None if state is None else state.limits,
                             vote_weights=load_vote_weights(config))
        if state is not None:
            commits.add(functools.partial(_keep, state.limits, {e.name: e.max_concurrency for e in config.experts}))
        if state is not None and encoders is not None:
            commits.add(functools.partial(_keep, state.encoders, encoders))
        if scope is not None:
            commits.add(functools.partial(_keep, scope.state.nested, scope.used))
    if outer is None:
        commits.apply()
    return built


class BuildCommits:
    """What builds change in the shared state, held until ``apply``: the encoders kept, the nested routers'
    states, their breakers reset for changed experts. Dropped unapplied when the build is refused."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []

    def add(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def apply(self) -> None:
        steps, self._steps = self._steps, []
        for step in steps:
            step()


_commits: ContextVar[BuildCommits | None] = ContextVar("moe_build_commits", default=None)


@contextlib.contextmanager
def deferred_commits() -> Iterator[BuildCommits]:
    """Builds inside this block (on this thread, nested routers' included) leave their changes to the shared state
    in the ``BuildCommits`` it yields, for the caller to ``apply`` once it serves what they built (a reload: at the
    swap, never for a refused one)."""
    commits = BuildCommits()
    token = _commits.set(commits)
    try:
        yield commits
    finally:
        _commits.reset(token)


def _keep(kept: dict[_K, _T], now: Mapping[_K, _T]) -> None:
    """``kept`` holds ``now`` and nothing else (what the latest build uses: an old encoder or a removed nested
    router's state is let go)."""
    kept.clear()
    kept.update(now)


@dataclass
class _Nested:
    """A nested router's shared state, and the config it was last built from (which experts a reload changed)."""

    state: SharedState
    config: RouterConfig | None = None


@dataclass
class _Scope:
    """The state of the router being built, and the nested routers' states its build uses (by ``build_nested``'s
    key)."""

    state: SharedState
    used: dict[_Key, _Nested] = field(default_factory=dict)


_scope: ContextVar[_Scope | None] = ContextVar("moe_build_scope", default=None)


def _child_state(parent: SharedState, name: str) -> SharedState:
    """A fresh state for the router nested in ``parent``'s under the expert ``name``: its own in-flight counts and
    encoders; its breakers in a store of their own (two levels may name an expert alike), which with Redis is the
    replicas' shared one, under a prefix of its own."""
    from router.breaker import MemoryBreakerStore
    from router.state_redis import RedisBreakerStore, SharedState

    store = parent.breaker_store
    breakers = (RedisBreakerStore(store.client, f"{store.key_prefix}nested:{name}:")
                if isinstance(store, RedisBreakerStore) else MemoryBreakerStore())
    return SharedState(rate_store=parent.rate_store, breaker_store=breakers)


def build_nested(config: RouterConfig, expert: ExpertConfig, path: Path, *,
                 context: ExpertContext | None = None) -> Orchestrator:
    """The orchestrator of the router nested in-process as ``expert`` (``type: router``, ``router_config``; its
    config, loaded from ``path``, is ``config``), for ``router.hierarchy``. Inside the build of a router with a shared
    state, it is built with the state that router keeps for it, found by the expert's name and the nested
    config's file: a reload keeps its breakers (a changed expert's reset, as at the top level), shares its
    in-flight counts between the old and the new build, and reuses its loaded encoders."""
    scope = _scope.get()
    if scope is None:
        return build_orchestrator(config, context=context)
    key = (expert.name, str(path))
    entry = scope.used.get(key) or scope.state.nested.get(key) or _Nested(_child_state(scope.state, expert.name))
    scope.used[key] = entry
    built = build_orchestrator(config, context=context, state=entry.state)

    def commit() -> None:
        if entry.config is not None:
            reset_changed_breakers(entry.config, config, built.breakers)
        entry.config = config

    commits = _commits.get()
    if commits is None:  # pragma: no cover - a scope is only set by build_orchestrator, which opens the commits
        commit()
    else:
        commits.add(commit)
    return built


def reset_changed_breakers(old: RouterConfig, new: RouterConfig, breakers: Breakers) -> None:
    """Breakers kept across a reload (a shared store) start afresh for an expert whose config changed. One pointed
    at another service (endpoint, model) needs no reset: its breaker is kept under that service's identity
    (``build_breakers``), so a replica still on the old config keeps the old one's to itself."""
    for name in new.expert_names:
        if name not in old.expert_names:
            continue
        was, now = old.expert(name), new.expert(name)
        if now != was and now.service_identity() == was.service_identity():
            breakers.reset(name, now.config_digest())


def config_inputs(config: RouterConfig, *, _seen: frozenset[Path] = frozenset()) -> list[Path]:
    """The files besides its own that building ``config`` reads and that ``moe train`` or an edit may change
    while the service runs, for the reload watch (``router.reload``): the gate artifact's files (a two-stage gate's
    fast stage and ``cascade.json`` too; the learned vote weights), and each nested router's config file with
    what it reads in turn. Listed whether or not they exist yet."""
    from router.cascade import CASCADE_FILE, FAST_DIR
    from router.config import ConfigError, load_config
    from router.gate_artifact import ARTIFACT_FILES
    from router.vote_weights import FILE_NAME as VOTE_WEIGHTS_FILE

    artifact = config.resolve(config.gate.artifact)
    # Every file of the artifact, not only the manifests: a copy into place (cp -r, kubectl cp, rsync) may land
    # gate.json before its arrays, whose arrival then has to trigger the reload that succeeds.
    files = [artifact / name for name in ARTIFACT_FILES]
    if config.gate.cascade is not None:
        files += [artifact / FAST_DIR / name for name in ARTIFACT_FILES] + [artifact / CASCADE_FILE]
    if config.combiner.vote_weights == "learned":
        files.append(artifact / VOTE_WEIGHTS_FILE)
    for expert in config.experts:
        if expert.router_config is None:
            continue
        nested = config.resolve(expert.router_config)
        if nested in _seen:  # a routing cycle: the build refuses it and names it
            continue
        files.append(nested)
        try:
            inner = load_config(nested)
        except (ConfigError, OSError):  # the build names what is wrong; the file itself is still watched
            continue
        files.extend(config_inputs(inner, _seen=_seen | {nested}))
    return list(dict.fromkeys(files))


def load_problem(exc: BaseException) -> tuple[str, str] | None:
    """The config key a failure to load what the config names belongs to, and the message: the gate artifact
    (absent, refused), its two-stage part, the learned vote weights; None for any other failure."""
    from router.cascade import CascadeNotTrained
    from router.gate_artifact import GateArtifactMismatch

    if isinstance(exc, CascadeNotTrained):
        return "gate.cascade", str(exc)
    if isinstance(exc, GateNotTrained | GateArtifactMismatch):
        return "gate.artifact", str(exc)
    if isinstance(exc, VoteWeightsNotTrained | VoteWeightsMismatch):
        return "combiner.vote_weights", str(exc)
    return None


def nested_loading_problems(config: RouterConfig) -> list[tuple[str, str]]:
    """``loading_problems`` of the routers nested in ``config`` in process (``type: router`` with
    ``router_config``), and of theirs in turn, each under its expert's key with its file named. A nested gate not
    trained yet is a problem here: ``moe train`` on this config does not train it. Remedies name the nested file,
    the one to train."""
    from router.config import load_config
    from router.errors import naming_config
    from router.gate_artifact import is_trained

    problems = []
    for i, expert in enumerate(config.experts):
        if expert.type != "router" or not expert.router_config:
            continue
        where = f"experts[{i}] ({expert.name}).router_config"
        path = Path(config.resolve(expert.router_config))
        inner = load_config(path, check_env=False)  # its schema was checked with this config's
        artifact = inner.resolve(inner.gate.artifact)
        if not is_trained(artifact):
            problems.append((where, naming_config(f"{path}: {GateNotTrained(artifact)}", str(path))))
            continue
        found = loading_problems(inner) + nested_loading_problems(inner)
        problems += [(where, naming_config(f"{path}: {key}: {message}", str(path))) for key, message in found]
    return problems


def expert_problems(config: RouterConfig) -> list[tuple[str, str]]:
    """What ``moe serve`` would refuse in building the experts (a replay expert's recordings missing, a type's
    own checks), found by building each as it does, as ``(key, message)`` problems. A nested router in process
    is ``nested_loading_problems``'s to check; nothing is called."""
    context = ExpertContext(base_dir=Path(config.base_dir))
    problems = []
    for i, expert in enumerate(config.experts):
        if expert.type == "router":
            continue
        try:
            build_expert(expert, context, EXPERT_TYPES)
        except ExpertConfigError as exc:
            problems.append((f"experts[{i}] ({expert.name})" + (f".{exc.field}" if exc.field else ""), exc.message))
    return problems


def loading_problems(config: RouterConfig) -> list[tuple[str, str]]:
    """What ``moe serve`` would refuse in the trained files the config names, found by loading them as it loads
    them (``load_gate``, with the encoder; ``load_vote_weights``), as ``(key, message)`` problems. A gate not
    trained yet is none: ``moe train`` writes it, vote weights included."""
    # On the CPU: a gate serves on any device (``gate.encoder.device``), and the check may run where the serving
    # GPU is not.
    def cpu(stage: _Stage) -> _Stage:  # the gate's settings, or its two-stage part's, with the encoder on the CPU
        return stage.model_copy(update={"encoder": stage.encoder.model_copy(update={"device": "cpu"})})

    cascade = config.gate.cascade
    gate = cpu(config.gate).model_copy(update={"cascade": None if cascade is None else cpu(cascade)})
    on_cpu = config.model_copy(update={"gate": gate})
    problems = []
    for load in (load_gate, load_vote_weights):
        try:
            load(on_cpu)
        except GateNotTrained:  # load_gate's first check, before any encoder is loaded
            return []
        except Exception as exc:
            found = load_problem(exc)
            if found is None:
                raise
            problems.append(found)
    return problems

