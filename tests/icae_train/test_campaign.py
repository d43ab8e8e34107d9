"""The training campaign: exact resume when the run survived, a warm start from the committed
export on a fresh clone, and the committed record (metrics log, curve, promotion)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from tiny_models import tiny_model
from train_testing import TINY_ICAE

from icmem.icae import campaign
from icmem.icae.model import ICAE
from icmem.icae.train import (
    TrainConfig,
    TrainingConfigError,
    export_checkpoint,
    latest_checkpoint,
    read_metrics,
    train,
)


@pytest.fixture
def base_dir(tmp_path, tokenizer):
    """A tiny base model on disk, as a user's local Hugging Face directory."""
    path = tmp_path / "base"
    tiny_model("llama", heads=4, kv_heads=2, max_positions=256).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def config(tmp_path, corpus, base_dir) -> TrainConfig:
    return TrainConfig(
        stage="pretrain",
        data=str(corpus),
        output_dir=str(tmp_path / "run"),
        base_model=str(base_dir),
        icae={**TINY_ICAE, "lora_dropout": 0.0, "slot_positions": "spread", "slot_head": "scale"},
        max_steps=4,
        micro_batch_size=2,
        learning_rate=3e-3,
        held_out_fraction=0.2,
        span_tokens=[8, 32],
        continuation_tokens=8,
        ae_fraction=1.0,
        eval_every_steps=2,
        eval_examples=2,
        checkpoint_every_steps=2,
        progress=False,
    )


def _tensors(icae: ICAE) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in icae.named_parameters() if p.requires_grad}


def test_with_no_export_and_no_run_the_campaign_starts_fresh(config, tmp_path):
    plan = campaign.plan_campaign(config, export_dir=tmp_path / "nothing")
    assert plan.mode == "fresh" and plan.config == config


def test_a_fresh_clone_warm_starts_from_the_committed_export(config, tmp_path):
    train(config, until_step=2)
    export = export_checkpoint(config.output_dir, tmp_path / "export")
    shutil.rmtree(config.output_dir)  # a fresh clone: runs/ is not in git

    plan = campaign.plan_campaign(config, export_dir=export)
    assert plan.mode == "warm-start"
    assert plan.config.init_from == str(export)
    assert plan.config.seed != config.seed  # new examples, not a replay of the first ones

    exported = _tensors(ICAE.from_pretrained(export))
    built = []

    def factory(cfg: TrainConfig) -> ICAE:
        icae = ICAE.from_pretrained(cfg.init_from)
        built.append(_tensors(icae))
        return icae

    result = train(plan.config, icae_factory=factory, until_step=1)
    assert result.steps == 1
    assert built[0].keys() == exported.keys()
    for name, tensor in exported.items():
        torch.testing.assert_close(built[0][name], tensor, msg=name)  # starts where it left off


def test_run_campaign_warm_starts_then_resumes_exactly(config, tmp_path):
    train(config, until_step=2)
    export = export_checkpoint(config.output_dir, tmp_path / "export")
    shutil.rmtree(config.output_dir)

    first = campaign.run_campaign(config, export_dir=export, until_step=2)
    assert first.steps == 2 and latest_checkpoint(config.output_dir).name == "step-0000002"
    assert campaign.plan_campaign(config, export_dir=export).mode == "resume"
    second = campaign.run_campaign(config, export_dir=export)
    assert second.steps == config.max_steps
    uninterrupted = train(
        TrainConfig.from_dict(
            {
                **campaign.plan_campaign(config, export).config.to_dict(),
                "output_dir": str(tmp_path / "whole"),
            }
        )
    )
    # resuming reproduces the uninterrupted warm-started run, step for step
    assert second.losses == pytest.approx(uninterrupted.losses[2:], rel=1e-5)


def test_an_export_of_another_recipe_is_not_loaded(config, tmp_path):
    other = TrainConfig.from_dict(
        {
            **config.to_dict(),
            "icae": {**config.icae, "slot_positions": "sequential"},
            "output_dir": str(tmp_path / "other"),
        }
    )
    train(other, until_step=2)
    export = export_checkpoint(other.output_dir, tmp_path / "export")
    plan = campaign.plan_campaign(config, export_dir=export)
    assert plan.mode == "fresh" and "another recipe" in plan.reason


def test_promotion_replaces_the_export_only_when_held_out_loss_improves(config, tmp_path):
    train(config, until_step=4)
    export = tmp_path / "export"
    first = campaign.promote_if_better(config, export)  # no export yet: promoted
    assert first["promoted"] and (export / "icae_config.json").is_file()
    again = campaign.promote_if_better(config, export)  # the same tensors: not better
    assert not again["promoted"] and again["candidate_loss"] == pytest.approx(
        again["committed_loss"], abs=1e-3
    )
    # an export that reconstructs worse (its adapter scrambled) is replaced
    worse = ICAE.from_pretrained(export)
    with torch.no_grad():
        for param in worse.trainable_parameters():
            param.add_(torch.randn_like(param))
    worse.save_pretrained(export)
    third = campaign.promote_if_better(config, export)
    assert third["promoted"] and third["candidate_loss"] < third["committed_loss"]


