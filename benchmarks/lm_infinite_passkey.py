"""Passkey retrieval at several prompt lengths and depths, vanilla against LM-Infinite.

    nice -n 10 .venv/bin/python benchmarks/lm_infinite_passkey.py --lengths 4096,8192 --trials 2

Prints one JSON object (also written to benchmarks/results/lm_infinite_passkey.json after each
run). Under the Λ mask the question sees the needle directly only when it lies within the last
`local_window` tokens (`in_window` per depth); deeper needles can only reach it through what the
window's own tokens carried forward, layer by layer.
"""

from __future__ import annotations

import argparse
import json

from lm_infinite_common import write_result

from icmem import load_model
from icmem.evals.long_context import passkey_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument(
        "--trials", default="3", help="trials per depth: one number, or one per length"
    )
    parser.add_argument("--modes", default="vanilla,lm_infinite")
    parser.add_argument(
        "--local-window", type=int, default=None, help="default: the pretraining length"
    )
    parser.add_argument("--name", default="lm_infinite_passkey", help="results/NAME.json")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    depths = tuple(float(d) for d in args.depths.split(","))
    result: dict = {"benchmark": "lm_infinite_passkey", "model": args.model, "runs": []}
    lengths = [int(n) for n in args.lengths.split(",")]
    trials = [int(n) for n in args.trials.split(",")]
    if len(trials) == 1:
        trials *= len(lengths)
    if len(trials) != len(lengths):
        parser.error(f"--trials gives {len(trials)} counts for {len(lengths)} lengths")
    for length, length_trials in zip(lengths, trials, strict=True):
        for mode in args.modes.split(","):
            run = passkey_accuracy(
                model,
                tokenizer,
                tokens=length,
                depths=depths,
                trials=length_trials,
                lm_infinite=mode == "lm_infinite",
                local_window=args.local_window,
            )
            result["runs"].append(run)
            write_result(args.name, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
