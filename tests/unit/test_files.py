"""Files a running service may be reading are replaced whole: ``router.files`` writes under temporary names and
renames, and a gate artifact is staged and published with the manifests last, so a reader (a hot reload, a replica
starting) meets the old artifact or the new one, and a save that fails leaves the old one as it was."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from router import files
from router.encoders import sha256_file
from router.files import STAGING_PREFIX, atomic_write_text, staged
from router.gate import Gate, train_gate
from tests.doubles.fakes import FakeHashingEncoder

QUERIES = {
    "math": ["solve this integral", "what is the derivative of x squared", "prove the triangle inequality",
             "factor the polynomial", "compute the eigenvalues of this matrix", "sum of a geometric series"],
    "code": ["write a python function", "fix this segfault in my C code", "why does my rust borrow fail",
             "refactor this java class", "explain this regex", "a bash loop over files"],
}


def _gate(extra: str = "") -> Gate:
    texts = [q + extra for qs in QUERIES.values() for q in qs]
    labels = [e for e, qs in QUERIES.items() for _ in qs]
    return train_gate(texts, labels, FakeHashingEncoder(), experts=list(QUERIES), progress=False)


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_write_text_replaces_whole_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "weights.json"
    target.write_text("old\n")
    inode = target.stat().st_ino
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert target.stat().st_ino != inode  # renamed over, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.json"]
    # The mode a plain write gives (not mkstemp's 0600): a service running as another user reads it.
    (tmp_path / "plain.json").write_text("x")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)


def test_a_staged_write_publishes_data_files_first_and_manifests_last(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "feedback.sqlite3").write_text("verdicts")  # lives beside the artifact: never touched
    published: list[str] = []
    real = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        published.append(str(Path(dst).relative_to(tmp_path)))
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with staged(tmp_path) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(STAGING_PREFIX)
        (stage / "cascade.json").write_text("{}")
        (stage / "gate.json").write_text("{}")
        (stage / "fast").mkdir()
        (stage / "fast" / "gate.json").write_text("{}")
        (stage / "fast" / "weights.npz").write_text("w")
        (stage / "weights.npz").write_text("w")
        (stage / "vote_weights.json").write_text("{}")
        assert published == []  # nothing is visible while the stage is written
    assert sorted(published[:3]) == ["fast/weights.npz", "vote_weights.json", "weights.npz"]
    assert published[3:] == ["fast/gate.json", "gate.json", "cascade.json"]
    assert (tmp_path / "feedback.sqlite3").read_text() == "verdicts"
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_a_staged_write_that_fails_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "gate.json").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), staged(tmp_path) as stage:
        (stage / "gate.json").write_text("new")
        raise RuntimeError("disk full")
    assert (tmp_path / "gate.json").read_text() == "old"
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_a_staging_folder_left_by_a_killed_run_is_removed_once_stale(tmp_path: Path) -> None:
    stale, recent = tmp_path / f"{STAGING_PREFIX}dead", tmp_path / f"{STAGING_PREFIX}running"
    for folder in (stale, recent):
        folder.mkdir()
        (folder / "weights.npz").write_text("half")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    with staged(tmp_path) as stage:
        (stage / "gate.json").write_text("{}")
    assert not stale.exists()
    assert recent.exists()  # perhaps another moe train still writing


def test_a_staging_folder_of_a_process_gone_from_this_host_is_removed_at_once(tmp_path: Path) -> None:
    """A moe train killed while writing left its stage for an hour, through later trains; a stage names its
    process and host now, and one whose process has ended here goes at the next train."""
    import socket
    import subprocess

    ended = subprocess.Popen(["true"])
    ended.wait()  # its pid names no process now
    host = socket.gethostname()
    dead = tmp_path / f"{STAGING_PREFIX}{ended.pid}@{host}-abc123"
    alive = tmp_path / f"{STAGING_PREFIX}{os.getppid()}@{host}-def456"  # a live process: perhaps still writing
    elsewhere = tmp_path / f"{STAGING_PREFIX}{ended.pid}@another-{host}-ghi789"  # its pid means nothing here
    for folder in (dead, alive, elsewhere):
        folder.mkdir()
    with staged(tmp_path) as stage:
        assert stage.name.startswith(f"{STAGING_PREFIX}{os.getpid()}@{host}-")
        (stage / "gate.json").write_text("{}")
    assert not dead.exists() and alive.exists() and elsewhere.exists()


def test_a_gate_save_that_fails_midway_leaves_the_served_artifact_loadable(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    served = _gate()
    served.save(tmp_path / "gate")
    before = _digests(tmp_path / "gate")
    assert list(before) == ["examples.npz", "gate.json", "weights.npz"]

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    # The weights are written, then the examples fail: in place, the weights would already be the new gate's.
    monkeypatch.setattr(np, "savez_compressed", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _gate(" please").save(tmp_path / "gate")
    monkeypatch.undo()
    assert _digests(tmp_path / "gate") == before
    loaded = Gate.load(tmp_path / "gate", FakeHashingEncoder())
    query = FakeHashingEncoder().encode(["fix this segfault"])
    assert np.allclose(loaded.predict_proba(query, ["fix this segfault"]),
                       served.predict_proba(query, ["fix this segfault"]))
    retrained = _gate(" please")
    retrained.save(tmp_path / "gate")
    after = _digests(tmp_path / "gate")
    assert after.keys() == before.keys() and after["weights.npz"] != before["weights.npz"]
    Gate.load(tmp_path / "gate", FakeHashingEncoder())


_KILLED_DURING_RENAMES = """
import os, sys
from pathlib import Path
from router import files
from tests.unit.test_files import _gate
renames = 0
real = os.replace
def replace(src, dst):
    global renames
    renames += 1
    if renames == 2:  # the weights are in place; the examples and gate.json are not
        os._exit(9)
    real(src, dst)
