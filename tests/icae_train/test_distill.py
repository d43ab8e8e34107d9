"""Distillation from the base model reading text: the loss against hand-computed KL, the cache
against computing everything in the step, the data, and the promotion rule."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import tiny_model
from train_testing import TINY_ICAE, build_tiny_icae, write_corpus

from icmem.icae import campaign, distill
from icmem.icae.data import TrainingDataError
from icmem.icae.model import ICAE, DistillLoss, ICAEExample, TeacherTargets
from icmem.icae.slots import MemorySlots
from icmem.icae.train import TrainConfig, train
from icmem.memory_text import with_context

RECIPE = {"slot_positions": "spread", "slot_head": "scale", "decoder_lora_rank": 4}


@pytest.fixture
def icae(tokenizer):
    model = build_tiny_icae(tokenizer, **RECIPE, lora_dropout=0.0)
    # A trained-looking decoder adapter: peft starts lora_B at zero, which would hide it.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval()


def _example(icae, teacher: TeacherTargets | None, gold: bool = True) -> ICAEExample:
    context = icae.tokenize("Paris is the capital of France. Alice lives in London.")[:24]
    target = icae.tokenize(" Alice")
    slots = (torch.randn(icae.config.slots_for(len(context)), icae.hidden_size) * 0.1,)
    return ICAEExample(
        context_ids=context,
        task="ft",
        target_ids=target,
        prompt_ids=icae.format_prompt("Who lives in London?"),
        span_lengths=(len(context),),
        slots=tuple(s.to(torch.bfloat16) for s in slots),
        teacher=teacher,
        gold=gold,
    )


def _student_logits(icae, example: ICAEExample) -> torch.Tensor:
    """The decoder's logits at each target token (EOS included), by the public inference path."""
    (slots,) = example.slots
    target = icae.with_eos(example.target_ids)
    memory = MemorySlots(slots, "span", len(example.context_ids), icae.fingerprint)
    following = example.prompt_ids + target[:-1]
    embeds = icae.decoder_inputs([memory], example.task, following)
    positions = icae.decoder_positions(
        [(len(example.context_ids), slots.shape[0])], example.task, len(following)
    )
    with torch.no_grad():
        logits = icae.decoder_logits(embeds[None], positions)[0].float()
    return logits[-len(target) :]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_kl_matches_torch_kl_div(icae, temperature):
    probe = _example(icae, None)
    logits = _student_logits(icae, probe)
    teacher_logprobs = torch.log_softmax(torch.randn_like(logits) * 3, dim=-1)
    vocab = torch.arange(logits.shape[-1]).expand_as(logits)
    example = dataclasses.replace(probe, teacher=TeacherTargets(vocab, teacher_logprobs))
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(logits / temperature, -1),
        torch.log_softmax(teacher_logprobs / temperature, -1),
        log_target=True,
        reduction="batchmean",
    ) * (temperature**2)
    with torch.no_grad():
        loss = icae.training_loss(
            [dataclasses.replace(example, gold=False)], DistillLoss(temperature)
        )
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_top_k_kl_plus_gold_cross_entropy_is_the_hand_computed_value(icae):
    probe = _example(icae, None)
    logits = _student_logits(icae, probe)
    rows, k, temperature, weight = logits.shape[0], 5, 1.5, 0.5
    generator = torch.Generator().manual_seed(3)
    ids = torch.stack(
        [torch.randperm(logits.shape[-1], generator=generator)[:k] for _ in range(rows)]
    )
    values = torch.log_softmax(torch.randn(rows, k, generator=generator), -1) - 1.0
    example = dataclasses.replace(probe, teacher=TeacherTargets(ids, values.half()))
    # by hand: the teacher renormalised over its top k at temperature t, the student's full
    # distribution at t, KL scaled by t^2, plus the weighted gold cross-entropy
    expected = []
    target = icae.with_eos(example.target_ids)
    for row in range(rows):
        p = [float(v) / temperature for v in values.half().float()[row]]
        top = max(p)
        z = sum(pow(2.718281828459045, v - top) for v in p)
        teacher = [pow(2.718281828459045, v - top) / z for v in p]
        student = torch.log_softmax(logits[row] / temperature, -1)
        kl = sum(
            t * (torch.log(torch.tensor(t)) - student[int(i)])
            for t, i in zip(teacher, ids[row], strict=True)
        )
        ce = -torch.log_softmax(logits[row], -1)[target[row]]
        expected.append(float(kl) * temperature**2 + weight * float(ce))
    with torch.no_grad():
        loss = icae.training_loss([example], DistillLoss(temperature, gold_weight=weight))
    assert float(loss) == pytest.approx(sum(expected) / rows, rel=1e-4)


