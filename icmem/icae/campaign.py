"""The training campaign of the default ICAE: one run that any session can continue.

Sessions come and go; the campaign goes on with whatever cores they leave idle. Starting it
either resumes the run directory exactly (when it survived) or, on a fresh clone, warm-starts
a new run from the committed export, so no session's training is lost. Before a session
stops, `report` appends the run's metrics to the committed log and re-draws the curve, and
`promote` replaces the committed export only when held-out quality improved on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icmem.icae.checkpoint import DEFAULT_CHECKPOINT, MANIFEST
from icmem.icae.config import ICAEConfig
from icmem.icae.train import (
    TrainConfig,
    TrainingConfigError,
    TrainResult,
    export_checkpoint,
    latest_checkpoint,
    read_metrics,
    train,
)

DEFAULT_CONFIG = Path("configs/campaign-smollm2-135m-k128.json")
# The campaign's latest export, committed whenever training stops (promoted or not), so that a
# new machine continues from it rather than from the shipped checkpoint.
CAMPAIGN_EXPORT = Path("campaign/latest")
PID_FILE = "campaign.pid"
LOG_FILE = "campaign.log"


@dataclass(frozen=True)
class CampaignPlan:
    """How the next start continues: "resume" (exact), "warm-start" (from the export) or
    "fresh" (the export was trained with another recipe, so nothing of it fits)."""

    mode: str
    config: TrainConfig
    reason: str


def warm_start_source() -> Path:
    """Where a fresh clone continues from: the campaign's committed latest export when there is
    one, else the shipped checkpoint."""
    return CAMPAIGN_EXPORT if (CAMPAIGN_EXPORT / MANIFEST).is_file() else DEFAULT_CHECKPOINT


def plan_campaign(config: TrainConfig, export_dir: str | Path | None = None) -> CampaignPlan:
    """Decide how to continue the campaign described by `config` (warm starts come from
    `export_dir`, by default `warm_start_source()`)."""
    export_dir = warm_start_source() if export_dir is None else export_dir
    out = Path(config.output_dir)
    if latest_checkpoint(out) is not None:
        saved = TrainConfig.from_file(out / "config.json")
        resumed = dataclasses.replace(
            saved, max_steps=config.max_steps, num_threads=config.num_threads
        )
        return CampaignPlan("resume", resumed, f"{out} holds checkpoints; resuming exactly")
    export = Path(export_dir)
    manifest_path = export / MANIFEST
    if not manifest_path.is_file():
        return CampaignPlan("fresh", config, f"no export in {export}; starting from the base model")
    manifest = json.loads(manifest_path.read_text())
    exported = ICAEConfig.from_dict(manifest["config"])
    wanted = ICAEConfig(base_model=config.base_model, **config.icae)
    if _recipe(exported) != _recipe(wanted):
        return CampaignPlan(
            "fresh",
            config,
            f"the export in {export} was trained with another recipe; starting from the base model",
        )
    # A new data seed per export: a warm start must not replay the examples already trained on.
    digest = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
    precision = {"dtype": config.icae["dtype"]} if "dtype" in config.icae else {}
    warm = dataclasses.replace(
        config, init_from=str(export), icae=precision, seed=config.seed + int(digest[:7], 16)
    )
    return CampaignPlan("warm-start", warm, f"warm-starting from the export in {export}")


def _recipe(config: ICAEConfig) -> dict[str, Any]:
    """What must match for an export's tensors to fit a run (precision may differ)."""
    return {k: v for k, v in config.to_dict().items() if k != "dtype"}


def run_campaign(
    config: TrainConfig | str | Path = DEFAULT_CONFIG,
    *,
    export_dir: str | Path | None = None,
    until_step: int | None = None,
) -> TrainResult:
    """Continue the campaign in this process (see `plan_campaign`)."""
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_file(config)
    plan = plan_campaign(config, export_dir)
    print(json.dumps({"campaign": plan.mode, "reason": plan.reason}), file=sys.stderr, flush=True)
    return train(plan.config, resume=plan.mode == "resume", until_step=until_step)


def start_in_background(config_path: str | Path = DEFAULT_CONFIG, *, niceness: int = 19) -> int:
    """Start the campaign as a detached process at `nice` `niceness`; returns its pid.

    It outlives the calling shell, logs to `output_dir/campaign.log` and is stopped (with a
    checkpoint) by `stop_background`. A campaign already running is refused, not doubled.
    """
    config = TrainConfig.from_file(config_path)
    out = Path(config.output_dir)
    running = background_pid(out)
    if running is not None:
        raise TrainingConfigError(
            f"the campaign is already running (pid {running}); stop it with "
            "`icmem train campaign stop` first"
        )
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "icmem.cli",
        "train",
        "campaign",
        "run",
        "--config",
        str(config_path),
    ]
    with (out / LOG_FILE).open("a") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: _lower_priority(niceness),
        )
    (out / PID_FILE).write_text(f"{process.pid}\n")
    return process.pid


