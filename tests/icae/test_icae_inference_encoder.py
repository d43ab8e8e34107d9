"""The inference encoder: compression runs on a copy of the base model with the adapter merged.

It must give the slots the training path gives, follow every change of the trained tensors,
stay out of checkpoints, and let compression and decoding run in two threads at once.
"""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import randomise_trained_tensors, tiny_icae

RECIPES = [
    {},
    {"slot_positions": "spread", "slot_head": "scale", "slot_residual": "pooled", "slot_layer": 1},
]


def spans_of(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=generator).tolist() for n in lengths]


def training_path(icae, spans):
    """Slots through the PEFT model, adapter on, as training computes them."""
    with torch.enable_grad():
        return [t.detach() for t in icae._encode_spans(spans)]


@pytest.mark.parametrize("recipe", RECIPES, ids=["default", "spread-pooled-layer1"])
def test_merged_encoder_gives_the_training_paths_slots(tokenizer, recipe):
    icae = tiny_icae(tokenizer, **recipe)
    randomise_trained_tensors(icae)
    spans = spans_of([32, 7, 19], seed=1)
    merged = [s.tensor for s in icae.compress(spans)]
    for a, b in zip(merged, training_path(icae, spans), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_merged_encoder_follows_changes_of_the_adapter(tokenizer):
    icae = tiny_icae(tokenizer)
    randomise_trained_tensors(icae)
    spans = spans_of([20], seed=2)
    before = icae.compress(spans)[0].tensor
    with torch.no_grad():
        for name, param in icae.model.named_parameters():
            if "lora_B" in name:
                param.mul_(-1.0)  # in place, as an optimizer step or a checkpoint load writes
    after = icae.compress(spans)[0].tensor
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(after, training_path(icae, spans)[0], rtol=1e-4, atol=1e-5)


def test_the_merged_copy_is_not_part_of_the_model(tokenizer):
    icae = tiny_icae(tokenizer)
    keys = set(icae.state_dict())
    icae.compress(spans_of([9], seed=3))
    assert set(icae.state_dict()) == keys
    assert sum(1 for _ in icae.parameters()) == sum(1 for _ in tiny_icae(tokenizer).parameters())


def test_compressing_while_another_thread_decodes_gives_the_slots_it_gives_alone(tokenizer):
    """The decoder switches the PEFT model's adapter off while it runs; compression in
    another thread must not see that (it reads its own merged weights)."""
    icae = tiny_icae(tokenizer)
    randomise_trained_tensors(icae)
    spans = spans_of([32, 32, 11, 25], seed=4)
    alone = [s.tensor for s in icae.compress(spans)]
    memory = icae.compress(spans[:2])
    stop = threading.Event()

    def decode() -> None:
        while not stop.is_set():
            icae.generate(memory, "Paris", max_new_tokens=8)

    worker = threading.Thread(target=decode)
    worker.start()
    try:
        for _ in range(20):
            for a, b in zip(alone, (s.tensor for s in icae.compress(spans)), strict=True):
                torch.testing.assert_close(a, b)
    finally:
        stop.set()
        worker.join()


@pytest.mark.parametrize("decoder_lora_rank", [0, 4])
def test_threads_decoding_and_compressing_at_once_get_what_they_get_alone(
    tokenizer, decoder_lora_rank
):
    """Adapters are process-wide switches of the PEFT model: without turns taken, one thread
    ending its decode switches the adapter back on under another one still decoding."""
    icae = tiny_icae(tokenizer, decoder_lora_rank=decoder_lora_rank)
    randomise_trained_tensors(icae)
    spans = spans_of([32, 17, 25], seed=6)
    memory = icae.compress(spans)
    prompts = ["Paris", "The quick", "Alice and Bob"]
    alone = {p: icae.generate(memory, p, max_new_tokens=10) for p in prompts}
    slots_alone = [s.tensor for s in icae.compress(spans)]
    results: dict[str, list[str]] = {p: [] for p in prompts}
    slot_runs: list[list[torch.Tensor]] = []

    def decode(prompt: str) -> None:
        for _ in range(3):  # streams interleave per forward call
            results[prompt].append(
                "".join(icae.generate(memory, prompt, max_new_tokens=10, stream=True))
            )

    def compress() -> None:
        for _ in range(3):
            slot_runs.append([s.tensor for s in icae.compress(spans)])

    workers = [threading.Thread(target=decode, args=(p,)) for p in prompts]
    workers.append(threading.Thread(target=compress))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == {p: [alone[p]] * 3 for p in prompts}
    for run in slot_runs:
        for a, b in zip(run, slots_alone, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("decoder_lora_rank", [0, 4])
def test_the_evaluation_path_decodes_in_turns_with_other_threads(tokenizer, decoder_lora_rank):
    """The reconstruction evaluation's raw-context answers decode through the same decoder
    (and its lock) as every other answer: beside threads decoding from memory and compressing,
    each thread gets what it gets alone."""
    from icmem.evals.reconstruct import raw_context_answer

    icae = tiny_icae(tokenizer, decoder_lora_rank=decoder_lora_rank)
    randomise_trained_tensors(icae)
    spans = spans_of([32, 17], seed=9)
    memory = icae.compress(spans)
    context = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
    raw_alone = raw_context_answer(icae, context, "Where?", 10)
    slots_alone = icae.generate(memory, "Where?", max_new_tokens=10)
    compressed_alone = [s.tensor for s in icae.compress(spans)]
    raw, slots, compressed = [], [], []

    def evaluate() -> None:
        for _ in range(3):
            raw.append(raw_context_answer(icae, context, "Where?", 10))

    def decode() -> None:
        for _ in range(3):
            slots.append("".join(icae.generate(memory, "Where?", max_new_tokens=10, stream=True)))

    def compress() -> None:
        for _ in range(3):
            compressed.append([s.tensor for s in icae.compress(spans)])

    workers = [threading.Thread(target=t) for t in (evaluate, decode, compress)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert raw == [raw_alone] * 3 and slots == [slots_alone] * 3
    for run in compressed:
        for a, b in zip(run, compressed_alone, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("decoder_lora_rank", [0, 4])
def test_a_decode_paused_mid_forward_keeps_its_weights(tokenizer, decoder_lora_rank):
    """Force the interleaving a race needs: thread one pauses inside a forward while thread two
    runs a whole decode. Without turns, thread two's exit switches the adapter back on (or to
    the encoder's) under thread one."""
    icae = tiny_icae(tokenizer, decoder_lora_rank=decoder_lora_rank)
    randomise_trained_tensors(icae)
    embeds = torch.randn(1, 12, icae.hidden_size, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        alone = icae.decoder_logits(embeds)
    other_done = threading.Event()
    paused = threading.Event()
    layers = icae.model.get_base_model().model.layers

    def pause(_module, _inputs):
        if threading.current_thread().name == "first" and not paused.is_set():
            paused.set()
            other_done.wait(timeout=1.0)  # with turns taken, the other waits for us instead

    handle = layers[1].register_forward_pre_hook(pause)
    results = {}

    def run(name: str) -> None:
        with torch.no_grad():
            results[name] = icae.decoder_logits(embeds)
        if name == "second":
            other_done.set()

    try:
        first = threading.Thread(target=run, args=("first",), name="first")
        first.start()
        assert paused.wait(timeout=5.0)
        second = threading.Thread(target=run, args=("second",), name="second")
        second.start()
        first.join()
        second.join()
    finally:
        handle.remove()
    torch.testing.assert_close(results["first"], alone)
    torch.testing.assert_close(results["second"], alone)


@pytest.mark.parametrize("decoder_lora_rank", [0, 4])
def test_conversations_in_threads_get_what_they_get_alone(tokenizer, decoder_lora_rank):
    """Threads holding conversations past the LM-Infinite window (the attention switch and the
    adapters are process-wide state of the model) while another compresses: every answer and
    every slot equals what it is alone."""
    from icmem.icae import Sampling
    from icmem.icae.conversation import PromptCache

    icae = tiny_icae(tokenizer, decoder_lora_rank=decoder_lora_rank)
    randomise_trained_tensors(icae)
    spans = spans_of([32, 17, 25], seed=7)
    memory = icae.compress(spans)
    slots_alone = [s.tensor for s in icae.compress(spans)]
    talks = {
        name: [{"role": "user", "content": f"{name} " * 40}, {"role": "user", "content": name}]
        for name in ("ada", "bob", "cy")
    }

    def converse(cache: PromptCache, turns: list[dict]) -> list[list[int]]:
        answers, conversation = [], []
        for turn in turns:
            conversation.append(turn)
            ids = list(cache.generate(icae, memory[:2], conversation, 6, Sampling()))
            answers.append(ids)
            conversation.append({"role": "assistant", "content": icae.tokenizer.decode(ids)})
        return answers

    alone = {name: converse(PromptCache(window=64), turns) for name, turns in talks.items()}
    shared = PromptCache(window=64)
    results: dict[str, list] = {}
    slot_runs: list[list[torch.Tensor]] = []

    errors: list[BaseException] = []

    def compress() -> None:
        for _ in range(3):
            slot_runs.append([s.tensor for s in icae.compress(spans)])

    def guarded(run) -> None:
        try:
            run()
        except BaseException as error:  # a thread's exception must fail the test
            errors.append(error)

    icae._merged.clear()  # the merged encoder is built while the conversations decode
    workers = [
        threading.Thread(
            target=guarded,
            args=(lambda n=name: results.__setitem__(n, converse(shared, talks[n])),),
        )
        for name in talks
    ]
    workers.append(threading.Thread(target=guarded, args=(compress,)))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == [] and len(slot_runs) == 3
    assert results == alone
    assert shared.stats["reused"] == len(talks), shared.stats  # each second turn: its own session
    for run in slot_runs:
        for a, b in zip(run, slots_alone, strict=True):
            torch.testing.assert_close(a, b)
