"""Perplexity per 2k-token bucket, vanilla against LM-Infinite, on Gutenberg plays.

    nice -n 10 .venv/bin/python benchmarks/lm_infinite_ppl.py --tokens 32768

Prints one JSON object (also written to benchmarks/results/lm_infinite_ppl.json, updated after
each mode). Target: every LM-Infinite bucket past 8k within 10% of the mean of its buckets below
8k, while vanilla explodes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

from lm_infinite_common import gutenberg_play_files, gutenberg_plays, write_result

from icmem import load_model
from icmem.evals.long_context import bucket_summary, perplexity_by_bucket


def summarise(lm_infinite: dict, vanilla: dict | None, split: int) -> dict:
    summary = bucket_summary(lm_infinite["buckets"], split)
    if vanilla is not None:
        summary["vanilla_over_lm_infinite"] = [
            v["ppl"] / o["ppl"]
            for v, o in zip(vanilla["buckets"], lm_infinite["buckets"], strict=True)
        ]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--bucket", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--split", type=int, default=8192, help="pretraining length to compare")
    parser.add_argument("--modes", default="lm_infinite,vanilla")
    parser.add_argument("--plays", type=int, default=1, help="texts to average over")
    parser.add_argument("--play-stride", type=int, default=9, help="plays between text starts")
    parser.add_argument("--name", default="lm_infinite_ppl", help="results/NAME.json")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    result: dict = {
        "benchmark": "lm_infinite_ppl",
        "model": args.model,
        "tokens": args.tokens,
        "texts": [],
    }
    per_mode: dict[str, list[dict]] = {}
    for play in range(args.plays):
        # Each text starts at a different play, so the average washes out what one play's
        # scenes do to a 2k bucket (prose against verse moves it by +-30%).
        text = gutenberg_plays(start=play * args.play_stride)
        result["texts"].append(gutenberg_play_files()[play * args.play_stride].name)
        for mode in args.modes.split(","):
            run = perplexity_by_bucket(
                model,
                tokenizer,
                text,
                tokens=args.tokens,
                bucket=args.bucket,
                chunk=args.chunk,
                lm_infinite=mode == "lm_infinite",
            )
            per_mode.setdefault(mode, []).append(run)
            result[mode] = average_runs(per_mode[mode])
            if "lm_infinite" in result:
                result["summary"] = summarise(
                    result["lm_infinite"], result.get("vanilla"), args.split
                )
            write_result(args.name, result)
    print(json.dumps(result))


def average_runs(runs: list[dict]) -> dict:
    """Per-bucket perplexity over several texts: exp of the mean log perplexity."""
    average = {k: v for k, v in runs[0].items() if k not in ("buckets", "summary")}
    average["buckets"] = [
        {**first, "ppl": math.exp(statistics.fmean(math.log(r["buckets"][i]["ppl"]) for r in runs))}
        for i, first in enumerate(runs[0]["buckets"])
    ]
    average["per_text_ppl"] = [[b["ppl"] for b in r["buckets"]] for r in runs]
    return average


if __name__ == "__main__":
    main()
