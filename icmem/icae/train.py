"""Pretraining (`[AE]` + `[LM]`) and instruction fine-tuning (`[FT]`) of an ICAE.

One loop serves both stages. It runs on CPU or CUDA, on one device or many through `accelerate`
(launch with `accelerate launch` or `torchrun`), accumulates gradients, follows a cosine schedule
with linear warmup, and checkpoints every N steps or minutes. A run resumes exactly: example i
of the stream is a pure function of (seed, i), and a checkpoint holds the fp32 trainable
tensors, the optimizer and schedule state and every process's RNG state, so a resumed run logs
the same losses as an uninterrupted one.

Run directory layout::

    output_dir/
      config.json                 the TrainConfig of the run
      metrics.jsonl               one JSON object per logged step / held-out evaluation
      checkpoints/step-0000100/   trainer.pt, rng-rank0.pt, icae/ (loadable by ICAE.from_pretrained)
      final/                      ICAE.save_pretrained at the end
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from icmem.chunking import DEFAULT_SPAN_TOKENS
from icmem.errors import IcmemError
from icmem.icae.data import (
    DEFAULT_HELD_OUT_FRACTION,
    DEFAULT_SPLIT_SEED,
    PretrainSampler,
    Triple,
    ae_fraction_at,
    ft_example,
    read_corpus,
    read_pwc_jsonl,
    split_by_document,
    tokenize_documents,
)
from icmem.models import DEFAULT_MODEL

if TYPE_CHECKING:
    import torch

    from icmem.icae.model import ICAE, DistillLoss, ICAEExample

STAGES = ("pretrain", "finetune", "distill")
MIXED_PRECISION = ("no", "bf16", "fp16")
_CHECKPOINT_PREFIX = "step-"
DEFAULT_EXPORT_DTYPE = "bfloat16"


class TrainingConfigError(IcmemError, ValueError):
    """A training config is invalid."""


class ResumeError(IcmemError):
    """A run cannot be resumed from its output directory."""


@dataclass
class TrainConfig:
    """Everything a training run needs; load one with `TrainConfig.from_file(path)`.

    Relative paths are taken from the working directory. `data` is a corpus (folder of .txt or
    .jsonl with `text`) for pretraining, or PwC-style JSONL (`input`, `prompt`, `answer`) for
    fine-tuning. `icae` overrides `ICAEConfig` fields of a fresh ICAE; `init_from` instead starts
    from a saved ICAE (how fine-tuning continues a pretrained one). `span_tokens` is an int or a
    `[low, high]` range sampled per example (a short-span curriculum); `ae_only_steps` trains on
    `[AE]` alone before mixing in `[LM]` at `ae_fraction`. `embedding_learning_rate` gives the
    ICAE's own tensors (memory and task embeddings, slot head) a rate of their own; the LoRA
    adapter keeps `learning_rate`. Both follow the same schedule.

    Stage `distill` reads a cache written by `icmem train distill-cache` from `data` (and
    `held_out_data` for its held-out loss), mixing in `[AE]` examples from `corpus` at
    `ae_fraction` so reconstruction is kept; `freeze_encoder` trains the decoder side only
    (its adapter and the task embeddings), which is what makes cached slots valid.
    `distill_temperature` and `gold_weight` shape the loss (`ICAE.training_loss`).
    """

    stage: str
    data: str
    output_dir: str
    base_model: str = DEFAULT_MODEL
    init_from: str | None = None
    icae: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    max_steps: int = 1000
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    learning_rate: float = 1e-4
    embedding_learning_rate: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = 1.0
    held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION
    split_seed: int = DEFAULT_SPLIT_SEED
    span_tokens: int | tuple[int, int] = DEFAULT_SPAN_TOKENS
    continuation_tokens: int = 256
    ae_fraction: float = 0.5
    ae_only_steps: int = 0
    max_context_tokens: int | None = None
    max_answer_tokens: int | None = 256
    eval_every_steps: int = 0
    eval_examples: int = 8
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 0.0
    keep_checkpoints: int = 2
    log_every_steps: int = 1
    mixed_precision: str = "no"
    corpus: str | None = None
    held_out_data: str | None = None
    freeze_encoder: bool = False
    distill_temperature: float = 1.0
    gold_weight: float = 1.0
    cpu: bool = False
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise TrainingConfigError(f"stage={self.stage!r}; use one of {STAGES}")
        if not self.data or not self.output_dir:
            raise TrainingConfigError("`data` and `output_dir` are required paths")
        if isinstance(self.span_tokens, list):
            self.span_tokens = tuple(self.span_tokens)
        self.adam_betas = cast("tuple[float, float]", tuple(self.adam_betas))
        positive = ("max_steps", "micro_batch_size", "grad_accum_steps", "continuation_tokens")
        for name in (*positive, "eval_examples", "keep_checkpoints", "log_every_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TrainingConfigError(f"{name}={value!r}; it must be a positive integer")
        for name in ("warmup_steps", "ae_only_steps", "eval_every_steps", "checkpoint_every_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise TrainingConfigError(f"{name}={value!r}; use 0 (off) or a positive integer")
        if self.learning_rate <= 0:
            raise TrainingConfigError(f"learning_rate={self.learning_rate}; it must be positive")
        if self.embedding_learning_rate is not None and self.embedding_learning_rate <= 0:
            raise TrainingConfigError(
                f"embedding_learning_rate={self.embedding_learning_rate}; it must be positive, "
                "or null to use learning_rate"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainingConfigError(f"min_lr_ratio={self.min_lr_ratio}; use a value in [0, 1]")
        if not 0.0 <= self.ae_fraction <= 1.0:
            raise TrainingConfigError(f"ae_fraction={self.ae_fraction}; use a value in [0, 1]")
        if self.mixed_precision not in MIXED_PRECISION:
            raise TrainingConfigError(
                f"mixed_precision={self.mixed_precision!r}; use one of {MIXED_PRECISION} "
                '(on CPU, prefer "no" with icae.dtype="bfloat16")'
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise TrainingConfigError("max_grad_norm must be positive, or null to disable")
        if self.stage == "distill" and self.ae_fraction > 0 and not self.corpus:
            raise TrainingConfigError(
                f"ae_fraction={self.ae_fraction} mixes in [AE] examples from `corpus`; name a "
                "corpus folder or set ae_fraction to 0"
            )
        if self.distill_temperature <= 0 or self.gold_weight < 0:
            raise TrainingConfigError(
                "distill_temperature must be positive and gold_weight 0 or more"
            )
        if self.checkpoint_every_minutes < 0:
            raise TrainingConfigError("checkpoint_every_minutes must be >= 0 (0 = off)")
        if self.stage == "finetune" and set(self.icae) - {"dtype"} and self.init_from:
            raise TrainingConfigError(
                "`icae` overrides build a fresh ICAE but `init_from` loads a saved one; "
                "drop one of them"
            )

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a JSON config; unknown keys are an error (a typo would otherwise be ignored)."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError as err:
            raise TrainingConfigError(
                f"config {p} does not exist; see configs/ for examples"
            ) from err
        except json.JSONDecodeError as err:
            raise TrainingConfigError(f"config {p} is not valid JSON: {err}") from err
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        if isinstance(self.span_tokens, tuple):
            data["span_tokens"] = list(self.span_tokens)
        return data

    @property
    def examples_per_step(self) -> int:
        """Per process; the global batch is this times the number of processes."""
        return self.micro_batch_size * self.grad_accum_steps


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    tokens_seen: int
    losses: list[float]  # training loss of every step this call ran (resumed runs: from there)


def cosine_with_warmup(
    step: int, *, max_steps: int, warmup_steps: int, min_lr_ratio: float
) -> float:
    """Learning-rate multiplier: linear from 1/(warmup+1) up to 1, then cosine down to
    `min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- public entry points


def pretrain(
    config: TrainConfig | str | Path, *, resume: bool = False, until_step: int | None = None
) -> TrainResult:
    """Pretrain an ICAE with `[AE]` and `[LM]` (config.stage must be "pretrain")."""
    return train(_as_config(config, "pretrain"), resume=resume, until_step=until_step)


def finetune(
    config: TrainConfig | str | Path, *, resume: bool = False, until_step: int | None = None
) -> TrainResult:
    """Fine-tune an ICAE on `[FT]` triples (config.stage must be "finetune")."""
    return train(_as_config(config, "finetune"), resume=resume, until_step=until_step)


def distill(
    config: TrainConfig | str | Path, *, resume: bool = False, until_step: int | None = None
) -> TrainResult:
    """Distil the base model reading text into the slot decoder (config.stage "distill")."""
    return train(_as_config(config, "distill"), resume=resume, until_step=until_step)


def _as_config(config: TrainConfig | str | Path, stage: str) -> TrainConfig:
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_file(config)
    if config.stage != stage:
        raise TrainingConfigError(
            f"this config is for stage {config.stage!r}; run `icmem train {config.stage}`"
        )
    return config


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    until_step: int | None = None,
    icae_factory: Callable[[TrainConfig], ICAE] | None = None,
) -> TrainResult:
    """Run (or resume) a training run.

    `until_step` stops early, with a checkpoint, after that step (to fit a run into time slots;
    `resume=True` later continues it exactly). `icae_factory` builds the model from the config
    (tests pass tiny ones); by default `init_from` or `ICAE.from_base`.
    """
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        cpu=config.cpu,
        # task embeddings unused by a batch ([FT] in pretraining) get no gradient
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    out = Path(config.output_dir)
    checkpoint = _prepare_output_dir(out, config, resume, write=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(config.seed)  # LoRA initialisation: identical on every process
    icae = (icae_factory or _build_icae)(config)
    icae.to(accelerator.device)
    if config.freeze_encoder:
        icae.freeze_encoder()
    stream = _example_stream(config, icae)
    params = icae.trainable_parameters()
    optimizer = torch.optim.AdamW(
        _parameter_groups(icae, config),
        lr=config.learning_rate,
        betas=config.adam_betas,
        weight_decay=config.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: cosine_with_warmup(
            step,
            max_steps=config.max_steps,
            warmup_steps=config.warmup_steps,
            min_lr_ratio=config.min_lr_ratio,
        ),
    )
    start_step, tokens_seen, elapsed_before = 0, 0, 0.0
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, icae, optimizer, schedule)
        start_step, tokens_seen, elapsed_before = state
        if accelerator.is_main_process:
            _truncate_metrics(out / "metrics.jsonl", start_step)
    if checkpoint is None:
        torch.manual_seed(config.seed + 1000 * rank)  # LoRA dropout differs per process
    else:
        _restore_rng(checkpoint, rank)
    held_out = _HeldOutEval(config, icae) if config.eval_every_steps else None
    objective, optimizer = accelerator.prepare(_objective(icae, config), optimizer)

    stop = _StopFlag()
    progress = _progress_bar(config, accelerator.is_main_process, start_step)
    losses: list[float] = []
    last_save = time.monotonic()
    started = time.monotonic()
    tokens_at_start = tokens_seen
    last_step = config.max_steps if until_step is None else min(until_step, config.max_steps)
    with stop.installed(), progress:
        for step in range(start_step, last_step):
            ae_fraction = ae_fraction_at(step, config.ae_fraction, config.ae_only_steps)
            icae.train()
            loss_sum = torch.zeros((), device=accelerator.device)
            step_tokens = 0
            for micro in range(config.grad_accum_steps):
                first = (step * config.grad_accum_steps + micro) * world + rank
                first *= config.micro_batch_size
                batch = [stream(first + j, ae_fraction) for j in range(config.micro_batch_size)]
                step_tokens += sum(len(e.context_ids) + len(e.target_ids) for e in batch)
                last = micro == config.grad_accum_steps - 1
                sync = contextlib.nullcontext() if last else accelerator.no_sync(objective)
                with sync, accelerator.autocast():
                    loss = objective(batch)
                    accelerator.backward(loss / config.grad_accum_steps)
                loss_sum += loss.detach()
            grad_norm = None
            if config.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(params, config.max_grad_norm))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)

            step_loss = float(accelerator.reduce(loss_sum, "mean")) / config.grad_accum_steps
            tokens_seen += int(
                accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), "sum")
            )
            losses.append(step_loss)
            done = step + 1
            elapsed = time.monotonic() - started
            rate = (tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
            if accelerator.is_main_process and done % config.log_every_steps == 0:
                _append_metrics(
                    out / "metrics.jsonl",
                    {
                        "step": done,
                        "loss": step_loss,
                        "lr": schedule.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "ae_fraction": ae_fraction,
                        "tokens_seen": tokens_seen,
                        "tokens_per_s": rate,
                        "elapsed_s": elapsed_before + elapsed,
                    },
                )
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{rate:.0f}")
            if held_out is not None and done % config.eval_every_steps == 0:
                record = {"step": done, "tokens_seen": tokens_seen, **held_out.losses()}
                if accelerator.is_main_process:
                    _append_metrics(out / "metrics.jsonl", record)
            by_steps = config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0
            by_time = (
                config.checkpoint_every_minutes
                and time.monotonic() - last_save >= 60 * config.checkpoint_every_minutes
            )
            stopping = _agree(accelerator, stop.requested)
            if _agree(accelerator, bool(by_steps or by_time)) or stopping or done == last_step:
                _save_checkpoint(
                    accelerator,
                    config,
                    icae,
                    optimizer,
                    schedule,
                    done,
                    tokens_seen,
                    elapsed_before + time.monotonic() - started,
                )
                last_save = time.monotonic()
            if stopping:
                break
    final_dir = out / "final"
    steps_done = start_step + len(losses)
    if steps_done == config.max_steps and accelerator.is_main_process:
        _atomic_save_pretrained(icae, final_dir)
    accelerator.wait_for_everyone()
    return TrainResult(out, final_dir, steps_done, tokens_seen, losses)


# --------------------------------------------------------------------------- model and data


def _objective(icae: ICAE, config: TrainConfig) -> torch.nn.Module:
    """`ICAE.training_loss` as a module `forward`, the call DDP hooks its gradient sync into."""
    from torch import nn

    loss = _distill_loss(config)

    class Objective(nn.Module):
        def __init__(self, inner: ICAE) -> None:
            super().__init__()
            self.icae = inner

        def forward(self, examples: Sequence[ICAEExample]) -> torch.Tensor:
            return self.icae.training_loss(examples, loss)

    return Objective(icae)


def _distill_loss(config: TrainConfig) -> DistillLoss:
    from icmem.icae.model import DistillLoss

    return DistillLoss(temperature=config.distill_temperature, gold_weight=config.gold_weight)


def _parameter_groups(icae: ICAE, config: TrainConfig) -> list[dict[str, Any]]:
    """One AdamW group, or two when the ICAE's own tensors have a learning rate of their own."""
    if config.embedding_learning_rate is None:
        return [{"params": icae.trainable_parameters()}]
    own = {id(t) for t in icae.own_tensors().values()}
    adapter = [p for p in icae.trainable_parameters() if id(p) not in own]
    return [
        {"params": adapter},
        {"params": list(icae.own_tensors().values()), "lr": config.embedding_learning_rate},
    ]


def _build_icae(config: TrainConfig) -> ICAE:
    from icmem.icae.model import ICAE

    if config.init_from:
        # `icae` may still choose the precision of a saved ICAE (its recipe is the saved one).
        return ICAE.from_pretrained(config.init_from, dtype=config.icae.get("dtype"))
    return ICAE.from_base(config.base_model, **config.icae)


def _example_stream(config: TrainConfig, icae: ICAE) -> Callable[[int, float], ICAEExample]:
    """Example i as a pure function of i (and the AE fraction in force)."""
    if config.stage == "pretrain":
        sampler = _pretrain_sampler(config, icae, held_out=False)
        return sampler.example
    if config.stage == "distill":
        return _distill_stream(config, icae)
    triples = _finetune_triples(config, held_out=False)

    def ft(index: int, _ae_fraction: float) -> ICAEExample:
        epoch, position = divmod(index, len(triples))
        order = list(range(len(triples)))
        random.Random(f"{config.seed}:{epoch}").shuffle(order)
        return ft_example(
            triples[order[position]],
            icae.tokenizer,
            icae.format_prompt,
            config.max_context_tokens,
            config.max_answer_tokens,
        )

    return ft


def _distill_stream(config: TrainConfig, icae: ICAE) -> Callable[[int, float], ICAEExample]:
    """Cached distillation examples in a fresh order each epoch, with `[AE]` examples from the
    corpus at `ae_fraction` (example i is still a pure function of i)."""
    from icmem.icae.distill import check_cache, iter_cache

    check_cache(icae, config.data)
    cached = list(iter_cache(config.data))
    sampler = _pretrain_sampler(config, icae, held_out=False) if config.corpus else None

    def example(index: int, ae_fraction: float) -> ICAEExample:
        rng = random.Random(f"{config.seed}:mix:{index}")
        if sampler is not None and rng.random() < ae_fraction:
            return sampler.example(index, 1.0)
        epoch, position = divmod(index, len(cached))
        order = list(range(len(cached)))
        random.Random(f"{config.seed}:{epoch}").shuffle(order)
        return cached[order[position]]

    return example


def _pretrain_sampler(config: TrainConfig, icae: ICAE, *, held_out: bool) -> PretrainSampler:
    corpus = config.corpus if config.stage == "distill" else config.data
    assert corpus is not None  # checked by TrainConfig for the distill stage
    split = split_by_document(read_corpus(corpus), config.held_out_fraction, config.split_seed)
    docs = split.held_out if held_out else split.train
    if not docs:
        raise TrainingConfigError("held_out_fraction=0 leaves no held-out documents to evaluate")
    span = config.span_tokens
    high = span if isinstance(span, int) else span[1]
    if high > icae.config.span_tokens:
        raise TrainingConfigError(
            f"span_tokens {span} exceeds the ICAE's span_tokens={icae.config.span_tokens}"
        )
    return PretrainSampler(
        tokenize_documents(docs, icae.tokenizer),
        span_tokens=span,
        continuation_tokens=config.continuation_tokens,
        seed=config.seed + (7919 if held_out else 0),
    )


def _finetune_triples(config: TrainConfig, *, held_out: bool) -> list[Triple]:
    """PwC triples split by context: every question about one context lands on one side."""
    from icmem.icae.data import Document

    triples = read_pwc_jsonl(config.data)
    contexts = [
        Document(hashlib.sha256(text.encode()).hexdigest(), text)
        for text in dict.fromkeys(t.input for t in triples)
    ]
    split = split_by_document(contexts, config.held_out_fraction, config.split_seed)
    side = {d.text for d in (split.held_out if held_out else split.train)}
    chosen = [t for t in triples if t.input in side]
    if not chosen:
        raise TrainingConfigError(
            f"no {'held-out' if held_out else 'training'} triples in {config.data}"
        )
    return chosen


class _HeldOutEval:
    """Teacher-forced loss on fixed held-out examples: the curve that says whether it learns."""

    def __init__(self, config: TrainConfig, icae: ICAE) -> None:
        self.icae = icae
        self.examples: dict[str, list[ICAEExample]] = {}
        n = config.eval_examples
        self.loss = _distill_loss(config)
        if config.stage == "pretrain" or (config.stage == "distill" and config.corpus):
            sampler = _pretrain_sampler(config, icae, held_out=True)
            self.examples["ae"] = [sampler.example(i, 1.0) for i in range(n)]
            self.examples["lm"] = [sampler.example(i, 0.0) for i in range(n)]
        if config.stage == "distill":
            if config.held_out_data:
                from icmem.icae.distill import check_cache, iter_cache

                check_cache(icae, config.held_out_data)
                cached = iter_cache(config.held_out_data)
                self.examples["distill"] = [e for e, _ in zip(cached, range(4 * n), strict=False)]
        elif config.stage == "finetune":
            self.examples["ft"] = [
                ft_example(
                    t,
                    icae.tokenizer,
                    icae.format_prompt,
                    config.max_context_tokens,
                    config.max_answer_tokens,
                )
                for t in _finetune_triples(config, held_out=True)[:n]
            ]

    def losses(self) -> dict[str, float]:
        import torch

        was_training = self.icae.training
        self.icae.eval()
        result = {}
        with torch.no_grad():
            for task, examples in self.examples.items():
                values = [float(self.icae.training_loss([e], self.loss)) for e in examples]
                result[f"held_out_{task}_loss"] = sum(values) / len(values)
        self.icae.train(was_training)
        return result


# --------------------------------------------------------------------------- checkpoints


def _prepare_output_dir(out: Path, config: TrainConfig, resume: bool, write: bool) -> Path | None:
    """Check the run directory and return the checkpoint to resume from, if any; `write`
    (the main process only) records the config and starts the metrics log."""
    latest = latest_checkpoint(out)
    if resume:
        if latest is None:
            raise ResumeError(f"nothing to resume in {out}: it has no checkpoints/step-* folder")
        saved = json.loads((out / "config.json").read_text())
        changed = {
            k
            for k in config.to_dict()
            if k not in _RESUMABLE_CHANGES and saved.get(k) != config.to_dict()[k]
        }
        if changed:
            raise ResumeError(
                f"the config differs from the run's config.json in {sorted(changed)}; an exact "
                f"resume needs the same settings (only {sorted(_RESUMABLE_CHANGES)} may change)"
            )
        if write:
            (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        return latest
    if latest is not None:
        raise ResumeError(
            f"{out} already holds checkpoints; pass --resume to continue, or a new output_dir"
        )
    if write:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (out / "metrics.jsonl").write_text("")
    return None


# Settings that do not change what is computed, so a resumed run may differ in them.
# max_steps may grow: the cosine schedule is then stretched from the resumed step on.
_RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "eval_every_steps",
        "eval_examples",
        "checkpoint_every_steps",
        "checkpoint_every_minutes",
        "keep_checkpoints",
        "log_every_steps",
        "progress",
        "num_threads",
    }
)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete `checkpoints/step-*` folder of a run, or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.glob(f"{_CHECKPOINT_PREFIX}*") if (p / "trainer.pt").is_file()]
    return max(done, key=lambda p: int(p.name.removeprefix(_CHECKPOINT_PREFIX)), default=None)


def _save_checkpoint(
    accelerator: Any,
    config: TrainConfig,
    icae: ICAE,
    optimizer: Any,
    schedule: Any,
    step: int,
    tokens_seen: int,
    elapsed: float,
) -> None:
    import torch

    root = Path(config.output_dir) / "checkpoints"
    final = root / f"{_CHECKPOINT_PREFIX}{step:07d}"
    staging = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        _atomic_save_pretrained(icae, staging / "icae")
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), staging / f"rng-rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trainable = {n: p.detach().cpu().clone() for n, p in _named_trainable(icae)}
        torch.save(
            {
                "step": step,
                "tokens_seen": tokens_seen,
                "elapsed_s": elapsed,
                "trainable": trainable,
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
            },
            staging / "trainer.pt",
        )
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        kept = sorted(
            (p for p in root.glob(f"{_CHECKPOINT_PREFIX}*") if (p / "trainer.pt").is_file()),
            key=lambda p: int(p.name.removeprefix(_CHECKPOINT_PREFIX)),
        )
        for old in kept[: -config.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _load_checkpoint(
    checkpoint: Path, icae: ICAE, optimizer: Any, schedule: Any
) -> tuple[int, int, float]:
    import torch

    # weights_only: the training state is tensors and plain containers, so nothing is unpickled.
    state = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=True)
    named = dict(_named_trainable(icae))
    if set(named) != set(state["trainable"]):
        raise ResumeError(
            f"{checkpoint} was written for a different ICAE (trainable tensors differ); "
            "resume with the config the run started with"
        )
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            named[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return int(state["step"]), int(state["tokens_seen"]), float(state["elapsed_s"])


def _named_trainable(icae: ICAE) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in icae.named_parameters() if p.requires_grad]


def _rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(checkpoint: Path, rank: int) -> None:
    import torch

    path = checkpoint / f"rng-rank{rank}.pt"
    if not path.is_file():
        raise ResumeError(
            f"{path} is missing: the run was checkpointed with fewer processes; "
            "resume with the same number of processes"
        )
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save_pretrained(icae: ICAE, directory: Path) -> None:
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    icae.save_pretrained(staging)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = DEFAULT_EXPORT_DTYPE,
    base_model: Any = None,
) -> Path:
    """Write the ICAE of a training checkpoint (or of a run's latest one) to `out_dir`.

    With `dtype` the trained tensors are stored in that precision (bf16 halves the file; the
    loader casts them back into its own parameters). `base_model` is passed to
    `ICAE.from_pretrained` (an already loaded `(model, tokenizer)` avoids a reload).
    """
    import torch

    from icmem.icae.model import ICAE

    source = Path(checkpoint)
    if (source / "checkpoints").is_dir():
        latest = latest_checkpoint(source)
        if latest is None:
            raise ResumeError(f"{source} has no complete checkpoint yet")
        source = latest
    if not (source / "icae").is_dir():
        raise ResumeError(f"{source} is not a training checkpoint (no icae/ folder)")
    target = Path(out_dir)
    if dtype is None:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source / "icae", target)
        return target
    icae = ICAE.from_pretrained(source / "icae", base_model=base_model)
    with torch.no_grad():
        for param in icae.trainable_parameters():
            param.data = param.data.to(getattr(torch, dtype))
    _atomic_save_pretrained(icae, target)
    return target


# --------------------------------------------------------------------------- logging and signals


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after the checkpoint so a resumed log reads as one uninterrupted run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _progress_bar(config: TrainConfig, main: bool, start: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=config.max_steps,
        initial=start,
        disable=not (config.progress and main),
        desc=config.stage,
        unit="step",
        dynamic_ncols=True,
    )


def _agree(accelerator: Any, flag: bool) -> bool:
    """True on every process if it is true on any (time and signals differ per process)."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    value = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(value, "max") > 0)


class _StopFlag:
    """SIGTERM / SIGINT finish the current step, checkpoint, and return."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum: int, _frame: Any) -> None:
            self.requested = True

        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no signal handling
            pass
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
