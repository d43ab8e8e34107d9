"""JSON-schema-constrained decoding libraries on SmolLM2's tokenizer: set-up, schema compile and
mask time while walking a valid answer token by token (every token must be allowed), for a
first answer (cold caches) and a second one in the same process.

This is how icmem chose the library behind `tool_choice` and `with_structured_output` (xgrammar
and lm-format-enforcer are measured when installed; they are not icmem dependencies).

    .venv/bin/python benchmarks/constrained_decoding.py --save
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from icae_common import emit

from icmem.models import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
ANSWER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}


def walk(step: Callable[[torch.Tensor, int], bool], tokens: list[int], vocab: int) -> list[float]:
    """Time each step's mask; fail if the valid answer's next token is ever disallowed."""
    times = []
    for token in tokens:
        logits = torch.zeros(1, vocab)
        start = time.perf_counter()
        allowed = step(logits, token)
        times.append(time.perf_counter() - start)
        if not allowed:
            raise AssertionError(f"token {token} of a valid answer was masked out")
    return times


def measure_xgrammar(tokenizer, vocab: int, tokens: list[int]) -> dict:
    import xgrammar as xgr

    start = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab))
    setup = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - start
    bitmask = xgr.allocate_token_bitmask(1, vocab)

    def answer() -> list[float]:
        matcher = xgr.GrammarMatcher(compiled)

        def step(logits: torch.Tensor, token: int) -> bool:
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            ok = bool(torch.isfinite(logits[0, token]))
            matcher.accept_token(token)
            return ok

        return walk(step, tokens, vocab)

    return {"setup_s": setup, "compile_s": compile_s, "cold": answer(), "warm": answer()}


def measure_llguidance(tokenizer, vocab: int, tokens: list[int]) -> dict:
    """Through icmem's own wrapper (llguidance's matcher, icmem's bitmask unpacking)."""
    from icmem.constrained import JsonConstraint

    start = time.perf_counter()
    JsonConstraint({"type": "string"}, tokenizer, vocab, [tokenizer.eos_token_id])
    setup = time.perf_counter() - start  # the tokenizer's trie, built once per tokenizer
    start = time.perf_counter()
    JsonConstraint(SCHEMA, tokenizer, vocab, [tokenizer.eos_token_id])
    compile_s = time.perf_counter() - start

    def answer() -> list[float]:
        constraint = JsonConstraint(SCHEMA, tokenizer, vocab, [tokenizer.eos_token_id])

        def step(logits: torch.Tensor, token: int) -> bool:
            constraint.mask_(logits[0])
            ok = bool(torch.isfinite(logits[0, token]))
            constraint.accept(token)
            return ok

        return walk(step, tokens, vocab)

    return {"setup_s": setup, "compile_s": compile_s, "cold": answer(), "warm": answer()}


def measure_lm_format_enforcer(tokenizer, vocab: int, tokens: list[int]) -> dict:
    from lmformatenforcer import JsonSchemaParser, TokenEnforcer
    from lmformatenforcer.integrations.transformers import (
        build_token_enforcer_tokenizer_data,
    )

    start = time.perf_counter()
    data = build_token_enforcer_tokenizer_data(tokenizer, vocab_size=vocab)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    TokenEnforcer(data, JsonSchemaParser(SCHEMA))
    compile_s = time.perf_counter() - start

    def answer() -> list[float]:
        enforcer = TokenEnforcer(data, JsonSchemaParser(SCHEMA))
        seen: list[int] = []

        def step(logits: torch.Tensor, token: int) -> bool:
            allowed = enforcer.get_allowed_tokens(seen)
            mask = torch.full_like(logits, float("-inf"))
            mask[0, allowed.allowed_tokens if hasattr(allowed, "allowed_tokens") else allowed] = 0
            logits += mask
            seen.append(token)
            return bool(torch.isfinite(logits[0, token]))

        return walk(step, tokens, vocab)

    return {"setup_s": setup, "compile_s": compile_s, "cold": answer(), "warm": answer()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    vocab = len(tokenizer)
    tokens = tokenizer(json.dumps(ANSWER), add_special_tokens=False)["input_ids"]
    results = {}
    for name, measure in [
        ("xgrammar", measure_xgrammar),
        ("llguidance", measure_llguidance),
        ("lm-format-enforcer", measure_lm_format_enforcer),
    ]:
        try:
            raw = measure(tokenizer, vocab, tokens)
        except Exception as error:  # a library that cannot walk the answer is reported as such
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        results[name] = {
            "setup_s": round(raw["setup_s"], 3),
            "compile_s": round(raw["compile_s"], 4),
            "first_answer_mask_ms": round(1000 * sum(raw["cold"]), 1),
            "second_answer_mask_ms": round(1000 * sum(raw["warm"]), 1),
            "second_answer_median_step_ms": round(1000 * statistics.median(raw["warm"]), 3),
        }
    emit(
        "constrained_decoding",
        {"benchmark": "constrained_decoding", "answer_tokens": len(tokens), "libraries": results},
        args.save,
    )


if __name__ == "__main__":
    main()
