"""Answers from memory through the whole pipeline: held-out invented documents ingested into a
store, questions answered with recall k=1 and k=4 from memory slots, from the same spans' text,
and with no memory; scored against gold answers and slot answers against text answers.

Each checkpoint named is measured on the same documents and questions in one run, so the
numbers compare (the shipped checkpoint against a campaign candidate, say).

    .venv/bin/python benchmarks/answers_from_memory.py --documents 40 --threads 2 --save \
        --checkpoint shipped=icmem/checkpoints/smollm2-135m-instruct-k128
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
from icae_common import RESULTS, emit

from icmem.evals.answers import evaluate, held_out_cases, summarise
from icmem.hardware import cpu_flags
from icmem.icae.model import ICAE


def plot(summaries: dict[str, dict[str, dict[str, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({g for s in summaries.values() for g in s})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(summaries))
    for n, (name, summary) in enumerate(summaries.items()):
        xs = [i + n * width for i in range(len(groups))]
        for ax, metric in zip(axes, ("contains_gold", "empty_rate"), strict=True):
            ax.bar(xs, [summary.get(g, {}).get(metric, 0.0) for g in groups], width, label=name)
    for ax, title in zip(axes, ("answer contains gold", "empty answers"), strict=True):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("Answers from memory (held-out invented documents)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        help="NAME=DIR, repeatable (default: the shipped checkpoint)",
    )
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    named = dict(c.split("=", 1) for c in (args.checkpoint or ["shipped="]))

    documents, cases = held_out_cases(args.documents)
    started = time.perf_counter()
    summaries, rows = {}, {}
    for name, directory in named.items():
        icae = ICAE.from_pretrained(directory or None, dtype="auto")
        # Text and no-memory answers come from the base model alone: measured once.
        modes = ("slots", "text", "none") if not rows else ("slots",)
        _, rows[name] = evaluate(
            icae, documents, cases, ks=args.k, modes=modes, max_new_tokens=args.max_new_tokens
        )
        first = next(iter(rows.values()))
        shared = [r for r in first if r["mode"] != "slots"] if rows[name] is not first else []
        summaries[name] = summarise(rows[name] + shared)
        print(name, summaries[name], flush=True)
    if args.save:
        plot(summaries, str(RESULTS / "answers_from_memory.png"))
    emit(
        "answers_from_memory",
        {
            "benchmark": "answers_from_memory",
            "command": " ".join(["python", *sys.argv]),
            "checkpoints": named,
            "documents": len(documents),
            "questions": len(cases),
            "summary": summaries,
            "machine": platform.processor() or platform.machine(),
            "bf16_cpu": bool(cpu_flags() & {"amx_bf16", "avx512_bf16"}),
            "threads": args.threads,
            "total_s": round(time.perf_counter() - started, 1),
            "rows": rows,
        },
        args.save,
    )


if __name__ == "__main__":
    main()