def test_a_mixed_phase_is_judged_by_its_own_mixture(config, tmp_path):
    from icmem.icae.train import _HeldOutEval

    train(config, until_step=2)
    icae_dir = latest_checkpoint(config.output_dir) / "icae"
    with torch.no_grad():
        losses = _HeldOutEval(config, ICAE.from_pretrained(icae_dir)).losses()
    ae, lm = losses["held_out_ae_loss"], losses["held_out_lm_loss"]
    assert abs(ae - lm) > 1e-3  # otherwise the weighting below could not be told apart
    measured = campaign.held_out_losses(config, icae_dir)
    pure = campaign.held_out_objective(config, measured)
    mixed = campaign.held_out_objective(dataclasses.replace(config, ae_fraction=0.25), measured)
    assert pure == pytest.approx(ae, rel=1e-5)
    assert mixed == pytest.approx(0.25 * ae + 0.75 * lm, rel=1e-5)


def test_metrics_are_appended_once_and_segments_add_up(config, tmp_path):
    train(config)
    log = tmp_path / "log.jsonl"
    added = campaign.append_metrics(config, log)
    assert added == len(read_metrics(config.output_dir)) > 0
    assert campaign.append_metrics(config, log) == 0  # a second report adds nothing
    records = [json.loads(line) for line in log.read_text().splitlines()]
    last_tokens = max(r["tokens_seen"] for r in records)
    # a second segment (a warm start with another seed) continues the token count
    with log.open("a") as handle:
        handle.write(
            json.dumps({"segment": 99, "step": 2, "tokens_seen": 10, "held_out_ae_loss": 1.5})
            + "\n"
        )
    curve = campaign.campaign_curve(log)
    assert curve[-1] == {
        "tokens": last_tokens + 10,
        "step": 2,
        "segment": 99,
        "held_out_ae_loss": 1.5,
    }
    assert [p["step"] for p in curve[:-1]] == [2, 4]


def test_the_goal_estimate_follows_a_log_linear_curve():
    # loss = 5 - 0.5 ln(tokens): 0.2 nats at ln(tokens) = 9.6
    curve = [{"tokens": t, "held_out_ae_loss": 5 - 0.5 * math.log(t)} for t in (1e3, 1e4, 1e5)]
    assert campaign.tokens_to_goal(curve, goal=0.2) == pytest.approx(math.exp(9.6), rel=1e-6)
    flat = [{"tokens": t, "held_out_ae_loss": 3.0} for t in (1e3, 1e4, 1e5)]
    assert campaign.tokens_to_goal(flat) is None


def test_the_curve_is_rewritten_between_its_markers(tmp_path):
    md = tmp_path / "TRAINING.md"
    md.write_text("# Training\n\nintro\n")
    curve = [
        {"tokens": 1000 * i, "step": i, "segment": 0, "held_out_ae_loss": 4.0 - i}
        for i in (1, 2, 3)
    ]
    campaign.render_curve(curve, md, tmp_path / "curve.png")
    campaign.render_curve(curve[:2], md, tmp_path / "curve.png")
    text = md.read_text()
    assert text.startswith("# Training\n\nintro\n")
    assert text.count(campaign.CURVE_START) == 1 and "| 2,000 | 0 | 2 | 2.000 |  |  |" in text
    assert "| 3,000 |" not in text  # the old table is gone
    # a distill run's curve shows its continuation and distillation losses beside [AE]
    distilled = [{**p, "held_out_lm_loss": 3.5, "held_out_distill_loss": 2.25} for p in curve]
    campaign.render_curve(distilled, md, tmp_path / "curve.png")
    assert "| 1,000 | 0 | 1 | 3.000 | 3.500 | 2.250 |" in md.read_text()
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_a_report_appends_metrics_and_redraws_the_curve(config, tmp_path):
    assert campaign.held_out_history(config.output_dir) == []  # nothing logged yet
    train(config)
    md = tmp_path / "TRAINING.md"
    md.write_text("# Training\n")
    latest = tmp_path / "latest"
    options = {"results": tmp_path / "results", "training_md": md, "latest_dir": latest}
    record = campaign.report(config, promote=False, **options)
    assert record == {
        "metrics_added": len(read_metrics(config.output_dir)),
        "evaluations": 2,
        "latest_export": str(latest),
    }
    assert (tmp_path / "results" / "icae_campaign_curve.png").stat().st_size > 0
    assert md.read_text().count(campaign.CURVE_START) == 1
    # the latest export is what a new machine warm-starts from: the run's last weights
    trained = ICAE.from_pretrained(latest_checkpoint(config.output_dir) / "icae")
    for name, tensor in _tensors(ICAE.from_pretrained(latest)).items():
        torch.testing.assert_close(tensor, _tensors(trained)[name], atol=2e-2, rtol=1e-2)
    assert (
        campaign.plan_campaign(
            dataclasses.replace(config, output_dir=str(tmp_path / "new")), latest
        ).mode
        == "warm-start"
    )
    again = campaign.report(config, promote=False, **options)
    assert again["metrics_added"] == 0 and again["evaluations"] == 2


