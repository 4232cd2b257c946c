"""``make results``: run every published suite into ``out/results/<suite>/``, add the peer, rewrite the README table.

Label suites also get aurelio semantic-router's figures on their exported split (``eval.peer``). Each
``results.json`` is stamped with the run's date and machine, then the README block between the markers is
rendered from those files alone (``eval.readme_results``). Embeddings come from the on-disk cache, so a re-run
embeds nothing new; the peer's result is reused while its split is unchanged.

    python -m eval.results                       # everything, README rewritten
    python -m eval.results --suites snips-intent --no-readme --limit 500   # a quick partial check
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from eval.harness import SUITES, reproducing_command, run_suite
from eval.peer import attach_peer, score_semantic_router
from eval.readme_results import load_results, render_block, rewrite_readme
from eval.report import write_results
from router.cli import limit_count, seed_number
from router.files import atomic_write_text

__all__ = ["LABEL_SUITES", "PUBLISHED", "main", "published_suites"]

LABEL_SUITES = ("mmlu-pro-domain", "clinc150-domain", "snips-intent", "banking77-intent")
PUBLISHED = (*LABEL_SUITES, "mmlu-pro-outcome", "routerbench", "routellm-mmlu")
OPTIONAL = ("mmlu-pro-combine", "routerbench-combine")  # published when registered in SUITES


def published_suites() -> list[str]:
    """The suites ``make results`` runs, decided at run time from ``SUITES``."""
    return [*PUBLISHED, *(s for s in OPTIONAL if s in SUITES)]


def _run_one(suite: str, out: Path, args: argparse.Namespace, day: dict[str, str]) -> dict[str, Any]:
    # The command that reproduces it, as moe eval writes its own (quoted, and naming --data where it was given).
    command = reproducing_command(argparse.Namespace(out=out, encoder=args.encoder, seed=args.seed, data=args.data,
                                                     limit=args.limit), suite)
    results = run_suite(suite, args.data, out, encoder=args.encoder, seed=args.seed, limit=args.limit,
                        command=command)
    results["setup"] = {**results["setup"], **day}   # one date for the whole run, though it crosses midnight
    if suite in LABEL_SUITES and suite in args.peer_suites.split(","):
        print(f"  peer: aurelio semantic-router on {out / 'split'}", flush=True)
        peer = score_semantic_router(out, torch_threads=args.torch_threads)
        peer["command"] = (f"bench/.venv-semantic-router/bin/python bench/peers/semantic_router_accuracy.py "
                           f"--split {out / 'split'} --out {out / 'peer_semantic_router.json'}")
        return attach_peer(results, peer, out)
    write_results(out, results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.results", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/results"))
    parser.add_argument("--suites", help="comma-separated subset (default: every published suite)")
    parser.add_argument("--data", default=None, help="data folder (default: ../shared/data or $MOE_DATA_DIR)")
    parser.add_argument("--encoder", default="onnx")
    parser.add_argument("--seed", type=seed_number, default=0)
    parser.add_argument("--limit", type=limit_count, default=None,
                        help="at most this many queries per split (quick runs)")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--no-readme", action="store_true", help="run the suites, leave the README alone")
    parser.add_argument("--peer-suites", default=",".join(LABEL_SUITES),
                        help="label suites that also run aurelio semantic-router (empty: none); its MiniLM on "
                             "torch embeds MMLU-Pro's long prompts at ~15 texts/s on 2 cores, so ~15 min there")
    parser.add_argument("--torch-threads", type=int, default=0, help="the peer's torch threads (0: default)")
    args = parser.parse_args(argv)
    suites = args.suites.split(",") if args.suites else published_suites()
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        print(f"error: unknown suite(s) {', '.join(unknown)}; known: {', '.join(sorted(SUITES))}", file=sys.stderr)
        return 2
    day = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")}
    failed = []
    started = time.perf_counter()
    for i, suite in enumerate(suites, 1):
        print(f"[{i}/{len(suites)}] {suite} -> {args.out / suite}", flush=True)
        t0 = time.perf_counter()
        try:
            _run_one(suite, args.out / suite, args, day)
        except Exception:  # one broken suite must not hide the others' numbers
            traceback.print_exc()
            failed.append(suite)
            continue
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    readme_failed = False
    if not args.no_readme:
        # Only this run's suites: a stale results.json from an earlier run must not reach the README.
        done = [s for s in suites if s not in failed]
        block = render_block(load_results(args.out, done))
        # Under a temporary name, then renamed over it (the file a link names, not the link): a full disk or a
        # kill part way leaves the README as it was, never cut short.
        text = rewrite_readme(args.readme.read_text(encoding="utf-8"), block)
        try:
            atomic_write_text(args.readme.resolve(), text)
        except OSError as exc:
            print(f"error: --readme {args.readme}: cannot write it ({exc.strerror or exc}); it is left as it was",
                  file=sys.stderr, flush=True)
            readme_failed = True
        else:
            print(f"rewrote the results block in {args.readme}", flush=True)
    print(f"{len(suites) - len(failed)}/{len(suites)} suites in {time.perf_counter() - started:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed or readme_failed else 0


if __name__ == "__main__":
    sys.exit(main())