files.os.replace = replace
_gate(" please").save(Path(sys.argv[1]))
"""


def _probe(gate: Gate) -> np.ndarray:
    texts = ["fix this segfault", "sum of a geometric series"]
    return gate.predict_proba(FakeHashingEncoder().encode(texts), texts)


def test_a_train_killed_during_its_renames_is_finished_by_the_next_reader(tmp_path: Path) -> None:
    """The stage is sealed before its renames; a run killed part-way leaves the artifact mixed (refused by its
    digests) and the sealed stage, whose renames the next reader or writer finishes."""
    import subprocess
    import sys

    from router.gate_artifact import GateArtifactMismatch

    _gate().save(tmp_path / "gate")
    killed = subprocess.run([sys.executable, "-c", _KILLED_DURING_RENAMES, str(tmp_path / "gate")],
                            cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr
    stage, = (tmp_path / "gate").glob(f"{STAGING_PREFIX}*")
    assert (stage / files.SEALED).is_file() and (stage / "gate.json").is_file()
    with pytest.raises(GateArtifactMismatch, match=r"\.npz: contents differ"):
        Gate.load(tmp_path / "gate", FakeHashingEncoder())
    files.recover(tmp_path / "gate")
    assert not stage.exists()
    assert np.allclose(_probe(Gate.load(tmp_path / "gate", FakeHashingEncoder())), _probe(_gate(" please")))
    assert not np.allclose(_probe(_gate(" please")), _probe(_gate()))  # the probe tells the two gates apart


def _killed_stage(folder: Path, artifact: Path, *, published: tuple[str, ...]) -> Path:
    """The stage that a run (a process now gone) killed after renaming ``published`` of ``artifact``'s files left."""
    import shutil
    import socket
    import subprocess

    ended = subprocess.Popen(["true"])
    ended.wait()
    stage = folder / f"{STAGING_PREFIX}{ended.pid}@{socket.gethostname()}-killed"
    shutil.copytree(artifact, stage)
    files._seal(stage, folder)
    for name in published:
        os.replace(stage / name, folder / name)
    return stage


def test_a_killed_runs_stage_that_a_later_train_superseded_is_removed_not_published(tmp_path: Path) -> None:
    """A stage sealed before the manifests now in the folder were published is older than what is served: it is
    removed, never published over the newer gate."""
    _gate(" please").save(tmp_path / "new")
    _gate().save(tmp_path / "gate")
    stage = _killed_stage(tmp_path / "gate", tmp_path / "new", published=())
    time.sleep(0.01)
    _gate(" later").save(tmp_path / "later")
    for name in ("weights.npz", "examples.npz", "gate.json"):  # a later run's publish, from another host say
        os.replace(tmp_path / "later" / name, tmp_path / "gate" / name)
    files.recover(tmp_path / "gate")
    assert not stage.exists()
    assert np.allclose(_probe(Gate.load(tmp_path / "gate", FakeHashingEncoder())), _probe(_gate(" later")))


