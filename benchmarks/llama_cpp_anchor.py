"""llama.cpp as the speed anchor: prompt-processing and decode timings of a GGUF model.

Runs under a separate interpreter that has ``llama-cpp-python`` (a benchmark-only venv, never a
project dependency); ``icae_compress.py`` and ``icae_decode.py`` call it between their own arms
so that the ratios come from one run on one machine state. Model loading is not timed.

    /work/bench-venv/bin/python benchmarks/llama_cpp_anchor.py --model M.gguf --ids ids.json
    /work/bench-venv/bin/python benchmarks/llama_cpp_anchor.py --model M.gguf --to-bf16 out.gguf

``--ids`` is a JSON list of prompts (lists of token ids of the same tokenizer). Each prompt is
processed from an empty cache; with ``--new-tokens N`` each is then decoded greedily for N
tokens. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def requantize_to_bf16(source: str, target: str, threads: int) -> None:
    """Rewrite a GGUF with bf16 weights (the same weights our bf16 PyTorch path runs)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_BF16
    params.allow_requantize = True
    status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), params)
    if status != 0:
        raise SystemExit(f"llama_model_quantize failed with status {status}")


def time_prompts(model: str, prompts: list[list[int]], threads: int, new_tokens: int) -> dict:
    from llama_cpp import Llama

    width = max(len(p) for p in prompts) + new_tokens + 1
    llm = Llama(
        model_path=model,
        n_ctx=width,
        n_batch=width,
        n_ubatch=width,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    llm.eval(prompts[0][:8])  # warm-up
    llm.reset()
    prefill, decode, tokens = [], [], 0
    for prompt in prompts:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill.append(time.perf_counter() - start)
        if new_tokens:
            start = time.perf_counter()
            for _ in range(new_tokens):
                token = int(llm.scores[llm.n_tokens - 1].argmax())
                llm.eval([token])
            decode.append(time.perf_counter() - start)
        tokens += len(prompt)
    return {
        "model": Path(model).name,
        "threads": threads,
        "prompts": len(prompts),
        "prompt_tokens": tokens,
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "new_tokens": new_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a GGUF file")
    parser.add_argument("--ids", help="JSON file: a list of prompts of token ids")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=0, help="greedy tokens after each")
    parser.add_argument("--to-bf16", help="write a bf16 copy of --model here and exit")
    args = parser.parse_args()
    if args.to_bf16:
        requantize_to_bf16(args.model, args.to_bf16, args.threads)
        return
    if not args.ids:
        parser.error("give --ids (prompts to time) or --to-bf16")
    prompts = json.loads(Path(args.ids).read_text())
    print(json.dumps(time_prompts(args.model, prompts, args.threads, args.new_tokens)))


if __name__ == "__main__":
    main()