def _lower_priority(niceness: int) -> None:
    """``nice`` the new process and its session's autogroup: with autogroups on (Linux's
    default for desktops and many VMs) the CPU is shared between sessions first, so a niced
    process in a session of its own would still take half the machine from everything else."""
    os.nice(niceness)
    with contextlib.suppress(OSError):  # no autogroups here: plain nice is all there is
        Path("/proc/self/autogroup").write_text(f"{niceness}\n")


def background_pid(output_dir: str | Path) -> int | None:
    """The pid of a live campaign process of this run, or None."""
    path = Path(output_dir) / PID_FILE
    if not path.is_file():
        return None
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, PermissionError):
        return None
    try:  # a campaign this process started and that has ended is a zombie until reaped
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return None
    except ChildProcessError:
        pass  # not our child: kill(pid, 0) above is the answer
    return pid


def stop_background(output_dir: str | Path, *, timeout: float = 600.0) -> bool:
    """SIGTERM the campaign (it checkpoints, then exits) and wait; False if none ran."""
    pid = background_pid(output_dir)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(1.0)
    raise TrainingConfigError(f"the campaign (pid {pid}) did not stop within {timeout:.0f} s")


def held_out_history(output_dir: str | Path) -> list[dict[str, Any]]:
    """The held-out evaluations of a run, in step order (none before it first logged)."""
    if not (Path(output_dir) / "metrics.jsonl").is_file():
        return []
    return [r for r in read_metrics(output_dir) if "held_out_ae_loss" in r]


AE_REGRESSION = 1.10  # a promoted export may lose at most 10% of held-out [AE] loss


def held_out_losses(config: TrainConfig, icae_dir: str | Path) -> dict[str, float]:
    """A saved ICAE's losses on the run's own held-out examples (the numbers in its metrics),
    so that two checkpoints of any recipe are compared on the same spans."""
    import torch

    from icmem.icae.model import ICAE
    from icmem.icae.train import _HeldOutEval

    icae = ICAE.from_pretrained(icae_dir, dtype="auto")
    with torch.no_grad():
        return _HeldOutEval(config, icae).losses()


def held_out_objective(config: TrainConfig, losses: dict[str, float]) -> float:
    """The run's own objective: `[AE]` and `[LM]` losses weighted by the mixture it trains on
    (pure `[AE]` for an autoencoding phase), so that a mixed phase is not judged by
    autoencoding alone."""
    if "held_out_distill_loss" in losses:
        return losses["held_out_distill_loss"]
    if "held_out_ft_loss" in losses:
        return losses["held_out_ft_loss"]
    weight = config.ae_fraction
    return weight * losses["held_out_ae_loss"] + (1.0 - weight) * losses["held_out_lm_loss"]


ANSWER_DOCUMENTS = 24  # held-out invented documents whose questions judge a distill run
ANSWERS = "answers_contains_gold"


def answers_score(icae_dir: str | Path, documents: int = ANSWER_DOCUMENTS) -> float:
    """How often a saved ICAE's answers from slots name the gold answer, through the whole
    pipeline (recall k=1 and k=4) on held-out invented documents (``icmem.evals.answers``)."""
    from icmem.evals.answers import evaluate, held_out_cases
    from icmem.icae.model import ICAE

    icae = ICAE.from_pretrained(icae_dir, dtype="auto")
    docs, cases = held_out_cases(documents)
    summary, _ = evaluate(icae, docs, cases, ks=(1, 4), modes=("slots",))
    return sum(summary[f"slots@{k}"]["contains_gold"] for k in (1, 4)) / 2


