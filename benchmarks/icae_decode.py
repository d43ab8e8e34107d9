"""Decoding speed on SmolLM2-135M: time to first token and tokens/s of answering a
question over 4 spans, from memory slots against the same 2048 tokens of raw text, in one run.
``--dtype auto`` (the default) is what ``icmem.hardware`` picks for this CPU.

Every ``generate`` arm is forced to make ``--new-tokens`` tokens (``min_new_tokens``: the
shipped checkpoint may answer with an early end-of-sequence, and then nothing would be timed).

Arms, interleaved round by round (medians reported):
- ``generate_slots``: ``ICAE.generate`` from the 4 spans' slots (streamed; first piece = first
  token), the shipped checkpoint's decoder (its adapter merged into a copy, the default).
- ``generate_slots_peft``: the same through peft's LoRA wrappers (``merge_adapter=False``),
  how slots were decoded before the merged copy.
- ``generate_text``: ``ICAE.generate`` with no memory and the raw text in the prompt (the base
  model alone, through the same loop).
- ``generate_slots_int8`` / ``generate_text_int8``: the same two through the decoder's
  weight-only int8 copies (``Decoder.int8_weights``, opt-in, not exact); ``..._int8_compiled``
  also with ``Decoder.compile_steps`` (its compilation happens in the warm-up round).
- ``hf_generate_text``: stock ``transformers`` ``generate`` on the same prompt ids (its own loop
  and its stock cache): what our loop costs against the reference one.
- ``slots_stock_cache`` / ``slots_lm_infinite_cache``: the same greedy loop over the slots'
  prefix, once with the stock cache and once with LM-Infinite attention and its bounded cache,
  at this short context (both read the prefix in reading order, which LM-Infinite needs).
- ``llama_cpp_{q4_1,bf16}`` (with ``--llama-python``): llama.cpp on the same raw-text prompt ids.
- ``conversation_{N}`` (``--conversation-tokens``): a conversation of N tokens answered through
  ``PromptCache`` (LM-Infinite past the window): per-token latency after the first token.

The answers are greedy; the two ``generate`` arms stop at EOS (tokens/s counts what they
made), every other arm makes exactly ``--new-tokens``.

    .venv/bin/python benchmarks/icae_decode.py --new-tokens 32 --repeats 3 --save \\
        --conversation-tokens 1024,8192,32768 --llama-python /work/bench-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from icae_common import emit, play_text
from icae_compress import bf16_gguf, shipped_gguf

from icmem import lm_infinite, load_model
from icmem.hardware import resolve_dtype
from icmem.icae import ICAE, Sampling
from icmem.icae.conversation import PromptCache

QUESTION = "Who speaks first in this passage, and what does he ask?"

Timing = tuple[float, float, int]  # (seconds to first token, total seconds, new tokens)


def timed_stream(pieces: Callable[[], object], icae: ICAE) -> Timing:
    start = time.perf_counter()
    first, text = None, ""
    for piece in pieces():
        first = first if first is not None else time.perf_counter() - start
        text += piece
    total = time.perf_counter() - start
    return first or total, total, len(icae.tokenize(text))


class _FirstTokenClock:
    """A ``generate`` streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.calls = 0
        self.first = 0.0

    def put(self, _value: torch.Tensor) -> None:
        self.calls += 1  # the first call carries the prompt
        if self.calls == 2:
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def hf_generate(model: torch.nn.Module, ids: list[int], new_tokens: int) -> Timing:
    clock = _FirstTokenClock()
    with torch.no_grad():
        model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=clock,
        )
    return clock.first, time.perf_counter() - clock.start, new_tokens


