"""The decoder: adapter off, parity with hand-built references, generation, streaming, loss."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_ICAE_CONFIG, tiny_icae_base

from icmem.icae import ICAE, BaseModelMismatchError, ICAEConfigError, ICAEExample, Sampling
from icmem.icae.decoder import next_token as pick_token

SPAN = TINY_ICAE_CONFIG["span_tokens"]
GREEDY = Sampling()


def two_spans(icae):
    document = torch.randint(3, 500, (SPAN + 12,), generator=torch.Generator().manual_seed(0))
    return icae.compress([document.tolist()])


def reference_greedy(
    model, embeds: torch.Tensor, max_new_tokens: int, stop: int, sampling: Sampling = GREEDY
) -> list[int]:
    """Decoding by full recomputation each step: no cache, nothing clever."""
    generator = None if sampling.seed is None else torch.Generator().manual_seed(sampling.seed)
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            new = model.get_input_embeddings()(torch.tensor(tokens, dtype=torch.long))
            logits = model(inputs_embeds=torch.cat([embeds, new])[None]).logits[0, -1]
            token = pick_token(logits, sampling, generator)
            if token == stop:
                break
            tokens.append(token)
    return tokens


def test_decoder_inputs_lay_out_slots_then_special_then_prompt(icae):
    memory = two_spans(icae)
    prompt = icae.format_prompt("Where?")
    embeds = icae.decoder_inputs(memory, "ft", prompt)
    k0, k1 = memory[0].num_slots, memory[1].num_slots
    assert embeds.shape == (k0 + k1 + 1 + len(prompt), icae.hidden_size)
    torch.testing.assert_close(embeds[:k0], memory[0].tensor)
    torch.testing.assert_close(embeds[k0 : k0 + k1], memory[1].tensor)
    ft = icae.config.special_tokens.index("ft")
    torch.testing.assert_close(embeds[k0 + k1], icae.special_embeddings[ft].detach())
    expected_prompt = icae.model.get_input_embeddings()(torch.tensor(prompt))
    torch.testing.assert_close(embeds[k0 + k1 + 1 :], expected_prompt)


def test_format_prompt_uses_the_chat_template(icae, tokenizer):
    text = tokenizer.decode(icae.format_prompt("Where is Paris?"))
    assert text == "<|im_start|>user\nWhere is Paris?<|im_end|>\n<|im_start|>assistant\n"


def test_decoder_equals_the_base_model_run_by_hand(icae, reference_model):
    embeds = icae.decoder_inputs(two_spans(icae), "ft", icae.format_prompt("Where?"))
    with torch.no_grad():
        expected = reference_model(inputs_embeds=embeds[None]).logits
        torch.testing.assert_close(icae.decoder_logits(embeds[None]), expected)


def test_lora_weights_change_the_encoder_but_not_the_decoder(icae):
    memory = two_spans(icae)
    embeds = icae.decoder_inputs(memory, "ae", [])
    with torch.no_grad():
        before = icae.decoder_logits(embeds[None])
        for name, param in icae.model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param))
        torch.testing.assert_close(icae.decoder_logits(embeds[None]), before)
    after = two_spans(icae)
    assert not torch.allclose(after[0].tensor, memory[0].tensor, atol=1e-3)


def test_the_decoder_runs_the_base_weights_without_lora_wrappers(icae, make_icae):
    from peft.tuners.tuners_utils import BaseTunerLayer

    decoder = icae.decoder.model()  # this config has no decoder adapter
    assert not any(isinstance(m, BaseTunerLayer) for m in decoder.modules())
    peft_tensors = {id(t) for t in (*icae.model.parameters(), *icae.model.buffers())}
    assert all(id(t) in peft_tensors for t in (*decoder.parameters(), *decoder.buffers()))
    assert icae.decoder.model(memory=False) is decoder  # built once
    with icae.decoder.state(False, memory=False):  # switches nothing in the PEFT model
        assert icae.decoder.adapters_enabled()
    embeds = icae.decoder_inputs(two_spans(icae), "ft", icae.format_prompt("Where?"))
    with torch.no_grad():
        with icae.decoder.weights():  # the PEFT model, adapters off
            expected = icae.model(inputs_embeds=embeds[None]).logits
        torch.testing.assert_close(decoder(inputs_embeds=embeds[None]).logits, expected)

    with_adapter = make_icae(trained=True, decoder_lora_rank=4)  # memory: its decoder adapter
    merged = with_adapter.decoder.model(memory=True)  # the adapter merged into a copy
    assert merged is not with_adapter.model
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert with_adapter.decoder.model(memory=True) is merged  # built once
    assert with_adapter.decoder.model(memory=False) is not with_adapter.model
    with torch.no_grad():
        with with_adapter.decoder.weights():  # the PEFT model, decoder adapter on
            expected = with_adapter.model(inputs_embeds=embeds[None]).logits
        torch.testing.assert_close(merged(inputs_embeds=embeds[None]).logits, expected)
        for name, param in with_adapter.model.named_parameters():
            if "lora_B.decoder" in name:
                param.add_(1.0)  # training moved the adapter: the copy follows
        with with_adapter.decoder.weights():
            moved = with_adapter.model(inputs_embeds=embeds[None]).logits
        rebuilt = with_adapter.decoder.model(memory=True)
        assert rebuilt is not merged
        torch.testing.assert_close(rebuilt(inputs_embeds=embeds[None]).logits, moved)
    with_adapter.decoder.merge_adapter = False
    assert with_adapter.decoder.model(memory=True) is with_adapter.model


def test_adapter_is_back_on_after_decoding(icae):
    memory = two_spans(icae)
    icae.generate(memory, "Hi", max_new_tokens=3)
    torch.testing.assert_close(two_spans(icae)[0].tensor, memory[0].tensor, rtol=0, atol=0)


def test_a_paused_stream_leaves_the_encoder_adapter_on(icae):
    memory = two_spans(icae)
    stream = icae.generate(memory, "Hi", max_new_tokens=5, stream=True)
    next(stream)
    torch.testing.assert_close(two_spans(icae)[0].tensor, memory[0].tensor, rtol=0, atol=0)


def test_greedy_generation_equals_a_cache_free_reference(icae, reference_model, tokenizer):
    memory = two_spans(icae)
    embeds = icae.decoder_inputs(memory, "ft", icae.format_prompt("Where?")).detach()
    expected = reference_greedy(reference_model, embeds, 12, tokenizer.eos_token_id)
    text = icae.generate(memory, "Where?", max_new_tokens=12)
    assert text == tokenizer.decode(expected, skip_special_tokens=True)


def test_streaming_yields_the_same_text_in_pieces(icae):
    memory = two_spans(icae)
    pieces = list(icae.generate(memory, "Where?", max_new_tokens=12, stream=True))
    assert len(pieces) > 1
    assert "".join(pieces) == icae.generate(memory, "Where?", max_new_tokens=12)


def test_sampling_is_repeatable_with_a_seed_and_varies_without_one(icae):
    memory = two_spans(icae)
    kwargs = dict(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95)
    first = icae.generate(memory, "Hi", seed=3, **kwargs)
    assert icae.generate(memory, "Hi", seed=3, **kwargs) == first
    assert len({icae.generate(memory, "Hi", seed=s, **kwargs) for s in range(4)}) > 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"temperature": -1.0}, ICAEConfigError),
        ({"top_p": 0.0}, ICAEConfigError),
        ({"max_new_tokens": 0}, ICAEConfigError),
        ({"task": "qa"}, ICAEConfigError),
        ({"beams": 4}, TypeError),
    ],
)
def test_bad_generation_arguments_are_refused(icae, kwargs, error):
    with pytest.raises(error):
        icae.generate(two_spans(icae), "Hi", **kwargs)


def test_memory_from_another_base_model_is_refused(icae, make_icae):
    foreign = make_icae(seed=5, trained=True).compress("Paris")
    with pytest.raises(BaseModelMismatchError, match="re-compress"):
        icae.generate(foreign, "Where?")
    with pytest.raises(ICAEConfigError, match="at least one"):
        icae.generate([], "", task="ae")  # nothing to reconstruct


def test_without_memory_the_base_model_answers_alone(icae, reference_model):
    """Recall may find nothing; the answer is then the base model's own, adapters off."""
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is Paris?"},
    ]
    ids = icae.format_chat(conversation)
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(6):
            logits = reference_model(input_ids=torch.tensor([ids + expected])).logits[0, -1]
            expected.append(int(logits.argmax()))
    expected = expected[: next((i for i, t in enumerate(expected) if t in icae.stop_ids), 6)]
    got = icae.generate([], conversation, max_new_tokens=6)
    assert got == icae.tokenizer.decode(expected, skip_special_tokens=True)


