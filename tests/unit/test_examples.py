"""The examples' own configs pass the config checks they will meet when run (the runs take minutes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from router.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_learned_vote_example_writes_a_config_the_router_accepts(data_dir: Path, tmp_path: Path) -> None:
    path = ROOT / "examples" / "learned_vote_mmlu_pro.py"
    spec = importlib.util.spec_from_file_location("learned_vote_mmlu_pro", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    models = ["gpt-4o-2024-05-13@ff991b5", "gemini-1.5-pro-002", "gemini-1.5-flash-002", "Meta-Llama-3_1-70B-Instruct",
              "DeepSeek-Coder-V2", "Qwen1.5-72B-Chat"]
    config = load_config(example.write_config(tmp_path, data_dir / "mmlu_pro_outcomes", models), check_env=False)
    assert config.gate.top_k.k == 5 and config.fallback.max_attempts >= config.gate.top_k.k
    assert config.combiner.vote_weights == "learned" and config.combiner.vote_answer_bias
