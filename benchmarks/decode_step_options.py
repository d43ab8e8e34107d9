"""What a faster SmolLM2-135M decode step could come from: one-token forwards after a 556-entry
prefix (4 spans of slots plus a question), each option timed in one run, 1 and 2 threads; and
the stock cache against the growing one after a 4096-token prefix.

Options: the step as the Decoder ran it before this benchmark's last change (a plain Llama
module, which is what the merged decoder copy and the adapter-free copy are, fp32, stock
``DynamicCache``, which copies the whole cache every step); the stock cache growing in place
(``icmem.icae.kv_cache``: what the Decoder decodes with now, exact); the step in bf16 (what
``Decoder.decode_dtype = "bfloat16"`` decodes in); a preallocated ``StaticCache``; weight-only
int8 (what ``Decoder.int8_weights`` decodes with: every Linear and the head in int8, a quarter
of fp32's bytes, not exact); with ``--compile``, the fp32 and int8 steps through
``torch.compile`` (their compile time recorded); and the bare matrix-vector products of the
step's weights, the floor any option in eager PyTorch can reach. Ratios are against the
stock-cache fp32 step in the same run and thread count.

    python benchmarks/decode_step_options.py --steps 16 --threads 2 --compile --save
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from icae_common import emit

from icmem import hardware
from icmem.icae.int8_linear import quantize_linears
from icmem.icae.kv_cache import growing_cache
from icmem.models import load_model

PREFIX = 556
LONG_PREFIX = 4096  # a long answer or chat below the window: where the stock cache's copy shows


def step_ms(
    model: torch.nn.Module, make_cache: Callable[[], Any], steps: int, prefix: int = PREFIX
) -> float:
    """Median wall ms of a one-token step after a prefix of ``prefix`` tokens."""
    ids = torch.randint(100, 40_000, (1, prefix), generator=torch.Generator().manual_seed(0))
    cache = make_cache()
    with torch.inference_mode():
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        times = []
        for position in range(prefix, prefix + steps):
            start = time.perf_counter()
            out = model(
                input_ids=torch.tensor([[token]]),
                position_ids=torch.tensor([[position]]),
                cache=cache,
                use_cache=True,
            )
            token = int(out.logits[0, -1].argmax())
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def matvec_floor_ms(model: torch.nn.Module, repeats: int) -> float:
    """One vector through every Linear weight of the model (and the tied head), no other op."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    vector = {w.shape[1]: torch.ones(1, w.shape[1], dtype=w.dtype) for w in weights}
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(vector[w.shape[1]], w)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def compiled(model: torch.nn.Module) -> tuple[torch.nn.Module, float]:
    """A copy of ``model`` whose forward is compiled, and the seconds its first calls (a prefill
    and a few steps: the graphs a decode needs) took beyond the same calls run eagerly."""
    from transformers import DynamicCache

    model = copy.deepcopy(model)
    first_calls = 3  # steps after the prefill (step_ms times the third)
    eager = time.perf_counter()
    step_ms(model, lambda: DynamicCache(config=model.config), first_calls)
    eager = time.perf_counter() - eager
    model.forward = torch.compile(model.forward, dynamic=True)  # type: ignore[method-assign]
    start = time.perf_counter()
    step_ms(model, lambda: DynamicCache(config=model.config), first_calls)
    return model, time.perf_counter() - start - eager


def base_ms(times: dict[str, float]) -> float:
    return times["today_fp32_dynamic_cache"]


