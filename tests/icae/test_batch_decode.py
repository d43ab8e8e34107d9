"""The lockstep batch decoder gives exactly what Hugging Face ``generate`` gave: the same greedy
tokens and the same logits, for one row or a left-padded batch whose rows stop at different
steps, with the whole prompt at once or in chunks through an LM-Infinite cache past the window.
``generate`` is the reference here, and only here: the library decodes through one loop."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from icmem import lm_infinite
from icmem.icae.batch_decode import decode_batch, pad_left

PAD = 0
PROMPTS = [[5, 17, 99, 4, 250, 31, 8], [77, 3, 12], [400, 401, 402, 403, 9]]


@pytest.fixture
def model():
    return tiny_model("llama", heads=4, kv_heads=2, max_positions=32, seed=3)


def reference(model, ids, mask, steps, stop_ids, **options):
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=sorted(stop_ids),
            output_logits=True,
            return_dict_in_generate=True,
            **options,
        )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1).float()


def assert_same(decoded, sequences, logits, stop_ids):
    for row, answer in enumerate(decoded):
        new = sequences[row].tolist()
        stop = next((n for n, t in enumerate(new) if t in stop_ids), None)
        assert answer.token_ids == new[:stop]
        assert answer.finish_reason == ("length" if stop is None else "stop")
        kept = len(new) if stop is None else stop + 1
        assert torch.equal(torch.stack(answer.logits), logits[row, :kept])


def test_a_left_padded_batch_stops_row_by_row_as_generate_did(model):
    ids, mask = pad_left(PROMPTS, PAD)
    free, _ = reference(model, ids, mask, 12, {511})
    # stop ids the rows actually reach, at different steps
    stop_ids = {int(free[0, 3]), int(free[1, 6])}
    sequences, logits = reference(model, ids, mask, 12, stop_ids)
    with torch.no_grad():
        decoded = decode_batch(
            model,
            ids,
            attention_mask=mask,
            max_new_tokens=12,
            stop_ids=frozenset(stop_ids),
            pad_id=PAD,
            keep_logits=True,
        )
    assert any(a.finish_reason == "stop" for a in decoded)
    assert_same(decoded, sequences, logits, stop_ids)


def test_one_row_without_a_mask_as_generate_did(model):
    ids = torch.tensor([PROMPTS[0]])
    sequences, logits = reference(model, ids, None, 10, {511})
    with torch.no_grad():
        decoded = decode_batch(
            model, ids, max_new_tokens=10, stop_ids=frozenset({511}), pad_id=PAD, keep_logits=True
        )
    assert_same(decoded, sequences, logits, {511})


def test_chunked_prefill_through_lm_infinite_past_the_window(model):
    ids = torch.arange(40, 100).remainder(500)[None] + 3  # 60 tokens, window 32
    with torch.no_grad(), lm_infinite.enabled(model, global_tokens=4, local_window=16):
        sequences, logits = reference(
            model,
            ids,
            torch.ones_like(ids),
            8,
            {511},
            cache=lm_infinite.make_cache(model),
            prefill_chunk_size=13,
        )
        decoded = decode_batch(
            model,
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            stop_ids=frozenset({511}),
            pad_id=PAD,
            cache=lm_infinite.make_cache(model),
            prefill_chunk=13,
            keep_logits=True,
        )
    assert_same(decoded, sequences, logits, {511})
