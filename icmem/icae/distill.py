"""Distillation from the base model reading raw text: how the slot decoder learns to answer.

The teacher is the base model (adapters off) reading the recalled spans as text, laid out
exactly as ``memory="text"`` lays them out (``icmem.memory_text.with_context``). The student is
the decoder reading the same spans' memory slots, with the same conversation after them. The
loss is KL(teacher || student) on every answer token (``ICAE.training_loss`` with a
``TeacherTargets``), plus cross-entropy where the answer is known to be right.

With the encoder frozen, everything but the student's forward is a constant of the example:
the spans' slots and the teacher's distributions are computed once (``build_cache``) and a
training step runs the decoder on slots + prompt + answer only.

Records (what to ask) are drawn before the teacher runs, split by document like the corpus:

- ``qa``: one invented document, a question about it, its gold answer;
- ``multi``: the same with 1-3 distractor spans around it, in a random memory order;
- ``conversation``: a system prompt and an earlier exchange before the question;
- ``absent``: the question's document is not in memory; the teacher's answer is the target;
- ``corpus``: an instruction about a corpus span (summary, topic), the teacher's answer;
- ``continue``: continue a corpus span (task ``lm``); the real next tokens, and the teacher's
  distributions over them from reading the span as text.

Half the invented documents share their span with other invented documents, up to nearly a
full span: a 512-token chunk of a real file holds several topics, and the decoder must find a
fact among 128 slots, not only among the 30 of a short document.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmem.icae.data import (
    DISTILLATION_PROMPTS,
    TrainingDataError,
    decode_text,
    read_corpus,
    split_by_document,
    tokenize_documents,
)
from icmem.icae.invented import InventedDocument, invented_document
from icmem.memory_text import with_context

if TYPE_CHECKING:
    import torch

    from icmem.icae.model import ICAE, ICAEExample, Task, TeacherTargets

KINDS = ("qa", "multi", "conversation", "absent", "corpus", "continue")
DEFAULT_MIX = {
    "qa": 0.3,
    "multi": 0.2,
    "conversation": 0.15,
    "absent": 0.08,
    "corpus": 0.12,
    "continue": 0.15,
}
INVENTED_SEEDS = {"train": 0, "held_out": 1}
SYSTEM_PROMPTS = (
    "You are a helpful assistant. Answer briefly.",
    "You are a careful research assistant. Answer from the context.",
    "You are a friendly assistant who answers questions about documents.",
)
SMALL_TALK = (
    ("Hi there!", "Hello! How can I help you today?"),
    ("Can you help me with a few questions?", "Of course! What would you like to know?"),
    ("Thanks for your help earlier.", "You're welcome! What else can I do for you?"),
)
SHARED_SPAN_FRACTION = 0.5  # invented documents that share their span with others
FILLER_SEED_OFFSET = 500  # the invented stream other documents of a shared span come from
CACHE_SHARD = 64  # examples per cache file: a crash loses at most this much work
CACHE_INFO = "cache.json"


@dataclass(frozen=True)
class DistillRecord:
    """One example before the teacher has answered: memory spans (texts, in memory order), the
    conversation after them, and the gold answer (or the real continuation) where known."""

    kind: str
    spans: tuple[str, ...]
    messages: tuple[dict[str, str], ...] = ()
    gold: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TrainingDataError(f"kind={self.kind!r}; use one of {KINDS}")
        if not self.spans:
            raise TrainingDataError("a distillation record needs at least one memory span")
        if (self.kind == "continue") != (not self.messages):
            raise TrainingDataError(
                f"a {self.kind!r} record {'has' if self.messages else 'lacks'} messages; only "
                "'continue' records have none"
            )
        if self.kind == "continue" and not self.gold:
            raise TrainingDataError("a 'continue' record needs the real continuation as gold")


def build_records(
    corpus: str | Path,
    tokenizer: Any,
    count: int,
    *,
    side: str = "train",
    mix: dict[str, float] | None = None,
    held_out_fraction: float = 0.05,
    split_seed: int = 0,
    seed: int = 0,
    span_tokens: int = 512,
) -> list[DistillRecord]:
    """``count`` records for one side of the split (``"train"`` or ``"held_out"``): corpus
    documents of the other side and the other side's invented documents never appear."""
    if side not in INVENTED_SEEDS:
        raise TrainingDataError(f"side={side!r}; use 'train' or 'held_out'")
    mix = mix or DEFAULT_MIX
    unknown = set(mix) - set(KINDS)
    if unknown or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise TrainingDataError(f"mix={mix}; give non-negative weights for kinds of {KINDS}")
    split = split_by_document(read_corpus(corpus), held_out_fraction, split_seed)
    documents = tokenize_documents(split.train if side == "train" else split.held_out, tokenizer)
    documents = [d for d in documents if len(d) >= 200]
    if not documents:
        raise TrainingDataError(f"no {side} corpus document has 200 tokens")
    rng = random.Random(f"distill:{side}:{seed}")
    invented_seed = INVENTED_SEEDS[side] + 1000 * seed
    kinds = list(mix)
    records = []
    for index in range(count):
        kind = rng.choices(kinds, weights=[mix[k] for k in kinds])[0]
        records.append(_record(kind, rng, index, invented_seed, documents, tokenizer, span_tokens))
    return records


