"""How long each notebook takes to run top to bottom in a fresh kernel: wall time and the
kernel's CPU time (user + sys, model loading included), which depends far less than wall time on
what else the machine is running.

    .venv/bin/python benchmarks/notebook_runtime.py --save
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nbformat
from icae_common import emit
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CPU_PROBE = (
    "import resource\n"
    "_usage = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(_usage.ru_utime + _usage.ru_stime, _usage.ru_maxrss)"
)


def run(path: Path) -> dict:
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(CPU_PROBE))
    start = time.perf_counter()
    NotebookClient(
        notebook,
        timeout=1800,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    wall = time.perf_counter() - start
    cpu, max_rss_kb = notebook.cells[-1].outputs[0]["text"].split()
    return {
        "notebook": path.name,
        "wall_s": round(wall, 1),
        "kernel_cpu_s": round(float(cpu), 1),
        "kernel_max_rss_mb": int(max_rss_kb) // 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook file names (default: all)")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    paths = [NOTEBOOKS / n for n in args.names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    runs = [run(path) for path in paths]
    emit(
        "notebook_runtime",
        {
            "benchmark": "notebook_runtime",
            "cpus": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 1),
            "runs": runs,
        },
        args.save,
    )


if __name__ == "__main__":
    main()
