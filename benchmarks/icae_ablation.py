"""ICAE recipe ablation: the same data, seed and steps per arm; held-out `[AE]` cross-entropy
against the no-memory prior. Each arm is an ordinary resumable training run under
runs/ablation/NAME/; `report` gathers them into benchmarks/results/NAME.json and .png.

    .venv/bin/python benchmarks/icae_ablation.py run --arms spread_scale --steps 400 --threads 1
    .venv/bin/python benchmarks/icae_ablation.py report --arms baseline spread_scale

Run arms side by side in separate processes (one thread each) on a 2-core machine; a second
`run` with more `--steps` continues an arm exactly where it stopped (constant learning rate
after warmup, so extending a run changes nothing already computed).

Gate (the training issue): an arm passes when its held-out `[AE]` cross-entropy is at least
1 nat below the prior within 2,000 steps; `report` gives the first step where that happened.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

from icae_common import RESULTS

from icmem.icae.train import TrainConfig, latest_checkpoint, read_metrics, train

RUNS = Path("runs/ablation")
GATE_NATS = 1.0
GATE_STEPS = 2000
START, END = "<!-- ablation:start -->", "<!-- ablation:end -->"

# What every arm shares: short spans (128 tokens into 32 slots, 4x), batch 4, [AE] only.
COMMON_ICAE = {
    "num_memory_tokens": 32,
    "span_tokens": 128,
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "dtype": "bfloat16",
}
COMMON_TRAIN = {
    "stage": "pretrain",
    "data": "runs/corpus",
    "seed": 0,
    "micro_batch_size": 4,
    "grad_accum_steps": 1,
    "learning_rate": 3e-4,
    "min_lr_ratio": 1.0,
    "warmup_steps": 20,
    "span_tokens": 128,
    "continuation_tokens": 64,
    "ae_fraction": 1.0,
    "eval_every_steps": 50,
    "eval_examples": 8,
    "checkpoint_every_minutes": 5.0,
    "keep_checkpoints": 1,
    "progress": False,
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name: (ICAEConfig overrides, TrainConfig overrides, what the arm tests)
ARMS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "baseline": ({}, {}, "today's recipe: sequential positions, raw last-layer slots"),
    "spread": ({"slot_positions": "spread"}, {}, "spread positions, raw slots"),
    "spread_scale": (
        {"slot_positions": "spread", "slot_head": "scale"},
        {},
        "spread positions, slots rescaled to token scale",
    ),
    "spread_mid": (
        {"slot_positions": "spread", "slot_head": "scale", "slot_layer": 15},
        {},
        "spread, slots from layer 15 of 30 (rescaled)",
    ),
    "spread_affine": (
        {"slot_positions": "spread", "slot_head": "affine"},
        {"embedding_learning_rate": 1e-3},
        "spread, rescaled + affine head, own tensors at lr 1e-3",
    ),
    "spread_scale_attn64": (
        {
            "slot_positions": "spread",
            "slot_head": "scale",
            "lora_rank": 64,
            "lora_alpha": 128,
            "lora_targets": ATTENTION,
        },
        {},
        "spread, rescaled, LoRA rank 64 on attention only",
    ),
    "spread_scale_lr1e3": (
        {"slot_positions": "spread", "slot_head": "scale"},
        {"learning_rate": 1e-3},
        "spread, rescaled, lr 1e-3",
    ),
    "spread_mid_lr1e3": (
        {"slot_positions": "spread", "slot_head": "scale", "slot_layer": 15},
        {"learning_rate": 1e-3},
        "spread, slots from layer 15 (rescaled), lr 1e-3",
    ),
    "spread_pooled_lr1e3": (
        {"slot_positions": "spread", "slot_head": "scale", "slot_residual": "pooled"},
        {"learning_rate": 1e-3},
        "spread, rescaled plus each group's mean token embedding, lr 1e-3",
    ),
    "spread_pooled_declora_lr1e3": (
        {
            "slot_positions": "spread",
            "slot_head": "scale",
            "slot_residual": "pooled",
            "decoder_lora_rank": 16,
        },
        {"learning_rate": 1e-3},
        "as spread_pooled_lr1e3, plus a rank-16 LoRA of the decoder's own",
    ),
}


def arm_config(name: str, steps: int, threads: int | None) -> TrainConfig:
    if name not in ARMS:
        raise SystemExit(f"unknown arm {name!r}; known: {sorted(ARMS)}")
    icae, overrides, _ = ARMS[name]
    return TrainConfig.from_dict(
        {
            **COMMON_TRAIN,
            "output_dir": str(RUNS / name),
            "icae": {**COMMON_ICAE, **icae},
            "max_steps": steps,
            "num_threads": threads,
            **overrides,
        }
    )


def corpus_digest(corpus: str) -> str:
    """SHA-256 of the corpus manifest: every arm must read the same documents."""
    manifest = Path(corpus) / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(
            f"{manifest} is missing; build the corpus: icmem train corpus --out {corpus}"
        )
    return hashlib.sha256(manifest.read_bytes()).hexdigest()


def run(args: argparse.Namespace) -> None:
    for name in args.arms:
        config = arm_config(name, args.steps, args.threads)
        resume = latest_checkpoint(config.output_dir) is not None
        digest, pinned = corpus_digest(config.data), Path(config.output_dir) / "corpus.sha256"
        if resume and pinned.is_file() and pinned.read_text().strip() != digest:
            raise SystemExit(
                f"{config.data} changed since arm {name!r} started, so resuming would train on "
                "other examples; rebuild the arm (delete its run folder) or restore the corpus"
            )
        pinned.parent.mkdir(parents=True, exist_ok=True)
        pinned.write_text(digest + "\n")
        started = time.monotonic()
        result = train(config, resume=resume)
        print(
            json.dumps(
                {
                    "arm": name,
                    "steps": result.steps,
                    "seconds": round(time.monotonic() - started, 1),
                }
            )
        )


def prior_ce(config: TrainConfig) -> float:
    """The base model's cross-entropy on the held-out spans with no memory (tokens after the
    first), the number every arm's held-out `[AE]` loss is measured against."""
    import torch

    from icmem.evals.reconstruct import _raw_nll
    from icmem.icae.model import ICAE
    from icmem.icae.train import _HeldOutEval

    torch.set_num_threads(config.num_threads or torch.get_num_threads())
    icae = ICAE.from_base(config.base_model, **config.icae)
    examples = _HeldOutEval(config, icae).examples["ae"]
    with torch.no_grad():
        return statistics.fmean(
            _raw_nll(icae, e.context_ids[:1], e.context_ids[1:]) for e in examples
        )


