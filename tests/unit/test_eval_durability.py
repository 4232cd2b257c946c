"""Evaluation files a kill or a full disk must not leave cut short, and full-disk errors that name the file.

A full disk is simulated in-process (``full_disk``): writes to files under one folder write what fits of the bytes
left, then fail with ENOSPC, as a real full disk does; nothing is mounted.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import eval.peer as peer
from eval.convert import convert
from eval.embeddings import CachedEncoder
from eval.harness import run_suite
from eval.report import write_results
from router.cli import main as cli_main
from tests.doubles.fakes import FakeHashingEncoder

DEAD_PID = 2**22 + 12345  # above the default pid_max: no such process


# ---------------------------------------------------------------- a full disk, in-process


class Disk:
    """The bytes left on a disk holding ``root``; ``free=None``: not full yet."""

    def __init__(self, root: Path, free: int | None = None) -> None:
        self.root, self.free = root.resolve(), free

    def holds(self, file: Any) -> bool:
        if isinstance(file, int):  # os.fdopen(fd) (router.files.atomic_write_text): the file the fd is open on
            try:
                file = os.readlink(f"/proc/self/fd/{file}")
            except OSError:
                return False
        try:
            return Path(os.path.abspath(os.fsdecode(file))).is_relative_to(self.root)
        except TypeError:
            return False


class FillingFile:
    """A file open for writing on ``disk``: a write past its free bytes writes what fits, then raises ENOSPC."""

    def __init__(self, fh: Any, disk: Disk) -> None:
        self._fh, self._disk = fh, disk

    def write(self, data: Any) -> int:
        if not isinstance(data, str):
            data = bytes(data)
        free = self._disk.free
        if free is not None and len(data) > free:
            self._fh.write(data[:free])
            self._fh.flush()
            self._disk.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if free is not None:
            self._disk.free = free - len(data)
        return int(self._fh.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._fh)


def full_disk(monkeypatch: pytest.MonkeyPatch, root: Path, free: int | None = 0) -> Disk:
    """From now on, files opened for writing under ``root`` (by ``open``, ``Path.open``/``write_text``,
    ``os.fdopen``, ``zipfile``) share ``free`` bytes."""
    disk = Disk(root, free)
    real = io.open

    def opening(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and disk.holds(file):
            return FillingFile(fh, disk)
        return fh

    monkeypatch.setattr(io, "open", opening)
    monkeypatch.setattr(builtins, "open", opening)
    return disk


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_simulated_full_disk_cuts_an_in_place_write_short(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulation itself: an in-place rewrite loses the earlier text, as on a real full disk."""
    target = tmp_path / "f.txt"
    target.write_text("the earlier text, whole\n", encoding="utf-8")
    full_disk(monkeypatch, tmp_path, free=5)
    with pytest.raises(OSError) as caught:
        target.write_text("the new text, longer than five bytes\n", encoding="utf-8")
    assert caught.value.errno == errno.ENOSPC
    assert target.read_text(encoding="utf-8") == "the n"


# ---------------------------------------------------------------- F3: the semantic-router peer's cache


def _split(suite_out: Path) -> None:
    (suite_out / "split").mkdir(parents=True)
    for part in peer.SPLIT_PARTS:
        (suite_out / "split" / f"{part}.jsonl").write_text(
            json.dumps({"id": f"{part}-1", "query": f"a {part} query", "label": "a"}) + "\n", encoding="utf-8")


def _fake_peer(monkeypatch: pytest.MonkeyPatch, result: dict[str, Any],
               after: Any = None) -> list[list[str]]:
    """``subprocess.run`` for eval.peer: the install does nothing, the bench script writes ``result`` to its
    ``--out`` (then calls ``after``). Returns the commands run."""
    calls: list[list[str]] = []

    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if cmd[1] == str(peer._SCRIPT):
            out = Path(cmd[cmd.index("--out") + 1])
            out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            if after is not None:
                after()
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(peer.subprocess, "run", run)
    return calls