def test_a_whole_conversation_is_laid_out_with_the_chat_template(icae):
    conversation = [
        {"role": "system", "content": "You keep the log."},
        {"role": "user", "content": "Who kept it?"},
        {"role": "assistant", "content": "Mara did."},
        {"role": "user", "content": "When?"},
    ]
    laid_out = icae.tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    assert icae.format_chat(conversation) == icae.tokenize(laid_out)
    memory = icae.compress("The log was kept by Mara in 1901.")
    with torch.no_grad():
        embeds = icae.decoder_inputs(memory, "ft", icae.prompt_ids(conversation))
    assert embeds.shape[0] == memory[0].num_slots + 1 + len(icae.tokenize(laid_out))
    with pytest.raises(ICAEConfigError, match="'role' and a 'content'"):
        icae.format_chat([{"role": "user"}])
    with pytest.raises(ICAEConfigError, match="task='ft'"):
        icae.generate(memory, conversation, task="lm")


def test_reconstruct_decodes_the_ae_task(icae, reference_model, tokenizer):
    memory = two_spans(icae)[1:]
    embeds = icae.decoder_inputs(memory, "ae", []).detach()
    expected = reference_greedy(reference_model, embeds, memory[0].token_count + 1, 2)
    assert icae.reconstruct(memory) == tokenizer.decode(expected, skip_special_tokens=True)


