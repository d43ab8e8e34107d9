"""Long-context evaluations: perplexity per position bucket and passkey retrieval.

Both run the same way with and without LM-Infinite (``lm_infinite=False`` is the vanilla
baseline), prefilling in chunks through a cache so that a 32k-token text never materialises a
32k x vocabulary logits tensor or a 32k x 32k attention matrix. Heavy imports live inside the
functions so that building the CLI parser stays cheap.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Sequence
from typing import Any

from icmem.errors import IcmemError

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_BUCKET = 2048  # perplexity bucket width in tokens
DEFAULT_CHUNK = 1024  # prefill chunk in tokens
DEFAULT_GLOBAL_TOKENS = 10  # LM-Infinite's leading tokens every query attends to
DEFAULT_TRIALS = 5  # passkey trials per depth

_PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n"
)
_PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
_PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
_PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


class EvaluationError(IcmemError):
    """An evaluation was asked for something its inputs cannot give (e.g. a text too short)."""


def _attention_context(model: Any, lm_infinite: bool, global_tokens: int, local_window: int | None):
    """LM-Infinite on for the evaluation (restoring the model afterwards), or a check that the
    vanilla baseline really is vanilla."""
    from contextlib import nullcontext

    from icmem import lm_infinite as lmi

    if lm_infinite:
        return lmi.enabled(model, global_tokens=global_tokens, local_window=local_window)
    if lmi.is_enabled(model):
        raise EvaluationError(
            "the vanilla baseline was asked for but LM-Infinite is enabled on the model; "
            "call icmem.lm_infinite.disable(model) first"
        )
    return nullcontext()


def _new_cache(model: Any, lm_infinite: bool) -> Any:
    from transformers import DynamicCache

    from icmem.lm_infinite import make_cache

    return make_cache(model) if lm_infinite else DynamicCache(config=model.config)


def _settings(model: Any, lm_infinite: bool, global_tokens: int, local_window: int | None) -> dict:
    if not lm_infinite:
        return {"mode": "vanilla"}
    window = local_window or model.config.get_text_config(decoder=True).max_position_embeddings
    return {"mode": "lm_infinite", "global_tokens": global_tokens, "local_window": window}


def _leading_tokens(tokenizer: Any, text: str, tokens: int) -> Any:
    """The first ``tokens`` token ids of ``text`` as (1, n), without tokenizing a whole book."""
    chars = 8 * tokens
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt", add_special_tokens=False).input_ids
        if ids.shape[1] > tokens or chars >= len(text):
            return ids[:, :tokens]
        chars *= 2


def perplexity_by_bucket(
    model: Any,
    tokenizer: Any,
    text: str,
    *,
    tokens: int,
    bucket: int = DEFAULT_BUCKET,
    lm_infinite: bool = True,
    chunk: int = DEFAULT_CHUNK,
    global_tokens: int = DEFAULT_GLOBAL_TOKENS,
    local_window: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of the first ``tokens`` tokens of ``text``, per bucket of target positions.

    Bucket k covers the predictions of tokens at positions [k·bucket, (k+1)·bucket); the very
    first token has no prediction. Returns ``{"mode", "tokens", "bucket", "buckets": [{"start",
    "end", "ppl", "count"}], ...settings}``.
    """
    import torch
    from tqdm.auto import tqdm

    if tokens < 2 or bucket < 1 or chunk < 1:
        raise EvaluationError(
            f"need tokens >= 2, bucket >= 1 and chunk >= 1 (got {tokens}, {bucket}, {chunk})"
        )
    ids = _leading_tokens(tokenizer, text, tokens)
    if ids.shape[1] < tokens:
        raise EvaluationError(
            f"the text has only {ids.shape[1]} tokens but {tokens} were asked for; pass a "
            "longer text or fewer --tokens"
        )
    ids = ids.to(model.device)
    nll = torch.empty(tokens - 1, dtype=torch.float64)
    with (
        torch.inference_mode(),
        _attention_context(model, lm_infinite, global_tokens, local_window),
    ):
        cache = _new_cache(model, lm_infinite)
        previous_last = None  # logits of the last position of the previous chunk
        for start in tqdm(
            range(0, tokens, chunk), desc="perplexity", disable=not progress, file=sys.stderr
        ):
            piece = ids[:, start : start + chunk]
            logits = model(piece, past_key_values=cache, use_cache=True).logits[0].float()
            if previous_last is not None:
                logits_for_piece = torch.cat((previous_last[None], logits[:-1]))
                targets, first = piece[0], start - 1
            else:
                logits_for_piece, targets, first = logits[:-1], piece[0, 1:], 0
            losses = torch.nn.functional.cross_entropy(logits_for_piece, targets, reduction="none")
            nll[first : first + losses.shape[0]] = losses.double().cpu()
            previous_last = logits[-1]

    positions = torch.arange(1, tokens)
    buckets = []
    for low in range(0, tokens, bucket):
        selected = (positions >= low) & (positions < low + bucket)
        count = int(selected.sum())
        if count:
            ppl = math.exp(float(nll[selected].mean()))
            buckets.append(
                {"start": low, "end": min(low + bucket, tokens), "ppl": ppl, "count": count}
            )
    split = model.config.get_text_config(decoder=True).max_position_embeddings
    return {
        **_settings(model, lm_infinite, global_tokens, local_window),
        "tokens": tokens,
        "bucket": bucket,
        "chunk": chunk,
        "buckets": buckets,
        "summary": bucket_summary(buckets, split),
    }


