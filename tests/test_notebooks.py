"""The notebooks run from top to bottom and show what their prose says they show.

Each notebook is executed in a fresh kernel (nbclient), then the checks below run in that same
kernel against the notebook's own variables, so a notebook that errors, or whose numbers no
longer support its text, fails here. Notebooks on the real SmolLM2 are marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
MAX_OUTPUT_BYTES = 4096  # committed notebooks carry no large outputs (no embedded plots)

CHECKS = {
    "quickstart.ipynb": """
assert [s.token_count for s in spans][:-1] == [128] * (len(spans) - 1)
assert len(memory) == 1 and memory[0].token_count == sum(s.token_count for s in spans)
assert reconstruction.strip()
assert answer.hits and answer.hits[0].document_id == "lighthouse"
""",
    "lm_infinite.ipynb": """
from icmem.evals.long_context import bucket_summary
full = {mode: bucket_summary(run["buckets"], 8192) for mode, run in by_mode.items()}
assert full["vanilla"]["worst_deviation_past"] > 10      # vanilla explodes past 8k
assert full["lm_infinite"]["worst_deviation_past"] < 0.5  # LM-Infinite stays bounded
pairs = list(zip(vanilla["buckets"], windowed["buckets"]))
assert abs(pairs[0][1]["ppl"] / pairs[0][0]["ppl"] - 1) < 1e-3  # inside the window: stock
assert all(w["ppl"] < 2 * v["ppl"] for v, w in pairs)  # past it: bounded, near vanilla
assert cache_entries == 4 + 64 < ids.shape[1]
""",
    "compression.ipynb": """
assert [r["tokens"] for r in rows] == [16, 32, 64]
assert [r["slots"] for r in rows] == [8, 8, 16]
# Each span comes back well above the no-memory prior (BLEU-4 about 0.02).
assert all(r["bleu4"] >= 0.15 for r in rows), rows
assert stats.documents == 2 and stats.spans == 2 and stats.slot_bytes > 0
""",
    "langgraph_agent.ipynb": """
assert session1_documents == ["turn-1"]
assert "bees" in second["recalled"][0]  # session 2 recalls what session 1 was told
assert sorted(session2_documents) == ["turn-1", "turn-2"]
""",
}


def test_every_notebook_is_checked():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert len(json.dumps(cell.outputs)) <= MAX_OUTPUT_BYTES, f"{name}: strip outputs"


@pytest.mark.slow  # every notebook runs the real SmolLM2
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook_runs_and_shows_what_it_says(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(CHECKS[name]))
    client = NotebookClient(
        notebook,
        timeout=1800,  # per cell; generous for a loaded CI machine, never a timing check
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