def test_training_loss_equals_cross_entropy_computed_by_hand(icae, reference_model):
    context = list(range(10, 30))
    prompt = icae.format_prompt("Repeat")
    example = ICAEExample(
        context_ids=context, task="ft", target_ids=[40, 41, 42], prompt_ids=prompt
    )
    target = [40, 41, 42, icae.tokenizer.eos_token_id]
    with torch.no_grad():
        ids = torch.tensor([context])
        slots = icae.encode(ids, torch.ones_like(ids), num_slots=icae.config.slots_for(20))
        embed = reference_model.get_input_embeddings()
        ft = icae.config.special_tokens.index("ft")
        inputs = torch.cat(
            [slots[0], icae.special_embeddings[ft : ft + 1], embed(torch.tensor(prompt + target))]
        )
        logits = reference_model(inputs_embeds=inputs[None]).logits[0]
        first = inputs.shape[0] - len(target) - 1  # the position that predicts target[0]
        expected = torch.nn.functional.cross_entropy(
            logits[first : first + len(target)], torch.tensor(target)
        )
        torch.testing.assert_close(icae.training_loss([example]), expected)


def test_batch_loss_is_the_mean_over_all_target_tokens(icae):
    short = ICAEExample(context_ids=list(range(5, 15)), task="ae", target_ids=[])
    long = ICAEExample(context_ids=list(range(3, 3 + SPAN + 9)), task="lm", target_ids=[7] * 6)
    with torch.no_grad():
        together = icae.training_loss([short, long])
        each = [icae.training_loss([short]), icae.training_loss([long])]
    counts = [10 + 1, 6 + 1]  # targets plus EOS
    expected = (each[0] * counts[0] + each[1] * counts[1]) / sum(counts)
    torch.testing.assert_close(together, expected, rtol=1e-4, atol=1e-5)


def test_training_loss_reaches_every_trainable_tensor(icae):
    examples = [
        ICAEExample(context_ids=list(range(5, 25)), task=task, target_ids=[9, 8, 7])
        for task in ("ae", "lm")
    ]
    icae.train()
    icae.training_loss(examples).backward()
    lora = [p for n, p in icae.model.named_parameters() if "lora_" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert icae.memory_embeddings.grad.abs().sum() > 0
    special = dict(
        zip(icae.config.special_tokens, icae.special_embeddings.grad.abs().sum(1), strict=True)
    )
    assert special["ae"] > 0 and special["lm"] > 0 and special["ft"] == 0  # ft was not used


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context_ids": [], "task": "ae", "target_ids": []}, "context_ids"),
        ({"context_ids": [3], "task": "lm", "target_ids": []}, "target_ids"),
        ({"context_ids": [3], "task": "ae", "target_ids": [], "prompt_ids": [4]}, "prompt_ids"),
    ],
)
def test_invalid_examples_are_refused(kwargs, message):
    with pytest.raises(ICAEConfigError, match=message):
        ICAEExample(**kwargs)


def sharp_base_model() -> torch.nn.Module:
    """The tiny base model with 10x query weights: peaked attention, so masking keys matters
    (a random model attends almost uniformly and hides the difference)."""
    model = tiny_icae_base(0)
    model.config.max_position_embeddings = 16  # a window the memory below outgrows
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
    return model


