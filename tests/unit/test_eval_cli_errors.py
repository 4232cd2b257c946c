"""``moe eval`` / ``moe convert`` / ``moe demo``: flags that are refused with a message naming them, warnings
shown once, legible figures and no stale figures in a reused ``--out``. Small synthetic data and a hashing
encoder, so each test runs in seconds."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import eval.report as report
from eval.convert import convert
from eval.embeddings import CachedEncoder
from eval.harness import run_suite
from eval.report import HARNESS_FIGURES, write_results
from eval.suite import subsample, warnings_once
from router.cli import limit_count
from router.cli import main as cli_main
from tests.doubles.fakes import FakeHashingEncoder

LABELS = ("alpha", "beta", "gamma")
EVAL_DIR = Path(__file__).resolve().parents[2] / "eval"


def _cli(argv: list[str]) -> int:
    """``moe ARGV``'s exit status, whether refused by argparse (SystemExit) or by the command (its return)."""
    try:
        return cli_main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _rows(n_per_label: int, *, labels: tuple[str, ...] = LABELS, prefix: str = "q") -> list[dict[str, str]]:
    """Queries each made of its label's own words (so a hashing encoder separates them), with unique ids."""
    rng = np.random.default_rng(len(prefix) + n_per_label)
    rows = []
    for label in labels:
        words = [f"{label}word{k}" for k in range(8)]
        for i in range(n_per_label):
            text = " ".join(rng.choice(words, 4)) + f" {prefix}{i}"
            rows.append({"id": f"{prefix}-{label}-{i}", "query": text, "label": label})
    return rows


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _jsonl_run(tmp_path: Path, train: Path, test: Path, out: Path, **kwargs: Any) -> dict[str, Any]:
    kwargs = {"plots": False, **kwargs}
    return run_suite("jsonl", None, out, encoder=FakeHashingEncoder(), train=train, test=test, progress=False,
                     cache_dir=tmp_path / "cache", **kwargs)


# ---------------------------------------------------------------- 1: --suite with --train/--test


