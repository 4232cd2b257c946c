"""An on-disk embedding cache for evaluation: re-runs of a suite embed nothing they have embedded before.

Keys are ``sha256(text)``; a cache folder belongs to one encoder (its identity, weights checksum and
``max_length``), so vectors from different models or truncations never mix. The folder holds append-only
shards ``shard-<n>.npz`` (``keys``: ``[n, 32]`` uint8 digests, ``vectors``: ``[n, dim]`` float32), read with
``allow_pickle=False``. A shard is written to a temporary name and renamed, so a killed run leaves no torn file;
the temporary file a killed run leaves is removed by the next run (``CachedEncoder._sweep``).

``CachedEncoder`` wraps any ``Encoder`` with the same contract, so code that embeds through an encoder
(``router.gate.train_gate``) hits the cache without knowing about it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import socket
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from router.encoders import Encoder, cache_root
from router.files import abandoned, owner_tag
from router.settings import Settings

log = logging.getLogger("eval.embeddings")

__all__ = ["CachedEncoder", "default_cache_dir"]

_CHUNK = 512  # texts per encode call: keeps the progress bar moving and each shard small
# A shard being written: ``.tmp-<pid>@<host>-<name>.npz``, renamed to ``shard-<name>.npz`` once whole.
_TMP = ".tmp-"


def default_cache_dir(settings: Settings | None = None) -> Path:
    """``$MOE_CACHE_DIR/embeddings``, else ``~/.cache/moe-router/embeddings`` (``settings``' ``cache_dir``)."""
    return cache_root(settings) / "embeddings"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class CachedEncoder(Encoder):
    """``inner`` behind a sha256-keyed disk cache. Same rows as ``inner.encode``, in input order."""

    def __init__(self, inner: Encoder, cache_dir: str | Path | None = None, *, max_length: int,
                 progress: bool = True) -> None:
        self.inner = inner
        self.identity, self.checksum, self.dim = inner.identity, inner.checksum, inner.dim
        self.max_length = inner.max_length
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{inner.identity}-{inner.checksum[:16]}-len{max_length}")
        self.folder = Path(cache_dir or default_cache_dir()) / slug
        self.progress = progress
        self._memory: dict[bytes, np.ndarray] = {}
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._sweep()
        for shard in sorted(self.folder.glob("shard-*.npz")):
            try:
                # Opened here, so a file numpy fails to read is still closed (it leaves its own open then).
                with open(shard, "rb") as fh, np.load(fh, allow_pickle=False) as data:
                    keys, vectors = data["keys"], data["vectors"]
                if keys.shape != (len(vectors), 32) or vectors.shape[1:] != (self.dim,):
                    raise ValueError(f"keys {keys.shape} and vectors {vectors.shape}, not (n, 32) and (n, "
                                     f"{self.dim})")
            except OSError as exc:  # not the file's fault (no permission, too many open files): it is kept
                log.warning("embedding cache %s: cannot read it (%s); its texts will be embedded again", shard,
                            exc.strerror or exc)
                continue
            except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
                # A cache's file, cut short (a full disk, a killed run) or overwritten: its texts are embedded
                # again, and the shard that holds them then is written in its place.
                log.warning("embedding cache %s: unreadable (%s: %s); removed, its texts will be embedded again",
                            shard, type(exc).__name__, str(exc).partition("\n")[0][:200])
                with contextlib.suppress(OSError):
                    shard.unlink()
                continue
            for key, vec in zip(keys, vectors, strict=True):
                self._memory[key.tobytes()] = vec
        self._loaded = True

    def _store(self, keys: list[bytes], vectors: np.ndarray) -> None:
        name = hashlib.sha256(b"".join(keys)).hexdigest()[:16]
        # The process and its host in the name: a later run tells a killed run's file from a live one's.
        tmp = self.folder / f"{_TMP}{owner_tag()}{name}.npz"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, keys=np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32),
                     vectors=vectors.astype(np.float32))
            tmp.replace(self.folder / f"shard-{name}.npz")
        except BaseException as exc:  # a full disk, or Ctrl-C part way: the part written is not left behind
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not isinstance(exc, OSError):
                raise
            # A bare "[Errno 30] Read-only file system" would not say which setting to change.
            raise ValueError(f"embedding cache {self.folder}: cannot write ({exc.strerror or exc}); point "
                             "MOE_CACHE_DIR at a writable folder") from None

    def _sweep(self) -> None:
        """Remove the temporary files of runs that were killed while writing a shard (SIGKILL, an out-of-memory
        kill, a power cut): one of this host whose process is gone (``router.files.abandoned``, as a killed
        run's staging folder in --out is told), and any untouched for ``ABANDONED_AFTER_S`` (another host's, or
        one named by an older version, which named no host)."""
        from eval.harness import ABANDONED_AFTER_S  # eval.harness imports this module

        here = socket.gethostname()
        for tmp in self.folder.glob(f"{_TMP}*.npz"):
            if abandoned(tmp, _TMP, ABANDONED_AFTER_S, here):
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    log.info("embedding cache %s: removed %s, left by a run that was killed", self.folder, tmp.name)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        from tqdm.auto import tqdm

        self._load()
        keys = [_digest(t) for t in texts]
        todo: dict[bytes, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in self._memory:
                todo.setdefault(key, text)
        if todo:
            # Similar lengths per call waste less work on padding.
            pending = sorted(todo.items(), key=lambda kv: len(kv[1]))
            with tqdm(total=len(pending), desc="embedding", unit="text",
                      disable=not self.progress or len(pending) < _CHUNK) as bar:
                for start in range(0, len(pending), _CHUNK):
                    chunk = pending[start:start + _CHUNK]
                    vecs = self.inner.encode([t for _, t in chunk])
                    self._store([k for k, _ in chunk], vecs)
                    self._memory.update((k, v) for (k, _), v in zip(chunk, vecs, strict=True))
                    bar.update(len(chunk))
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._memory[k] for k in keys]).astype(np.float32, copy=False)