def test_teacher_rows_must_cover_every_target_token(icae):
    probe = _example(icae, None)
    short = TeacherTargets(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
    with pytest.raises(Exception, match="rows"):
        icae.training_loss([dataclasses.replace(probe, teacher=short)])


def test_a_frozen_encoder_stays_frozen_through_adapter_switches(icae):
    icae.freeze_encoder()
    example = dataclasses.replace(_example(icae, None), slots=())  # the encoder runs too
    icae.train()
    icae.training_loss([example]).backward()  # switches to the decoder adapter and back
    trainable = {n for n, p in icae.named_parameters() if p.requires_grad}
    assert trainable and all(".decoder." in n or n == "special_embeddings" for n in trainable)
    assert all(p.grad is None for n, p in icae.named_parameters() if n not in trainable)


def test_an_example_without_teacher_or_gold_is_refused(icae):
    with pytest.raises(Exception, match="needs a teacher"):
        _example(icae, None, gold=False)


@pytest.fixture
def records(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "corpus", documents=10, words=400)
    return corpus, distill.build_records(
        corpus, tokenizer, 12, held_out_fraction=0.2, span_tokens=32
    )


def test_cached_and_uncached_training_give_the_same_loss(icae, records, tmp_path):
    _, chosen = records
    icae.freeze_encoder()
    distill.build_cache(
        icae, chosen, tmp_path / "cache", top_k=8, max_answer_tokens=6, progress=False
    )
    cached = list(distill.iter_cache(tmp_path / "cache"))
    assert len(cached) >= len(chosen) - 2 and all(e.slots for e in cached)
    uncached = [dataclasses.replace(e, slots=()) for e in cached]  # the encoder runs in the step
    icae.train()
    for mine, theirs in zip(cached, uncached, strict=True):
        torch.testing.assert_close(icae.training_loss([mine]), icae.training_loss([theirs]))
    torch.testing.assert_close(icae.training_loss(cached[:4]), icae.training_loss(uncached[:4]))


def test_teacher_reads_the_spans_as_memory_text_lays_them_out(icae, records):
    _, chosen = records
    record = next(r for r in chosen if r.kind != "continue")
    answer = distill.teacher_answers(icae, [record], 5, top_k=8)[0]
    example = distill.teach(icae, record, top_k=8, answer=answer)
    assert example is not None and example.teacher is not None
    prompt = icae.format_chat(with_context(list(record.messages), record.spans))
    forced = distill.teacher_targets(icae, prompt, example.target_ids, top_k=8)
    if answer.targets is not None and example.target_ids == answer.token_ids:
        # read off the generation, they equal a teacher-forced pass over the same answer
        torch.testing.assert_close(
            answer.targets.logprobs.float(), forced.logprobs.float(), atol=2e-2, rtol=0
        )
    torch.testing.assert_close(example.teacher.token_ids[:, 0], forced.token_ids[:, 0])


def generate_teacher_answers(icae, records, steps, top_k):
    """The teacher's answers as they were made before the one decoding loop: Hugging Face
    ``generate`` on the left-padded batch, targets read off its logits."""
    prompts = [icae.format_chat(with_context(list(r.messages), r.spans)) for r in records]
    pad = icae.tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with icae.base_model() as base:
        out = base.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=sorted(icae.stop_ids),
            output_logits=True,
            return_dict_in_generate=True,
        )
    logits = torch.stack(out.logits, dim=1).float()
    answers = []
    for row in range(len(prompts)):
        new = out.sequences[row, width:].tolist()
        stop = next((n for n, t in enumerate(new) if t in icae.stop_ids), None)
        if stop is None:
            answers.append(distill.TeacherAnswer(new, None))
        else:
            logprobs = torch.log_softmax(logits[row, : stop + 1], dim=-1)
            answers.append(distill.TeacherAnswer(new[:stop], distill._top_k(logprobs, top_k)))
    return answers


