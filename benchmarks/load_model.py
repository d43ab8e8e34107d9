"""Time `icmem.load_model` in a fresh process: from the safetensors cache against the GGUF.

Prints one JSON object. Each measurement runs in its own interpreter so that imports and file
caches count as a user would see them on a second load.

    .venv/bin/python benchmarks/load_model.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CACHED = """
import time; t = time.perf_counter()
import icmem
icmem.load_model("smollm2-135m-instruct")
print(time.perf_counter() - t)
"""

GGUF = """
import time; t = time.perf_counter()
from transformers import AutoModelForCausalLM, AutoTokenizer
from icmem.models import DEFAULT_MODEL, EMBEDDED_MODELS, _embedded_gguf
path = _embedded_gguf(EMBEDDED_MODELS[DEFAULT_MODEL])
AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
print(time.perf_counter() - t)
"""


def timed(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    timed(CACHED)  # make sure the cache exists; the first conversion is not what we measure
    cached = [timed(CACHED) for _ in range(args.repeats)]
    gguf = [timed(GGUF) for _ in range(args.repeats)]
    result = {
        "benchmark": "load_model",
        "model": "smollm2-135m-instruct",
        "cached_load_s": {"median": statistics.median(cached), "all": cached},
        "gguf_load_s": {"median": statistics.median(gguf), "all": gguf},
        "speedup_vs_gguf": statistics.median(gguf) / statistics.median(cached),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
