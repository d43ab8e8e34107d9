"""Decoding speed and peak memory at 4k..32k tokens of context, vanilla against LM-Infinite.

    nice -n 10 .venv/bin/python benchmarks/lm_infinite_speed.py

Each (context, mode) runs in its own process so that its peak resident memory is its own. The
cache is filled with random keys and values of the context's length instead of a real prefill:
the cost of a decoding step depends on how many entries the cache holds, not on what they are,
and a real 32k-token prefill takes many minutes on a CPU. Prints one JSON object (also written
to benchmarks/results/lm_infinite_speed.json). Target: flat tokens/s and memory for LM-Infinite,
and at 32k at least 2.7x vanilla's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from lm_infinite_common import write_result


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _globals(layer):
    """LM-Infinite layers keep the global tokens apart from their window; vanilla has none."""
    import torch

    empty = torch.empty(0, 0, 0, 0)
    return getattr(layer, "global_keys", empty), getattr(layer, "global_values", empty)


def measure(model_name: str, context: int, mode: str, steps: int, threads: int) -> dict:
    """One configuration, in this process: fill the cache, then time greedy decoding."""
    import torch
    from transformers import DynamicCache

    from icmem import lm_infinite, load_model

    if threads:
        torch.set_num_threads(threads)

    model, _ = load_model(model_name)
    config = model.config
    kv_heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    rss_before = _rss_mb()
    with torch.inference_mode():
        if mode == "lm_infinite":
            lm_infinite.enable(model)
            cache = lm_infinite.make_cache(model)
            layers = cache.layers
        else:
            cache = DynamicCache(config=config)
            layers = None
        for layer_idx in range(config.num_hidden_layers):
            keys = torch.randn(1, kv_heads, context, head_dim, generator=generator)
            values = torch.randn(1, kv_heads, context, head_dim, generator=generator)
            if layers is not None:  # already unrotated: store directly, as the cache would
                layers[layer_idx].update(keys, values)
            else:
                cache.update(keys, values, layer_idx)
            del keys, values
        token = torch.tensor([[42]])
        timings = []
        for _ in range(steps + 2):  # the first two are warm-up
            start = time.perf_counter()
            logits = model(token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            timings.append(time.perf_counter() - start)
    held = [
        tensor for layer in cache.layers for tensor in (layer.keys, layer.values, *_globals(layer))
    ]
    entries = cache.layers[0].keys.shape[-2] + _globals(cache.layers[0])[0].shape[-2]
    return {
        "context": context,
        "mode": mode,
        "threads": torch.get_num_threads(),
        "tokens_per_s": 1 / statistics.median(timings[2:]),  # the median resists load spikes
        "cache_entries_per_layer": int(entries),
        "cache_mb": sum(t.numel() * t.element_size() for t in held) / 2**20,
        "rss_before_cache_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--contexts", default="4096,8192,16384,32768")
    parser.add_argument("--steps", type=int, default=16, help="timed decoding steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--one", nargs=2, metavar=("CONTEXT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(
            json.dumps(measure(args.model, int(args.one[0]), args.one[1], args.steps, args.threads))
        )
        return

    result: dict = {"benchmark": "lm_infinite_speed", "model": args.model, "runs": []}
    for context in [int(c) for c in args.contexts.split(",")]:
        for mode in ("vanilla", "lm_infinite"):
            command = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps)]
            command += ["--threads", str(args.threads)]
            out = subprocess.run(
                [*command, "--one", str(context), mode], capture_output=True, text=True, check=True
            )
            result["runs"].append(json.loads(out.stdout.strip().splitlines()[-1]))
            write_result("lm_infinite_speed", result)
    by_key = {(r["context"], r["mode"]): r for r in result["runs"]}
    result["speedup"] = {
        str(c): by_key[(c, "lm_infinite")]["tokens_per_s"] / by_key[(c, "vanilla")]["tokens_per_s"]
        for c, mode in by_key
        if mode == "vanilla"
    }
    largest = max(c for c, _ in by_key)
    result["target"] = {"context": largest, "min_speedup": 2.7}
    result["target_met"] = result["speedup"][str(largest)] >= 2.7
    write_result("lm_infinite_speed", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