def test_teacher_answers_are_the_ones_generate_gave(icae, records):
    """The distillation cache's answers stay what they were: same tokens, same targets."""
    chosen = records[1][:6]
    free = generate_teacher_answers(icae, chosen, 8, top_k=8)
    # stop tokens the rows reach at different steps, so some stop and some run to the limit
    icae.stop_ids = icae.stop_ids | {free[0].token_ids[2], free[1].token_ids[5]}
    expected = generate_teacher_answers(icae, chosen, 8, top_k=8)
    answers = distill.teacher_answers(icae, chosen, 8, top_k=8, batch_size=len(chosen))
    assert [a.token_ids for a in answers] == [e.token_ids for e in expected]
    assert any(a.targets is not None for a in answers)
    for mine, theirs in zip(answers, expected, strict=True):
        assert (mine.targets is None) == (theirs.targets is None)
        if mine.targets is not None:
            assert torch.equal(mine.targets.token_ids, theirs.targets.token_ids)
            assert torch.equal(mine.targets.logprobs, theirs.targets.logprobs)


def test_records_are_split_by_document_and_repeatable(records, tokenizer):
    corpus, chosen = records
    again = distill.build_records(corpus, tokenizer, 12, held_out_fraction=0.2, span_tokens=32)
    assert chosen == again
    held = distill.build_records(
        corpus, tokenizer, 12, side="held_out", held_out_fraction=0.2, span_tokens=32
    )
    train_spans = {s for r in chosen for s in r.spans}
    assert not train_spans & {s for r in held for s in r.spans}
    for record in chosen:
        if record.kind in ("qa", "multi", "conversation"):
            assert record.gold is not None and any(record.gold in s for s in record.spans)
        if record.kind == "absent":
            assert record.gold is None


def test_invented_documents_share_spans_up_to_a_full_span(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "corpus", documents=10, words=400)
    chosen = distill.build_records(corpus, tokenizer, 60, held_out_fraction=0.2, span_tokens=2048)
    invented = [r for r in chosen if r.kind in ("qa", "multi", "conversation")]
    # an invented document is a title and a paragraph; a shared span joins two or more
    shared = [r for r in invented if any(s.count("\n\n") >= 3 for s in r.spans)]
    assert shared and len(shared) < len(invented)  # about half, never all
    for record in chosen:
        assert all(len(tokenizer.encode(s)) <= 2048 for s in record.spans)
    for record in invented:
        assert record.gold is not None and any(record.gold in s for s in record.spans)


def test_bad_records_are_refused():
    with pytest.raises(TrainingDataError, match="kind"):
        distill.DistillRecord("essay", ("text",), ({"role": "user", "content": "q"},))
    with pytest.raises(TrainingDataError, match="needs the real continuation"):
        distill.DistillRecord("continue", ("text",))


