"""How often answering from memory slots agrees with answering from the same recalled spans'
raw text: the same questions, the same recall, `memory="slots"` against `memory="text"`.

Agreement is reported two ways: exact match of the answers, and token F1 between them (the
SQuAD measure, averaged). While the shipped ICAE's `[FT]` is untrained, slot answers are often
empty, and the numbers say so.

    .venv/bin/python benchmarks/slots_text_agreement.py --questions 12 --save
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch
from icae_common import emit, play_text

from icmem.evals.answers import token_f1
from icmem.pipeline import MemoryPipeline

QUESTIONS = [
    "Who is the king of Denmark?",
    "Who is Hamlet's mother?",
    "What did the ghost tell Hamlet?",
    "Who is Ophelia's father?",
    "Where does the play take place?",
    "Who is Horatio?",
    "What do the guards see at night?",
    "Who is Laertes?",
    "What does Polonius advise his son?",
    "Why is Hamlet sad?",
    "Who are Rosencrantz and Guildenstern?",
    "What happens to Ophelia?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--spans", type=int, default=16, help="spans of Hamlet to ingest")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    rows = []
    with (
        tempfile.TemporaryDirectory() as directory,
        MemoryPipeline.open(directory, create=True) as memory,
    ):
        words = play_text().split()
        text = " ".join(words[: args.spans * 350])  # about 512 tokens per 350 words
        memory.ingest(text, document_id="hamlet")
        for question in QUESTIONS[: args.questions]:
            answers = {}
            for form in ("slots", "text"):
                answers[form] = memory.ask(
                    question, k=args.k, memory=form, max_new_tokens=args.max_new_tokens
                ).text.strip()
            rows.append(
                {
                    "question": question,
                    **answers,
                    "exact": answers["slots"] == answers["text"],
                    "f1": round(token_f1(answers["slots"], answers["text"]), 3),
                }
            )
            print(rows[-1], flush=True)
    emit(
        "slots_text_agreement",
        {
            "benchmark": "slots_text_agreement",
            "questions": len(rows),
            "k": args.k,
            "exact_agreement": round(sum(r["exact"] for r in rows) / len(rows), 3),
            "mean_token_f1": round(statistics.mean(r["f1"] for r in rows), 3),
            "empty_slot_answers": sum(not r["slots"] for r in rows),
            "machine": platform.processor() or platform.machine(),
            "total_s": round(time.perf_counter() - started, 1),
            "rows": rows,
        },
        args.save,
    )


if __name__ == "__main__":
    main()
