"""What a distillation step costs, cached against computed in the step, fp32 against bf16.

Cached: the decoder's forward and backward on slots + prompt + answer (the frozen encoder's
slots and the teacher's distributions read from the cache). Uncached: the same step plus what
the cache saves, the encoder compressing the spans and the teacher reading them as text. Each
arm runs on the same cached examples (`icmem train distill-cache`), on this machine's CPU.

    .venv/bin/python benchmarks/distill_step.py --cache runs/distill/train --examples 6 --save
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from icae_common import emit

from icmem.hardware import cpu_flags, fast_dtype
from icmem.icae import distill
from icmem.icae.model import ICAE, DistillLoss


def seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def step_times(icae: ICAE, examples) -> dict[str, float]:
    """Median seconds per example: the student step, and the encoder and teacher it avoids.

    The teacher reads the spans' tokens then the prompt: the length of what `memory="text"`
    lays out, less a few tokens of its system-prompt header."""
    loss = DistillLoss()
    student, encoder, teacher = [], [], []
    for example in examples:
        icae.zero_grad(set_to_none=True)
        student.append(seconds(lambda e=example: icae.training_loss([e], loss).backward()))
        with torch.no_grad():
            encoder.append(seconds(lambda e=example: distill.slots_of(icae, e)))
        prompt = list(example.context_ids) + list(example.prompt_ids)
        teacher.append(
            seconds(lambda p=prompt, e=example: distill.teacher_targets(icae, p, e.target_ids, 64))
        )
    cached = statistics.median(student)
    uncached = statistics.median(
        s + e + t for s, e, t in zip(student, encoder, teacher, strict=True)
    )
    return {
        "cached_s": round(cached, 3),
        "uncached_s": round(uncached, 3),
        "encoder_s": round(statistics.median(encoder), 3),
        "teacher_s": round(statistics.median(teacher), 3),
        "speedup": round(uncached / cached, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="runs/distill/train")
    parser.add_argument("--examples", type=int, default=6)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    examples = list(distill.iter_cache(args.cache))[: args.examples]
    result = {}
    for dtype in args.dtypes:
        icae = ICAE.from_pretrained(dtype=dtype)
        icae.freeze_encoder()
        icae.train()
        result[dtype] = {"examples": len(examples), **step_times(icae, examples)}
        print(dtype, result[dtype], flush=True)
    emit(
        "distill_step",
        {
            "benchmark": "distill_step",
            "command": " ".join(["python", *sys.argv]),
            "machine": platform.processor() or platform.machine(),
            "bf16_cpu": bool(cpu_flags() & {"amx_bf16", "avx512_bf16"}),
            "auto_dtype": fast_dtype(),
            "threads": args.threads,
            "per_example": result,
        },
        args.save,
    )


if __name__ == "__main__":
    main()
