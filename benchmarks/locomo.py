"""LoCoMo (Maharana et al., ACL 2024): long-term conversational memory, measured the way an agent
would meet it. Each conversation's sessions are written into a per-conversation namespace of an
icmem store, and every non-adversarial question is answered three ways by the same model:

* ``slots``: recall k memories, decode from their ICAE memory slots (``MemoryPipeline.reply``);
* ``text``: recall the same way, the model reads the memories' stored text instead;
* ``full``: the whole conversation read through LM-Infinite (no store at all), the
  "full-context" baseline of the memory papers.

Scores are LoCoMo's token F1 per question category (the paper's metric; see ``locomo_f1`` for
what differs from its evaluation script), with seconds per answer and bytes of memory per
conversation. The published figures beside them are LLM-judge (J) scores of much larger models:
not the same metric, shown for scale only. Nothing here trains on LoCoMo.

The data. ``data/locomo10.json`` of https://github.com/snap-research/locomo (licence CC BY-NC 4.0:
attribution, non-commercial use). It is not part of icmem: download it and pass its path::

    curl -LO https://raw.githubusercontent.com/snap-research/locomo/main/data/locomo10.json

The file's sha256 is checked (``LOCOMO_SHA256``) and recorded in the JSON.

Compute. SmolLM2 on two CPU cores compresses some tens of tokens per second and a conversation
is 16-26k tokens, so a run can be limited to a few conversations and a seeded sample of questions
per category. Ingested stores and finished answers are kept in ``--work-dir``: a run that stops
resumes where it was, and a larger run reuses what a smaller one did. ::

    OMP_NUM_THREADS=2 python benchmarks/locomo.py --data locomo10.json \\
        --conversations 1 --per-category 5 --threads 2 --save
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmem.evals.answers import token_f1

if TYPE_CHECKING:
    from icmem.icae.model import ICAE
    from icmem.pipeline import MemoryPipeline, TextDocument

LOCOMO_URL = "https://github.com/snap-research/locomo/blob/main/data/locomo10.json"
LOCOMO_SHA256 = "79fa87e90f04081343b8c8debecb80a9a6842b76a7aa537dc9fdf651ea698ff4"
LOCOMO_LICENCE = "CC BY-NC 4.0 (snap-research/locomo LICENSE.txt)"
RESULTS = Path(__file__).resolve().parent / "results"

# Category names as LoCoMo's own evaluation script (task_eval/evaluation.py) treats them: 1 is
# scored by sub-answers (multi-hop), 3 by the first of ';'-separated answers (open-domain).
# Some later papers swap the names of 1 and 4; the ids are what the data says.
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
ADVERSARIAL = 5
MODES = ("slots", "text", "full")

# LoCoMo's prompts (task_eval/hf_llm_utils.py), so that answers are asked for as the paper did.
CONVERSATION_START = (
    "Below is a conversation between two people: {} and {}. The conversation takes place over "
    "multiple days and the date of each conversation is written at the beginning of the "
    "conversation.\n\n"
)
QA_PROMPT = (
    "Based on the above conversations, write a short answer for the following question in a few "
    "words. Do not write complete and lengthy sentences. Answer with exact words from the "
    "conversations whenever possible.\n\nQuestion: {}"
)
TEMPORAL_HINT = " Use DATE of CONVERSATION to answer with an approximate date."

# Mem0 paper (Chhikara et al., arXiv 2504.19413), LoCoMo overall, LLM-as-a-judge J score with
# GPT-4o-mini as judge and answering model. J is not token F1: shown for scale, not comparison.
PUBLISHED = [
    {"system": "full context", "j_score": 72.9},
    {"system": "Mem0", "j_score": 66.9},
    {"system": "Zep", "j_score": 66.0},
    {"system": "LangMem", "j_score": 58.1},
    {"system": "OpenAI memory", "j_score": 52.9},
]
PUBLISHED_SETTING = {
    "source": "Mem0 paper, arXiv 2504.19413 (overall over categories 1-4)",
    "metric": "LLM-as-a-judge J score (GPT-4o-mini judge), percent; NOT token F1",
    "answer_model": "GPT-4o-mini",
    "answer_model_size": "not disclosed by OpenAI (a large proprietary model)",
}


class LocomoDataError(ValueError):
    """The file given as LoCoMo's data is not it (or not in its format); the message says how
    to get the right one."""


@dataclass(frozen=True)
class Turn:
    speaker: str
    dia_id: str
    text: str

    def line(self) -> str:
        """The turn as one line of the conversation (a shared photo as its caption, as LoCoMo's
        own prompts do: the images are not released)."""
        return f"{self.speaker}: {self.text}"


@dataclass(frozen=True)
class Session:
    number: int
    date: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Question:
    sample_id: str
    index: int  # position in the sample's ``qa`` list: a stable id across runs and subsets
    question: str
    answer: str
    category: int
    evidence: tuple[str, ...]


@dataclass(frozen=True)
class Conversation:
    sample_id: str
    speakers: tuple[str, str]
    sessions: tuple[Session, ...]
    questions: tuple[Question, ...]  # adversarial ones left out
    adversarial: int  # how many adversarial questions were left out


@dataclass(frozen=True)
class LocomoData:
    conversations: tuple[Conversation, ...]
    sha256: str


def load_locomo(path: str | Path, *, expected_sha256: str | None = LOCOMO_SHA256) -> LocomoData:
    """Read ``locomo10.json`` (or a file in its format when ``expected_sha256`` is None)."""
    path = Path(path)
    if not path.is_file():
        raise LocomoDataError(f"{path} does not exist; download LoCoMo's data from {LOCOMO_URL}")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise LocomoDataError(
            f"{path} is not LoCoMo's data/locomo10.json: its sha256 is {digest}, expected "
            f"{expected_sha256}; download the file from {LOCOMO_URL}"
        )
    try:
        samples = json.loads(raw)
        conversations = tuple(_conversation(sample) for sample in samples)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise LocomoDataError(
            f"{path} is not in LoCoMo's format (a list of samples with 'sample_id', "
            f"'conversation' and 'qa'): {type(error).__name__}: {error}; use data/locomo10.json "
            f"from {LOCOMO_URL}"
        ) from error
    if not conversations:
        raise LocomoDataError(f"{path} holds no conversations; use {LOCOMO_URL}")
    return LocomoData(conversations, digest)


def _conversation(sample: dict[str, Any]) -> Conversation:
    sample_id = str(sample["sample_id"])
    body = sample["conversation"]
    numbers = sorted(
        int(key.split("_")[1])
        for key, value in body.items()
        if key.startswith("session_") and key.count("_") == 1 and isinstance(value, list)
    )
    if not numbers:
        raise KeyError(f"{sample_id} has no session_<n> lists")
    sessions = tuple(
        Session(
            n,
            str(body[f"session_{n}_date_time"]),
            tuple(_turn(t) for t in body[f"session_{n}"]),
        )
        for n in numbers
    )
    questions, adversarial = [], 0
    for index, qa in enumerate(sample["qa"]):
        category = int(qa["category"])
        if category not in CATEGORIES:
            raise ValueError(f"{sample_id} question {index} has unknown category {category}")
        if category == ADVERSARIAL:
            adversarial += 1
            continue
        questions.append(
            Question(
                sample_id,
                index,
                str(qa["question"]),
                str(qa["answer"]),  # some answers are numbers (years)
                category,
                tuple(qa.get("evidence", ())),
            )
        )
    speakers = (str(body["speaker_a"]), str(body["speaker_b"]))
    return Conversation(sample_id, speakers, sessions, tuple(questions), adversarial)


def _turn(raw: dict[str, Any]) -> Turn:
    text = str(raw["text"])
    if raw.get("blip_caption"):
        text += f" [shares a photo: {raw['blip_caption']}]"
    return Turn(str(raw["speaker"]), str(raw["dia_id"]), text)


def choose_conversations(
    data: LocomoData, conversations: int | Sequence[str] | None
) -> tuple[Conversation, ...]:
    """The first N conversations, those with the given sample ids (in the file's order), or
    all of them (None)."""
    if conversations is None or isinstance(conversations, int):
        return data.conversations[:conversations]
    known = {c.sample_id for c in data.conversations}
    unknown = sorted(set(conversations) - known)
    if unknown:
        raise LocomoDataError(f"no conversation {unknown} in the data; it holds {sorted(known)}")
    return tuple(c for c in data.conversations if c.sample_id in set(conversations))


def select_questions(
    conversation: Conversation, per_category: int | None, seed: int
) -> list[Question]:
    """The questions to answer: all, or ``per_category`` of each category, drawn with a seed
    made of ``seed``, the conversation and the category (the same draw whatever else is run)."""
    if per_category is None:
        return list(conversation.questions)
    chosen = []
    for category in sorted(CATEGORIES):
        pool = [q for q in conversation.questions if q.category == category]
        rng = random.Random(f"{seed}:{conversation.sample_id}:{category}")
        picked = rng.sample(pool, min(per_category, len(pool)))
        chosen += sorted(picked, key=lambda q: q.index)
    return chosen


# ------------------------------------------------------------------------------- memories


def session_header(session: Session) -> str:
    return f"Session {session.number}, {session.date}:"


def conversation_memories(
    conversation: Conversation,
    count_tokens: Callable[[str], int],
    max_tokens: int,
    turns_per_memory: int | None = None,
) -> list[list[TextDocument]]:
    """Per session, the memories an agent would write: consecutive turns packed while they fit
    in ``max_tokens`` (one ICAE span, so each memory is one block of slots) or
    ``turns_per_memory`` turns, each memory starting with its session's date so that a recalled
    memory says when it was said. Metadata keeps the session, date and dialogue ids."""
    from icmem.pipeline import TextDocument

    sessions = []
    for session in conversation.sessions:
        header = session_header(session)
        groups: list[list[Turn]] = []
        for turn in session.turns:
            group = groups[-1] if groups else None
            if (
                group is not None
                and (turns_per_memory is None or len(group) < turns_per_memory)
                and count_tokens(_memory_text(header, [*group, turn])) <= max_tokens
            ):
                group.append(turn)
            else:
                groups.append([turn])
        sessions.append(
            [
                TextDocument(
                    document_id=f"{conversation.sample_id}/session_{session.number}/{i}",
                    texts=(_memory_text(header, group),),
                    metadata={
                        "session": session.number,
                        "date": session.date,
                        "dia_ids": [t.dia_id for t in group],
                    },
                )
                for i, group in enumerate(groups)
            ]
        )
    return sessions


def _memory_text(header: str, turns: Sequence[Turn]) -> str:
    return "\n".join([header, *(t.line() for t in turns)])


def full_conversation_text(conversation: Conversation) -> str:
    """The whole conversation laid out as LoCoMo's full-context prompts lay it out."""
    parts = [CONVERSATION_START.format(*conversation.speakers)]
    for session in conversation.sessions:
        lines = "\n".join(t.line() for t in session.turns)
        parts.append(f"DATE: {session.date}\nCONVERSATION:\n{lines}\n\n")
    return "".join(parts).rstrip()


def question_prompt(question: Question) -> str:
    """LoCoMo's QA prompt (temporal questions ask for a date, as the paper's prompts do)."""
    asked = question.question + (TEMPORAL_HINT if question.category == 2 else "")
    return QA_PROMPT.format(asked)


def locomo_f1(prediction: str, question: Question) -> float:
    """Token F1 with LoCoMo's per-category handling: multi-hop answers are split at commas and
    each gold part scored against its best predicted part (then averaged); open-domain answers
    keep their first ';'-separated alternative. The token F1 is icmem's SQuAD F1
    (``icmem.evals.answers.token_f1``); LoCoMo's script also Porter-stems words and drops
    'a/an/the/and', so its numbers run slightly higher on the same answers."""
    gold = question.answer
    if question.category == 3:
        gold = gold.split(";")[0].strip()
    if question.category != 1:
        return token_f1(prediction, gold)
    predicted = [p.strip() for p in prediction.split(",")]
    parts = [g.strip() for g in gold.split(",")]
    return statistics.mean(max(token_f1(p, g) for p in predicted) for g in parts)


# ------------------------------------------------------------------------------- answering


class ResultCache:
    """Finished work (ingestion timings, answers) as JSON lines keyed by what produced them:
    a run that stops loses at most the answer in progress."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[record["key"]] = record

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def put(self, key: str, record: dict[str, Any]) -> dict[str, Any]:
        record = {"key": key, **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.records[key] = record
        return record


@dataclass(frozen=True)
class LocomoSettings:
    """What decides the answers (and so the cache keys): the same settings give the same rows."""

    checkpoint: str = "shipped"
    k: int = 4
    max_new_tokens: int = 32
    turns_per_memory: int | None = None
    modes: tuple[str, ...] = MODES

    def __post_init__(self) -> None:
        unknown = set(self.modes) - set(MODES)
        if unknown or not self.modes:
            raise ValueError(f"modes {sorted(unknown)} are not LoCoMo modes; use some of {MODES}")

    def key(self, *parts: object) -> str:
        unit = "packed" if self.turns_per_memory is None else f"turns{self.turns_per_memory}"
        return "|".join(str(p) for p in (self.checkpoint, unit, *parts))


def namespace_of(sample_id: str) -> tuple[str, str]:
    """Each conversation's memories live in their own namespace, as one user's would."""
    return ("locomo", sample_id)


def ingest_conversation(
    pipeline: MemoryPipeline,
    conversation: Conversation,
    settings: LocomoSettings,
    cache: ResultCache,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Write the conversation's memories session by session, each session's time cached as it
    is stored: an interrupted ingestion resumes at the next session, and the total still counts
    every session once."""
    key = settings.key("ingest", conversation.sample_id)
    done = cache.get(key)
    if done is not None:
        return done
    sessions = conversation_memories(
        conversation,
        lambda text: len(pipeline.token_ids(text)),
        pipeline.icae.config.span_tokens,
        settings.turns_per_memory,
    )
    namespace = namespace_of(conversation.sample_id)
    seconds = 0.0
    for n, documents in enumerate(sessions, 1):
        session_key = settings.key("ingest", conversation.sample_id, n)
        stored = cache.get(session_key)
        if stored is None:
            started = time.perf_counter()
            pipeline.write_documents(documents, namespace=namespace)
            stored = cache.put(session_key, {"seconds": time.perf_counter() - started})
            log(
                f"[{conversation.sample_id}] ingested session {n}/{len(sessions)} "
                f"({stored['seconds']:.1f} s)"
            )
        seconds += stored["seconds"]
    texts = [text for documents in sessions for d in documents for text in d.texts]
    return cache.put(
        key,
        {
            "memories": len(texts),
            "tokens": sum(len(pipeline.token_ids(t)) for t in texts),
            "text_bytes": sum(len(t.encode("utf-8")) for t in texts),
            "seconds": seconds,
        },
    )


def answer_from_memory(
    pipeline: MemoryPipeline, question: Question, form: str, settings: LocomoSettings
) -> tuple[str, list[str]]:
    """The answer read from recalled memories (their slots or their text), recalled by the bare
    question, and the dialogue ids the recalled memories hold."""
    from icmem.pipeline import MemoryForm

    memory: MemoryForm = "slots" if form == "slots" else "text"
    reply = pipeline.reply(
        question_prompt(question),
        query=question.question,
        namespace=namespace_of(question.sample_id),
        k=settings.k,
        memory=memory,
        max_new_tokens=settings.max_new_tokens,
    )
    text = "".join(reply.pieces)
    recalled = [d for hit in reply.hits for d in hit.metadata.get("dia_ids", ())]
    return text, recalled


class FullContextReader:
    """The whole conversation read once through LM-Infinite (``DecoderSession``, the bounded
    decoder state icmem's chat uses), then each question answered from a copy of that state:
    the conversation is prefilled once per conversation, not once per question.

    ``PromptCache`` alone would not do: a request that does not extend a kept session is rebuilt
    from the conversation's last window only, which is not reading the whole conversation."""

    def __init__(self, icae: ICAE, conversation: Conversation) -> None:
        from icmem.icae.conversation import DecoderSession
        from icmem.icae.decoder import GREEDY

        self.icae = icae
        self.text = full_conversation_text(conversation)
        prefix, _ = self._split(QA_PROMPT.format(""))
        self.prefix_ids: list[int] = icae.tokenize(prefix)
        started = time.perf_counter()
        self.session = DecoderSession(icae, [], [])
        # Reading happens before the first token is picked; stopping there leaves exactly the
        # prefix in the cache (resuming would feed the picked token too).
        for _ in self.session.generate(self.prefix_ids, 1, GREEDY):
            break
        self.prefill_seconds = time.perf_counter() - started

    def _split(self, prompt: str) -> tuple[str, str]:
        """The chat-laid-out prompt cut after the conversation (the part shared by every
        question) and the rest (the question and the assistant header)."""
        laid_out = self.icae.chat_text([{"role": "user", "content": f"{self.text}\n\n{prompt}"}])
        cut = laid_out.index(self.text) + len(self.text)
        return laid_out[:cut], laid_out[cut:]

    def question_ids(self, question: Question) -> list[int]:
        """The decoder's whole input for a question: the conversation's tokens (read once) and
        the question's."""
        _, rest = self._split(question_prompt(question))
        return self.prefix_ids + self.icae.tokenize(rest)

    def cache_bytes(self) -> int:
        """Bytes of the LM-Infinite cache holding the conversation (bounded by the window)."""
        total = 0
        for layer in self.session.cache.layers:
            for name in _CACHE_TENSORS:
                tensor = getattr(layer, name, None)
                if tensor is not None:
                    total += tensor.nelement() * tensor.element_size()
        return total

    def answer(self, question: Question, max_new_tokens: int) -> str:
        from icmem.icae.conversation import DecoderSession
        from icmem.icae.decoder import GREEDY

        session = DecoderSession(self.icae, [], [])
        session.cache = _copy_cache(self.session.cache)
        session.read = list(self.prefix_ids)
        tokens = session.generate(self.question_ids(question), max_new_tokens, GREEDY)
        return "".join(self.icae.decoder.text(tokens))


_CACHE_TENSORS = ("keys", "values", "global_keys", "global_values")


def _copy_cache(cache: Any) -> Any:
    """A copy of an LM-Infinite cache that decoding can extend without touching the original:
    its layers' tensors cloned (the ring is written in place), the model it is bound to
    shared. The parity test in tests/test_locomo_bench.py catches a cache with more state."""
    copied = copy.copy(cache)
    copied.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in copied.layers:
        for name in _CACHE_TENSORS:
            tensor = getattr(layer, name, None)
            if tensor is not None:
                setattr(layer, name, tensor.clone())
    return copied


@dataclass
class ConversationReport:
    sample_id: str
    turns: int
    sessions: int
    questions: int
    adversarial_left_out: int
    ingest: dict[str, Any] = field(default_factory=dict)
    memory_bytes: dict[str, int] = field(default_factory=dict)
    full_prefill_seconds: float | None = None


def run_conversation(
    pipeline: MemoryPipeline,
    conversation: Conversation,
    questions: Sequence[Question],
    settings: LocomoSettings,
    cache: ResultCache,
    log: Callable[[str], None],
) -> tuple[ConversationReport, list[dict[str, Any]]]:
    """Ingest one conversation (if a memory mode is asked) and answer its questions in every
    mode, reusing cached answers; returns its report and one row per answer."""
    report = ConversationReport(
        conversation.sample_id,
        sum(len(s.turns) for s in conversation.sessions),
        len(conversation.sessions),
        len(questions),
        conversation.adversarial,
    )
    text_bytes = len(full_conversation_text(conversation).encode("utf-8"))
    report.memory_bytes["conversation_text"] = text_bytes
    rows = []
    memory_modes = [m for m in settings.modes if m != "full"]
    if memory_modes:
        report.ingest = ingest_conversation(pipeline, conversation, settings, cache, log)
        stats = pipeline.stats(namespace_of(conversation.sample_id))
        report.memory_bytes["slots"] = stats.slot_bytes
        report.memory_bytes["embeddings"] = stats.embedding_bytes
        report.memory_bytes["memory_text"] = report.ingest["text_bytes"]
    for mode in settings.modes:
        reader: FullContextReader | None = None
        for n, question in enumerate(questions, 1):
            key = settings.key(mode, settings.k, settings.max_new_tokens, *_qid(question))
            row = cache.get(key)
            if row is None:
                started = time.perf_counter()
                recalled: list[str] | None = None
                if mode == "full":
                    if reader is None:
                        log(f"[{conversation.sample_id}] reading the whole conversation")
                        reader = FullContextReader(pipeline.icae, conversation)
                        cache.put(
                            settings.key("full-prefill", conversation.sample_id),
                            {
                                "seconds": reader.prefill_seconds,
                                "tokens": len(reader.prefix_ids),
                                "cache_bytes": reader.cache_bytes(),
                            },
                        )
                        started = time.perf_counter()
                    answer = reader.answer(question, settings.max_new_tokens)
                else:
                    answer, recalled = answer_from_memory(pipeline, question, mode, settings)
                row = cache.put(
                    key,
                    {
                        "sample_id": question.sample_id,
                        "index": question.index,
                        "category": question.category,
                        "mode": mode,
                        "question": question.question,
                        "gold": question.answer,
                        "answer": answer.strip(),
                        "seconds": time.perf_counter() - started,
                        "evidence_recalled": _evidence_recalled(question, recalled),
                    },
                )
                log(
                    f"[{conversation.sample_id}] {mode} {n}/{len(questions)} "
                    f"({row['seconds']:.1f} s): {row['answer'][:60]!r}"
                )
            rows.append({**row, "f1": locomo_f1(row["answer"], question)})
        if mode == "full":
            prefill = cache.get(settings.key("full-prefill", conversation.sample_id))
            if prefill is not None:
                report.full_prefill_seconds = prefill["seconds"]
                report.memory_bytes["lm_infinite_cache"] = prefill["cache_bytes"]
                report.memory_bytes["full_prompt_tokens"] = prefill["tokens"]
    return report, rows


def _qid(question: Question) -> tuple[str, int]:
    return question.sample_id, question.index


def _evidence_recalled(question: Question, recalled: Sequence[str] | None) -> float | None:
    """Share of the question's evidence turns among the recalled memories (None: no recall)."""
    if recalled is None or not question.evidence:
        return None
    held = set(recalled)
    return sum(e in held for e in question.evidence) / len(question.evidence)


def summarise(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mode: token F1 and answer count per category and overall (over all answers, as the
    paper's overall), seconds per answer, share of evidence turns recalled."""
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_mode.setdefault(row["mode"], []).append(row)
    summary = {}
    for mode, group in by_mode.items():
        categories = {}
        for category, name in CATEGORIES.items():
            scored = [r["f1"] for r in group if r["category"] == category]
            if scored:
                categories[name] = {"answers": len(scored), "f1": round(statistics.mean(scored), 4)}
        recalled = [r["evidence_recalled"] for r in group if r["evidence_recalled"] is not None]
        summary[mode] = {
            "answers": len(group),
            "f1": round(statistics.mean(r["f1"] for r in group), 4),
            "f1_by_category": categories,
            "seconds_per_answer": round(statistics.mean(r["seconds"] for r in group), 3),
            "empty_rate": round(statistics.mean(not r["answer"] for r in group), 4),
            "evidence_recalled": round(statistics.mean(recalled), 4) if recalled else None,
        }
    return summary


_DATA_FIELDS = ("key", "question", "gold")


def run_locomo(
    pipeline: MemoryPipeline,
    data: LocomoData,
    settings: LocomoSettings,
    work_dir: Path,
    *,
    conversations: int | Sequence[str] | None = None,
    per_category: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """The benchmark over some ``conversations`` (the first N, these sample ids, or all) and
    ``per_category`` seeded questions of each category (all by default): the result JSON."""
    cache = ResultCache(work_dir / "results.jsonl")
    chosen = choose_conversations(data, conversations)
    reports, rows = [], []
    started = time.perf_counter()
    for conversation in chosen:
        questions = select_questions(conversation, per_category, seed)
        report, answered = run_conversation(pipeline, conversation, questions, settings, cache, log)
        reports.append(report)
        rows += answered
    total_questions = sum(len(c.questions) for c in data.conversations)
    summary = summarise(rows)
    prefills = [r.full_prefill_seconds for r in reports if r.full_prefill_seconds is not None]
    if "full" in summary and prefills:
        # Once per conversation, not in seconds_per_answer: the reading every answer shares.
        summary["full"]["prefill_seconds_per_conversation"] = round(statistics.mean(prefills), 3)
    return {
        "benchmark": "locomo",
        "data": {
            "file": "locomo10.json",
            "sha256": data.sha256,
            "source": LOCOMO_URL,
            "licence": LOCOMO_LICENCE,
            "conversations": len(data.conversations),
            "questions_non_adversarial": total_questions,
            "adversarial_left_out": sum(c.adversarial for c in data.conversations),
        },
        "subset": {
            "conversations": [c.sample_id for c in chosen],
            "per_category": per_category,
            "seed": seed,
            "questions": len(rows) // max(1, len(settings.modes)),
            "of_questions_non_adversarial": total_questions,
            "complete": len(chosen) == len(data.conversations) and per_category is None,
        },
        "settings": asdict(settings),
        "metric": (
            "token F1 per LoCoMo category (icmem.evals.answers.token_f1 with LoCoMo's multi-hop "
            "and open-domain answer handling; no stemming); adversarial questions (category 5) "
            "are not asked"
        ),
        "summary": summary,
        "conversations": [asdict(r) for r in reports],
        "published": {"setting": PUBLISHED_SETTING, "scores": PUBLISHED},
        "total_s": round(time.perf_counter() - started, 1),
        # LoCoMo's questions and gold answers stay in the data file (CC BY-NC): rows name them
        # by sample id and index.
        "rows": [{k: v for k, v in r.items() if k not in _DATA_FIELDS} for r in rows],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Token F1 per category and mode beside the published J scores (different metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    asked = {name for stats in summary.values() for name in stats["f1_by_category"]}
    names = [n for n in CATEGORIES.values() if n in asked] + ["overall"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(summary))
    for n, (mode, stats) in enumerate(summary.items()):
        values = [stats["f1_by_category"].get(c, {}).get("f1", 0.0) for c in names[:-1]]
        values.append(stats["f1"])
        xs = [i + n * width for i in range(len(names))]
        left.bar(xs, [100 * v for v in values], width, label=f"{mode} ({stats['answers']} q)")
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    left.set_ylabel("token F1 (%)")
    subset = result["subset"]
    left.set_title(
        f"icmem {result['settings']['checkpoint']} (SmolLM2-135M), "
        f"{len(subset['conversations'])} conv., {subset['questions']} questions"
    )
    left.legend()
    scores = result["published"]["scores"]
    right.barh([s["system"] for s in scores], [s["j_score"] for s in scores], color="grey")
    right.invert_yaxis()
    right.set_xlim(0, 100)
    right.set_xlabel("LLM-judge J (%), GPT-4o-mini: NOT token F1")
    right.set_title("Published (Mem0 paper, arXiv 2504.19413)")
    fig.suptitle("LoCoMo: token F1 of a 135M model vs published judge scores of GPT-4o-mini")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help=f"path of locomo10.json ({LOCOMO_URL})")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache/icmem/locomo"))
    parser.add_argument("--checkpoint", default=None, help="ICAE directory (default: shipped)")
    parser.add_argument("--conversations", type=int, default=None, help="first N (default all)")
    parser.add_argument("--sample-ids", nargs="+", default=None, help="these conversations")
    parser.add_argument("--per-category", type=int, default=None, help="seeded sample size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--turns-per-memory", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/locomo.*")
    args = parser.parse_args()

    import torch

    from icmem.icae.model import ICAE
    from icmem.pipeline import MemoryPipeline

    torch.set_num_threads(args.threads)
    try:
        data = load_locomo(args.data)
        choose_conversations(data, args.sample_ids)
    except LocomoDataError as error:
        sys.exit(str(error))
    settings = LocomoSettings(
        checkpoint=args.checkpoint or "shipped",
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        turns_per_memory=args.turns_per_memory,
        modes=tuple(args.modes),
    )
    work_dir = Path(args.work_dir) / settings.key().replace("/", "_").replace("|", "-")
    load_at_start = os.getloadavg()
    icae = ICAE.from_pretrained(args.checkpoint, dtype="auto")
    with MemoryPipeline.open(work_dir / "store", icae=icae, create=True) as pipeline:
        result = run_locomo(
            pipeline,
            data,
            settings,
            work_dir,
            conversations=args.sample_ids or args.conversations,
            per_category=args.per_category,
            seed=args.seed,
        )
    result["command"] = " ".join(["python", *sys.argv])
    result["machine"] = platform.processor() or platform.machine()
    result["threads"] = args.threads
    # The machine may be shared: its load says how far the seconds are from an idle machine's.
    result["load_average_1_5_15"] = {"start": load_at_start, "end": os.getloadavg()}
    result["niceness"] = os.nice(0)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "locomo.json").write_text(text + "\n", encoding="utf-8")
        plot(result, RESULTS / "locomo.png")


if __name__ == "__main__":
    main()