def test_bootstrap_carries_a_smaller_k_checkpoint_over(config, tmp_path):
    small = ICAE.from_base(
        config.base_model, **{**config.icae, "num_memory_tokens": 4, "span_tokens": 16}
    )
    with torch.no_grad():
        for param in small.trainable_parameters():
            param.add_(torch.randn_like(param))
    small.save_pretrained(tmp_path / "small")
    out = campaign.bootstrap(tmp_path / "small", config, tmp_path / "big")
    big, source = ICAE.from_pretrained(out), _tensors(ICAE.from_pretrained(tmp_path / "small"))
    assert big.config.num_memory_tokens == 8 and big.config.span_tokens == 32
    for name, tensor in _tensors(big).items():
        expected = source[name].repeat(2, 1) if name == "memory_embeddings" else source[name]
        torch.testing.assert_close(tensor, expected, msg=name)
    other = TrainConfig.from_dict(
        {**config.to_dict(), "icae": {**config.icae, "slot_positions": "sequential"}}
    )
    with pytest.raises(TrainingConfigError, match="another recipe"):
        campaign.bootstrap(tmp_path / "small", other, tmp_path / "other")


def test_a_background_campaign_trains_to_its_last_step_and_logs(config, tmp_path):
    import time

    path = tmp_path / "campaign.json"
    path.write_text(json.dumps(config.to_dict()))
    pid = campaign.start_in_background(path, niceness=0)
    with pytest.raises(TrainingConfigError, match="already running"):
        campaign.start_in_background(path)
    deadline = time.monotonic() + 120
    while campaign.background_pid(config.output_dir) == pid and time.monotonic() < deadline:
        time.sleep(0.5)
    log = (tmp_path / "run" / campaign.LOG_FILE).read_text()
    assert campaign.background_pid(config.output_dir) is None, log
    assert latest_checkpoint(config.output_dir).name.endswith("4"), log
    assert max(r["step"] for r in read_metrics(config.output_dir)) == config.max_steps


def test_report_tags_records_with_the_runs_own_seed(config, tmp_path):
    """A warm start trains with a seed drawn from the export: its records are a segment of
    their own even when the campaign file's seed equals an earlier segment's."""
    run = dataclasses.replace(config, seed=1234)
    train(run, until_step=2)
    (tmp_path / "T.md").write_text(f"{campaign.CURVE_START}\n{campaign.CURVE_END}\n")
    record = campaign.report(
        config,
        results=tmp_path / "results",
        training_md=tmp_path / "T.md",
        promote=False,
        latest_dir=tmp_path / "latest",
    )
    log = tmp_path / "results" / "icae_campaign_metrics.jsonl"
    segments = {json.loads(line)["segment"] for line in log.read_text().splitlines()}
    assert record["metrics_added"] > 0 and segments == {1234}


def test_a_saved_checkpoint_holds_no_model_card(config, tmp_path):
    train(config, until_step=2)
    saved = latest_checkpoint(config.output_dir) / "icae"
    assert not (saved / "README.md").exists()
    assert not (export_checkpoint(config.output_dir, tmp_path / "export") / "README.md").exists()


def test_a_mixed_phase_may_not_trade_reconstruction_away(config, tmp_path, monkeypatch):
    mixed = dataclasses.replace(config, ae_fraction=0.5)
    train(mixed, until_step=2)
    export = tmp_path / "export"
    export_checkpoint(mixed.output_dir, export)
    losses = {  # the candidate continues far better but reconstructs 20% worse
        str(latest_checkpoint(mixed.output_dir) / "icae"): {
            "held_out_ae_loss": 1.2,
            "held_out_lm_loss": 2.0,
        },
        str(export): {"held_out_ae_loss": 1.0, "held_out_lm_loss": 9.0},
    }
    monkeypatch.setattr(campaign, "held_out_losses", lambda _c, d: losses[str(d)])
    refused = campaign.promote_if_better(mixed, export)
    assert not refused["promoted"] and "[AE] loss 1.200" in refused["reason"]
    assert refused["candidate_loss"] < refused["committed_loss"]  # the objective alone improved
    losses[str(latest_checkpoint(mixed.output_dir) / "icae")]["held_out_ae_loss"] = 1.05
    assert campaign.promote_if_better(mixed, export)["promoted"]  # within 10%: promoted
