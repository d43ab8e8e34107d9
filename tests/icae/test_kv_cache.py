"""The growing key/value cache gives the stock cache's logits bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model
from transformers import DynamicCache

from icmem.icae.kv_cache import MIN_CAPACITY, GrowingLayer, growing_cache


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(max_positions=2 * MIN_CAPACITY + 64)


def _decode(model, cache, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Greedy steps after ``prompt``; the logits of each step."""
    logits = []
    with torch.no_grad():
        out = model(input_ids=prompt, cache=cache, use_cache=True)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=token, cache=cache, use_cache=True)
    return logits


def test_steps_past_several_growths_equal_the_stock_cache(model):
    prompt = torch.randint(
        3, 500, (2, MIN_CAPACITY - 5), generator=torch.Generator().manual_seed(0)
    )
    steps = MIN_CAPACITY  # the buffer doubles once and fills most of its new size
    stock = _decode(model, DynamicCache(config=model.config), prompt, steps)
    cache = growing_cache(model.config)
    grown = _decode(model, cache, prompt, steps)
    assert all(torch.equal(a, b) for a, b in zip(stock, grown, strict=True))
    layer = cache.layers[0]
    assert isinstance(layer, GrowingLayer)
    assert layer.key_buffer is not None and layer.key_buffer.shape[-2] == 2 * MIN_CAPACITY
    assert layer.keys is not None and layer.keys.data_ptr() == layer.key_buffer.data_ptr()
    assert cache.get_seq_length() == prompt.shape[1] + steps


def test_a_cache_made_without_a_config_grows_in_place_too(model):
    prompt = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(1))
    cache = growing_cache(None)
    grown = _decode(model, cache, prompt, 6)
    stock = _decode(model, DynamicCache(), prompt, 6)
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    assert all(torch.equal(a, b) for a, b in zip(stock, grown, strict=True))


def test_crop_copy_and_batch_selection_continue_like_the_stock_cache(model):
    """A cropped cache overwrites its stale tail; a deep copy and a batch selection leave the
    keys outside the buffer, and the next step copies them into a fresh one."""
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 500, (3, 20), generator=generator)
    more = torch.randint(3, 500, (3, 4), generator=generator)
    caches = [DynamicCache(config=model.config), growing_cache(model.config)]
    with torch.no_grad():
        for cache in caches:
            model(input_ids=prompt, cache=cache, use_cache=True)
            cache.crop(-8)  # drop the last 8 positions
        outs = [model(input_ids=more, cache=c, use_cache=True).logits for c in caches]
        assert torch.equal(*outs)
        copies = [copy.deepcopy(c) for c in caches]
        for cache in copies:
            cache.batch_select_indices(torch.tensor([2, 0]))
        outs = [model(input_ids=more[[2, 0]], cache=c, use_cache=True).logits for c in copies]
        assert torch.equal(*outs)
        # the original growing cache was not disturbed by its copy's steps
        outs = [model(input_ids=more, cache=c, use_cache=True).logits for c in caches]
        assert torch.equal(*outs)
