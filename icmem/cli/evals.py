"""`icmem eval ppl|passkey|reconstruct`: long-context decoding and ICAE memory, measured."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from icmem.evals import long_context as lc
from icmem.evals import reconstruct as rc
from icmem.models import DEFAULT_MODEL


def ppl_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", required=True, type=Path, help="a UTF-8 text file")
    parser.add_argument("--tokens", required=True, type=int, help="how many tokens to score")
    parser.add_argument("--bucket", type=int, default=lc.DEFAULT_BUCKET, help="bucket width")
    _long_context_options(parser)


def passkey_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", required=True, type=int, help="prompt length in tokens")
    parser.add_argument(
        "--depths",
        type=_depth_list,
        default=lc.DEFAULT_DEPTHS,
        help="comma-separated needle depths in [0, 1] (default "
        + ",".join(f"{d:g}" for d in lc.DEFAULT_DEPTHS)
        + ")",
    )
    parser.add_argument("--trials", type=int, default=lc.DEFAULT_TRIALS, help="trials per depth")
    parser.add_argument("--seed", type=int, default=0)
    _long_context_options(parser)


def _long_context_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name or directory")
    parser.add_argument("--vanilla", action="store_true", help="stock attention (the baseline)")
    parser.add_argument("--global-tokens", type=int, default=lc.DEFAULT_GLOBAL_TOKENS)
    parser.add_argument(
        "--local-window", type=int, default=None, help="default: the model's pretraining length"
    )
    parser.add_argument(
        "--chunk", type=int, default=lc.DEFAULT_CHUNK, help="prefill chunk in tokens"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _depth_list(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers like 0,0.5,1; got {value!r}") from exc


def ppl(args: argparse.Namespace) -> int:
    from icmem.models import load_model

    model, tokenizer = load_model(args.model)
    try:
        text = args.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise lc.EvaluationError(
            f"cannot read --text {args.text}: {exc}; pass a UTF-8 file"
        ) from exc
    result = lc.perplexity_by_bucket(
        model,
        tokenizer,
        text,
        tokens=args.tokens,
        bucket=args.bucket,
        lm_infinite=not args.vanilla,
        chunk=args.chunk,
        global_tokens=args.global_tokens,
        local_window=args.local_window,
    )
    result["model"] = args.model
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['mode']}: perplexity per {args.bucket}-token bucket")
    for b in result["buckets"]:
        print(f"  [{b['start']:>6}, {b['end']:>6})  {b['ppl']:10.2f}")
    summary = result["summary"]
    if "worst_deviation_past" in summary:
        print(
            f"  past {summary['split']}: worst {summary['worst_deviation_past']:.1%} from the "
            f"mean below it ({summary['mean_below']:.2f})"
        )
    return 0


def passkey(args: argparse.Namespace) -> int:
    from icmem.models import load_model

    model, tokenizer = load_model(args.model)
    result = lc.passkey_accuracy(
        model,
        tokenizer,
        tokens=args.tokens,
        depths=args.depths,
        trials=args.trials,
        lm_infinite=not args.vanilla,
        seed=args.seed,
        chunk=args.chunk,
        global_tokens=args.global_tokens,
        local_window=args.local_window,
    )
    result["model"] = args.model
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['mode']}: passkey accuracy {result['accuracy']:.0%} at {args.tokens} tokens")
    for d in result["depths"]:
        seen = "in window" if d["in_window"] else "outside window"
        print(f"  depth {d['depth']:.2f}: {d['accuracy']:.0%} ({seen})")
    return 0


def reconstruct_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", default=None, help="ICAE directory (default: the shipped one)"
    )
    parser.add_argument(
        "--text", required=True, help="held-out text: a .txt file or a folder of them"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(rc.DEFAULT_LENGTHS))
    parser.add_argument("--k", type=int, nargs="+", default=None, help="slot counts (default: own)")
    parser.add_argument(
        "--spans", type=int, default=rc.DEFAULT_SPANS_PER_LENGTH, help="spans per length"
    )
    parser.add_argument(
        "--continuation",
        type=int,
        default=rc.DEFAULT_CONTINUATION_TOKENS,
        help="continuation tokens",
    )
    parser.add_argument("--no-generate", action="store_true", help="skip greedy reconstruction")
    parser.add_argument("--qa", default=None, help="PwC-style JSONL of held-out triples")
    parser.add_argument("--qa-limit", type=int, default=8, help="triples to answer from --qa")


def reconstruct(args: argparse.Namespace) -> int:
    from icmem.icae.data import read_pwc_jsonl
    from icmem.icae.model import ICAE

    icae = ICAE.from_pretrained(args.checkpoint)
    result = rc.evaluate_reconstruction(
        icae,
        rc.read_held_out_texts(args.text),
        lengths=args.lengths,
        ks=args.k,
        spans_per_length=args.spans,
        continuation_tokens=args.continuation,
        generate=not args.no_generate,
        qa_triples=read_pwc_jsonl(args.qa)[: args.qa_limit] if args.qa else (),
    )
    result["checkpoint"] = args.checkpoint or "default"
    print(json.dumps(result) if args.json else rc.format_table(result))
    return 0
