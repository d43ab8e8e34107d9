"""The training loop: exact resume, gradient accumulation, schedule, config and fine-tuning."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import tiny_model
from train_testing import build_tiny_icae

from icmem.cli import build_parser
from icmem.icae.data import Triple, write_pwc_jsonl
from icmem.icae.model import ICAE
from icmem.icae.train import (
    ResumeError,
    TrainConfig,
    TrainingConfigError,
    cosine_with_warmup,
    export_checkpoint,
    latest_checkpoint,
    read_metrics,
    train,
)

DETERMINISTIC_KEYS = ("step", "loss", "lr", "grad_norm", "ae_fraction", "tokens_seen")


def _config(corpus, out, **overrides) -> TrainConfig:
    settings = dict(
        stage="pretrain",
        data=str(corpus),
        output_dir=str(out),
        max_steps=6,
        micro_batch_size=2,
        grad_accum_steps=2,
        learning_rate=3e-3,
        warmup_steps=2,
        held_out_fraction=0.2,
        span_tokens=[8, 32],
        continuation_tokens=8,
        ae_fraction=0.5,
        ae_only_steps=2,
        eval_every_steps=3,
        eval_examples=2,
        checkpoint_every_steps=0,
        progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


def _trainable(icae: ICAE) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in icae.named_parameters() if p.requires_grad}


def _runner(tokenizer, built: list, **overrides):
    """An icae_factory that builds tiny ICAEs and keeps them in `built` for inspection."""

    def factory(config: TrainConfig) -> ICAE:
        built.append(build_tiny_icae(tokenizer, **overrides))
        return built[-1]

    return factory


def test_resumed_run_matches_an_uninterrupted_one(tokenizer, corpus, tmp_path):
    built: list[ICAE] = []
    whole = train(_config(corpus, tmp_path / "whole"), icae_factory=_runner(tokenizer, built))
    assert whole.steps == 6 and len(whole.losses) == 6
    assert all(math.isfinite(v) for v in whole.losses)

    split_config = _config(corpus, tmp_path / "split")
    first = train(split_config, until_step=3, icae_factory=_runner(tokenizer, built))
    assert first.steps == 3 and first.losses == whole.losses[:3]
    assert latest_checkpoint(tmp_path / "split").name == "step-0000003"
    assert not first.final_dir.exists()
    second = train(split_config, resume=True, icae_factory=_runner(tokenizer, built))
    assert second.steps == 6
    assert second.losses == whole.losses[3:]  # exact: same examples, weights, Adam state, RNG
    assert second.tokens_seen == whole.tokens_seen
    for name, tensor in _trainable(built[0]).items():
        torch.testing.assert_close(_trainable(built[2])[name], tensor, rtol=0, atol=0)

    def strip(records):
        return [
            {k: r.get(k) for k in DETERMINISTIC_KEYS if k in r}
            | {k: v for k, v in r.items() if k.startswith("held_out")}
            for r in records
        ]

    assert strip(read_metrics(tmp_path / "split")) == strip(read_metrics(tmp_path / "whole"))
    fresh_base = tiny_model("llama", heads=4, kv_heads=2, max_positions=256, seed=0)
    reloaded = ICAE.from_pretrained(whole.final_dir, base_model=(fresh_base, tokenizer))
    for name, tensor in _trainable(built[0]).items():
        torch.testing.assert_close(_trainable(reloaded)[name], tensor)


def test_export_stores_bf16_tensors_that_load_back(tokenizer, corpus, tmp_path):
    from safetensors.torch import load_file

    built: list[ICAE] = []
    config = _config(corpus, tmp_path / "run", max_steps=2, eval_every_steps=0)
    train(config, icae_factory=_runner(tokenizer, built))

    def fresh_base():
        return (tiny_model("llama", heads=4, kv_heads=2, max_positions=256, seed=0), tokenizer)

    out = export_checkpoint(tmp_path / "run", tmp_path / "export", base_model=fresh_base())
    stored = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    loaded = ICAE.from_pretrained(out, base_model=fresh_base())
    for name, tensor in _trainable(built[0]).items():
        expected = tensor.to(torch.bfloat16).float()
        torch.testing.assert_close(_trainable(loaded)[name].float(), expected, rtol=0, atol=0)
    with pytest.raises(ResumeError, match="no icae/ folder"):
        export_checkpoint(tmp_path, tmp_path / "x")


def test_metrics_log_has_loss_throughput_and_held_out_curve(tokenizer, corpus, tmp_path):
    train(_config(corpus, tmp_path / "run"), icae_factory=_runner(tokenizer, []))
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "held_out_ae_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["ae_fraction"] for r in steps] == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    assert all(r["tokens_per_s"] > 0 and r["tokens_seen"] > 0 for r in steps)
    assert [r["step"] for r in evals] == [3, 6]
    assert all(math.isfinite(r["held_out_lm_loss"]) for r in evals)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_steps"] == 6


def test_accumulating_micro_batches_equals_one_larger_batch(tokenizer, corpus, tmp_path):
    # fixed span length and AE only: every example has the same number of target tokens,
    # so the mean of micro-batch means equals the mean over the whole batch
    common = dict(max_steps=1, span_tokens=32, ae_only_steps=1, eval_every_steps=0)
    runs = {}
    for name, micro, accum in (("big", 4, 1), ("accumulated", 1, 4)):
        built: list[ICAE] = []
        config = _config(
            corpus, tmp_path / name, micro_batch_size=micro, grad_accum_steps=accum, **common
        )
        train(config, icae_factory=_runner(tokenizer, built, lora_dropout=0.0))
        runs[name] = _trainable(built[0])
    for name, tensor in runs["big"].items():
        torch.testing.assert_close(runs["accumulated"][name], tensor, rtol=1e-5, atol=1e-6)


def test_restart_and_resume_errors(tokenizer, corpus, tmp_path):
    config = _config(corpus, tmp_path / "run", max_steps=2, eval_every_steps=0)
    with pytest.raises(ResumeError, match="no checkpoints"):
        train(config, resume=True, icae_factory=_runner(tokenizer, []))
    train(config, icae_factory=_runner(tokenizer, []))
    with pytest.raises(ResumeError, match="pass --resume"):
        train(config, icae_factory=_runner(tokenizer, []))
    changed = _config(corpus, tmp_path / "run", max_steps=2, eval_every_steps=0, seed=5)
    with pytest.raises(ResumeError, match=r"\['seed'\]"):
        train(changed, resume=True, icae_factory=_runner(tokenizer, []))


def test_finetune_trains_on_pwc_triples(tokenizer, tmp_path):
    triples = [
        Triple(f"Alice met Bob in London on day {i}. " * 3, "Where did they meet?", "London")
        for i in range(10)
    ]
    data = tmp_path / "pwc.jsonl"
    write_pwc_jsonl(data, triples)
    config = TrainConfig(
        stage="finetune",
        data=str(data),
        output_dir=str(tmp_path / "ft"),
        max_steps=3,
        learning_rate=1e-2,
        held_out_fraction=0.2,
        eval_every_steps=3,
        eval_examples=2,
        progress=False,
    )
    result = train(config, icae_factory=_runner(tokenizer, []))
    assert result.steps == 3 and all(math.isfinite(v) for v in result.losses)
    assert "held_out_ft_loss" in read_metrics(tmp_path / "ft")[-1]


def test_cosine_schedule_known_values():
    kw = dict(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert cosine_with_warmup(0, **kw) == pytest.approx(1 / 11)
    assert cosine_with_warmup(9, **kw) == pytest.approx(10 / 11)
    assert cosine_with_warmup(10, **kw) == pytest.approx(1.0)
    assert cosine_with_warmup(60, **kw) == pytest.approx(0.55)
    assert cosine_with_warmup(110, **kw) == pytest.approx(0.1)
    assert cosine_with_warmup(500, **kw) == pytest.approx(0.1)


def test_config_validation_and_file_loading(tmp_path):
    base = dict(stage="pretrain", data="c", output_dir="o")
    with pytest.raises(TrainingConfigError, match="stage='train'"):
        TrainConfig(**{**base, "stage": "train"})
    with pytest.raises(TrainingConfigError, match="grad_accum_steps=0"):
        TrainConfig(**base, grad_accum_steps=0)
    with pytest.raises(TrainingConfigError, match="ae_fraction"):
        TrainConfig(**base, ae_fraction=1.5)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**base, "learning_rat": 1e-4}))
    with pytest.raises(TrainingConfigError, match=r"unknown config keys \['learning_rat'\]"):
        TrainConfig.from_file(path)
    path.write_text(json.dumps({**base, "span_tokens": [64, 512]}))
    config = TrainConfig.from_file(path)
    assert config.span_tokens == (64, 512)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_shipped_example_configs_are_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.json"))
    assert configs
    for path in configs:
        TrainConfig.from_file(path)


def test_cli_parses_train_commands():

    parser = build_parser()
    args = parser.parse_args(["train", "pretrain", "--config", "c.json", "--resume"])
    assert (args.stage, args.config, args.resume) == ("pretrain", "c.json", True)
    args = parser.parse_args(["train", "finetune", "--config", "f.json", "--until-step", "5"])
    assert (args.stage, args.resume, args.until_step) == ("finetune", False, 5)
    assert callable(args.func)
    args = parser.parse_args(["train", "instructions", "--corpus", "c", "--out", "o"])
    assert (args.retention, args.distill, args.held_out_fraction) == (2000, 0, 0.05)