def judge(
    config: TrainConfig, candidate: dict[str, float], committed: dict[str, float]
) -> tuple[bool, str]:
    """Whether ``candidate`` should replace ``committed``, by held-out numbers only (never one
    span): its held-out ``[AE]`` loss may grow by at most ``AE_REGRESSION``; where both were
    asked questions, more right answers win and fewer lose; otherwise (or on a tie) the run's
    held-out objective decides."""
    ae = "held_out_ae_loss"
    if ae in candidate and ae in committed and candidate[ae] > AE_REGRESSION * committed[ae]:
        return (
            False,
            f"[AE] loss {candidate[ae]:.3f} is worse than the export's {committed[ae]:.3f}",
        )
    if ANSWERS in candidate and ANSWERS in committed:
        if candidate[ANSWERS] < committed[ANSWERS]:
            return False, (
                f"fewer right answers from slots ({candidate[ANSWERS]:.3f} against "
                f"{committed[ANSWERS]:.3f})"
            )
        if candidate[ANSWERS] > committed[ANSWERS]:
            return True, (
                f"more right answers from slots ({candidate[ANSWERS]:.3f} against "
                f"{committed[ANSWERS]:.3f})"
            )
    ours, theirs = held_out_objective(config, candidate), held_out_objective(config, committed)
    if ours >= theirs:
        return False, f"held-out objective {ours:.4f} is no better than the export's {theirs:.4f}"
    return True, f"held-out objective {ours:.4f} beats the export's {theirs:.4f}"


def promote_if_better(
    config: TrainConfig, export_dir: str | Path = DEFAULT_CHECKPOINT
) -> dict[str, Any]:
    """Export the run's latest checkpoint over `export_dir` when `judge` prefers it to the
    export, both measured on the same held-out examples (and, for a distill run, the same
    held-out questions)."""
    checkpoint = latest_checkpoint(config.output_dir)
    if checkpoint is None:
        return {"promoted": False, "reason": f"{config.output_dir} has no checkpoint yet"}
    candidate = held_out_losses(config, checkpoint / "icae")
    export = Path(export_dir)
    committed = held_out_losses(config, export) if (export / MANIFEST).is_file() else None
    if config.stage == "distill":
        candidate[ANSWERS] = answers_score(checkpoint / "icae")
        if committed is not None:
            committed[ANSWERS] = answers_score(export)
    record: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "candidate_loss": round(held_out_objective(config, candidate), 4),
        "committed_loss": None
        if committed is None
        else round(held_out_objective(config, committed), 4),
        "candidate": {k: round(v, 4) for k, v in candidate.items()},
        "committed": None if committed is None else {k: round(v, 4) for k, v in committed.items()},
    }
    if committed is not None:
        better, reason = judge(config, candidate, committed)
        if not better:
            return {"promoted": False, "reason": reason, **record}
        record["reason"] = reason
    export_checkpoint(checkpoint, export)
    return {"promoted": True, **record}


# --------------------------------------------------------------------------- the committed record

CURVE_START = "<!-- campaign-curve:start -->"
CURVE_END = "<!-- campaign-curve:end -->"
GOAL_CE = 0.2  # held-out [AE] nats/token where reconstructions become near exact (UPL's logs)
# What the curve shows, where a run logged it: reconstruction, continuation, and (distill runs)
# the KL from the model reading the spans as text.
CURVE_LOSSES = ("held_out_ae_loss", "held_out_lm_loss", "held_out_distill_loss")


def append_metrics(config: TrainConfig, log: str | Path) -> int:
    """Append the run's records that `log` lacks, tagged with the run's data seed (one segment
    per warm start); returns how many were added."""
    path = Path(log)
    old = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    seen = {(r["segment"], r["step"], "held_out_ae_loss" in r) for r in old}
    new = [
        {"segment": config.seed, **r}
        for r in read_metrics(config.output_dir)
        if (config.seed, r["step"], "held_out_ae_loss" in r) not in seen
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in new)
    return len(new)


def campaign_curve(log: str | Path) -> list[dict[str, Any]]:
    """Held-out evaluations across every segment, tokens counted from the campaign's start
    (each segment starts where the segments before it ended)."""
    records = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    reached: dict[int, int] = {}  # segment -> tokens it processed, in order of appearance
    for record in records:
        reached[record["segment"]] = max(reached.get(record["segment"], 0), record["tokens_seen"])
    offsets, total = {}, 0
    for segment, tokens in reached.items():
        offsets[segment], total = total, total + tokens
    return [
        {
            "tokens": offsets[r["segment"]] + r["tokens_seen"],
            "step": r["step"],
            "segment": r["segment"],
            **{k: r[k] for k in CURVE_LOSSES if k in r},
        }
        for r in records
        if "held_out_ae_loss" in r
    ]


def tokens_to_goal(curve: list[dict[str, Any]], goal: float = GOAL_CE) -> float | None:
    """Where a straight line through the last evaluations (loss against log tokens) reaches
    `goal`; None while the curve is not falling."""
    import math

    points = [(math.log(p["tokens"]), p["held_out_ae_loss"]) for p in curve[-6:] if p["tokens"]]
    if len(points) < 3:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    if slope >= 0:
        return None
    return math.exp(mx + (goal - my) / slope)