def bucket_summary(buckets: Sequence[dict[str, Any]], split: int) -> dict[str, Any]:
    """How far each bucket past ``split`` (the pretraining length) strays from the mean of the
    buckets below it: LM-Infinite should stay within 10%, where vanilla explodes."""
    below = [b["ppl"] for b in buckets if b["end"] <= split]
    past = [b["ppl"] for b in buckets if b["start"] >= split]
    summary: dict[str, Any] = {"split": split, "mean_below": None}
    if below:
        mean_below = sum(below) / len(below)
        summary["mean_below"] = mean_below
        if past:
            deviations = [ppl / mean_below - 1 for ppl in past]
            summary["deviation_past"] = deviations
            summary["worst_deviation_past"] = max(abs(d) for d in deviations)
            summary["within_10_percent"] = summary["worst_deviation_past"] <= 0.10
    return summary


def passkey_prompt(tokenizer: Any, *, tokens: int, depth: float, key: str) -> tuple[str, int]:
    """A prompt of about ``tokens`` tokens hiding ``key`` at fractional ``depth`` of the filler.

    Returns the prompt and the token index where the needle starts.
    """
    if not 0.0 <= depth <= 1.0:
        raise EvaluationError(f"depth must lie in [0, 1], got {depth}")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    needle = _PASSKEY_NEEDLE.format(key=key)
    fixed = count(_PASSKEY_INTRO) + count(needle) + count(_PASSKEY_QUESTION)
    repeats = max(0, (tokens - fixed) // count(_PASSKEY_FILLER))
    before = round(repeats * depth)
    head = _PASSKEY_INTRO + _PASSKEY_FILLER * before
    prompt = head + needle + _PASSKEY_FILLER * (repeats - before) + _PASSKEY_QUESTION
    return prompt, count(head)


def passkey_accuracy(
    model: Any,
    tokenizer: Any,
    *,
    tokens: int,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = DEFAULT_TRIALS,
    lm_infinite: bool = True,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
    global_tokens: int = DEFAULT_GLOBAL_TOKENS,
    local_window: int | None = None,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy passkey retrieval: a random 5-digit key hidden at each depth, ``trials`` times.

    A trial passes when the key appears in the generated answer. Each depth reports whether the
    needle lies inside the last ``local_window`` tokens of the prompt (``in_window``): only there
    can the question attend to it directly under the Λ mask (the first ``global_tokens`` tokens
    are the other place it sees, and they hold the instructions, not the needle).
    """
    import torch
    from tqdm.auto import tqdm

    from icmem.icae.batch_decode import decode_batch, stop_token_ids

    if trials < 1 or not depths:
        raise EvaluationError("need trials >= 1 and at least one depth")
    settings = _settings(model, lm_infinite, global_tokens, local_window)
    rng = random.Random(seed)
    results = []
    jobs = [(depth, trial) for depth in depths for trial in range(trials)]
    per_depth: dict[float, dict[str, Any]] = {}
    with (
        torch.inference_mode(),
        _attention_context(model, lm_infinite, global_tokens, local_window),
    ):
        for depth, _trial in tqdm(
            jobs, desc=f"passkey {tokens}", disable=not progress, file=sys.stderr
        ):
            key = f"{rng.randrange(10_000, 100_000)}"
            prompt, needle_at = passkey_prompt(tokenizer, tokens=tokens, depth=depth, key=key)
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            ids = ids.to(model.device)
            (decoded,) = decode_batch(
                model,
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                stop_ids=stop_token_ids(model),
                pad_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                cache=_new_cache(model, lm_infinite),
                prefill_chunk=chunk,
            )
            answer = tokenizer.decode(decoded.generated(), skip_special_tokens=True)
            entry = per_depth.setdefault(
                depth, {"depth": depth, "correct": 0, "trials": 0, "needle_distance": []}
            )
            entry["correct"] += int(key in answer)
            entry["trials"] += 1
            entry["needle_distance"].append(ids.shape[1] - needle_at)
    window = settings.get("local_window")
    for entry in per_depth.values():
        distance = max(entry.pop("needle_distance"))
        entry["accuracy"] = entry["correct"] / entry["trials"]
        entry["needle_distance"] = distance
        entry["in_window"] = True if window is None else distance <= window
        results.append(entry)
    total = sum(e["correct"] for e in results) / sum(e["trials"] for e in results)
    return {**settings, "tokens": tokens, "trials": trials, "accuracy": total, "depths": results}
