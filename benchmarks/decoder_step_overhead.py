"""What peft's LoRA wrappers cost the ICAE decoder per decode step (SmolLM2-135M, bf16).

With its own adapter (the shipped checkpoint's, when it reads memory) the decoder runs the PEFT
model, that adapter applied unmerged; otherwise it runs the base modules without peft's wrappers,
sharing their weights (``Decoder.model``). Each arm
prefills the same 300 token ids with the stock cache, then takes ``--steps`` one-token steps;
the median process CPU time of a step is reported (with ``--threads 1`` CPU time counts only
this process's work, so a loaded machine moves it far less than wall time). Arms, interleaved
round by round, medians over rounds:

- ``plain``: the stock model loaded on its own (the reference).
- ``peft_adapters_off``: the ICAE's PEFT model inside ``Decoder.weights(memory=False)``, the
  wrappers switched off (how the decoder read no memory before ``Decoder.model``).
- ``unwrapped_base``: the decoder that reads no memory, ``Decoder.model(memory=False)`` inside
  ``Decoder.state``: the same weights, no wrappers.
- ``peft_decoder_adapter``: the PEFT model with the decoder adapter on, unmerged (how the
  decoder reads memory).
- ``merged_decoder_adapter``: a copy with the decoder adapter merged (one more set of weights;
  not offered by the library, measured to size that trade).

A streamed answer and a conversation enter the decoder's state around every forward call, so
``state_enter_exit_cpu_ms`` times entering and leaving it alone: the PEFT model's adapter
switching against the unwrapped decoder's lock.

Each arm's last-step logits are compared with its PEFT counterpart's, so a cheaper arm that
computed something else would show.

    .venv/bin/python benchmarks/decoder_step_overhead.py --rounds 5 --threads 1
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
from contextlib import AbstractContextManager, nullcontext

import torch
from icae_common import emit

from icmem import load_model
from icmem.icae import ICAE
from icmem.icae.model import DECODER_ADAPTER

PREFIX = torch.arange(100, 400)[None]  # 300 ordinary token ids


def step_cpu_ms(
    model: torch.nn.Module, steps: int, state: AbstractContextManager[object]
) -> tuple[float, torch.Tensor]:
    """Median CPU milliseconds of one decode step after a prefill, and the last logits."""
    with torch.no_grad(), state:
        out = model(input_ids=PREFIX, use_cache=True, logits_to_keep=1)
        token, cpu = torch.tensor([[500]]), []
        for _ in range(steps):
            start = time.process_time()
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            cpu.append(time.process_time() - start)
    return statistics.median(cpu) * 1000, out.logits[0, -1].float()


def enter_exit_cpu_ms(state: Callable[[], AbstractContextManager[object]], times: int) -> float:
    """Mean CPU milliseconds of entering and leaving a decoder state with nothing inside."""
    start = time.process_time()
    for _ in range(times):
        with state():
            pass
    return (time.process_time() - start) / times * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per arm and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", action="store_true", help="write results/NAME.json")
    parser.add_argument("--name", default="decoder_step_overhead", help="results file name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    icae = ICAE.from_pretrained(dtype="bfloat16")
    plain, _ = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    peft = icae.model
    unwrapped = icae.decoder.model(memory=False)
    with torch.no_grad():
        with_decoder = copy.deepcopy(peft)
        with_decoder.set_adapter(DECODER_ADAPTER)
        merged = with_decoder.merge_and_unload(adapter_names=[DECODER_ADAPTER])
    del with_decoder
    arms: dict[str, Callable[[], tuple[float, torch.Tensor]]] = {
        "plain": lambda: step_cpu_ms(plain, args.steps, nullcontext()),
        "peft_adapters_off": lambda: step_cpu_ms(
            peft, args.steps, icae.decoder.weights(memory=False)
        ),
        "unwrapped_base": lambda: step_cpu_ms(
            unwrapped, args.steps, icae.decoder.state(False, memory=False)
        ),
        "peft_decoder_adapter": lambda: step_cpu_ms(
            peft, args.steps, icae.decoder.weights(memory=True)
        ),
        "merged_decoder_adapter": lambda: step_cpu_ms(merged, args.steps, nullcontext()),
    }
    logits = {name: arm()[1] for name, arm in arms.items()}  # warm-up
    ms: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, arm in arms.items():
            ms[name].append(arm()[0])
    median = {name: statistics.median(v) for name, v in ms.items()}
    states: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "peft_adapters_off": lambda: icae.decoder.weights(memory=False),
        "unwrapped_base": lambda: icae.decoder.state(False, memory=False),
        "peft_decoder_adapter": lambda: icae.decoder.state(False, memory=True),
    }
    switching = {name: round(enter_exit_cpu_ms(state, 50), 3) for name, state in states.items()}

    def gap(a: str, b: str) -> float:
        return round(float((logits[a] - logits[b]).abs().max()), 4)

    result = {
        "benchmark": "decoder_step_overhead",
        "model": "smollm2-135m-instruct",
        "dtype": "bfloat16",
        "prefix_tokens": PREFIX.shape[1],
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "command": "python benchmarks/decoder_step_overhead.py " + " ".join(sys.argv[1:]),
        "step_cpu_ms": {name: [round(x, 2) for x in v] for name, v in ms.items()},
        "median_step_cpu_ms": {name: round(v, 2) for name, v in median.items()},
        "peft_adapters_off_vs_plain": round(median["peft_adapters_off"] / median["plain"], 3),
        "peft_adapters_off_vs_unwrapped": round(
            median["peft_adapters_off"] / median["unwrapped_base"], 3
        ),
        "peft_decoder_adapter_vs_merged": round(
            median["peft_decoder_adapter"] / median["merged_decoder_adapter"], 3
        ),
        "state_enter_exit_cpu_ms": switching,
        "max_abs_logit_gap": {
            "unwrapped_vs_peft_adapters_off": gap("unwrapped_base", "peft_adapters_off"),
            "merged_vs_peft_decoder_adapter": gap("merged_decoder_adapter", "peft_decoder_adapter"),
            "plain_vs_peft_adapters_off": gap("plain", "peft_adapters_off"),
        },
    }
    emit(args.name, result, args.save)


if __name__ == "__main__":
    main()