NOTE = (
    "Where a step goes: reading the fp32 weights once (matvec_floor_fp32, 540 MB) takes most of "
    "the step, so this machine's memory bandwidth, not its cores, sets the pace; the rest is "
    "beyond_weight_reads_ms (attention over the cache, norms, rotary, the stock cache's copy, "
    "Python). The growing cache removes the stock cache's whole-cache copy per token, exactly. "
    "Fewer bytes per step: bf16 halves them (though a bf16 copy's prefill is ~6x slower on an "
    "AVX2-only CPU, so Decoder.decode_dtype picks it only when asked); weight-only int8 "
    "(Decoder.int8_weights, opt-in, not exact) quarters them. torch.compile fuses the eager "
    "ops; its compile_seconds are paid once per process and shape family. A preallocated "
    "StaticCache gains nothing in eager mode: its masked attention reads the whole buffer."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd arms")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    from transformers import DynamicCache, StaticCache

    fp32, _ = load_model("smollm2-135m-instruct", dtype="float32")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    int8 = quantize_linears(copy.deepcopy(fp32))
    length = PREFIX + args.steps + 8

    def dynamic(model: torch.nn.Module) -> Callable[[], Any]:
        return lambda: DynamicCache(config=model.config)

    def growing(model: torch.nn.Module) -> Callable[[], Any]:
        return lambda: growing_cache(model.config)

    def static(model: torch.nn.Module) -> Callable[[], Any]:
        return lambda: StaticCache(config=model.config, max_cache_len=length)

    arms = {
        "today_fp32_dynamic_cache": (fp32, dynamic(fp32)),
        "fp32_growing_cache": (fp32, growing(fp32)),
        "bf16_dynamic_cache": (bf16, dynamic(bf16)),
        "fp32_static_cache": (fp32, static(fp32)),
        "int8_weight_only_growing_cache": (int8, growing(fp32)),
    }
    long_arms = {  # the two caches after a long prefix
        f"fp32_dynamic_cache_after_{LONG_PREFIX}": (fp32, dynamic(fp32)),
        f"fp32_growing_cache_after_{LONG_PREFIX}": (fp32, growing(fp32)),
    }
    compile_seconds: dict[str, float] = {}
    if args.compile:
        for name, model in (("fp32_compiled", fp32), ("int8_weight_only_compiled", int8)):
            torch.set_num_threads(max(args.threads))
            module, seconds = compiled(model)
            # the stock cache: the growing one's Python checks would split the compiled graph
            arms[name] = (module, dynamic(fp32))
            compile_seconds[name] = round(seconds, 1)
    results: dict[str, Any] = {}
    load_start = os.getloadavg()
    for threads in args.threads:
        torch.set_num_threads(threads)
        # Arms interleaved round by round, the median of their rounds: memory bandwidth, which
        # paces a step, drifts by tens of percent within minutes on a shared machine.
        rounds: dict[str, list[float]] = {name: [] for name in [*arms, *long_arms]}
        rounds.update(matvec_floor_fp32=[], matvec_floor_bf16=[])
        for _ in range(args.rounds):
            for name, (model, cache) in arms.items():
                rounds[name].append(step_ms(model, cache, args.steps))
            for name, (model, cache) in long_arms.items():
                rounds[name].append(step_ms(model, cache, args.steps, LONG_PREFIX))
            rounds["matvec_floor_fp32"].append(matvec_floor_ms(fp32, args.steps))
            rounds["matvec_floor_bf16"].append(matvec_floor_ms(bf16, args.steps))
        times = {name: statistics.median(values) for name, values in rounds.items()}
        base = base_ms(times)
        results[f"threads_{threads}"] = {
            "median_step_ms": {k: round(v, 2) for k, v in times.items()},
            # what today's step spends beyond reading its weights: attention over the cache,
            # norms, rotary, cache growth and Python (module calls, transformers' plumbing)
            "beyond_weight_reads_ms": round(base_ms(times) - times["matvec_floor_fp32"], 2),
            "tokens_per_s": {k: round(1000 / v, 1) for k, v in times.items()},
            "speedup_vs_today": {k: round(base / v, 2) for k, v in times.items()},
            f"growing_over_dynamic_cache_speedup_after_{LONG_PREFIX}": round(
                times[f"fp32_dynamic_cache_after_{LONG_PREFIX}"]
                / times[f"fp32_growing_cache_after_{LONG_PREFIX}"],
                2,
            ),
        }
    emit(
        "decode_step_options",
        {
            "benchmark": "decode_step_options",
            "model": "smollm2-135m-instruct",
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpu_flags_bf16": sorted(hardware.cpu_flags() & {"amx_bf16", "avx512_bf16"}),
            "torch": torch.__version__,
            "prefix_entries": PREFIX,
            "steps": args.steps,
            "rounds": args.rounds,
            "command": "python " + " ".join(sys.argv),
            "load_average_at_start": [round(v, 2) for v in load_start],
            "note": NOTE,
            "compile_seconds": compile_seconds,
            **results,
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        },
        args.save,
    )


if __name__ == "__main__":
    main()