def _record(
    kind: str,
    rng: random.Random,
    index: int,
    invented_seed: int,
    documents: Sequence[Sequence[int]],
    tokenizer: Any,
    span_tokens: int,
) -> DistillRecord:
    def corpus_span(low: int, high: int, after: int = 0) -> tuple[str, str]:
        doc = rng.choice([d for d in documents if len(d) >= high + after] or documents)
        length = rng.randint(low, min(high, len(doc) - after))
        start = rng.randrange(len(doc) - length - after + 1)
        text = decode_text(tokenizer, doc[start : start + length])
        return text, decode_text(tokenizer, doc[start + length : start + length + after])

    def invented(offset: int) -> InventedDocument:
        return invented_document(index * 7 + offset, invented_seed)

    def passage(document: InventedDocument, slot: int) -> str:
        if rng.random() >= SHARED_SPAN_FRACTION:
            return document.text
        budget = rng.randint(span_tokens // 2, span_tokens - 16)
        parts = [document.text]
        for j in range(8):
            other = invented_document(index * 64 + slot * 8 + j, invented_seed + FILLER_SEED_OFFSET)
            if len(tokenizer.encode("\n\n".join([*parts, other.text]))) > budget:
                break
            parts.append(other.text)
        rng.shuffle(parts)
        return "\n\n".join(parts)

    if kind == "continue":
        span, following = corpus_span(96, 320, after=48)
        return DistillRecord(kind, (span,), (), following)
    if kind == "corpus":
        span, _ = corpus_span(96, 256)
        instruction = rng.choice(DISTILLATION_PROMPTS)
        return DistillRecord(kind, (span,), ({"role": "user", "content": instruction},))
    document = invented(0)
    asked = rng.choice(document.questions)
    question = {"role": "user", "content": asked.question}
    text = passage(document, 0)
    if kind == "qa":
        return DistillRecord(kind, (text,), (question,), asked.answer)
    distractors = [
        passage(invented(1 + i), 1 + i) if rng.random() < 0.6 else corpus_span(64, 192)[0]
        for i in range(rng.randint(1, 3))
    ]
    if kind == "absent":
        return DistillRecord(kind, tuple(distractors), (question,))
    if kind == "multi":
        spans = [text, *distractors]
        rng.shuffle(spans)
        return DistillRecord(kind, tuple(spans), (question,), asked.answer)
    # conversation: a system prompt, an earlier exchange, then the question
    if rng.random() < 0.5:
        earlier = rng.choice([q for q in document.questions if q != asked] or [asked])
        before = (earlier.question, f"{earlier.answer}.")
    else:
        before = rng.choice(SMALL_TALK)
    messages = (
        {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
        {"role": "user", "content": before[0]},
        {"role": "assistant", "content": before[1]},
        question,
    )
    spans = [text, *distractors[: rng.randint(0, 1)]]
    rng.shuffle(spans)
    return DistillRecord(kind, tuple(spans), messages, asked.answer)


def write_records(path: str | Path, records: Sequence[DistillRecord]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")


def read_records(path: str | Path) -> list[DistillRecord]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            data = json.loads(line)
            data["spans"] = tuple(data["spans"])
            data["messages"] = tuple(data["messages"])
            records.append(DistillRecord(**data))
    return records


# --------------------------------------------------------------------------- the teacher


def teacher_targets(
    icae: ICAE, prompt_ids: Sequence[int], target_ids: Sequence[int], top_k: int
) -> TeacherTargets:
    """The base model's top-k next-token log-probabilities at each target token and at the
    end-of-sequence token after them, reading ``prompt_ids`` then the target (teacher forcing).
    ``top_k`` at or above the vocabulary size keeps the whole distribution (in float32)."""
    import torch

    target = icae.with_eos(target_ids)
    ids = torch.tensor([list(prompt_ids) + target[:-1]], device=icae.device)
    with icae.base_model() as base:
        logits = base(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 :]
    return _top_k(torch.log_softmax(logits.float(), dim=-1), top_k)


@dataclass(frozen=True)
class TeacherAnswer:
    """The teacher's greedy answer (token ids, stop token excluded) and, when it stopped by
    itself, its distributions at every answer token and at the stop (read off the generation,
    so no second pass over the prompt is needed)."""

    token_ids: list[int]
    targets: TeacherTargets | None


def teacher_answers(
    icae: ICAE,
    records: Sequence[DistillRecord],
    max_answer_tokens: int,
    *,
    top_k: int = 64,
    batch_size: int = 16,
) -> list[TeacherAnswer]:
    """The teacher's greedy answers to question records, reading their spans as text.

    Batched (left-padded, longest first): on a CPU a decode step costs little more for eight
    sequences than for one, and answers are most of the teacher's time."""
    import torch

    from icmem.icae.batch_decode import decode_batch, pad_left

    prompts = [icae.format_chat(with_context(list(r.messages), r.spans)) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    pad = icae.tokenizer.pad_token_id
    pad = icae.tokenizer.eos_token_id if pad is None else pad
    answers: list[TeacherAnswer | None] = [None] * len(prompts)
    with icae.base_model() as base:
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            ids, mask = pad_left([prompts[i] for i in chosen], pad)
            decoded = decode_batch(
                base,
                ids.to(icae.device),
                attention_mask=mask.to(icae.device),
                max_new_tokens=max_answer_tokens,
                stop_ids=icae.stop_ids,
                pad_id=pad,
                keep_logits=True,
            )
            for i, answer in zip(chosen, decoded, strict=True):
                targets = None
                if answer.finish_reason == "stop":
                    logprobs = torch.log_softmax(torch.stack(answer.logits), dim=-1)
                    targets = _top_k(logprobs, top_k)
                answers[i] = TeacherAnswer(answer.token_ids, targets)
    return [a for a in answers if a is not None]


def _top_k(logprobs: torch.Tensor, top_k: int) -> TeacherTargets:
    """Rows of full log-probabilities as ``TeacherTargets``: the top ``top_k`` in float16, or
    all of them (float32) when ``top_k`` reaches the vocabulary size."""
    import torch

    from icmem.icae.model import TeacherTargets

    if top_k >= logprobs.shape[-1]:
        full = torch.arange(logprobs.shape[-1], device=logprobs.device)
        return TeacherTargets(full.expand_as(logprobs).cpu(), logprobs.cpu())
    values, indices = logprobs.topk(top_k, dim=-1)
    return TeacherTargets(indices.cpu(), values.to(torch.float16).cpu())


def answer_target(
    icae: ICAE, record: DistillRecord, answer: TeacherAnswer
) -> tuple[list[int], bool, TeacherTargets | None]:
    """The target of a question record, whether it is known right, and the teacher's targets
    when the answer generation already gave them: the teacher's answer when it contains the
    gold answer (or there is none), else the gold answer itself."""
    text = decode_text(icae.tokenizer, answer.token_ids, skip_special_tokens=True).strip()
    if record.gold is None:
        return answer.token_ids, False, answer.targets
    if text and record.gold.lower() in text.lower():
        return answer.token_ids, True, answer.targets
    return icae.tokenize(record.gold), True, None


def teach(
    icae: ICAE,
    record: DistillRecord,
    *,
    top_k: int = 64,
    max_answer_tokens: int = 48,
    answer: TeacherAnswer | None = None,
) -> ICAEExample | None:
    """A training example with the spans' slots (bf16, as the store keeps them) and the
    teacher's targets; None when the teacher gives nothing to learn (an empty answer).
    ``answer`` is the teacher's answer when already known (``teacher_answers``)."""
    import torch

    from icmem.icae.model import ICAEExample

    span_ids = [icae.tokenize(text)[: icae.config.span_tokens] for text in record.spans]
    span_ids = [ids for ids in span_ids if ids]
    context = [token for ids in span_ids for token in ids]
    if record.kind == "continue":
        assert record.gold is not None  # checked by DistillRecord
        target = icae.tokenize(record.gold)
        teacher_prompt: list[int] = context
        prompt: list[int] = []
        gold, targets = True, None
        task: Task = "lm"
    else:
        if answer is None:
            (answer,) = teacher_answers(icae, [record], max_answer_tokens, top_k=top_k)
        target, gold, targets = answer_target(icae, record, answer)
        teacher_prompt = icae.format_chat(with_context(list(record.messages), record.spans))
        prompt = icae.format_chat(list(record.messages))
        task = "ft"
    if not target:
        return None
    slots = tuple(s.tensor.to(torch.bfloat16) for s in icae.compress(span_ids))
    return ICAEExample(
        context_ids=context,
        task=task,
        target_ids=target,
        prompt_ids=prompt,
        span_lengths=tuple(len(ids) for ids in span_ids),
        slots=slots,
        teacher=targets or teacher_targets(icae, teacher_prompt, target, top_k),
        gold=gold,
    )


# --------------------------------------------------------------------------- the cache


def build_cache(
    icae: ICAE,
    records: Sequence[DistillRecord],
    out_dir: str | Path,
    *,
    top_k: int = 64,
    max_answer_tokens: int = 48,
    progress: bool = True,
) -> int:
    """Teach every record into ``out_dir`` in shards of ``CACHE_SHARD`` examples; resumable
    (finished shards are kept and skipped). Returns how many examples the cache holds."""
    import torch
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CACHE_INFO).write_text(
        json.dumps(
            {
                "records": len(records),
                "top_k": top_k,
                "fingerprint": icae.fingerprint,
                "encoder": icae.encoder_digest(),
            }
        )
    )
    shards = range(0, len(records), CACHE_SHARD)
    bar = tqdm(total=len(records), desc="teacher", unit="ex", disable=not progress)
    with bar:
        for start in shards:
            path = out / f"part-{start // CACHE_SHARD:05d}.pt"
            chosen = records[start : start + CACHE_SHARD]
            if path.is_file():
                bar.update(len(chosen))
                continue
            questions = [r for r in chosen if r.kind != "continue"]
            answers = dict(
                zip(
                    map(id, questions),
                    teacher_answers(icae, questions, max_answer_tokens, top_k=top_k),
                    strict=True,
                )
            )
            examples = []
            for record in chosen:
                example = teach(
                    icae,
                    record,
                    top_k=top_k,
                    max_answer_tokens=max_answer_tokens,
                    answer=answers.get(id(record)),
                )
                if example is not None:
                    examples.append(_to_plain(example))
                bar.update(1)
            partial = path.with_suffix(".tmp")
            torch.save(examples, partial)
            partial.replace(path)
    return sum(1 for _ in iter_cache(out))


def check_cache(icae: ICAE, cache_dir: str | Path) -> None:
    """Refuse a cache whose slots another encoder wrote: the decoder would learn to read slots
    it will never be given."""
    info_path = Path(cache_dir) / CACHE_INFO
    if not info_path.is_file():
        raise TrainingDataError(
            f"{cache_dir} has no {CACHE_INFO}; build it with `icmem train distill-cache`"
        )
    info = json.loads(info_path.read_text())
    if info.get("encoder") != icae.encoder_digest():
        raise TrainingDataError(
            f"the slots cached in {cache_dir} were written by encoder {info.get('encoder')!r}, "
            f"but this ICAE's encoder is {icae.encoder_digest()!r}; rebuild the cache with "
            "`icmem train distill-cache --icae` naming the checkpoint you train from"
        )


def iter_cache(cache_dir: str | Path) -> Iterator[ICAEExample]:
    """The cached examples in order (shards written by ``build_cache``)."""
    import torch

    from icmem.icae.model import ICAEExample, TeacherTargets

    shards = sorted(Path(cache_dir).glob("part-*.pt"))
    if not shards:
        raise TrainingDataError(
            f"{cache_dir} holds no cached examples; build it with `icmem train distill-cache`"
        )
    for shard in shards:
        for item in torch.load(shard, weights_only=True):
            teacher = TeacherTargets(item.pop("teacher_ids"), item.pop("teacher_logprobs"))
            item["span_lengths"] = tuple(item["span_lengths"])
            item["slots"] = tuple(item["slots"])
            yield ICAEExample(teacher=teacher, **item)


def _to_plain(example: ICAEExample) -> dict[str, Any]:
    """An example as tensors, lists and scalars only (``torch.load(weights_only=True)``)."""
    assert example.teacher is not None
    return {
        "context_ids": example.context_ids,
        "task": example.task,
        "target_ids": example.target_ids,
        "prompt_ids": example.prompt_ids,
        "span_lengths": list(example.span_lengths),
        "slots": list(example.slots),
        "teacher_ids": example.teacher.token_ids,
        "teacher_logprobs": example.teacher.logprobs,
        "gold": example.gold,
    }


def slots_of(icae: ICAE, example: ICAEExample) -> tuple[torch.Tensor, ...]:
    """The bf16 slots a frozen encoder gives an example's spans (what ``teach`` caches)."""
    import torch

    return tuple(s.tensor.to(torch.bfloat16) for s in icae.compress(icae.example_spans(example)))
