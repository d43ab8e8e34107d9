"""Where one decode step of SmolLM2-135M goes: the shipped ICAE's decoder from 4 spans of slots
(decoder adapter on) and without memory, in float32 and bfloat16, with the stock cache and
LM-Infinite's bounded cache, against a copy with the decoder adapter merged into its weights.

Per arm: the median wall milliseconds of one step (a one-token forward after a ~560-entry
prefix, the size of 4 spans of slots plus a question), and for the main arms a
``torch.profiler`` table of self CPU time grouped into matrix products, attention, cache
updates, LoRA (peft's wrappers), element-wise ops and the rest; ``python_overhead_ms`` is wall
time no op accounts for (module calls, argument handling, peft's dispatch).

    OMP_NUM_THREADS=1 python benchmarks/decode_step_profile.py --threads 1 --steps 24 --save
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from icae_common import emit, play_text
from torch.profiler import ProfilerActivity, profile

from icmem import lm_infinite
from icmem.hardware import cpu_flags
from icmem.icae import ICAE
from icmem.icae.model import DECODER_ADAPTER

QUESTION = "Who speaks first in this passage, and what does he ask?"

CATEGORIES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product", "aten::_scaled_dot", "aten::softmax", "flash"),
    "cache": ("aten::cat", "aten::copy_", "aten::index_copy", "aten::slice_scatter"),
    "elementwise": (
        "aten::mul",
        "aten::add",
        "aten::silu",
        "aten::rsqrt",
        "aten::pow",
        "aten::mean",
        "aten::neg",
        "aten::div",
        "aten::sub",
    ),
    "conversion": ("aten::to", "aten::_to_copy", "aten::type_as"),
}


def category(name: str) -> str:
    for label, prefixes in CATEGORIES.items():
        if any(name.startswith(p) for p in prefixes):
            return label
    return "other_ops"


def steps_ms(
    model: torch.nn.Module,
    embeds: torch.Tensor,
    steps: int,
    state: Callable[[], AbstractContextManager[object]],
    lm_inf: bool,
) -> tuple[list[float], torch.Tensor]:
    """Wall milliseconds of each decode step after a prefill of ``embeds``, and last logits."""
    with torch.no_grad(), state():
        infinite = lm_infinite.enabled(model) if lm_inf else nullcontext()
        with infinite:
            cache = lm_infinite.make_cache(model) if lm_inf else None
            out = model(
                inputs_embeds=embeds[None], past_key_values=cache, use_cache=True, logits_to_keep=1
            )
            token = out.logits[0, -1].argmax().view(1, 1)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[0, -1].argmax().view(1, 1)
                times.append((time.perf_counter() - start) * 1000)
    return times, out.logits[0, -1].float()


def profiled(
    model: torch.nn.Module,
    embeds: torch.Tensor,
    steps: int,
    state: Callable[[], AbstractContextManager[object]],
) -> dict:
    """Self CPU milliseconds per step by category, and the wall time no op accounts for."""
    with torch.no_grad(), state():
        out = model(inputs_embeds=embeds[None], use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax().view(1, 1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[0, -1].argmax().view(1, 1)
            wall = (time.perf_counter() - start) * 1000 / steps
    grouped: dict[str, float] = defaultdict(float)
    ops, calls = 0.0, 0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        self_ms = event.self_cpu_time_total / 1000 / steps
        grouped[category(event.key)] += self_ms
        ops += self_ms
        calls += event.count
    return {
        "wall_ms_under_profiler": round(wall, 2),
        "self_cpu_ms": {k: round(v, 2) for k, v in sorted(grouped.items())},
        "aten_ops_per_step": round(calls / steps),
        "python_overhead_ms": round(wall - ops, 2),
    }


def merged_decoder(icae: ICAE) -> torch.nn.Module:
    with torch.no_grad():
        with_decoder = copy.deepcopy(icae.model)
        with_decoder.set_adapter(DECODER_ADAPTER)
        return with_decoder.merge_and_unload(adapter_names=[DECODER_ADAPTER]).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="decode steps per arm and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", action="store_true", help="write results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    result: dict = {
        "benchmark": "decode_step_profile",
        "model": "smollm2-135m-instruct",
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "avx512_bf16_or_amx": bool({"avx512_bf16", "amx_bf16"} & cpu_flags()),
        "threads": args.threads,
        "steps": args.steps,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "command": "python benchmarks/decode_step_profile.py " + " ".join(sys.argv[1:]),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    for dtype in ("float32", "bfloat16"):
        icae = ICAE.from_pretrained(dtype=dtype)
        context = icae.tokenize(play_text())[: 4 * icae.config.span_tokens]
        memory = icae.compress([context], batch_size=4)
        with torch.no_grad():
            slots_prefix = icae.decoder_inputs(memory, "ft", icae.prompt_ids(QUESTION))
            text_prefix = icae.model.get_input_embeddings()(
                torch.tensor(icae.prompt_ids("Tell me a story about the sea."))
            )
        merged = merged_decoder(icae)
        unwrapped = icae.decoder.model(memory=False)
        adapter: Callable[[], AbstractContextManager[object]] = icae.decoder.weights
        lock: Callable[[], AbstractContextManager[object]] = nullcontext
        arms = {
            "slots_peft_decoder_adapter": (icae.model, slots_prefix, adapter, False),
            "slots_merged_decoder_adapter": (merged, slots_prefix, lock, False),
            "slots_peft_decoder_adapter_lm_infinite": (icae.model, slots_prefix, adapter, True),
            "slots_merged_lm_infinite": (merged, slots_prefix, lock, True),
            "no_memory_unwrapped": (unwrapped, text_prefix, lock, False),
            "no_memory_unwrapped_lm_infinite": (unwrapped, text_prefix, lock, True),
        }
        logits = {n: steps_ms(m, e, 2, s, li)[1] for n, (m, e, s, li) in arms.items()}
        times: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.rounds):
            for name, (model, embeds, state, lm_inf) in arms.items():
                times[name] += steps_ms(model, embeds, args.steps, state, lm_inf)[0]
        gap = float(
            (logits["slots_merged_decoder_adapter"] - logits["slots_peft_decoder_adapter"])
            .abs()
            .max()
        )
        result[dtype] = {
            "slots_prefix_entries": slots_prefix.shape[0],
            "text_prefix_tokens": text_prefix.shape[0],
            "median_step_ms": {n: round(statistics.median(t), 2) for n, t in times.items()},
            "merged_vs_peft_max_abs_logit_gap": round(gap, 4),
            "profile": {
                "slots_peft_decoder_adapter": profiled(
                    icae.model, slots_prefix, args.steps, adapter
                ),
                "slots_merged_decoder_adapter": profiled(merged, slots_prefix, args.steps, lock),
                "no_memory_unwrapped": profiled(unwrapped, text_prefix, args.steps, lock),
            },
        }
        del icae, merged, unwrapped
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    emit("decode_step_profile", result, args.save)


if __name__ == "__main__":
    main()