def test_a_peer_cache_cut_short_is_scored_again_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A peer_semantic_router.json cut short (a kill or a full disk mid-write) failed the suite with
    JSONDecodeError in every later `make results`, until removed by hand."""
    suite_out = tmp_path / "snips-intent"
    _split(suite_out)
    cached = suite_out / "peer_semantic_router.json"
    cached.write_text('{"accuracy": 0.97, "test": 100, "split_sha', encoding="utf-8")
    calls = _fake_peer(monkeypatch, {"accuracy": 0.9, "test": 3})
    with caplog.at_level(logging.WARNING, logger="eval.peer"):
        result = peer.score_semantic_router(suite_out)
    assert result["accuracy"] == 0.9 and len(calls) == 2  # installed and scored again
    [warning] = [r.getMessage() for r in caplog.records if r.name == "eval.peer"]
    assert str(cached) in warning and "\n" not in warning
    assert json.loads(cached.read_text(encoding="utf-8")) == result  # the cache is whole again
    calls.clear()
    assert peer.score_semantic_router(suite_out) == result and calls == []  # and reused


@pytest.mark.parametrize("content", ["[1, 2, 3]\n", "\xff\xfe not utf-8"])
def test_a_peer_cache_holding_no_result_is_a_miss(content: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    suite_out = tmp_path / "s"
    _split(suite_out)
    (suite_out / "peer_semantic_router.json").write_bytes(content.encode("latin-1"))
    _fake_peer(monkeypatch, {"accuracy": 0.5, "test": 3})
    assert peer.score_semantic_router(suite_out)["accuracy"] == 0.5


def test_a_full_disk_while_caching_the_peer_leaves_a_whole_file(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """eval/peer.py rewrote the cache in place to add the split's sha256: a full disk then left it cut short."""
    suite_out = tmp_path / "s"
    _split(suite_out)
    cached = suite_out / "peer_semantic_router.json"
    cached.write_text(json.dumps({"accuracy": 0.1, "split_sha256": "an earlier split"}), encoding="utf-8")
    disk = full_disk(monkeypatch, tmp_path, free=None)
    fresh = {"accuracy": 0.9, "test": 3}

    def fill() -> None:
        disk.free = 10

    _fake_peer(monkeypatch, fresh, after=fill)
    with pytest.raises(OSError, match="No space left on device"):
        peer.score_semantic_router(suite_out)
    assert json.loads(cached.read_text(encoding="utf-8")) == fresh  # the peer's own file, whole
    assert sorted(p.name for p in suite_out.iterdir()) == ["peer_semantic_router.json", "split"]


def test_the_peer_script_writes_its_result_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/peers/semantic_router_accuracy.py wrote its --out in place: a full disk left it cut short."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the script sets them on import; restored after the test
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from bench.peers.semantic_router_accuracy import write_json

    out = tmp_path / "peer_semantic_router.json"
    write_json(out, {"accuracy": 0.1})
    before = out.read_bytes()
    full_disk(monkeypatch, tmp_path, free=5)
    with pytest.raises(OSError, match="No space left on device"):
        write_json(out, {"accuracy": 0.9, "test": 100})
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [out.name]
    monkeypatch.undo()
    write_json(out, {"accuracy": 0.9})
    assert json.loads(out.read_text(encoding="utf-8")) == {"accuracy": 0.9}
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# ---------------------------------------------------------------- F4: results.json, report.md, README