def test_long_memory_decodes_through_lm_infinite(tokenizer, monkeypatch):
    from icmem import lm_infinite
    from icmem.icae import decoder as icae_decoder

    icae = ICAE.from_base((sharp_base_model(), tokenizer), **TINY_ICAE_CONFIG)
    reference = sharp_base_model()
    memory = two_spans(icae) * 3  # 3 x (8 + 3) slots, far past the 16-position window
    embeds = icae.decoder_inputs(memory, "lm", icae.tokenize("The")).detach()
    seen: list[torch.Tensor] = []  # the logits generate() chooses each token from
    pick = icae_decoder.next_token
    monkeypatch.setattr(icae_decoder, "next_token", lambda x, *a: seen.append(x) or pick(x, *a))
    text = icae.generate(memory, "The", task="lm", max_new_tokens=6)
    assert not lm_infinite.is_enabled(icae.model)

    tokens = [pick(x, GREEDY, None) for x in seen]
    inputs = torch.cat([embeds, reference.get_input_embeddings()(torch.tensor(tokens[:-1]))])
    steps = slice(embeds.shape[0] - 1, None)  # the positions that chose each new token
    with torch.no_grad():
        plain = reference(inputs_embeds=inputs[None]).logits[0, steps]
        with lm_infinite.enabled(reference):
            expected = reference(inputs_embeds=inputs[None]).logits[0, steps]
    assert not torch.allclose(plain, expected, atol=1e-2)  # the window matters here
    torch.testing.assert_close(torch.stack(seen), expected, rtol=1e-4, atol=1e-4)
    assert text == tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"temperature": 1.0, "top_k": 1}, {0}),
        ({"temperature": 1.0, "top_k": 2}, {0, 1}),
        ({"temperature": 1.0, "top_k": 3}, {0, 1, 2}),
        ({"temperature": 1.0, "top_p": 0.6}, {0}),  # p(0) = 0.644 already covers 0.6
        ({"temperature": 1.0, "top_p": 0.7}, {0, 1}),  # 0.644 + 0.237 = 0.881
        ({"temperature": 1.0, "top_p": 0.9}, {0, 1, 2}),  # + 0.087 = 0.968
        ({"temperature": 1.0}, {0, 1, 2, 3}),
    ],
)
def test_top_k_and_top_p_keep_exactly_the_nucleus(settings, expected):
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    drawn = {pick_token(logits, Sampling(**settings), generator) for _ in range(400)}
    assert drawn == expected


def test_int8_weights_are_opt_in_and_close_to_the_float_decoder(make_icae):
    """Off by default; on, the decoding copies hold int8 Linear layers (the PEFT model keeps
    its float weights) and give logits close to the float decoder's, not equal to them."""
    icae = make_icae(trained=True, slot_positions="spread", decoder_lora_rank=4)
    assert not icae.decoder.int8_weights
    memory = icae.compress([list(range(3, 40))])
    prompt = icae.prompt_ids("Where?")
    with torch.no_grad():
        prefix = icae.decoder_inputs(memory, "ft", prompt)[None]
        exact = icae.decoder.model(True)(inputs_embeds=prefix).logits[0, -1]
        icae.decoder.int8_weights = True
        quantized = icae.decoder.model(True)
        approximate = quantized(inputs_embeds=prefix).logits[0, -1]
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    assert all(p.is_floating_point() for p in icae.model.parameters())
    assert not torch.equal(exact, approximate)
    assert (exact - approximate).abs().max() <= 0.1 * exact.abs().max()
    assert isinstance(icae.generate(memory, "Where?", max_new_tokens=4), str)
    assert isinstance(icae.generate([], "Where?", max_new_tokens=4), str)


def test_compiled_steps_are_opt_in_and_answer_as_the_eager_decoder(make_icae):
    """``compile_steps`` runs answers below the window through compiled copies with the stock
    cache, giving the eager decoder's greedy tokens; past the window (LM-Infinite) the eager
    copy decodes; switching it off returns the eager copy."""
    icae = make_icae(trained=True, slot_positions="spread", decoder_lora_rank=4)
    decoder = icae.decoder
    assert not decoder.compile_steps
    memory = icae.compress([list(range(3, 40))])
    eager = icae.generate(memory, "Where?", max_new_tokens=6)
    decoder.compile_steps = True
    compiled_module = decoder.step_module(memory=True, long_context=False)
    assert isinstance(compiled_module, torch._dynamo.eval_frame.OptimizedModule)
    assert type(decoder.new_cache(compiled_module, long_context=False)).__name__ == "DynamicCache"
    assert decoder.step_module(memory=True, long_context=True) is decoder.model(True)
    assert icae.generate(memory, "Where?", max_new_tokens=6) == eager
    assert decoder.step_module(memory=True, long_context=False) is compiled_module  # kept
    decoder.compile_steps = False
    assert decoder.step_module(memory=True, long_context=False) is decoder.model(True)
