"""Writing files that a running service may be reading: a reader sees the old contents or the new, whole.

``moe train`` replaces a gate artifact that a running service (or a replica starting up) may read at any moment:
its hot reload watches the artifact (``router.reload``). Written in place, a reader could meet a half-written
``.npz``, or new arrays under the old ``gate.json``. So every artifact file is written under a temporary name
and renamed over the old one (a rename within one folder is atomic on POSIX file systems), and a whole artifact is
first written into a staging folder inside its own folder, then published with one rename per file, the
manifests (``gate.json``, then ``cascade.json``) last: the artifact on disk is mixed for the microseconds the
renames take, not for the seconds the writing takes. A reader that still meets the mix is refused by the
manifest's digests (new arrays under the old ``gate.json``), or, for the files no digest ties to the gate
(``cascade.json``, the vote weights), may load it; either way the rename after changes a file the reload watch
stamps, and it reloads again.

A stage is sealed once it is whole, before its renames start: its seal holds the digest of each file it publishes,
and of each manifest of the folder it replaces. A run killed during the renames leaves the artifact mixed and its
sealed stage in place; the next run to write the folder, or to read a gate from it, finishes those renames
(``recover``) where the folder is still as they left it, and otherwise (a later publish, a backup restored)
removes the stage unpublished. An unsealed stage is only removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["MANIFESTS", "SEALED", "STAGING_PREFIX", "abandoned", "atomic_write_text", "owner_tag", "process_gone",
           "recover", "sha256_file", "staged"]

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
# Published last, in this order (deeper folders first): a manifest names the digests of the files beside it, so
# it must not land before them.
MANIFESTS = ("gate.json", "cascade.json")
# A staging folder older than this was left by a run that died (killed mid-write): removed by the next ``staged``,
# as one of this host whose process is gone is at once.
_STALE_S = 3600.0
# Written into a stage once everything in it is written, just before its renames (``_seal``): a stage holding it
# is a whole artifact that ``recover`` may publish for a run that was killed part-way through them.
SEALED = f"{STAGING_PREFIX}sealed"
# How long a sealed stage is left to its own run, whatever host that runs on, before ``recover`` takes it over:
# the renames take microseconds, so a stage sealed this long ago belongs to a run that died or failed during them.
_SEALED_GRACE_S = 60.0


def owner_tag() -> str:
    """``<pid>@<host>-``: what a temporary file or folder's name holds so that a later run can tell one a killed
    process left (``process_gone``) from one a live process is still writing. The host tells a process of another
    machine or container sharing the folder (its own pid numbers) from a dead one here."""
    return f"{os.getpid()}@{socket.gethostname()}-"


def process_gone(tag: str, here: str | None = None) -> bool:
    """Whether ``tag``, ``<pid>@<host>-<rest>`` (``owner_tag`` and a rest holding no ``-``), names a process of
    this host (``here``, default ``socket.gethostname()``) other than this one that no longer runs. A process of
    another host, or a tag of another form, is never gone: its process cannot be seen from here."""
    pid, _, rest = tag.partition("@")
    if not pid.isdecimal() or int(pid) == os.getpid() or rest.rpartition("-")[0] != (here or socket.gethostname()):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def abandoned(path: Path, prefix: str, max_age_s: float, here: str | None = None) -> bool:
    """Whether the temporary file or folder ``path``, named ``<prefix><pid>@<host>-...`` (``owner_tag``), was left
    by a run that was killed: one of this host whose process is gone (``process_gone``), or one untouched for
    ``max_age_s`` (another host's, whose processes cannot be seen from here, or one named without its process).
    One that cannot be read is not."""
    try:
        return (process_gone(path.name.removeprefix(prefix), here)
                or time.time() - path.stat().st_mtime > max_age_s)
    except OSError:
        return False


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` under a temporary name in the same folder, then rename it over ``path``."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp makes the file 0600; give it the mode a plain write would (0666 less the umask), so a service
        # running as another user (the image's) can still read what moe train wrote.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


@contextlib.contextmanager
def staged(directory: str | Path) -> Iterator[Path]:
    """A folder to write a whole artifact into; on a clean exit its files replace ``directory``'s files of the same
    names (``_publish``). An error while the stage is written changes nothing in ``directory``. The stage is sealed
    before the renames (``_seal``): a run killed during them, or a disk failing, leaves it for ``recover`` to
    finish. Files in ``directory`` the stage does not hold (the feedback store beside the artifact, say) are left
    alone."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    # A stage inside another run's stage (a gate saved into the artifact moe train stages) publishes into that
    # stage, which is sealed, then finished or removed, whole: it needs neither a recovery nor a seal of its own.
    inner = _in_staging(target)
    if not inner:
        recover(target)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{owner_tag()}", dir=target))
    try:
        yield stage
        if not inner:
            _seal(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _publish(stage, target)
    shutil.rmtree(stage, ignore_errors=True)


def recover(directory: str | Path) -> None:
    """Deal with the staging folders that runs which were killed left in ``directory``: finish publishing a sealed
    one whose renames were cut short, where ``directory`` is still as that run left it (``_may_finish``); remove
    every other one. A stage is left to its run while that may still be writing it (``abandoned``: a process of
    this host that is gone, or one untouched for an hour), but a sealed one only for ``_SEALED_GRACE_S``, whatever
    host sealed it: its renames take microseconds. A folder this process may not write is left as it is, with a
    warning: a process that can write it will finish the job."""
    target = Path(directory)
    here = socket.gethostname()
    try:
        left = [old for old in target.glob(f"{STAGING_PREFIX}*") if old.is_dir() and (
            abandoned(old, STAGING_PREFIX, _STALE_S, here) or _sealed_for(old) > _SEALED_GRACE_S)]
    except OSError as exc:
        log.warning("%s: cannot look for what killed runs left there (%s)", target, exc)
        return
    for old in sorted(left, key=lambda stage: -_sealed_for(stage)):  # the earliest sealed first
        try:
            why_not = _may_finish(old, target)
            if why_not is None:
                _publish(old, target)
                log.warning("%s: finished publishing the artifact that a run killed part-way through it left in "
                            "%s", target, old.name)
            elif why_not:
                log.warning("%s: removed %s, which a run killed part-way through publishing it left, unpublished: "
                            "%s", target, old.name, why_not)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            hint = "; a process that may write the folder will finish it" if isinstance(exc, PermissionError) else \
                f"; remove {old.name} and train again"
            log.warning("%s: cannot finish publishing %s, which a run killed part-way through it left (%s)%s",
                        target, old.name, exc, hint)


def _seal(stage: Path, target: Path) -> None:
    """Mark ``stage`` whole, just before its renames: the digest of each file it publishes, and of each manifest
    of ``target`` its own will replace (null where there is none), so that ``recover`` can tell the folder as the
    renames left it from one changed since."""
    files = {_rel(p, stage): sha256_file(p) for p in _files(stage)}
    replaces = {rel: _digest(target / rel) for rel in files if Path(rel).name in MANIFESTS}
    (stage / SEALED).write_text(json.dumps({"files": files, "replaces": replaces}), encoding="utf-8")


def _may_finish(stage: Path, target: Path) -> str | None:
    """None where ``stage``'s renames may be finished: it is sealed, each file already renamed out of it is in
    ``target`` as it was sealed, and each manifest it replaces is either the one it replaced or its own. Else why
    not ("" for a stage never sealed: its run died while writing it, and nothing of it was published)."""
    try:
        seal = json.loads((stage / SEALED).read_text(encoding="utf-8"))
        files, replaces = dict(seal["files"]), dict(seal["replaces"])
    except FileNotFoundError:
        return ""
    except (OSError, ValueError, KeyError, TypeError):
        return "its seal cannot be read"
    for rel, digest in files.items():
        if not (stage / rel).is_file() and _digest(target / rel) != digest:
            return f"{rel}, which it had published, has been replaced since"
    for rel, before in replaces.items():
        if _digest(target / rel) not in (before, files.get(rel)):
            return f"{rel} has been replaced since by another publish"
    return None


def _sealed_for(stage: Path) -> float:
    """Seconds since ``stage`` was sealed; -inf if it never was (or its seal cannot be read)."""
    try:
        return time.time() - (stage / SEALED).stat().st_mtime
    except OSError:
        return -math.inf


def _digest(path: Path) -> str | None:
    """``path``'s sha256, or None where there is no such file. One this process may not read (another user's
    manifest, which a rename may still replace) stands as its inode, size and time instead."""
    try:
        return sha256_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except PermissionError:
        try:
            info = path.stat()
        except OSError:
            return None
        return f"unreadable:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in blocks of 1 MiB."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(stage: Path) -> list[Path]:
    """The files a stage publishes: all it holds outside staging folders (a nested stage's, its seal)."""
    return [p for p in stage.rglob("*") if p.is_file() and not _in_staging(p.relative_to(stage))]


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _publish(stage: Path, target: Path) -> None:
    def order(p: Path) -> tuple[int, int, int]:
        rel = p.relative_to(stage)
        if rel.name not in MANIFESTS:
            return (0, 0, 0)
        return (1, MANIFESTS.index(rel.name), -len(rel.parts))

    for file in sorted(_files(stage), key=order):
        rel = file.relative_to(stage)
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(file, target / rel)
        except FileNotFoundError:  # another process finishing the same killed run's stage moved it first
            if file.exists():
                raise


def _in_staging(rel: Path) -> bool:
    return any(part.startswith(STAGING_PREFIX) for part in rel.parts)