def test_distill_run_trains_the_decoder_side_only(tmp_path, tokenizer, records):
    corpus, chosen = records
    base = tmp_path / "base"  # a local Hugging Face directory, so that init_from can load it
    tiny_model("llama", heads=4, kv_heads=2, max_positions=256).save_pretrained(base)
    tokenizer.save_pretrained(base)
    teacher = ICAE.from_base(str(base), **{**TINY_ICAE, **RECIPE, "lora_dropout": 0.0})
    teacher.freeze_encoder()
    distill.build_cache(
        teacher, chosen, tmp_path / "cache", top_k=8, max_answer_tokens=6, progress=False
    )
    init = tmp_path / "init"
    teacher.save_pretrained(init)
    config = TrainConfig(
        stage="distill",
        data=str(tmp_path / "cache"),
        held_out_data=str(tmp_path / "cache"),
        corpus=str(corpus),
        output_dir=str(tmp_path / "run"),
        init_from=str(init),
        freeze_encoder=True,
        max_steps=6,
        micro_batch_size=2,
        learning_rate=1e-2,
        held_out_fraction=0.2,
        span_tokens=[8, 32],
        continuation_tokens=8,
        ae_fraction=0.25,
        eval_every_steps=6,
        eval_examples=2,
        progress=False,
    )
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    result = train(config)
    trained = ICAE.from_pretrained(result.final_dir)
    after = dict(trained.named_parameters())
    changed = {
        n for n, p in after.items() if not torch.equal(p.detach().to(before[n].dtype), before[n])
    }
    assert changed and all(".decoder." in n or n == "special_embeddings" for n in changed)
    metrics = [r for r in campaign.read_metrics(config.output_dir) if "held_out_distill_loss" in r]
    assert metrics and {"held_out_ae_loss", "held_out_lm_loss"} <= set(metrics[-1])


@pytest.fixture
def distill_config(tmp_path):
    return TrainConfig(
        stage="distill", data=str(tmp_path), output_dir=str(tmp_path / "run"), ae_fraction=0.0
    )


@pytest.mark.parametrize(
    ("candidate", "committed", "promoted", "why"),
    [
        (
            {"answers_contains_gold": 0.4, "held_out_distill_loss": 2.0},
            {"answers_contains_gold": 0.1, "held_out_distill_loss": 1.0},
            True,
            "more right answers",
        ),
        (
            {"answers_contains_gold": 0.1, "held_out_distill_loss": 0.5},
            {"answers_contains_gold": 0.4, "held_out_distill_loss": 1.0},
            False,
            "fewer right answers",
        ),
        (
            {"answers_contains_gold": 0.4, "held_out_distill_loss": 0.9},
            {"answers_contains_gold": 0.4, "held_out_distill_loss": 1.0},
            True,
            "objective",
        ),
        (
            {"answers_contains_gold": 0.4, "held_out_distill_loss": 1.1},
            {"answers_contains_gold": 0.4, "held_out_distill_loss": 1.0},
            False,
            "no better",
        ),
        (
            {"answers_contains_gold": 0.9, "held_out_distill_loss": 0.1, "held_out_ae_loss": 0.5},
            {"answers_contains_gold": 0.1, "held_out_distill_loss": 1.0, "held_out_ae_loss": 0.4},
            False,
            r"\[AE\]",
        ),
    ],
)
def test_promotion_picks_the_better_checkpoint(distill_config, candidate, committed, promoted, why):
    verdict, reason = campaign.judge(distill_config, candidate, committed)
    assert verdict is promoted
    assert __import__("re").search(why, reason)


def test_campaign_config_is_a_valid_distill_recipe():
    config = TrainConfig.from_file(campaign.DEFAULT_CONFIG)
    assert config.stage == "distill" and config.freeze_encoder
    assert config.icae["dtype"] == "auto"  # fast on AVX2-only and AMX machines alike
    assert TINY_ICAE  # the tiny recipe the tests train stays importable


def test_a_cache_from_another_encoder_is_refused(icae, tokenizer, records, tmp_path):
    _, chosen = records
    distill.build_cache(
        icae, chosen[:2], tmp_path / "cache", top_k=4, max_answer_tokens=4, progress=False
    )
    distill.check_cache(icae, tmp_path / "cache")  # the encoder that wrote it
    bf16 = build_tiny_icae(tokenizer, **RECIPE, lora_dropout=0.0)
    bf16.load_state_dict(icae.state_dict())
    distill.check_cache(bf16.to(torch.bfloat16), tmp_path / "cache")  # same weights, bf16
    other = build_tiny_icae(tokenizer, seed=1, **RECIPE, lora_dropout=0.0)
    with torch.no_grad():
        other.memory_embeddings.add_(1.0)
    with pytest.raises(TrainingDataError, match="rebuild the cache"):
        distill.check_cache(other, tmp_path / "cache")
