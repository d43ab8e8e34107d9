"""Answering a question over 4 spans on SmolLM2-135M: time to first token (prefill) and total
time, from ICAE memory slots (4 x 128 prefix entries) against the same 2048 tokens of raw text.

Both paths run the same frozen decoder (adapter off) through the same greedy loop with a
forced number of new tokens, in the same process, so the ratio is the cost of the prefix alone.
Compressing the spans is an ingest-time cost, reported separately.

    .venv/bin/python benchmarks/icae_latency.py --new-tokens 16 --repeats 3 --save
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from icae_common import emit, play_text

from icmem.icae import ICAE

QUESTION = "Who speaks first in this passage, and what does he ask?"


def timed_decode(icae: ICAE, embeds: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """``(seconds to first token, seconds for all new_tokens)`` of greedy decoding."""
    model = icae.model
    with torch.no_grad(), model.disable_adapter():
        start = time.perf_counter()
        out = model(inputs_embeds=embeds[None], use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax().view(1, 1)
        first = time.perf_counter() - start
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[0, -1].argmax().view(1, 1)
        return first, time.perf_counter() - start


def median_times(icae: ICAE, embeds: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    timed_decode(icae, embeds, 2)  # warm-up
    runs = [timed_decode(icae, embeds, new_tokens) for _ in range(repeats)]
    return {
        "prefix_entries": embeds.shape[0],
        "ttft_s": round(statistics.median(r[0] for r in runs), 4),
        "total_s": round(statistics.median(r[1] for r in runs), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (median)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)"
    )
    parser.add_argument("--save", action="store_true", help="write results/icae_latency.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    icae = ICAE.from_base("smollm2-135m-instruct", dtype=args.dtype)
    context = icae.tokenize(play_text())[: args.spans * icae.config.span_tokens]
    start = time.perf_counter()
    memory = icae.compress([context], batch_size=args.spans)
    compress_s = time.perf_counter() - start

    with torch.no_grad():
        from_slots = icae.decoder_inputs(memory, "ft", icae.format_prompt(QUESTION))
        raw_prompt = icae.format_prompt(icae.tokenizer.decode(context) + "\n\n" + QUESTION)
        from_text = icae.model.get_input_embeddings()(torch.tensor(raw_prompt))
    slots = median_times(icae, from_slots, args.new_tokens, args.repeats)
    text = median_times(icae, from_text, args.new_tokens, args.repeats)
    emit(
        "icae_latency",
        {
            "benchmark": "icae_latency",
            "model": "smollm2-135m-instruct",
            "dtype": args.dtype,
            "machine": platform.machine(),
            "torch_threads": args.threads,
            "context_tokens": len(context),
            "memory_slots": sum(m.num_slots for m in memory),
            "new_tokens": args.new_tokens,
            "from_slots": slots,
            "from_raw_text": text,
            "prefill_speedup": round(text["ttft_s"] / slots["ttft_s"], 2),
            "total_speedup": round(text["total_s"] / slots["total_s"], 2),
            "compress_once_s": round(compress_s, 3),
        },
        args.save,
    )


if __name__ == "__main__":
    main()