def test_results_rewritten_on_a_full_disk_leave_the_earlier_files_whole(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``make results`` and attach_peer rewrite results.json and report.md (write_results) in place."""
    out = tmp_path / "snips-intent"
    write_results(out, {"metrics": {"accuracy": 0.5}, "suite": "snips-intent", "notes": []})
    before = _tree(out)
    for free in (0, 40, 2000):  # nothing fits; part of results.json; results.json but not report.md
        full_disk(monkeypatch, tmp_path, free=free)
        with pytest.raises(OSError, match="No space left on device"):
            write_results(out, {"metrics": {"accuracy": 0.9}, "suite": "snips-intent", "notes": ["x" * 3000],
                                "peer_semantic_router": {"accuracy": 0.8}})
        monkeypatch.undo()
        assert set(_tree(out)) == set(before)  # no temporary file left
        assert json.loads((out / "results.json").read_text(encoding="utf-8"))["metrics"] in (
            {"accuracy": 0.5}, {"accuracy": 0.9})  # one run's, whole
        assert (out / "report.md").read_bytes() == before["report.md"]


def test_attach_peer_on_a_full_disk_leaves_results_json_whole(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "s"
    results = {"metrics": {"accuracy": 0.5}, "suite": "s", "setup": {"test": 3}, "notes": []}
    write_results(out, results)
    before = _tree(out)
    full_disk(monkeypatch, tmp_path, free=30)
    with pytest.raises(OSError, match="No space left on device"):
        peer.attach_peer(results, {"accuracy": 0.9, "test": 3}, out)
    assert _tree(out) == before


def test_the_readme_on_a_full_disk_is_left_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """eval.results rewrote README.md in place: a full disk left it cut short, its earlier text lost."""
    import eval.results as results

    monkeypatch.setattr(results, "_run_one", lambda *args: {})
    monkeypatch.setattr(results, "load_results", lambda root, suites: [])
    monkeypatch.setattr(results, "render_block", lambda rows: "| the new results table |\n" * 50)
    readme = tmp_path / "docs" / "README.md"
    readme.parent.mkdir()
    readme.write_text("# moe-router\n\n" + "Prose the user wrote.\n" * 200
                      + "<!-- results:start -->\n<!-- results:end -->\n\nMore prose.\n", encoding="utf-8")
    before = readme.read_bytes()
    argv = ["--suites", "snips-intent", "--out", str(tmp_path / "out"), "--readme", str(readme)]
    disk = full_disk(monkeypatch, readme.parent, free=100)
    assert results.main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: --readme {readme}: cannot write it (No space left on device); it is left as it was" in err
    assert readme.read_bytes() == before and [p.name for p in readme.parent.iterdir()] == ["README.md"]
    disk.free = None  # room again
    assert results.main(argv) == 0
    text = readme.read_text(encoding="utf-8")
    assert "| the new results table |" in text and text.endswith("More prose.\n")


# ---------------------------------------------------------------- F7: the embedding cache's temporary files


def test_a_shard_that_cannot_be_written_leaves_no_temporary_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cache = CachedEncoder(FakeHashingEncoder(), tmp_path / "cache", max_length=256, progress=False)
    full_disk(monkeypatch, tmp_path, free=300)
    with pytest.raises(ValueError, match=rf"^embedding cache {re.escape(str(cache.folder))}: cannot write \(No "
                                         r"space left on device\)"):
        cache.encode(["first query", "second query"])
    assert list(cache.folder.iterdir()) == []


def test_a_killed_runs_temporary_shard_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """Only a file of this host whose process is gone, or one untouched for a day (another host's, whose processes
    cannot be seen from here, or one an older version named without its host)."""
    cache = CachedEncoder(FakeHashingEncoder(), tmp_path, max_length=256, progress=False)
    cache.folder.mkdir(parents=True)
    host = socket.gethostname()
    with pytest.raises(ProcessLookupError):
        os.kill(DEAD_PID, 0)
    gone = [f".tmp-{DEAD_PID}@{host}-0123456789abcdef.npz", ".tmp-17@another-host-0123456789abcdef.npz"]
    kept = [f".tmp-{os.getppid()}@{host}-0123456789abcdef.npz",  # alive
            f".tmp-{os.getpid()}@{host}-0123456789abcdef.npz",  # this process's own
            f".tmp-{DEAD_PID}@another-host-0123456789abcdef.npz",  # its process cannot be seen from here
            f".tmp-{DEAD_PID}-0123456789abcdef.npz"]  # an older version's name: no host, so not known to be gone
    for name in gone + kept:
        (cache.folder / name).write_bytes(b"part of a shard")
    day_ago = time.time() - 2 * 86_400
    os.utime(cache.folder / gone[1], (day_ago, day_ago))
    vectors = cache.encode(["a query"])
    assert vectors.shape == (1, cache.dim)
    names = sorted(p.name for p in cache.folder.iterdir())
    assert [n for n in names if n.startswith(".tmp-")] == sorted(kept)
    assert len([n for n in names if n.startswith("shard-")]) == 1


# ---------------------------------------------------------------- F8: full-disk errors name --out


def test_convert_on_a_full_disk_names_out_and_keeps_the_earlier_file(data_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`moe convert` said only "error: [Errno 28] No space left on device"."""
    out = tmp_path / "o" / "snips.jsonl"
    assert convert("snips-intent", data_dir, "train", out, limit=10) == 10
    before = out.read_bytes()
    full_disk(monkeypatch, out.parent, free=len(before) + 100)
    with pytest.raises(ValueError, match=rf"^--out {re.escape(str(out))}: cannot write there \(No space left on "
                                         r"device\)$"):
        convert("snips-intent", data_dir, "train", out, limit=50)
    assert out.read_bytes() == before and [p.name for p in out.parent.iterdir()] == [out.name]
    code = cli_main(["convert", "snips-intent", "--split", "train", "--limit", "50", "--out", str(out),
                     "--data", str(data_dir)])
    err = capsys.readouterr().err
    assert code == 1 and f"error: --out {out}: cannot write there (No space left on device)" in err
    assert out.read_bytes() == before and [p.name for p in out.parent.iterdir()] == [out.name]


def test_convert_whose_last_lines_fail_to_flush_names_out(data_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk may only be reported when the buffered lines are written out, as the file is closed."""
    import eval.convert as convert_module

    out = tmp_path / "snips.jsonl"
    out.write_text("earlier\n", encoding="utf-8")
    real_open = Path.open

    class Unflushable(io.StringIO):
        def close(self) -> None:
            super().close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def opening(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return Unflushable() if "w" in mode and self.parent == tmp_path else real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(convert_module.Path, "open", opening)
    with pytest.raises(ValueError, match=rf"^--out {re.escape(str(out))}: cannot write there \(No space"):
        convert("snips-intent", data_dir, "train", out, limit=5)
    assert out.read_text(encoding="utf-8") == "earlier\n"


def _rows(n_per_label: int, prefix: str = "q") -> list[dict[str, str]]:
    rng = np.random.default_rng(len(prefix) + n_per_label)
    rows = []
    for label in ("alpha", "beta", "gamma"):
        words = [f"{label}word{k}" for k in range(8)]
        rows += [{"id": f"{prefix}-{label}-{i}", "query": " ".join(rng.choice(words, 4)) + f" {prefix}{i}",
                  "label": label} for i in range(n_per_label)]
    return rows


def _jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _eval(tmp_path: Path, out: Path, train: Path, test: Path) -> dict[str, Any]:
    return run_suite("jsonl", None, out, encoder=FakeHashingEncoder(), train=train, test=test, progress=False,
                     plots=False, cache_dir=tmp_path / "cache")


def _an_earlier_run(tmp_path: Path) -> tuple[Path, Callable[[], None]]:
    """An earlier run's results in ``tmp_path / "out"``, and a check to call once the disk is made to fail: a new
    run there is refused naming --out, and leaves the earlier run's files as they were, with no staging folder."""
    test = _jsonl(tmp_path / "test.jsonl", _rows(5, prefix="t"))
    out = tmp_path / "out"
    _eval(tmp_path, out, _jsonl(tmp_path / "train.jsonl", _rows(20)), test)
    before = _tree(out)

    def rerun() -> None:
        with pytest.raises(ValueError, match=rf"^--out {re.escape(str(out))}: cannot write there \(No space left "
                                             r"on device\)"):
            _eval(tmp_path, out, _jsonl(tmp_path / "other.jsonl", _rows(15, prefix="o")), test)
        assert _tree(out) == before and [p.name for p in out.iterdir() if p.name.startswith(".")] == []

    return out, rerun


@pytest.mark.parametrize("free", [0, 3000])  # the first file; a later one
def test_eval_on_a_full_disk_names_out_and_keeps_the_earlier_run(free: int, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  fast_static: None) -> None:
    """`moe eval --out` said only "error: [Errno 28] No space left on device" when its staging folder filled."""
    out, rerun = _an_earlier_run(tmp_path)
    full_disk(monkeypatch, out, free=free)
    rerun()


def test_eval_whose_publish_meets_a_full_disk_names_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        fast_static: None) -> None:
    """The publish makes one folder (the earlier run's files go aside there) before its renames."""
    _, rerun = _an_earlier_run(tmp_path)
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if self.name == ".previous":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rerun()


def test_an_error_that_is_not_about_out_is_left_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         fast_static: None) -> None:
    """Only a failure to write --out is reported as one: an OSError elsewhere (reading the data) keeps its own."""
    import eval.labels as labels

    train = _jsonl(tmp_path / "train.jsonl", _rows(20))
    test = _jsonl(tmp_path / "test.jsonl", _rows(5, prefix="t"))

    def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "elsewhere.bin"))

    monkeypatch.setattr(labels, "evaluate_labels", unreadable)
    with pytest.raises(PermissionError):
        _eval(tmp_path, tmp_path / "out", train, test)
