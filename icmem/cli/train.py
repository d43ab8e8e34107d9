"""`icmem train ...`: ICAE training runs, the default ICAE's campaign, and training data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from icmem.icae import data
from icmem.icae.campaign import DEFAULT_CONFIG
from icmem.icae.train import DEFAULT_EXPORT_DTYPE
from icmem.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from icmem.icae.train import TrainResult

CAMPAIGN_ACTIONS = ("start", "run", "stop", "status", "report", "bootstrap")


def run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="JSON TrainConfig (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--until-step", type=int, default=None, help="stop (checkpointed) here")


def pretrain(args: argparse.Namespace) -> int:
    from icmem.icae.train import pretrain

    return _print_result(pretrain(args.config, resume=args.resume, until_step=args.until_step))


def finetune(args: argparse.Namespace) -> int:
    from icmem.icae.train import finetune

    return _print_result(finetune(args.config, resume=args.resume, until_step=args.until_step))


def distill(args: argparse.Namespace) -> int:
    from icmem.icae.train import distill

    return _print_result(distill(args.config, resume=args.resume, until_step=args.until_step))


def _print_result(result: TrainResult) -> int:
    summary = {
        "output_dir": str(result.output_dir),
        "final_dir": str(result.final_dir),
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "last_loss": result.losses[-1] if result.losses else None,
    }
    print(json.dumps(summary))
    return 0


def campaign_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=CAMPAIGN_ACTIONS,
        help="start: in the background at nice 19; run: here, in the foreground; stop: "
        "checkpoint and end it; status: where it stands; report: append metrics, re-draw "
        "the curve in TRAINING.md and promote the checkpoint if held-out loss improved; "
        "bootstrap: widen a checkpoint to the campaign's memory tokens",
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument(
        "--until-step", type=int, default=None, help="run: stop (checkpointed) here"
    )
    parser.add_argument(
        "--no-promote", action="store_true", help="report: never replace the export"
    )
    parser.add_argument(
        "--source", help="bootstrap: a same-recipe checkpoint with fewer memory tokens"
    )
    parser.add_argument("--out", help="bootstrap: where to save the ICAE to start from (init_from)")


def campaign(args: argparse.Namespace) -> int:
    from icmem.icae import campaign
    from icmem.icae.train import TrainConfig, TrainingConfigError

    config = TrainConfig.from_file(args.config)
    if args.action == "start":
        plan = campaign.plan_campaign(config)
        pid = campaign.start_in_background(args.config)
        log = Path(config.output_dir) / campaign.LOG_FILE
        report = {"started": pid, "mode": plan.mode, "reason": plan.reason, "log": str(log)}
    elif args.action == "run":
        result = campaign.run_campaign(config, until_step=args.until_step)
        report = {"steps": result.steps, "tokens_seen": result.tokens_seen}
    elif args.action == "stop":
        report = {"stopped": campaign.stop_background(config.output_dir)}
    elif args.action == "status":
        history = campaign.held_out_history(config.output_dir)
        report = {
            "running": campaign.background_pid(config.output_dir),
            "next_start": campaign.plan_campaign(config).mode,
            "last_held_out": history[-1] if history else None,
        }
    elif args.action == "bootstrap":
        if not (args.source and args.out):
            raise TrainingConfigError("bootstrap needs --source CHECKPOINT and --out DIR")
        report = {"out": str(campaign.bootstrap(args.source, config, args.out))}
    else:
        report = campaign.report(config, promote=not args.no_promote)
    print(json.dumps(report))
    return 0


def corpus_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write .txt documents into")
    parser.add_argument(
        "--man-pages", type=int, default=data.DEFAULT_MAN_PAGES, help="rendered man pages"
    )


def corpus(args: argparse.Namespace) -> int:
    written = data.build_local_corpus(args.out, man_pages=args.man_pages)
    print(json.dumps({"out": args.out, "documents": len(written)}))
    return 0


def export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", required=True, help="run output_dir, or one checkpoints/step-* dir"
    )
    parser.add_argument("--out", required=True, help="directory for ICAE.from_pretrained")
    parser.add_argument(
        "--dtype", default=DEFAULT_EXPORT_DTYPE, help="precision of the stored tensors"
    )


def export(args: argparse.Namespace) -> int:
    from icmem.icae.train import export_checkpoint

    target = export_checkpoint(args.run, args.out, dtype=args.dtype)
    print(json.dumps({"out": str(target)}))
    return 0


def _split_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--held-out-fraction",
        type=float,
        default=data.DEFAULT_HELD_OUT_FRACTION,
        help="as in pretraining",
    )
    parser.add_argument(
        "--split-seed", type=int, default=data.DEFAULT_SPLIT_SEED, help="as in pretraining"
    )


def held_out_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="corpus folder (as for pretraining)")
    parser.add_argument("--out", required=True, help="folder for the held-out .txt documents")
    _split_options(parser)


def held_out(args: argparse.Namespace) -> int:
    documents = data.write_held_out(
        args.corpus,
        args.out,
        held_out_fraction=args.held_out_fraction,
        split_seed=args.split_seed,
    )
    print(json.dumps({"out": str(Path(args.out)), "documents": documents}))
    return 0


def instructions_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="corpus folder (as for pretraining)")
    parser.add_argument("--out", required=True, help="folder for train.jsonl and held_out.jsonl")
    parser.add_argument("--base-model", default=DEFAULT_MODEL)
    parser.add_argument(
        "--retention", type=int, default=data.DEFAULT_RETENTION, help="templated retention triples"
    )
    parser.add_argument("--distill", type=int, default=0, help="context-distilled triples")
    _split_options(parser)


def instructions(args: argparse.Namespace) -> int:
    from icmem.models import load_model

    model, tokenizer = load_model(args.base_model)
    counts = data.build_instruction_data(
        args.corpus,
        args.out,
        tokenizer,
        retention=args.retention,
        distill_model=model if args.distill else None,
        distill=args.distill,
        held_out_fraction=args.held_out_fraction,
        split_seed=args.split_seed,
    )
    print(json.dumps({"out": args.out, **counts}))
    return 0


def distill_cache_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="corpus folder (as for pretraining)")
    parser.add_argument("--out", required=True, help="cache folder (resumable: re-run to extend)")
    parser.add_argument("--icae", default=None, help="ICAE whose frozen encoder makes the slots")
    parser.add_argument("--count", type=int, required=True, help="records to teach")
    parser.add_argument("--side", choices=("train", "held_out"), default="train")
    parser.add_argument("--seed", type=int, default=0, help="which records (same seed, same set)")
    parser.add_argument("--top-k", type=int, default=64, help="teacher tokens kept per position")
    parser.add_argument("--max-answer-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    _split_options(parser)


def distill_cache(args: argparse.Namespace) -> int:
    """Teach records into a cache: slots from the frozen encoder, the teacher's distributions."""
    import torch

    from icmem.icae import distill
    from icmem.icae.model import ICAE

    if args.threads:
        torch.set_num_threads(args.threads)
    icae = ICAE.from_pretrained(args.icae, dtype="auto")
    records = distill.build_records(
        args.corpus,
        icae.tokenizer,
        args.count,
        side=args.side,
        held_out_fraction=args.held_out_fraction,
        split_seed=args.split_seed,
        seed=args.seed,
        span_tokens=icae.config.span_tokens,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    distill.write_records(out / "records.jsonl", records)
    held = distill.build_cache(
        icae, records, out, top_k=args.top_k, max_answer_tokens=args.max_answer_tokens
    )
    print(json.dumps({"out": str(out), "records": len(records), "examples": held}))
    return 0
