"""The combiners' answer extractors on degenerate answers: the worst time each takes, and on which text.

An LLM that degenerates writes long runs of one thing (spaces, dashes, "1 - 1 - ..."), and the extractors run on
the event loop for every panel answer, so a regular expression that backtracks quadratically there holds up every
request on the replica (60,000 spaces took ``extract_short`` 18 s before 2026-12-07). ``python -m
bench.extractors`` builds texts from pairs of the tokens the extractors' patterns read, each pair repeated to
``--chars`` characters (alone, after an answer statement, and as one run before another token), times each
extractor on each, prints the slowest, and writes ``bench/results/extractors.json``. Linear patterns keep every
time in milliseconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

from router.combine import EXTRACTORS

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = (" ", "\t", "\n", "-", "(", ")", "1", ",", ".", "=", "answer is ", "answer:", "\\boxed{", "^", "/", "{", "}",
          "$", "I", "a", "\u00d7", "\\times ", "#### ", "*", "_", "`", " because", "\u00a0", "000", "e", "\\frac{",
          "10", "\\,", "{,}", "option ", "B", "b", ":", '"', "[", "%")


def texts(chars: int) -> Iterator[tuple[str, str]]:
    """(a short description, the text) for every pair of tokens."""
    for a, b in itertools.product(TOKENS, repeat=2):
        run = (a + b) * (chars // len(a + b))
        yield f"({a + b!r})*", run
        yield f"answer is 1 ({a + b!r})* x", f"answer is 1{run}x"
        yield f"{a!r}* {b!r}", a * chars + b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.extractors", description=__doc__)
    parser.add_argument("--chars", type=int, default=20_000, help="length of each text (default 20,000)")
    parser.add_argument("--out", type=Path, default=RESULTS / "extractors.json")
    args = parser.parse_args(argv)
    worst = {extractor: (-1.0, "") for extractor in EXTRACTORS}  # seconds, and the text that took them
    started, count = time.perf_counter(), 0
    for name, text in texts(args.chars):
        count += 1
        for extractor, read in EXTRACTORS.items():
            t0 = time.perf_counter()
            read(text)
            seconds = time.perf_counter() - t0
            if seconds > worst[extractor][0]:
                worst[extractor] = (seconds, name)
    report = {"chars": args.chars, "texts": count, "seconds_total": time.perf_counter() - started,
              "worst": {extractor: {"seconds": s, "text": name} for extractor, (s, name) in worst.items()}}
    print(f"{count} texts of about {args.chars:,} characters, each through every extractor:")
    for extractor, (seconds, name) in worst.items():
        print(f"  {extractor:<7} worst {1000 * seconds:8.1f} ms  on {name}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
