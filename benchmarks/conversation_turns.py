"""Cost per turn of a long scripted conversation from ICAE memory: time and decoder memory at
turns 1, 100 and 1000, with the prompt cache (each turn reads only what it adds) against
re-reading the whole conversation each turn (both under LM-Infinite, the same memory block).

The user turns are scripted; the assistant turns are what the model generates (greedy,
``--answer-tokens`` at most), so the cached session's tokens are exactly the conversation's.
One throw-away turn warms the process up first, so turn 1 is a real first turn (it reads the
memory block) rather than the process's first forward. Single turns are noisy on a shared
machine, so medians of ten-turn blocks are reported beside them, and at the end a first turn
(a fresh conversation) and the long conversation's next turn are timed alternately,
``--paired`` times each, so that their ratio sees the same load; the resident set size at each
measured turn shows whether the process stays bounded as the conversation grows.

    .venv/bin/python benchmarks/conversation_turns.py --turns 1000 --save
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from icae_common import emit, play_text

from icmem.icae import ICAE
from icmem.icae.conversation import DecoderSession, PromptCache
from icmem.icae.decoder import Sampling

TOPICS = ["the king", "the ghost", "Ophelia", "the castle", "the players", "the sea", "Denmark"]


def user_turn(turn: int) -> str:
    topic = TOPICS[turn % len(TOPICS)]
    return f"Turn {turn}: tell me one more thing about {topic}, briefly, in plain words."


def cache_bytes(session: DecoderSession) -> int:
    """Bytes of keys and values the session's cache holds (the ring's allocated size)."""
    total = 0
    for layer in session.cache.layers:
        for tensor in (layer.keys, layer.values, layer.global_keys, layer.global_values):
            total += tensor.numel() * tensor.element_size()
    return total


def rss_mib() -> int:
    """The process's resident set size now (not its peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return round(pages * resource.getpagesize() / 2**20)


def block_median(times: list[float], last: int) -> float:
    """Median seconds of the ten turns ending at turn ``last`` (1-based)."""
    return round(statistics.median(times[max(0, last - 10) : last]), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--measure", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--spans", type=int, default=2, help="memory: spans of Hamlet")
    parser.add_argument("--window", type=int, default=None, help="LM-Infinite window")
    parser.add_argument("--paired", type=int, default=3, help="alternate first/next turns")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    icae = ICAE.from_pretrained()
    ids = icae.tokenize(play_text())[: args.spans * icae.config.span_tokens]
    memory = icae.compress([ids])
    greedy = Sampling()
    system = {"role": "system", "content": "You answer questions about the play in memory."}
    warm_up = [system, {"role": "user", "content": user_turn(0)}]
    list(PromptCache(max_sessions=0).generate(icae, memory, warm_up, args.answer_tokens, greedy))
    cache = PromptCache(max_sessions=1, window=args.window)
    conversation: list[dict[str, str]] = [system]
    rows, times, started = [], [], time.perf_counter()
    for turn in range(1, args.turns + 1):
        conversation.append({"role": "user", "content": user_turn(turn)})
        before = dict(cache.stats)
        start = time.perf_counter()
        answer = list(cache.generate(icae, memory, conversation, args.answer_tokens, greedy))
        cached_s = time.perf_counter() - start
        times.append(cached_s)
        conversation.append({"role": "assistant", "content": icae.tokenizer.decode(answer)})
        if turn in args.measure:
            (session,) = cache._sessions.values()
            # template_s: laying out and tokenizing the whole conversation, what each turn would
            # cost without the prompt cache's incremental tokenizer
            start = time.perf_counter()
            tokens = len(icae.prompt_ids(conversation))
            row = {
                "turn": turn,
                "conversation_tokens": tokens,
                "template_s": round(time.perf_counter() - start, 4),
                "cached_s": round(cached_s, 3),
                "cached_median_10_s": block_median(times, turn),
                "cached_tokens_read": cache.stats["tokens_read"] - before["tokens_read"],
                "cached_reused": cache.stats["reused"] > before["reused"],
                "cache_mib": round(cache_bytes(session) / 2**20, 2),
            }
            # The baseline: a fresh session reads the whole conversation, then answers.
            fresh = DecoderSession(icae, memory, session.key[1], args.window)
            turns = icae.prompt_ids(conversation[:-1])[len(session.key[1]) :]
            start = time.perf_counter()
            again = list(fresh.generate(turns, args.answer_tokens, greedy))
            row["reread_s"] = round(time.perf_counter() - start, 3)
            row["reread_tokens_read"] = len(turns)
            row["reread_cache_mib"] = round(cache_bytes(fresh) / 2**20, 2)
            row["same_answer"] = again == answer
            row["rss_mib"] = rss_mib()
            row["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            rows.append(row)
            print(row, flush=True)
        elif turn % 50 == 0:
            print(f"turn {turn}: {time.perf_counter() - started:.0f} s", flush=True)
    fresh_s, next_s = [], []
    for _ in range(args.paired):
        start = time.perf_counter()
        opening = [system, {"role": "user", "content": user_turn(1)}]
        list(
            PromptCache(max_sessions=0).generate(icae, memory, opening, args.answer_tokens, greedy)
        )
        fresh_s.append(time.perf_counter() - start)
        turn += 1
        conversation.append({"role": "user", "content": user_turn(turn)})
        start = time.perf_counter()
        answer = list(cache.generate(icae, memory, conversation, args.answer_tokens, greedy))
        next_s.append(time.perf_counter() - start)
        conversation.append({"role": "assistant", "content": icae.tokenizer.decode(answer)})
    first = rows[0]
    result = {
        "benchmark": "conversation_turns",
        "model": icae.config.base_model,
        "window": args.window or icae.max_positions,
        "memory_slots": sum(m.num_slots for m in memory),
        "answer_tokens": args.answer_tokens,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "turns": rows,
        "cached_last_over_first": round(rows[-1]["cached_s"] / first["cached_s"], 2),
        "cached_last_over_second": round(rows[-1]["cached_s"] / times[1], 2)
        if args.turns > 1
        else None,
        "median_last_10_over_first_10": round(
            block_median(times, len(times)) / block_median(times, min(10, len(times))), 2
        ),
        "cache_mib_first_last": [first["cache_mib"], rows[-1]["cache_mib"]],
        "paired": {
            "first_turn_s": [round(t, 3) for t in fresh_s],
            "next_turn_s": [round(t, 3) for t in next_s],
            "next_turn_after": args.turns,
            "next_over_first_median": round(
                statistics.median(next_s) / statistics.median(fresh_s), 2
            ),
        }
        if args.paired
        else None,
        "reread_last_over_cached_last": round(rows[-1]["reread_s"] / rows[-1]["cached_s"], 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    emit("conversation_turns", result, args.save)


if __name__ == "__main__":
    main()
