"""A tiny random-weight Llama, built at test time so the integration tier needs no model download.

It produces random text. What it proves is that a real vLLM server works end to end: the OpenAI routes,
streaming, token usage, ``max_tokens``, concurrency and errors, not answer quality.

Shapes were chosen for vLLM's CPU backend: ``head_dim=64`` is a head size its CPU attention is known to take.
Everything is seeded, so two builds give the same files and greedy decoding gives the same text.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "MAX_POSITIONS", "build_tiny_llama"]

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
VOCAB_SIZE = 1024
# Positions the model has. The servers serve 512 of them (``--max-model-len`` in tests.integration.vllm_server);
# a test that needs longer generations passes a larger ``--max-model-len`` in its server's extra arguments.
MAX_POSITIONS = 4096

# Role header, content, end of turn. ``content`` may be None or a list of parts (multi-part messages): only
# string content is rendered, so such messages still pass through the template. Tool calling is Hermes-style,
# as vLLM's ``hermes`` tool parser reads it: an assistant's calls as ``<tool_call>{"name": ..., "arguments":
# ...}</tool_call>``, a tool's result inside ``<tool_response>``, and the request's ``tools`` in a system turn
# of their own, one ``name(parameters): description`` line each: a whole JSON schema costs ~250 of the 512
# positions in this tiny vocabulary. A conversation with no tools, tool calls or tool messages renders as before.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<s>system\n<tools>\n' }}{% for tool in tools %}"
    "{% set function = tool['function'] %}"
    "{% set parameters = (function['parameters'] or {})['properties'] or {} %}"
    "{{ function['name'] + '(' + parameters | join(', ') + '): ' + (function['description'] or '') + '\n' }}"
    "{% endfor %}{{ '</tools></s>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'tool' %}{{ '<tool_response>' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% endif %}"
    "{% if message['role'] == 'tool' %}{{ '</tool_response>' }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set arguments = call['function']['arguments'] %}"
    # vLLM hands the template arguments already parsed into a mapping; other callers send the JSON string.
    "{{ '<tool_call>{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": ' }}"
    "{{ (arguments if arguments is string else arguments | tojson) + '}</tool_call>' }}"
    "{% endfor %}"
    "{{ '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the", "a", "an", "expert", "router", "gate", "model", "token", "answer", "question", "query",
    "weight", "route", "combine", "fallback", "trace", "what", "is", "why", "how", "when", "where", "who",
    "which", "number", "two", "three", "seven", "ten", "hundred", "plus", "minus", "times", "equals",
    "python", "code", "function", "return", "value", "list", "string", "error", "server", "request",
    "reply", "stream", "chat", "user", "system", "assistant", "tool", "call", "math", "physics", "history",
    "law", "medicine", "biology", "chemistry", "economics", "write", "explain", "sum",
)


def _corpus(lines: int = 400) -> list[str]:
    """Deterministic pseudo-sentences: enough text for the BPE merges, no randomness, no download."""
    out = []
    n = len(_WORDS)
    for i in range(lines):
        words = [_WORDS[(i * 7 + j * 13 + (i * j) % 5) % n] for j in range(6 + i % 9)]
        out.append(" ".join(words).capitalize() + ("?" if i % 3 == 0 else ".") + f" {i}")
    return out


def _build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the vocabulary, so any text (and any random output) round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def build_tiny_llama(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a tokenizer and a random-weight ``LlamaForCausalLM`` to ``out_dir``; return ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    import sys
    import time

    t0 = time.perf_counter()
    path = build_tiny_llama(Path(sys.argv[1] if len(sys.argv) > 1 else "out/tiny-llama"))
    print(f"built {path} in {time.perf_counter() - t0:.1f} s")
