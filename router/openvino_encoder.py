"""The ``openvino`` encoder: the same verified int8 ONNX export as ``onnx``, run by OpenVINO, in bfloat16 where the
CPU has it.

onnxruntime folds the export's int8 weights into float32 when it loads the model, so its matrix products run in
float32; they are most of a query's time (``python -m bench.encoder_profile``), and on these machines they already
run near the cores' float32 peak. OpenVINO reads the same file and, on a CPU where its plugin runs bfloat16 by
default (Intel AMX), runs the products in bfloat16 with float32 accumulation. On 2 cores of an Intel Xeon with AMX
(2026-12-06 03:04 UTC, ``make bench``) that took batched decisions from 812 to 1,314 queries/s and the router from
462 to 609 requests/s; one query alone took 2.82 ms against onnxruntime's 2.34. Rows agree with the float32 run at
cosine above 0.9999, and gates trained on either route CLINC150 alike (``tests/unit/test_openvino_encoder.py``).

``precision``: ``bf16``, ``f32``, or ``auto`` (the default): the plugin's own default on this CPU, which is
``bf16`` where bfloat16 pays (AMX) and ``f32`` elsewhere. The resolved precision is part of the encoder's
``identity``, so a gate trained on bfloat16 rows is refused by a float32 encoder and the other way round: pin
``precision`` where the gate is trained and served on different CPUs. ``bf16`` on a CPU without it is an error,
not a silent fallback.

OpenVINO prepares a run again for every new input shape and keeps what it prepared. Widths are padded to a
multiple of 8 and a run's rows to one of a few sizes (``padded_rows``), so a server meets a few dozen shapes, not
thousands: on random batches of 1 to 64 queries the encoder's process held 271 MB after 2,400 batches, against
520 MB and still growing with exact shapes, and ran 4% faster.

OpenVINO is an optional dependency (``pip install 'moe-router[openvino]'``); the module imports it only when an
encoder is built.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from router.encoders import MODEL_NAME, OnnxMiniLMEncoder, _import, default_threads

if TYPE_CHECKING:
    from router.config import EncoderConfig

__all__ = ["PAD_TO", "PRECISIONS", "OpenVinoMiniLMEncoder", "openvino_precision", "openvino_threads",
           "padded_rows"]

# Config name -> OpenVINO's INFERENCE_PRECISION_HINT, and the capability the CPU must report for it.
PRECISIONS: dict[str, tuple[str, str]] = {"f32": ("f32", "FP32"), "bf16": ("bf16", "BF16")}

# Sequence widths are padded to a multiple of this. A new input shape cost about 1 ms for one short query;
# padding to 8 makes most widths repeat (one query p50 2.0 ms against 2.8 in random order, 2 threads, SNIPS
# queries; 2026-12-06).
PAD_TO = 8


def padded_rows(n: int) -> int:
    """The rows a run of ``n`` texts is padded to: a power of two up to 8, then a multiple of 8."""
    return 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8


def openvino_threads(cores: int, threads: int | None = None, parallel: int | None = None) -> tuple[int, int]:
    """``(threads, parallel)``: OpenVINO threads per run and runs at once (its streams), each as given or its default.

    ``threads`` defaults as for onnxruntime (``default_threads``: half the cores, two on 2 or 3). Unlike
    onnxruntime's runs, OpenVINO's streams do not share threads: each holds its own, so ``parallel`` defaults to as
    many as the cores hold at ``threads`` each, which on 2 cores is one stream of two threads."""
    threads = threads or default_threads(cores)
    return threads, parallel or max(1, cores // threads)


def openvino_precision(wanted: str, capabilities: list[str], default: str) -> str:
    """The precision to run: ``wanted`` (``auto``, ``bf16`` or ``f32``) given the CPU's OpenVINO
    ``OPTIMIZATION_CAPABILITIES`` and the plugin's ``default`` precision (``auto`` takes it where it is bf16, else
    f32); raises ``ValueError`` for a precision the CPU lacks or an unknown name."""
    if wanted == "auto":
        return "bf16" if default == "bf16" and PRECISIONS["bf16"][1] in capabilities else "f32"
    if wanted not in PRECISIONS:
        raise ValueError(f"openvino precision {wanted!r}: expected one of auto, {', '.join(PRECISIONS)}")
    if PRECISIONS[wanted][1] not in capabilities:
        raise ValueError(f"openvino precision {wanted!r}: this CPU does not run it (OpenVINO reports "
                         f"{', '.join(capabilities) or 'nothing'}); use precision auto or f32")
    return wanted


class OpenVinoMiniLMEncoder(OnnxMiniLMEncoder):
    """all-MiniLM-L6-v2 from the verified int8 ONNX export, run by OpenVINO's CPU plugin at ``precision``.

    Tokenising, length batching, pooling and normalising are the ``onnx`` backend's; only the model run differs.
    Each stream has its own infer request, so as many runs go at once as there are streams, and further callers
    wait for a free one.
    """

    identity = f"openvino:{MODEL_NAME}"  # each instance's names its precision: openvino-bf16:…, openvino-f32:…

    # Runs are one at a time per stream and bfloat16 products gain from width, so wider runs than onnxruntime's:
    # 64 short queries per run gave 2,150 queries/s against 1,720 at 8 (2 threads, Intel Xeon with AMX). 2048
    # padded tokens hold 64 short queries in one run; on MMLU-Pro prompts (median 122 tokens, calls of 1 to 64)
    # caps of 256, 1024, 2048 and 4096 came within 10% of each other, each about twice onnxruntime's 64-80
    # queries/s (2026-12-06).
    BATCH = 64
    BATCH_TOKENS = 2048

    def __init__(self, max_length: int = 256, batch_size: int = BATCH, *, model_path: str | Path | None = None,
                 threads: int | None = None, parallel: int | None = None, batch_tokens: int = BATCH_TOKENS,
                 precision: str = "auto") -> None:
        self._wanted_precision = precision
        super().__init__(max_length, batch_size, model_path=model_path, threads=threads, parallel=parallel,
                         batch_tokens=batch_tokens)

    @staticmethod
    def _threads(cores: int, threads: int | None, parallel: int | None) -> tuple[int, int]:
        return openvino_threads(cores, threads, parallel)

    def _open(self, path: Path) -> None:
        ov = _import("openvino", "openvino", "'moe-router[openvino]'")  # the project's extra, which pins it
        core = ov.Core()
        default = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
        self.precision = openvino_precision(
            self._wanted_precision, list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            "bf16" if default == ov.Type.bf16 else "f32")
        self.identity = f"openvino-{self.precision}:{MODEL_NAME}"
        self._compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_PRECISION_HINT": PRECISIONS[self.precision][0],
            "INFERENCE_NUM_THREADS": self.threads * self.parallel,
            "NUM_STREAMS": self.parallel,
            # Activations stay in the precision above: the plugin's default int8 quantisation of them on the fly
            # moves rows further from the float32 model than bfloat16 does.
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
            # Threads not bound to cores: the router's event loop shares them, and so may other workers' models.
            "ENABLE_CPU_PINNING": False,
        })
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.parallel):
            self._requests.put(self._compiled.create_infer_request())

    def _hidden(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        rows, width = feeds["input_ids"].shape
        # Padding: [PAD] ids under a zero mask, so the real rows and positions are unchanged; the extra rows are
        # dropped below.
        pad = ((0, padded_rows(rows) - rows), (0, -(-width // PAD_TO) * PAD_TO - width))
        if pad != ((0, 0), (0, 0)):
            feeds = {name: np.pad(x, pad) for name, x in feeds.items()}
        request = self._requests.get()
        try:
            # share_outputs: the request's own buffer, which its next run overwrites, so copy out the real part
            # before handing the request back.
            out = request.infer(feeds, share_outputs=True)["last_hidden_state"]
            return np.array(out[:rows, :width], dtype=np.float32, copy=True)
        finally:
            self._requests.put(request)

    def mismatch_hint(self, trained_identity: str) -> str:
        """A gate trained by this backend at the other precision (``auto`` resolves per CPU): the setting to pin."""
        backend = trained_identity.partition(":")[0]
        trained = backend.removeprefix("openvino-")
        if not backend.startswith("openvino-") or trained == self.precision:
            return ""
        return (f"The openvino backend ran {self.precision} on this CPU: set gate.encoder.precision: {trained} if "
                "this CPU runs it, or retrain here.")

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> OpenVinoMiniLMEncoder:
        return cls(max_length=cfg.max_length, batch_size=cfg.batch_size or cls.BATCH, threads=cfg.threads,
                   parallel=cfg.parallel, batch_tokens=cfg.batch_tokens or cls.BATCH_TOKENS,
                   precision=cfg.precision or "auto")