def render_curve(curve: list[dict[str, Any]], training_md: str | Path, png: str | Path) -> None:
    """Re-draw the campaign's curve: a PNG, and a table between the markers in TRAINING.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in CURVE_LOSSES:
        points = [(p["tokens"], p[key]) for p in curve if key in p]
        if points:
            label = key.removeprefix("held_out_").removesuffix("_loss")
            ax.plot(*zip(*points, strict=True), marker=".", label=f"held-out {label}")
    ax.axhline(GOAL_CE, color="green", linestyle=":", label=f"goal proxy ({GOAL_CE} nats)")
    ax.set_xscale("log")
    ax.set_xlabel("tokens processed (span + target), all segments")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("ICAE training campaign")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)

    goal = tokens_to_goal(curve)
    rows = [
        "| tokens | segment | step | held-out AE CE | held-out LM CE | held-out distill KL |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    rows += [
        f"| {p['tokens']:,} | {p['segment']} | {p['step']} | "
        + " | ".join(f"{p[k]:.3f}" if k in p else "" for k in CURVE_LOSSES)
        + " |"
        for p in curve
    ]
    estimate = (
        f"{len(curve)} evaluation(s) so far: too few to extrapolate to the goal."
        if len(curve) < 3
        else "The curve is not falling, so it names no token count for the goal."
        if goal is None
        else f"A straight line through the last evaluations (loss against log tokens) reaches "
        f"{GOAL_CE} nats at about {goal:,.0f} tokens."
    )
    block = "\n".join([CURVE_START, "", *rows, "", estimate, "", CURVE_END])
    path = Path(training_md)
    text = path.read_text()
    if CURVE_START in text and CURVE_END in text:
        before, rest = text.split(CURVE_START, 1)
        text = before + block + rest.split(CURVE_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## The campaign's curve\n\n" + block + "\n"
    path.write_text(text)


def report(
    config: TrainConfig,
    *,
    results: str | Path = "benchmarks/results",
    training_md: str | Path = "TRAINING.md",
    promote: bool = True,
    latest_dir: str | Path = CAMPAIGN_EXPORT,
) -> dict[str, Any]:
    """What a session does before it stops: append the run's metrics to the committed log,
    re-draw the curve, export the latest checkpoint to `latest_dir` (committed, so the next
    machine continues from it) and promote it if it beats the shipped one."""
    results = Path(results)
    log = results / "icae_campaign_metrics.jsonl"
    saved = Path(config.output_dir) / "config.json"
    # The run's own seed names its segment (a warm start draws a new one, see plan_campaign).
    run = TrainConfig.from_file(saved) if saved.is_file() else config
    added = append_metrics(run, log)
    curve = campaign_curve(log)
    if curve:
        render_curve(curve, training_md, results / "icae_campaign_curve.png")
    record: dict[str, Any] = {"metrics_added": added, "evaluations": len(curve)}
    checkpoint = latest_checkpoint(config.output_dir)
    if checkpoint is not None:
        record["latest_export"] = str(export_checkpoint(checkpoint, latest_dir))
    if promote:
        record["promotion"] = promote_if_better(config)
    return record


def bootstrap(source: str | Path, config: TrainConfig, out_dir: str | Path) -> Path:
    """Save an ICAE of `config`'s recipe that starts from `source`, a checkpoint of the same
    recipe trained with fewer memory tokens (how the 512/128 campaign was seeded from the
    128/32 ablation winner). Every tensor is copied as is, except the memory embeddings: the
    trained rows are repeated over the larger k, since spread positions give each memory token
    its place and the rows mostly say "this is memory"."""
    import torch

    from icmem.icae.model import ICAE

    trained = ICAE.from_pretrained(source)
    fresh = ICAE.from_base(config.base_model, **config.icae)
    sizes = {"num_memory_tokens": None, "span_tokens": None}
    if _recipe(trained.config) | sizes != _recipe(fresh.config) | sizes:
        raise TrainingConfigError(
            f"{source} was trained with another recipe than {config.icae}; bootstrap needs the "
            "same recipe, differing only in num_memory_tokens and span_tokens"
        )
    source_tensors = dict(trained.named_parameters())
    with torch.no_grad():
        for name, param in fresh.named_parameters():
            if not param.requires_grad:
                continue
            value: torch.Tensor = source_tensors[name]
            if name == "memory_embeddings":
                value = value.repeat(-(-param.shape[0] // value.shape[0]), 1)[: param.shape[0]]
            param.copy_(value)
    return fresh.save_pretrained(out_dir)