def greedy_loop(icae: ICAE, embeds: torch.Tensor, new_tokens: int, lm_inf: bool) -> Timing:
    """Exactly ``new_tokens`` greedy steps of the decoder over a prefix of embeddings."""
    model = icae.model
    start = time.perf_counter()
    infinite = lm_infinite.enabled(model) if lm_inf else nullcontext()
    with torch.no_grad(), icae.decoder.weights(), infinite:
        cache = lm_infinite.make_cache(model) if lm_inf else None
        out = model(
            inputs_embeds=embeds[None], past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        token = out.logits[0, -1].argmax().view(1, 1)
        first = time.perf_counter() - start
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[0, -1].argmax().view(1, 1)
    return first, time.perf_counter() - start, new_tokens


def conversation_step(icae: ICAE, text: str, new_tokens: int) -> Timing:
    """A fresh session over a long conversation: first token, then per-token time."""
    cache = PromptCache(max_sessions=0)
    start = time.perf_counter()
    first = None
    settings = Sampling(min_new_tokens=new_tokens)
    turns = [{"role": "user", "content": text}]
    for count, _token in enumerate(cache.generate(icae, [], turns, new_tokens, settings), 1):
        if count == 1:
            first = time.perf_counter() - start
    assert first is not None
    return first, time.perf_counter() - start, new_tokens


def llama_cpp(python: str, model: Path, ids: list[int], threads: int, new_tokens: int) -> Timing:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump([ids], handle)
    try:
        command = [python, str(Path(__file__).with_name("llama_cpp_anchor.py"))]
        command += ["--model", str(model), "--ids", handle.name, "--threads", str(threads)]
        command += ["--new-tokens", str(new_tokens)]
        run = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    finally:
        os.unlink(handle.name)
    prefill, decode = run["prefill_seconds"][0], run["decode_seconds"][0]
    # its first token comes from the prefill's logits, as ours does
    return prefill, prefill + decode, new_tokens + 1


def summary(times: list[Timing]) -> dict:
    ttft = statistics.median(t[0] for t in times)
    rates = [(n - 1) / (total - first) for first, total, n in times if n > 1 and total > first]
    return {
        "ttft_s": round(ttft, 3),
        "decode_tokens_per_s": round(statistics.median(rates), 2) if rates else None,
        "new_tokens": [t[2] for t in times],
        "total_s": [round(t[1], 3) for t in times],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--llama-python", help="interpreter with llama-cpp-python installed")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto")
    parser.add_argument(
        "--conversation-tokens",
        default="",
        help="comma-separated conversation lengths for per-token latency (e.g. 1024,8192,32768)",
    )
    parser.add_argument("--save", action="store_true", help="write results/NAME.json")
    parser.add_argument("--name", default="icae_decode", help="results file name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dtype = resolve_dtype(args.dtype)
    icae = ICAE.from_pretrained(dtype=dtype)
    peft_icae = ICAE.from_pretrained(dtype=dtype)
    peft_icae.decoder.merge_adapter = False
    int8_icae = ICAE.from_pretrained(dtype=dtype)
    int8_icae.decoder.int8_weights = True
    compiled_icae = ICAE.from_pretrained(dtype=dtype)
    compiled_icae.decoder.int8_weights = compiled_icae.decoder.compile_steps = True
    plain, _ = load_model("smollm2-135m-instruct", dtype=getattr(torch, dtype))
    context = icae.tokenize(play_text())[: args.spans * icae.config.span_tokens]
    memory = icae.compress([context], batch_size=args.spans)
    raw_prompt = icae.tokenizer.decode(context) + "\n\n" + QUESTION
    raw_ids = icae.prompt_ids(raw_prompt)
    with torch.no_grad():
        slots_prefix = icae.decoder_inputs(memory, "ft", icae.prompt_ids(QUESTION))
    n = args.new_tokens

    def answer(model: ICAE, slots: bool) -> Callable[[], Timing]:
        """A streamed ``generate`` of exactly ``n`` tokens, from the slots or from the text."""
        given, prompt = (memory, QUESTION) if slots else ([], raw_prompt)
        return lambda: timed_stream(
            lambda: model.generate(given, prompt, max_new_tokens=n, stream=True, min_new_tokens=n),
            model,
        )

    arms: dict[str, Callable[[], Timing]] = {
        "generate_slots": answer(icae, slots=True),
        "generate_slots_peft": answer(peft_icae, slots=True),
        "generate_text": answer(icae, slots=False),
        "generate_slots_int8": answer(int8_icae, slots=True),
        "generate_text_int8": answer(int8_icae, slots=False),
        "generate_slots_int8_compiled": answer(compiled_icae, slots=True),
        "generate_text_int8_compiled": answer(compiled_icae, slots=False),
        "hf_generate_text": lambda: hf_generate(plain, raw_ids, n),
        "slots_stock_cache": lambda: greedy_loop(icae, slots_prefix, n, lm_inf=False),
        "slots_lm_infinite_cache": lambda: greedy_loop(icae, slots_prefix, n, lm_inf=True),
    }
    if args.llama_python:
        for label, gguf in (
            ("q4_1", shipped_gguf()),
            ("bf16", bf16_gguf(args.llama_python, args.threads)),
        ):
            arms[f"llama_cpp_{label}"] = lambda g=gguf: llama_cpp(
                args.llama_python, g, raw_ids, args.threads, n
            )
    words = icae.tokenize(play_text("macbeth") + play_text("lear"))
    for length in [int(x) for x in args.conversation_tokens.split(",") if x]:
        text = icae.tokenizer.decode(words[:length])
        arms[f"conversation_{length}"] = lambda t=text: conversation_step(icae, t, n)
    for arm in arms.values():
        arm()  # warm-up
    times: dict[str, list[Timing]] = defaultdict(list)
    for _ in range(args.repeats):
        for name, arm in arms.items():
            times[name].append(arm())
    result = {name: summary(t) for name, t in times.items()}
    ratios = {
        "ttft_text_over_slots": round(
            result["generate_text"]["ttft_s"] / result["generate_slots"]["ttft_s"], 2
        ),
        "lm_infinite_over_stock_cache_ttft": round(
            result["slots_lm_infinite_cache"]["ttft_s"] / result["slots_stock_cache"]["ttft_s"], 2
        ),
        "slots_merged_over_peft_tokens_per_s": round(
            result["generate_slots"]["decode_tokens_per_s"]
            / result["generate_slots_peft"]["decode_tokens_per_s"],
            2,
        ),
        "lm_infinite_over_stock_cache_tokens_per_s": round(
            result["slots_lm_infinite_cache"]["decode_tokens_per_s"]
            / result["slots_stock_cache"]["decode_tokens_per_s"],
            2,
        ),
    }
    conversations = sorted(
        (int(name.split("_")[1]), r)
        for name, r in result.items()
        if name.startswith("conversation_")
    )
    if len(conversations) > 1:
        shortest = conversations[0][1]["decode_tokens_per_s"]
        for length, r in conversations[1:]:
            ratios[f"conversation_{length}_over_{conversations[0][0]}_per_token_time"] = round(
                shortest / r["decode_tokens_per_s"], 2
            )
    for label in ("q4_1", "bf16"):
        if f"llama_cpp_{label}" in result:
            anchor = result[f"llama_cpp_{label}"]
            ratios[f"generate_text_ttft_over_llama_cpp_{label}"] = round(
                result["generate_text"]["ttft_s"] / anchor["ttft_s"], 2
            )
            for arm in (
                "generate_slots",
                "generate_text",
                "generate_slots_int8",
                "generate_text_int8",
                "generate_slots_int8_compiled",
                "generate_text_int8_compiled",
            ):
                ratios[f"{arm}_tokens_per_s_over_llama_cpp_{label}"] = round(
                    result[arm]["decode_tokens_per_s"] / anchor["decode_tokens_per_s"], 2
                )
    emit(
        args.name,
        {
            "benchmark": "icae_decode",
            "model": "smollm2-135m-instruct",
            "dtype": dtype,
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "threads": args.threads,
            "new_tokens_forced": n,
            "repeats": args.repeats,
            "command": "python benchmarks/icae_decode.py " + " ".join(sys.argv[1:]),
            "context_tokens": len(context),
            "slots_prefix_entries": slots_prefix.shape[0],
            "raw_prompt_tokens": len(raw_ids),
            "arms": result,
            "ratios": ratios,
        },
        args.save,
    )


if __name__ == "__main__":
    main()