def test_a_suite_with_train_or_test_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = _write(tmp_path / "train.jsonl", _rows(5))
    out = tmp_path / "out"
    # --data at an empty folder: were the flags ignored, the suite would fail on its missing data instead.
    assert _cli(["eval", "--suite", "snips-intent", "--train", str(train), "--test", str(train), "--limit", "20",
                 "--data", str(tmp_path), "--out", str(out), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "--suite snips-intent" in err and "--train and --test" in err and "not both" in err
    assert _cli(["eval", "--suite", "snips-intent", "--test", str(train), "--data", str(tmp_path),
                 "--out", str(out)]) == 2
    assert "would ignore --test " in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match=r"--train and --test name your own JSONL, which suite 'snips-intent'"):
        run_suite("snips-intent", tmp_path, out, encoder=FakeHashingEncoder(), train=train, test=train, limit=20,
                  cache_dir=tmp_path / "cache")
    assert not out.exists()


def test_train_without_test_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = _write(tmp_path / "train.jsonl", _rows(5))
    out = tmp_path / "out"
    for flags in (["--train", str(train)], ["--test", str(train)]):
        assert _cli(["eval", *flags, "--out", str(out), "--no-plots"]) == 2  # as argparse's and its siblings'
        assert capsys.readouterr().err.strip() == (f"error: {flags[0]} was given alone: your own data needs both "
                                                   "--train (to train the gate on) and --test (to score it on)")
    assert not out.exists()


@pytest.mark.parametrize("suite", ["jsonl", "snips"])
def test_an_unknown_suite_is_a_usage_error_listing_the_suites(suite: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """It exited 1 as a failed run, and listed "jsonl" as known, which --suite jsonl then refused three ways."""
    train = _write(tmp_path / "train.jsonl", _rows(5))
    out = tmp_path / "out"
    assert _cli(["eval", "--suite", suite, "--train", str(train), "--test", str(train), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: unknown suite {suite!r}; known: banking77-intent, clinc150-cold-start, ")
    assert "jsonl" not in err.removeprefix(f"error: unknown suite {suite!r}") and "--train and --test" in err
    assert not out.exists()


# ---------------------------------------------------------------- 2: --limit


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_limit_below_one_is_refused_by_every_command(value: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    train = _write(tmp_path / "train.jsonl", _rows(5))
    out, converted = tmp_path / "out", tmp_path / "x.jsonl"
    for argv in (["eval", "--train", str(train), "--test", str(train), "--out", str(out), "--no-plots"],
                 ["eval", "--suite", "snips-intent", "--out", str(out), "--data", str(tmp_path)],
                 ["convert", "snips-intent", "--out", str(converted), "--data", str(tmp_path)],
                 ["demo", "--out", str(out), "--data", str(tmp_path)]):
        with pytest.raises(SystemExit) as refused:  # by argparse, before the command starts
            cli_main([*argv, "--limit", value])
        assert refused.value.code == 2, argv
        err = capsys.readouterr().err
        assert "argument --limit" in err and ">= 1" in err and value in err, (argv, err)
    assert not out.exists() and not converted.exists()


def test_limit_is_checked_by_the_functions_and_the_results_parser(tmp_path: Path, data_dir: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from eval.results import main as results_main

    items = list(range(10))
    assert subsample(items, 3, 0, key=str) == subsample(items, 3, 0, key=str) and len(subsample(items, 3, 0, str)) == 3
    for bad in (0, -5):
        with pytest.raises(ValueError, match="argument --limit: must be an integer >= 1"):
            subsample(items, bad, 0, key=str)
        with pytest.raises(ValueError, match="argument --limit: must be an integer >= 1"):
            convert("snips-intent", data_dir, "train", tmp_path / "x.jsonl", limit=bad)
    assert not (tmp_path / "x.jsonl").exists()
    assert convert("snips-intent", data_dir, "train", tmp_path / "x.jsonl", limit=1) == 1
    assert limit_count("7") == 7
    for raw in ("0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be an integer >= 1"):
            limit_count(raw)
    with pytest.raises(SystemExit) as exited:
        results_main(["--limit", "0", "--no-readme", "--out", str(tmp_path / "r")])
    assert exited.value.code == 2 and "argument --limit: must be an integer >= 1" in capsys.readouterr().err


def test_the_overlap_warning_counts_the_queries_the_limited_run_uses(tmp_path: Path, fast_static: None,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    train = _write(tmp_path / "train.jsonl", _rows(40))  # 120 queries; the test file is the same file
    results = _jsonl_run(tmp_path, train, train, tmp_path / "out", limit=20)
    assert (results["setup"]["train"], results["setup"]["test"]) == (20, 20)
    err = capsys.readouterr().err
    assert "warning: 20 of 20 test queries also occur in the training data" in err and "of 120" not in err
    assert any(n.startswith("20 of 20 test queries") for n in results["notes"])


# ---------------------------------------------------------------- 3: glyphs the font lacks


def test_labels_the_font_cannot_draw_are_escaped_in_figures_only(tmp_path: Path, fast_static: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    odd = ("emoji 🎉", "日本語", "tab\tlabel")
    train = _write(tmp_path / "train.jsonl", _rows(30, labels=odd))
    test = _write(tmp_path / "test.jsonl", _rows(8, labels=odd, prefix="t"))
    ticks: dict[str, list[str]] = {}
    finish = report._finish

    def spy(plt: Any, fig: Any, ax: Any, path: Path, title: str, **kwargs: Any) -> None:
        ticks[path.name] = [t.get_text() for t in ax.get_xticklabels()]
        finish(plt, fig, ax, path, title, **kwargs)

    monkeypatch.setattr(report, "_finish", spy)
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _jsonl_run(tmp_path, train, test, out, plots=True)
    glyphs = [str(w.message) for w in caught if "Glyph" in str(w.message)]
    assert glyphs == []
    assert ticks["confusion_matrix.png"] == ["emoji \\U0001f389", "tab\\tlabel", "\\u65e5\\u672c\\u8a9e"]
    # The true labels stay in the results and the report.
    assert results["labels"] == sorted(odd)
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["labels"] == sorted(odd) and set(saved["per_class"]) == set(odd)
    assert "emoji 🎉" in (out / "report.md").read_text(encoding="utf-8")
    assert report._legible("café a/b") == "café a/b"  # characters the font has stay as they are


def test_labels_and_titles_holding_dollars_are_drawn_literally_not_as_mathtext(
        tmp_path: Path, fast_static: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib import cbook

    odd = ("$\\frac{a}$ math", "a_b^c $x_1$", "costs $5 or \\$6")
    train = _write(tmp_path / "train.jsonl", _rows(30, labels=odd))
    test = _write(tmp_path / "t $x$.jsonl", _rows(8, labels=odd, prefix="t"))
    drawn: dict[str, tuple[list[str], str]] = {}
    finish = report._finish

    def spy(plt: Any, fig: Any, ax: Any, path: Path, title: str, **kwargs: Any) -> None:
        finish(plt, fig, ax, path, title, **kwargs)
        drawn[path.name] = ([t.get_text() for t in ax.get_xticklabels()], ax.get_title())

    monkeypatch.setattr(report, "_finish", spy)
    out = tmp_path / "out"
    results = _jsonl_run(tmp_path, train, test, out, plots=True)  # "$\\frac{a}$" was a mathtext parse error
    ticks, title = drawn["confusion_matrix.png"]
    for text in (*ticks, title):
        assert not cbook.is_math_text(text), text  # drawn as text: matplotlib shows "\\$" as "$"
    assert [t.replace("\\$", "$") for t in ticks] == sorted(odd)
    assert title.replace("\\$", "$") == "t $x$.jsonl: gate confusion matrix"
    assert all((out / name).is_file() for name in results["figures"])
    # The true labels stay in the results and the report.
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["labels"] == sorted(odd) and set(saved["per_class"]) == set(odd)
    assert "| a_b^c $x_1$ |" in (out / "report.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------- 4: stale figures in a reused --out


def test_write_results_removes_only_the_harness_figures_this_run_did_not_draw(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in (*HARNESS_FIGURES, "mine.png", "notes.txt"):
        (out / name).write_bytes(b"old")
    write_results(out, {"suite": "s", "metrics": {"accuracy": 1.0}, "figures": ["reliability.png"]})
    assert sorted(p.name for p in out.iterdir()) == ["mine.png", "notes.txt", "reliability.png", "report.md",
                                                     "results.json"]
    write_results(out, {"suite": "s", "metrics": {"accuracy": 1.0}})
    assert not (out / "reliability.png").exists() and (out / "mine.png").exists()


def test_every_figure_the_harness_draws_is_known_to_the_cleanup() -> None:
    drawn = {m for path in EVAL_DIR.glob("*.py") for m in re.findall(r'"(\w+\.png)"', path.read_text("utf-8"))}
    assert drawn and drawn <= set(HARNESS_FIGURES), drawn - set(HARNESS_FIGURES)


def test_a_no_plots_run_in_a_reused_out_leaves_no_figures(tmp_path: Path, fast_static: None) -> None:
    train = _write(tmp_path / "train.jsonl", _rows(20))
    test = _write(tmp_path / "test.jsonl", _rows(5, prefix="t"))
    out = tmp_path / "out"
    first = _jsonl_run(tmp_path, train, test, out, plots=True)
    assert first["figures"] and all((out / name).is_file() for name in first["figures"])
    _jsonl_run(tmp_path, train, test, out, plots=False)
    assert sorted(p.name for p in out.glob("*.png")) == []


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_run_that_fails_leaves_out_as_it_found_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   fast_static: None) -> None:
    """A run stopped part way (bad data, a broken cache, Ctrl-C) had written its split (and perhaps predictions)
    beside the earlier run's results.json, which then described other data; a fresh --out was left holding its
    split alone. Now a run writes into a staging folder and moves its files in once it is done."""
    import eval.labels as labels

    train = _write(tmp_path / "train.jsonl", _rows(20))
    test = _write(tmp_path / "test.jsonl", _rows(5, prefix="t"))
    out = tmp_path / "out"
    _jsonl_run(tmp_path, train, test, out)
    (out / "mine.txt").write_text("kept", encoding="utf-8")
    before = _tree(out)
    assert {"results.json", "report.md", "predictions.jsonl", "split/train.jsonl", "mine.txt"} <= set(before)
    real = labels.evaluate_labels

    def stopped(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)  # every file written, then stopped before the results
        raise KeyboardInterrupt

    monkeypatch.setattr(labels, "evaluate_labels", stopped)
    other = _write(tmp_path / "other.jsonl", _rows(15, prefix="o"))
    for where in (out, tmp_path / "fresh" / "out"):
        with pytest.raises(KeyboardInterrupt):
            _jsonl_run(tmp_path, other, test, where)
    assert _tree(out) == before and sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert not (tmp_path / "fresh").exists()


def _refusing_report_md(real: Any) -> Any:
    """``os.replace`` that refuses, with a PermissionError, to move a run's report.md out of its staging folder."""
    def refusing(src: Any, dst: Any) -> None:
        if Path(src).name == "report.md" and Path(src).parent.name.startswith(".partial-"):
            raise PermissionError(13, "Permission denied", str(dst))
        real(src, dst)

    return refusing


def test_a_publish_that_fails_part_way_leaves_the_earlier_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              fast_static: None) -> None:
    """It deleted the earlier run's files before moving the new ones in, so a failure between the two (a file it
    may not remove, a read-only mount) left neither, and said only PermissionError: 'notes.txt'."""
    import eval.harness as harness

    train = _write(tmp_path / "train.jsonl", _rows(20))
    test = _write(tmp_path / "test.jsonl", _rows(5, prefix="t"))
    out = tmp_path / "out"
    _jsonl_run(tmp_path, train, test, out)
    before = _tree(out)
    real = os.replace
    monkeypatch.setattr(harness.os, "replace", _refusing_report_md(real))
    with pytest.raises(ValueError, match=rf"^--out {re.escape(str(out))}: cannot put this run's files in place of "
                                         r"the earlier run's \(Permission denied: .*report.md\); the earlier"):
        _jsonl_run(tmp_path, _write(tmp_path / "other.jsonl", _rows(15, prefix="o")), test, out)
    assert _tree(out) == before and [p.name for p in out.iterdir() if p.name.startswith(".")] == []

    def interrupted(src: Any, dst: Any) -> None:  # Ctrl-C (or SIGTERM's SystemExit) part way through the moves
        if Path(src).name == "report.md" and Path(src).parent.name.startswith(".partial-"):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(harness.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _jsonl_run(tmp_path, _write(tmp_path / "other.jsonl", _rows(15, prefix="o")), test, out)
    assert _tree(out) == before and [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path: Path, fast_static: None) -> None:
    """SIGKILL leaves no chance to clean up: the next run into the same --out removes a staging folder whose
    process is gone, and leaves a live one's."""
    train = _write(tmp_path / "train.jsonl", _rows(20))
    test = _write(tmp_path / "test.jsonl", _rows(5, prefix="t"))
    out = tmp_path / "out"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    host = socket.gethostname()
    (out / f".partial-{dead}@{host}-abc" / "split").mkdir(parents=True)
    kept = [f".partial-{os.getppid()}@{host}-xyz", f".partial-{dead}@another-host-abc"]  # alive; not seen from here
    for name in kept:
        (out / name).mkdir()
    _jsonl_run(tmp_path, train, test, out)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == sorted(kept)


def test_a_staging_folder_untouched_for_a_day_is_removed_whatever_host_it_names(tmp_path: Path,
                                                                              fast_static: None) -> None:
    """A container's host name is new each time, so a killed container's folder never matched this host's."""
    train = _write(tmp_path / "train.jsonl", _rows(20))
    test = _write(tmp_path / "test.jsonl", _rows(5, prefix="t"))
    out = tmp_path / "out"
    old = out / ".partial-17@3f9a1c2b7d4e-abc"
    (old / "split").mkdir(parents=True)
    os.utime(old, (time.time() - 2 * 86_400, time.time() - 2 * 86_400))
    _jsonl_run(tmp_path, train, test, out)
    assert not old.exists()


def test_a_signal_during_the_publish_waits_for_it() -> None:
    """Ctrl-C or SIGTERM between the renames could leave a file moved aside and not put back (or a second one
    could stop the putting back): they are held until the renames are done, then delivered."""
    import signal

    from eval.harness import _signals_held

    # Python's own Ctrl-C handler, whatever this process inherited: a shell starts a job run with & ignoring SIGINT.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with _signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                done.append("renamed")
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert done == ["renamed"]


def test_sigterm_stops_a_run_as_ctrl_c_does() -> None:
    """timeout, docker stop and a cancelled CI job send SIGTERM, which skipped the cleanup and left the staging
    folder; while moe eval runs it is SystemExit(143), which the cleanup sees, and the handler is put back."""
    import signal

    from eval.harness import _terminated_as_exit

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, _terminated_as_exit():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert stopped.value.code == 143 and signal.getsignal(signal.SIGTERM) == before


def test_a_run_replaces_every_file_an_earlier_run_wrote(tmp_path: Path, fast_static: None) -> None:
    """A suite that writes no split or predictions (routellm-mmlu) run into a folder another suite wrote left
    those beside its own results.json."""
    train = _write(tmp_path / "train.jsonl", _rows(20))
    test = _write(tmp_path / "test.jsonl", _rows(5, prefix="t"))
    out = tmp_path / "out"
    (out / "split").mkdir(parents=True)
    (out / "split" / "val.jsonl").write_text("{}\n", encoding="utf-8")
    for name in ("predictions.jsonl", "quality_cost.png", "mine.txt"):
        (out / name).write_text("old", encoding="utf-8")
    _jsonl_run(tmp_path, train, test, out)
    names = set(_tree(out))
    assert "quality_cost.png" not in names and "mine.txt" in names
    assert (out / "split" / "val.jsonl").read_text(encoding="utf-8") != "{}\n"
    assert (out / "predictions.jsonl").read_text(encoding="utf-8") != "old"
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["setup"]["out"] == str(out)


def test_a_run_leaves_a_users_own_files_in_split_and_never_replaces_its_own_input(
        tmp_path: Path, fast_static: None) -> None:
    """A run moved the whole split/ folder aside and deleted it: a user's notes and hand-labelled hold-out in
    out/split were lost, and with --train out/split/train.jsonl the user's own training file was replaced by the
    run's copy."""
    out = tmp_path / "proj"
    (out / "split").mkdir(parents=True)
    train = _write(out / "split" / "train.jsonl", _rows(20))
    test = _write(out / "split" / "test.jsonl", _rows(5, prefix="t"))
    (out / "split" / "README.txt").write_text("my notes", encoding="utf-8")
    before = _tree(out)
    with pytest.raises(ValueError, match=rf"^--train {re.escape(str(train))} is split/train.jsonl in --out "
                                         rf"{re.escape(str(out))}, which this run writes in its place"):
        _jsonl_run(tmp_path, train, test, out)
    assert _tree(out) == before
    mine = _write(tmp_path / "train.jsonl", _rows(20, prefix="m"))
    _jsonl_run(tmp_path, mine, _write(tmp_path / "test.jsonl", _rows(5, prefix="t")), out)
    after = _tree(out)
    assert after["split/README.txt"] == b"my notes"
    assert after["split/train.jsonl"] != before["split/train.jsonl"]  # the run's own split, with its ids
    assert {"split/val.jsonl", "split/test.jsonl", "results.json"} <= set(after)


def test_a_split_that_is_a_link_or_a_file_is_replaced_itself_never_written_through(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_static: None) -> None:
    """With out/split a link to the user's data folder, a run moved the files there aside, deleted them and wrote
    its own in their place; a dangling link failed the run after all its work."""
    import eval.harness as harness

    userdata = tmp_path / "userdata"
    userdata.mkdir()
    train = _write(userdata / "train.jsonl", _rows(20))
    test = _write(userdata / "test.jsonl", _rows(5, prefix="t"))
    (userdata / "notes.txt").write_text("mine", encoding="utf-8")
    mine = {p.name: p.read_bytes() for p in userdata.iterdir()}
    out = tmp_path / "out"
    out.mkdir()
    (out / "split").symlink_to(userdata)
    _jsonl_run(tmp_path, train, test, out)  # the link's target is no file the run replaces
    assert {p.name: p.read_bytes() for p in userdata.iterdir()} == mine
    assert (out / "split").is_dir() and not (out / "split").is_symlink()
    assert {"train.jsonl", "val.jsonl", "test.jsonl"} <= {p.name for p in (out / "split").iterdir()}
    for odd in ("dangling", "file"):
        shutil.rmtree(out / "split")
        if odd == "dangling":
            (out / "split").symlink_to(tmp_path / "gone")
        else:
            (out / "split").write_text("a file", encoding="utf-8")
        _jsonl_run(tmp_path, train, test, out)
        assert (out / "split" / "train.jsonl").is_file(), odd
    # A publish that fails part way puts the link back as it was.
    shutil.rmtree(out / "split")
    (out / "split").symlink_to(userdata)
    real = os.replace
    monkeypatch.setattr(harness.os, "replace", _refusing_report_md(real))
    with pytest.raises(ValueError, match="cannot put this run's files in place"):
        _jsonl_run(tmp_path, train, test, out)
    assert (out / "split").is_symlink() and {p.name: p.read_bytes() for p in userdata.iterdir()} == mine


def test_a_file_an_output_links_to_may_be_given(tmp_path: Path, fast_static: None) -> None:
    """out/split/train.jsonl a link to the user's file: the run replaces the link, not the file, so --train may
    name the file (it was refused)."""
    train = _write(tmp_path / "train.jsonl", _rows(20))
    test = _write(tmp_path / "test.jsonl", _rows(5, prefix="t"))
    out = tmp_path / "out"
    (out / "split").mkdir(parents=True)
    (out / "split" / "train.jsonl").symlink_to(train)
    before = train.read_bytes()
    _jsonl_run(tmp_path, train, test, out)
    assert train.read_bytes() == before and not (out / "split" / "train.jsonl").is_symlink()


def test_a_link_loop_among_the_outputs_is_no_crash(tmp_path: Path, fast_static: None) -> None:
    train = _write(tmp_path / "train.jsonl", _rows(20))
    test = _write(tmp_path / "test.jsonl", _rows(5, prefix="t"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").symlink_to(out / "results.json")
    _jsonl_run(tmp_path, train, test, out)
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["metrics"]


# ---------------------------------------------------------------- 5: errors name the flag and the path


def test_out_train_test_and_cache_problems_name_the_flag_and_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    train = _write(tmp_path / "train.jsonl", _rows(5))
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    out = str(tmp_path / "out")
    base = ["eval", "--no-plots", "--encoder", "static"]
    assert _cli([*base, "--train", str(train), "--test", str(train), "--out", str(afile)]) == 1
    err = capsys.readouterr().err
    assert f"--out {afile}: exists and is not a folder" in err and "Errno" not in err
    missing = tmp_path / "nope.jsonl"
    assert _cli([*base, "--train", str(missing), "--test", str(train), "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"--train {missing}: No such file or directory" in err and "Errno" not in err
    assert _cli([*base, "--train", str(train), "--test", str(tmp_path), "--out", out]) == 1
    assert f"--test {tmp_path}: Is a directory" in capsys.readouterr().err
    assert not Path(out).exists()
    with pytest.raises(ValueError, match=r"^--out .*afile/sub: cannot create the folder \(Not a directory\)$"):
        _jsonl_run(tmp_path, train, train, afile / "sub")
    # The embedding cache under a file: the setting and the path are named, before any work.
    monkeypatch.setenv("MOE_CACHE_DIR", str(afile / "cache"))
    assert _cli([*base, "--train", str(train), "--test", str(train), "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"embedding cache {afile / 'cache' / 'embeddings'} (MOE_CACHE_DIR={afile / 'cache'}): cannot create" in err
    assert "Not a directory" in err
    assert "Errno" not in err
    with pytest.raises(ValueError, match=r"embedding cache .*afile.*: cannot write \(Not a directory\); point "
                                         "MOE_CACHE_DIR"):
        CachedEncoder(FakeHashingEncoder(), afile, max_length=256, progress=False).encode(["a query"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other_width"])
def test_an_unreadable_cache_shard_is_embedded_again_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    """A shard cut short (a killed run, a full disk) raised BadZipFile with a traceback, and one overwritten with
    other bytes numpy's advice to load it with allow_pickle, naming no file; the cache is only a cache."""
    texts = ["first query", "second query", "third query"]
    first = CachedEncoder(FakeHashingEncoder(), tmp_path, max_length=256, progress=False)
    want = first.encode(texts)
    [shard] = first.folder.glob("shard-*.npz")
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "garbage":
        shard.write_bytes(b"\x80\x04not a numpy file at all")
    else:
        np.savez(shard.with_suffix(""), keys=np.zeros((3, 32), np.uint8), vectors=np.zeros((3, 5), np.float32))
    with caplog.at_level(logging.WARNING, logger="eval.embeddings"):
        again = CachedEncoder(FakeHashingEncoder(), tmp_path, max_length=256, progress=False).encode(texts)
    np.testing.assert_allclose(again, want)
    assert any(f"embedding cache {shard}: unreadable" in r.getMessage() for r in caplog.records), caplog.text
    [rewritten] = first.folder.glob("shard-*.npz")  # written again, readable
    with np.load(rewritten, allow_pickle=False) as data:
        assert data["vectors"].shape == (3, want.shape[1])


def test_a_cache_shard_that_cannot_be_opened_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Too many open files, or no permission on a shared cache, is not the file's fault: it was removed."""
    import builtins

    texts = ["first query", "second query"]
    first = CachedEncoder(FakeHashingEncoder(), tmp_path, max_length=256, progress=False)
    want = first.encode(texts)
    [shard] = first.folder.glob("shard-*.npz")
    real_open = builtins.open

    def refusing(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(str(file)) == shard:
            raise OSError(24, "Too many open files")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    with caplog.at_level(logging.WARNING, logger="eval.embeddings"):
        again = CachedEncoder(FakeHashingEncoder(), tmp_path, max_length=256, progress=False).encode(texts)
    monkeypatch.setattr(builtins, "open", real_open)
    np.testing.assert_allclose(again, want)
    assert shard.is_file() and "cannot read it (Too many open files)" in caplog.text


def test_training_data_with_one_label_names_the_file(tmp_path: Path) -> None:
    one = _write(tmp_path / "one.jsonl", _rows(5, labels=("alpha",)))
    test = _write(tmp_path / "test.jsonl", _rows(2))
    with pytest.raises(ValueError, match=rf"^--train {re.escape(str(one))}: its queries carry 1 label\(s\): "
                                         r"'alpha'; routing needs at least two$"):
        _jsonl_run(tmp_path, one, test, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the refused run leaves no empty --out folder behind
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError, match="routing needs at least two"):
        _jsonl_run(tmp_path, one, test, tmp_path / "kept")
    assert (tmp_path / "kept").is_dir()  # a folder that was there before stays


# ---------------------------------------------------------------- 6: each warning once per run


def test_each_training_warning_is_shown_once_per_run(tmp_path: Path, fast_static: None,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    rows = _rows(30)
    conflicting = [{**r, "id": f"{r['id']}-again", "label": "beta" if r["label"] != "beta" else "gamma"}
                   for r in rows[::10]]
    train = _write(tmp_path / "train.jsonl", rows + conflicting)
    test = _write(tmp_path / "test.jsonl", _rows(5, prefix="t"))
    with caplog.at_level(logging.WARNING):
        _jsonl_run(tmp_path, train, test, tmp_path / "out")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("carry more than one label" in m for m in messages) == 1, messages
    assert len(messages) == len(set(messages)), messages


def test_warnings_once_drops_repeats_only_inside_the_run(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("router.gate")
    with caplog.at_level(logging.WARNING):
        with warnings_once():
            for _ in range(3):
                log.warning("same %d", 1)
            log.warning("same %d", 2)
        log.warning("same %d", 1)
    assert [r.getMessage() for r in caplog.records] == ["same 1", "same 2", "same 1"]
