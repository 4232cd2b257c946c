"""``python -m bench``'s pure parts: the table's labels, the memory figures, progress lines, peer skips and the
partial bench.json written after each phase. Nothing here starts a router, a peer or a model."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import bench.__main__ as bench_main
import bench.router_bench as router_bench
from bench import provenance
from bench.__main__ import (
    P99_DIFFERENCE,
    REPO,
    Progress,
    assemble,
    flatten,
    memory_label,
    parse_args,
    parse_peer_output,
    repo_relative,
    skip_peer,
    table,
    write_report,
)
from bench.peers.install import LITELLM, SEMANTIC_ROUTER, PeerInstall
from bench.router_bench import add_unloaded_overhead, compare, rss_growth
from bench.upstream import LoadResult


def _gate() -> dict[str, Any]:
    figures = {"p50_ms": 6.0, "p99_ms": 9.0, "batch_qps": 420.0}
    return {"onnx": figures, "st": figures, "static": figures,
            "cascade": {**figures, "fast_share": 0.92, "agreement_with_full": 0.99},
            "scaling": [{"experts": 4, "k": 1, "p50_ms": 7.2, "p99_ms": 9.0, "post_embedding_us": 250.0,
                         "batch_qps_k1": 400.0}]}


def _level(c: int) -> dict[str, Any]:
    router = {"overhead_p50_ms": 10.0 + c, "p99_difference_ms": 5.0 + c, "overhead_p99_ms": 5.0 + c,
              "cpu_ms_per_request": 5.5}
    return {"concurrency": c, "direct": {}, "router": router, "router_static": router, "router_cascade": router}


def _router() -> dict[str, Any]:
    thr = {"rps": 250.0, "cpu_ms_per_request": 5.5, "direct_rps_same_client": 1600.0, "seconds": 60.0,
           "rss_span_s": 60.4, **rss_growth([300.0, 301.0, 303.0])}
    return {"top1": [_level(c) for c in (1, 8, 32, 128)], "throughput_top1": thr,
            "throughput_top1_static": {"rps": 700.0}, "throughput_top1_cascade": {"rps": 600.0}, "litellm": None}


def test_rss_growth_first_last_max_and_percent() -> None:
    assert rss_growth([300.0, 310.0, 303.0]) == {"rss_mb_start": 300.0, "rss_mb_end": 303.0, "rss_mb_max": 310.0,
                                                 "rss_growth_pct": 1.0, "rss_mb_per_min_late": None}
    # a failed /proc read (nan) is not a sample; no samples at all is no figure
    assert rss_growth([float("nan"), 200.0, 200.0])["rss_mb_start"] == 200.0
    assert rss_growth([])["rss_growth_pct"] is None


def test_flatten_keeps_the_old_p99_key_and_adds_the_difference_under_its_own_name() -> None:
    flat = flatten(_gate(), _router(), None)
    assert flat["router_p99_difference_ms_c32"] == 37.0
    assert flat["router_overhead_p99_ms_c32"] == 37.0  # compatibility: same figure, old name
    assert flat["router_memory_run_s"] == 60.4
    assert (flat["router_rss_mb_start"], flat["router_rss_mb_end"], flat["router_rss_growth_pct"]) == (300.0, 303.0,
                                                                                                       1.0)


def test_table_labels_the_p99_difference_and_the_memory_runs_length() -> None:
    text = table(flatten(_gate(), _router(), None), _gate(), _router())
    assert P99_DIFFERENCE == "p99 difference (router p99 − direct p99)"
    rows = [line for line in text.splitlines() if P99_DIFFERENCE in line]
    assert len(rows) == 4 and rows[2].split()[-3:] == ["37", "-", "-"]
    assert "p99 overhead" not in text and "overhead p99" not in text
    memory = next(line for line in text.splitlines() if line.startswith("router RSS MB"))
    assert "over 60 s" in memory and "300 -> 303" in memory
    assert any(line.startswith("  RSS growth") and line.split()[-3] == "1" for line in text.splitlines())
    # the metric column widens to the longest label, so every row's figures line up
    header = text.splitlines()[0]
    assert all(len(line) >= header.index("ours") for line in text.splitlines()[2:10])


def test_openvino_figures_and_ratios_when_its_router_ran() -> None:
    gate = {**_gate(), "openvino": {"p50_ms": 2.0, "p99_ms": 3.0, "batch_qps": 2000.0, "precision": "bf16"}}
    router = _router()
    for level in router["top1"]:
        level["router_openvino"] = {"overhead_p50_ms": 5.0 + level["concurrency"], "cpu_ms_per_request": 2.0}
        level["litellm"] = {"overhead_p50_ms": 100.0}
    router["throughput_top1_openvino"] = {"rps": 550.0, "cpu_ms_per_request": 2.5, "rss_span_s": 61.0,
                                          **rss_growth([250.0, 255.0])}
    router["litellm"] = {"throughput": {"rps": 110.0, "cpu_ms_per_request": 6.0}}
    flat = flatten(gate, router, None)
    assert (flat["openvino_precision"], flat["openvino_gate_p50_ms"], flat["openvino_gate_batch_qps"]) == (
        "bf16", 2.0, 2000.0)
    assert flat["openvino_router_overhead_p50_ms_c32"] == 37.0
    assert flat["ratio_overhead_openvino_vs_litellm_c32"] == 0.37
    assert (flat["openvino_router_rps_top1"], flat["ratio_rps_openvino_vs_litellm"]) == (550.0, 5.0)
    text = table(flat, gate, router)
    assert any(line.startswith("gate decision p50 ms (OpenVINO bf16)") for line in text.splitlines())
    c32 = next(line for line in text.splitlines() if line.startswith("  same, OpenVINO encoder, c32"))
    assert c32.split()[-3:] == ["37", "100", "0.37"]
    memory = next(line for line in text.splitlines() if line.startswith("router RSS MB over 61 s (OpenVINO"))
    assert "250 -> 255" in memory and flat["openvino_router_rss_growth_pct"] == 2.0


def test_without_openvino_its_figures_are_none_and_the_table_shows_dashes() -> None:
    gate = {**_gate(), "openvino": None}  # as run_gate records a backend whose package is not installed
    flat = flatten(gate, _router(), None)
    assert flat["openvino_gate_p50_ms"] is None and flat["openvino_router_rps_top1"] is None
    assert flat["ratio_rps_openvino_vs_litellm"] is None
    text = table(flat, gate, _router())
    row = next(line for line in text.splitlines() if line.startswith("gate decision p50 ms (OpenVINO -)"))
    assert row.split()[-5:-2] == ["-", "-", "-"]  # ours, peer, ratio; then the target "<= 3"


def test_memory_label_without_a_length() -> None:
    assert "over" not in memory_label(None)
    assert "over 8 s" in memory_label(8.01)


def test_memory_run_defaults_to_60_s_and_other_runs_keep_throughput_s() -> None:
    args = parse_args([])
    assert (args.memory_s, args.throughput_s) == (60.0, 8.0)
    assert parse_args(["--memory-s", "5", "--throughput-s", "2"]).memory_s == 5.0


def test_progress_says_when_a_step_starts_ends_and_fails() -> None:
    now = [100.0]
    lines: list[str] = []
    progress = Progress(lines.append, clock=lambda: now[0])
    with progress.step("router overhead, c32") as notes:
        now[0] += 12.5
        notes.append("router 117")
    assert lines == ["[   0.0 s] router overhead, c32 ...",
                     "[  12.5 s] router overhead, c32: done in 12.5 s (router 117)"]
    with pytest.raises(RuntimeError), progress.step("top-3"):
        now[0] += 1.0
        raise RuntimeError("router exited")
    assert lines[-1] == "[  13.5 s] top-3: failed after 1.0 s (RuntimeError: router exited)"


def test_progress_ticker_prints_every_interval() -> None:
    lines: list[str] = []
    tick = Progress(lines.append, clock=lambda: 0.0).ticker("memory run", 60.0, every_s=15.0)
    for second in range(1, 61):
        tick(float(second), 300.0)
    expected = [f"{s} s of ~60 s, RSS 300 MB" for s in (15, 30, 45, 60)]
    assert [line.split("memory run: ")[1] for line in lines] == expected


def test_skip_peer_records_the_reason_and_prints_it() -> None:
    lines: list[str] = []
    status: dict[str, Any] = {}
    skip_peer(status, "LiteLLM", "install failed: no network", Progress(lines.append))
    assert status == {"skipped": "install failed: no network"}
    assert lines[-1].endswith("LiteLLM skipped: install failed: no network")


def test_parse_peer_output_takes_the_last_json_line() -> None:
    assert parse_peer_output('loading\n{"p50_ms": 14.8}\n\n') == {"p50_ms": 14.8}
    for bad in ("", "\n", "Traceback: boom", "[1, 2]"):
        with pytest.raises(ValueError):
            parse_peer_output(bad)


def test_semantic_router_bad_output_is_a_skip_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_main, "install_peer", lambda peer, progress: None)

    def fake_run(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args[0], 0, stdout="a warning, then no JSON\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    lines: list[str] = []
    result = bench_main.run_semantic_router(parse_args([]), Progress(lines.append))
    assert result["skipped"].startswith("JSONDecodeError")
    assert "semantic-router skipped: JSONDecodeError" in lines[-1]


def test_semantic_router_failed_install_is_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_main, "install_peer", lambda peer, progress: "install took over 900 s")
    result = bench_main.run_semantic_router(parse_args([]), Progress(lambda line: None))
    assert result == {"skipped": "install took over 900 s"}


def test_litellm_that_cannot_install_is_skipped_and_the_block_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_main, "install_peer", lambda peer, progress: "install failed (exit 1): pip")
    status: dict[str, Any] = {}
    with bench_main._litellm("http://127.0.0.1:1/v1", parse_args([]), status, Progress(lambda line: None)) as proxy:
        assert proxy is None
    assert status == {"skipped": "install failed (exit 1): pip"}


def test_litellm_that_raises_while_installing_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(peer: PeerInstall, progress: Progress) -> str | None:
        raise OSError("disk full")

    monkeypatch.setattr(bench_main, "install_peer", boom)
    status: dict[str, Any] = {}
    with bench_main._litellm("http://127.0.0.1:1/v1", parse_args([]), status, Progress(lambda line: None)) as proxy:
        assert proxy is None
    assert status == {"skipped": "OSError: disk full"}


def _peer(tmp_path: Path, body: str) -> PeerInstall:
    script = tmp_path / "install_x.sh"
    script.write_text('VERSION="${X_VERSION:-1.2.3}"\n' + body, encoding="utf-8")
    return PeerInstall("X", script, tmp_path / "venv", "x", "X_VERSION")


def test_peer_install_knows_first_use_from_the_stamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("X_VERSION", raising=False)
    peer = _peer(tmp_path, "exit 0\n")
    assert peer.version() == "1.2.3" and not peer.installed()
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".installed-x-1.2.3").touch()
    assert peer.installed()
    monkeypatch.setenv("X_VERSION", "2.0")
    assert not peer.installed()
    # the real scripts name their version the same way
    assert LITELLM.version() and SEMANTIC_ROUTER.version()


def test_install_peer_says_before_and_after_a_first_install(tmp_path: Path) -> None:
    lines: list[str] = []
    assert bench_main.install_peer(_peer(tmp_path, "exit 0\n"), Progress(lines.append)) is None
    assert "installing X into" in lines[0] and "(first use, can take minutes)" in lines[0]
    assert "X: installed into" in lines[1]
    failed = _peer(tmp_path, "echo 'no network' >&2; exit 3\n")
    assert failed.install() == "install failed (exit 3): no network"


def test_repo_relative_paths() -> None:
    assert repo_relative(REPO / "bench" / "results" / "profile_raw.txt") == "bench/results/profile_raw.txt"
    assert repo_relative("/somewhere/else.txt") == "/somewhere/else.txt"


def test_partial_report_has_what_was_measured(tmp_path: Path) -> None:
    partial = assemble({"date": "d"}, gate=_gate(), router=None, semantic=None, pool_rows=None,
                       phases={"gate": 50.0}, elapsed_s=50.04, done=["gate"], complete=False)
    assert partial["gate_p50_ms"] == 6.0 and partial["router_rps_top1"] is None
    assert (partial["complete"], partial["phases_done"], partial["elapsed_s"]) == (False, ["gate"], 50.0)
    out = tmp_path / "results" / "bench.json"
    write_report(out, partial)
    assert json.loads(out.read_text())["gate_p50_ms"] == 6.0
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temporary file left behind
    before = assemble({}, gate=None, router=None, semantic=None, pool_rows=None, phases={}, elapsed_s=1.0,
                      done=[], complete=False, error="RuntimeError: x")
    assert before["error"] == "RuntimeError: x" and "gate_p50_ms" not in before


def test_a_late_failure_keeps_the_gate_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """main() with the measurements stubbed: the router phase fails, bench.json still holds the gate's figures."""

    class Upstream:
        url = "http://127.0.0.1:1/v1"

        def __enter__(self) -> Upstream:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    class Data:
        test_texts = ("hello",)

    async def pool(*args: Any) -> list[dict[str, Any]]:
        return [{"concurrency": 8, "client": "aiohttp", "cpu_ms_per_request": 0.3}]

    def router_fails(args: Any, gates: Any, texts: Any, progress: Progress, out: dict[str, Any],
                     checkpoint: Any) -> None:
        out["top1"] = [_level(c) for c in (1, 8, 32, 128)]
        checkpoint()
        raise RuntimeError("router exited with 1")

    monkeypatch.setattr(bench_main, "run_gate", lambda args, progress: (_gate(), {"onnx": None}, Data()))
    monkeypatch.setattr(bench_main, "profile_encoder", lambda texts: {"ops": []})
    monkeypatch.setattr(bench_main, "UpstreamProcess", lambda **kw: Upstream())
    monkeypatch.setattr(bench_main, "measure_http_pool", pool)
    monkeypatch.setattr(bench_main, "run_router", router_fails)
    out = tmp_path / "bench.json"
    with pytest.raises(RuntimeError, match="router exited"):
        bench_main.main(["--skip-peers", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is False and report["phases_done"] == ["gate"]
    assert report["error"] == "RuntimeError: router exited with 1"
    assert report["gate_p50_ms"] == 6.0 and report["router_overhead_p50_ms_c32"] == 42.0
    assert report["options"]["memory_s"] == 60.0 and report["options"]["out"] == str(out)


def test_rss_slope_over_the_second_half_tells_growth_from_settling() -> None:
    # settles after a step early on: first-to-last says +1%, the late slope says flat
    settled = rss_growth([300.0, 303.0, 303.0, 303.0, 303.0, 303.0, 303.0], span_s=6.0)
    assert settled["rss_growth_pct"] == 1.0 and settled["rss_mb_per_min_late"] == 0.0
    # still growing at the end, 0.1 MB a second: 6 MB a minute, though first-to-last is only +2%
    growing = rss_growth([300.0 + 0.1 * i for i in range(61)], span_s=60.0)
    assert growing["rss_growth_pct"] == 2.0 and growing["rss_mb_per_min_late"] == 6.0
    assert rss_growth([300.0, 301.0, 302.0], span_s=2.0)["rss_mb_per_min_late"] is None  # too few samples


def test_unloaded_overhead_is_against_the_direct_p50_at_the_lowest_concurrency() -> None:
    rows = [{"concurrency": 1, "direct": {"p50_ms": 6.0}, "router": {"p50_ms": 10.0, "overhead_p50_ms": 4.0}},
            {"concurrency": 32, "direct": {"p50_ms": 17.0}, "router": {"p50_ms": 77.0, "overhead_p50_ms": 60.0},
             "litellm": {"p50_ms": 175.0, "overhead_p50_ms": 158.0}}]
    add_unloaded_overhead(rows)
    assert rows[0]["router"]["overhead_p50_vs_unloaded_ms"] == 4.0
    assert rows[1]["router"]["overhead_p50_vs_unloaded_ms"] == 71.0 and rows[1]["router"]["overhead_p50_ms"] == 60.0
    assert rows[1]["litellm"]["overhead_p50_vs_unloaded_ms"] == 169.0
    assert "overhead_p50_vs_unloaded_ms" not in rows[1]["direct"]
    assert add_unloaded_overhead([]) == []


def test_compare_reverses_the_targets_order_every_other_round(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def fake_load(url: str, payloads: list[dict[str, Any]], **kwargs: Any) -> LoadResult:
        calls.append(url)
        return LoadResult(kwargs["concurrency"], latencies_ms=[5.0, 6.0], elapsed_s=0.1)

    class Target:
        def __init__(self, name: str) -> None:
            self.url, self.pid, self.model = name, 1, "auto"

    monkeypatch.setattr(router_bench, "run_load", fake_load)
    monkeypatch.setattr(router_bench, "cpu_seconds", lambda pid: 0.0)
    targets = {name: Target(name) for name in ("a", "b", "c")}
    row = asyncio.run(compare(targets, "direct", ["hi"], concurrency=1, rounds=4))  # type: ignore[arg-type]
    assert calls == ["direct", "a", "b", "c", "direct", "c", "b", "a"] * 2
    assert row["a"]["ok"] == 8 and row["c"]["overhead_p50_ms"] == 0.0


def test_flatten_and_table_carry_the_brackets_the_slope_and_the_st_gate_in_the_peers_window() -> None:
    router = _router()
    for level in router["top1"]:
        c = level["concurrency"]
        level["router"] = {**level["router"], "overhead_p50_vs_unloaded_ms": 20.0 + c}
        level["litellm"] = {"overhead_p50_ms": 100.0, "overhead_p50_vs_unloaded_ms": 104.0}
    router["throughput_top1"] = {**router["throughput_top1"], "rss_mb_per_min_late": 0.6}
    semantic = {"p50_ms": 5.2, "our_gate_p50_ms_same_window": 2.6, "our_st_gate_p50_ms_same_window": 5.72}
    flat = flatten(_gate(), router, semantic)
    assert flat["router_overhead_p50_vs_unloaded_ms_c32"] == 52.0
    assert flat["ratio_overhead_vs_unloaded_router_vs_litellm_c32"] == 0.5
    assert (flat["st_gate_p50_ms_same_window"], flat["ratio_st_gate_vs_semantic_router_p50"]) == (5.72, 1.1)
    assert flat["router_rss_mb_per_min_late"] == 0.6 and flat["openvino_router_rss_mb_per_min_late"] is None
    lines = table(flat, _gate(), router).splitlines()
    st = next(line for line in lines if line.startswith("  again, alone, right after semantic-router ran"))
    assert st.split()[-3:] == ["5.72", "5.2", "1.1"]
    c32 = next(line for line in lines if line.startswith("  same, against the direct p50 at c1 (upper bracket), c32"))
    assert c32.split()[-3:] == ["52", "104", "0.5"]
    assert any(line.startswith("  RSS slope over the run's second half") and "0.6" in line for line in lines)


def test_provenance_names_the_commit_and_whether_tracked_files_differ() -> None:
    def git(args: Any) -> subprocess.CompletedProcess[str]:
        out = {"rev-parse": "abc123\n", "status": " M bench/router_bench.py\n"}[args[0]]
        return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")

    found = provenance(git, packages=("numpy", "no-such-package-here"))
    assert (found["commit"], found["dirty"]) == ("abc123", True)
    assert found["versions"]["numpy"] and found["versions"]["no-such-package-here"] is None
    assert provenance(lambda args: None, packages=()) == {"commit": None, "dirty": None, "versions": {}}


def test_litellm_that_started_records_its_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.peers.litellm_proxy as litellm_proxy

    class Proxy:
        def __init__(self, url: str) -> None:
            self.url = url

        def __enter__(self) -> Proxy:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(bench_main, "install_peer", lambda peer, progress: None)
    monkeypatch.setattr(litellm_proxy, "LiteLLMProxy", Proxy)
    status: dict[str, Any] = {}
    with bench_main._litellm("http://127.0.0.1:1/v1", parse_args([]), status, Progress(lambda line: None)) as proxy:
        assert isinstance(proxy, Proxy)
    assert status == {"version": LITELLM.version()}


def test_the_benchmarks_read_moe_data_dir_as_every_moe_command_does(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    from bench.data import data_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MOE_DATA_DIR", "~/data")
    assert data_dir() == tmp_path / "data"  # expanded, not a folder named "~"
    for unset in ("", "   "):  # unset, not the working folder (or a folder named by spaces)
        monkeypatch.setenv("MOE_DATA_DIR", unset)
        assert data_dir() == Path(__file__).resolve().parents[3] / "shared" / "data"