def report(args: argparse.Namespace) -> None:
    arms = {}
    prior = prior_ce(arm_config(args.arms[0], 1, args.threads))
    for name in args.arms:
        path = RUNS / name
        if not (path / "metrics.jsonl").is_file():
            raise SystemExit(f"arm {name!r} has not run yet ({path}/metrics.jsonl missing)")
        records = read_metrics(path)
        curve = [
            (r["step"], r["tokens_seen"], r["held_out_ae_loss"])
            for r in records
            if "held_out_ae_loss" in r
        ]
        steps = [r for r in records if "loss" in r]
        passed = next((s for s, _, ce in curve if ce <= prior - GATE_NATS), None)
        arms[name] = {
            "what": ARMS[name][2],
            "icae": {**COMMON_ICAE, **ARMS[name][0]},
            "train": ARMS[name][1],
            "steps": steps[-1]["step"] if steps else 0,
            "seconds": round(steps[-1]["elapsed_s"], 1) if steps else 0.0,
            "held_out_ae_ce": [
                {"step": s, "tokens_seen": t, "ce": round(ce, 4)} for s, t, ce in curve
            ],
            "best_ce": round(min(ce for _, _, ce in curve), 4) if curve else None,
            "gate_step": passed if passed is not None and passed <= GATE_STEPS else None,
        }
    result = {
        "benchmark": "icae_ablation",
        "span_tokens": COMMON_ICAE["span_tokens"],
        "num_memory_tokens": COMMON_ICAE["num_memory_tokens"],
        "batch": COMMON_TRAIN["micro_batch_size"] * COMMON_TRAIN["grad_accum_steps"],
        "held_out_examples": COMMON_TRAIN["eval_examples"],
        "corpus_manifest_sha256": corpus_digest(COMMON_TRAIN["data"]),
        "prior_ce": round(prior, 4),
        "gate": f"held-out AE CE <= prior - {GATE_NATS} within {GATE_STEPS} steps",
        "arms": arms,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / f"{args.name}.png")
    write_table(result, Path("TRAINING.md"), args.name)
    print(
        json.dumps(
            {
                name: {"best_ce": a["best_ce"], "gate_step": a["gate_step"]}
                for name, a in arms.items()
            }
            | {"prior_ce": result["prior_ce"]}
        )
    )


def write_table(result: dict[str, Any], training_md: Path, name: str) -> None:
    """The arms side by side at every evaluated step they share, between the markers."""
    arms = result["arms"]
    steps = sorted({p["step"] for a in arms.values() for p in a["held_out_ae_ce"]})
    header = "| arm | what | " + " | ".join(f"step {s}" for s in steps) + " | gate |"
    rows = [header, "|---|---|" + "---:|" * (len(steps) + 1)]
    for arm_name, arm in arms.items():
        at = {p["step"]: p["ce"] for p in arm["held_out_ae_ce"]}
        cells = " | ".join(f"{at[s]:.3f}" if s in at else "" for s in steps)
        gate = "not yet" if arm["gate_step"] is None else f"step {arm['gate_step']}"
        rows.append(f"| `{arm_name}` | {arm['what']} | {cells} | {gate} |")
    block = "\n".join(
        [
            START,
            "",
            f"Held-out `[AE]` cross-entropy (nats/token); prior {result['prior_ce']:.3f}, gate "
            f"{result['prior_ce'] - GATE_NATS:.3f}. "
            f"`benchmarks/results/{name}.json`, plot `benchmarks/results/{name}.png`:",
            "",
            *rows,
            "",
            f"![ablation](benchmarks/results/{name}.png)",
            "",
            END,
        ]
    )
    text = training_md.read_text()
    before, rest = text.split(START, 1)
    training_md.write_text(before + block + rest.split(END, 1)[1])


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, arm in result["arms"].items():
        points = arm["held_out_ae_ce"]
        ax.plot([p["step"] for p in points], [p["ce"] for p in points], marker=".", label=name)
    ax.axhline(result["prior_ce"], color="black", linestyle="--", label="prior (no memory)")
    ax.axhline(result["prior_ce"] - GATE_NATS, color="red", linestyle=":", label="gate")
    ax.set_xlabel(f"optimizer step (batch {result['batch']})")
    ax.set_ylabel("held-out [AE] cross-entropy (nats/token)")
    ax.set_title(
        f"ICAE recipe ablation: {result['span_tokens']} tokens into "
        f"{result['num_memory_tokens']} slots"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train (or continue) arms one after another")
    p.add_argument("--arms", nargs="+", required=True, choices=sorted(ARMS))
    p.add_argument("--steps", type=int, default=GATE_STEPS)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run)
    p = sub.add_parser("report", help="gather arms into JSON and a PNG plot")
    p.add_argument("--arms", nargs="+", default=sorted(ARMS), choices=sorted(ARMS))
    p.add_argument("--name", default="icae_ablation")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
