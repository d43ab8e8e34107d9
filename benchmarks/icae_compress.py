"""ICAE compression throughput on SmolLM2-135M: tokens/s and spans/s, fp32 and bf16, batch 1
against larger batches, and against a plain forward of the base model over the same positions,
all measured in the same run.

    .venv/bin/python benchmarks/icae_compress.py --spans 8 --batch-sizes 1 4 8 --save
"""

from __future__ import annotations

import argparse
import platform

import torch
from icae_common import emit, median_seconds, play_text

from icmem import load_model
from icmem.icae import ICAE


def measure(dtype: str, spans_wanted: int, batch_sizes: list[int], repeats: int) -> list[dict]:
    """Compression beside a plain forward of the base model over the same positions (each span
    plus its memory tokens) in the same batches: the ratio is what compression costs on top of
    the forward pass it consists of."""
    icae = ICAE.from_base("smollm2-135m-instruct", dtype=dtype)
    plain, _ = load_model("smollm2-135m-instruct", dtype=getattr(torch, dtype))
    tokens = icae.tokenize(play_text())[: spans_wanted * icae.config.span_tokens]
    spans = icae.split_spans(tokens)
    width = icae.config.span_tokens + icae.config.num_memory_tokens
    runs = []
    for batch_size in batch_sizes:
        seconds = median_seconds(lambda b=batch_size: icae.compress(spans, batch_size=b), repeats)

        def forward(b: int = batch_size) -> None:
            with torch.no_grad():
                for start in range(0, len(spans), b):
                    rows = len(spans[start : start + b])
                    ids = torch.randint(0, 1000, (rows, width))
                    plain.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

        plain_seconds = median_seconds(forward, repeats)
        runs.append(
            {
                "dtype": dtype,
                "batch_size": batch_size,
                "spans": len(spans),
                "seconds": round(seconds, 3),
                "tokens_per_s": round(len(tokens) / seconds, 1),
                "spans_per_s": round(len(spans) / seconds, 3),
                "plain_forward_seconds": round(plain_seconds, 3),
                "compress_vs_plain_forward": round(plain_seconds / seconds, 3),
            }
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=8, help="full 512-token spans per run")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting (median)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)"
    )
    parser.add_argument("--save", action="store_true", help="write results/icae_compress.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs = [r for d in args.dtypes for r in measure(d, args.spans, args.batch_sizes, args.repeats)]
    rate = {(r["dtype"], r["batch_size"]): r["tokens_per_s"] for r in runs}
    first = args.batch_sizes[0]
    result = {
        "benchmark": "icae_compress",
        "model": "smollm2-135m-instruct",
        "span_tokens": 512,
        "num_memory_tokens": 128,
        "machine": platform.machine(),
        "torch_threads": args.threads,
        "runs": runs,
        f"tokens_per_s_ratio_vs_batch_{first}": {
            d: {str(b): round(rate[d, b] / rate[d, first], 2) for b in args.batch_sizes}
            for d in args.dtypes
        },
    }
    if {"float32", "bfloat16"} <= set(args.dtypes):
        result["bf16_vs_fp32_tokens_per_s"] = {
            str(b): round(rate["bfloat16", b] / rate["float32", b], 2) for b in args.batch_sizes
        }
    emit("icae_compress", result, args.save)


if __name__ == "__main__":
    main()