def test_the_next_train_finishes_a_killed_publish_before_its_own(tmp_path: Path) -> None:
    """A stage's files the killed run had not renamed are published by the next ``staged`` first, then its own:
    what the killed run wrote and the next one does not (a fast stage, say) is not lost half-way."""
    _gate(" please").save(tmp_path / "new")
    (tmp_path / "new" / "cascade.json").write_text("{}")
    _gate().save(tmp_path / "gate")
    _killed_stage(tmp_path / "gate", tmp_path / "new", published=("weights.npz",))
    with staged(tmp_path / "gate") as stage:
        (stage / "vote_weights.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "gate").iterdir()) == [
        "cascade.json", "examples.npz", "gate.json", "vote_weights.json", "weights.npz"]
    assert np.allclose(_probe(Gate.load(tmp_path / "gate", FakeHashingEncoder())), _probe(_gate(" please")))


def test_a_killed_runs_stage_is_not_published_over_a_backup_restored_since(tmp_path: Path) -> None:
    """A train killed after renaming its weights; the operator then restores the served artifact from a backup
    (cp -a keeps its old times). The stage's rest is not published over it: the weights it had renamed are no
    longer in place, so publishing the rest would mix two gates."""
    import shutil

    _gate().save(tmp_path / "gate")
    shutil.copytree(tmp_path / "gate", tmp_path / "backup")
    _gate(" please").save(tmp_path / "new")
    stage = _killed_stage(tmp_path / "gate", tmp_path / "new", published=("weights.npz",))
    for name in ("weights.npz", "examples.npz", "gate.json"):
        shutil.copy2(tmp_path / "backup" / name, tmp_path / "gate" / name)
    files.recover(tmp_path / "gate")
    assert not stage.exists()
    assert np.allclose(_probe(Gate.load(tmp_path / "gate", FakeHashingEncoder())), _probe(_gate()))


def test_a_sealed_stage_of_another_host_is_finished_after_a_minute(tmp_path: Path) -> None:
    """A trainer in another container (another host name, whose process cannot be seen from here) killed during
    its renames: its sealed stage is finished by the next load here once it has been sealed a minute, not an
    hour; a stage still being written there (unsealed) is left to it."""
    import socket

    _gate().save(tmp_path / "gate")
    _gate(" please").save(tmp_path / "new")
    killed = _killed_stage(tmp_path / "gate", tmp_path / "new", published=("weights.npz",))
    elsewhere = killed.rename(tmp_path / "gate" / f"{STAGING_PREFIX}1@another-{socket.gethostname()}-x")
    writing = tmp_path / "gate" / f"{STAGING_PREFIX}2@another-{socket.gethostname()}-y"
    writing.mkdir()
    files.recover(tmp_path / "gate")
    assert elsewhere.exists()  # sealed just now: perhaps still renaming
    minute_ago = time.time() - 61
    os.utime(elsewhere / files.SEALED, (minute_ago, minute_ago))
    files.recover(tmp_path / "gate")
    assert not elsewhere.exists() and writing.exists()
    assert np.allclose(_probe(Gate.load(tmp_path / "gate", FakeHashingEncoder())), _probe(_gate(" please")))


def test_a_manifest_this_process_may_not_read_is_still_replaced(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename needs only the folder's write permission: another user's gate.json (mode 0600) is replaced as it
    was before seals hashed it, and the seal stands it in by its inode, size and time."""
    (tmp_path / "gate.json").write_text("theirs")
    real = files.sha256_file

    def unreadable(path: str | Path) -> str:
        if Path(path) == tmp_path / "gate.json":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(files, "sha256_file", unreadable)
    with staged(tmp_path) as stage:
        (stage / "gate.json").write_text("ours")
    assert (tmp_path / "gate.json").read_text() == "ours"
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_a_seal_that_cannot_be_written_leaves_no_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(stage: Path, target: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "_seal", full)
    with pytest.raises(OSError, match="No space left"), staged(tmp_path) as stage:
        (stage / "gate.json").write_text("new")
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*")) and not (tmp_path / "gate.json").exists()


def test_a_gate_saved_inside_another_stage_is_sealed_once_with_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """moe train saves its gate into the stage of the whole artifact: only that outer stage is sealed (its files
    hashed), not the gate's own stage inside it, which the outer one's seal already covers."""
    sealed: list[Path] = []
    real = files._seal

    def counted(stage: Path, target: Path) -> None:
        sealed.append(target)
        real(stage, target)

    monkeypatch.setattr(files, "_seal", counted)
    with staged(tmp_path / "gate") as stage:
        _gate().save(stage)
    assert sealed == [tmp_path / "gate"]
    assert np.allclose(_probe(Gate.load(tmp_path / "gate", FakeHashingEncoder())), _probe(_gate()))
