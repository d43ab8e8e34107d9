"""LM-Infinite attention: parity with stock attention, with a naive reference, across paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from icmem import lm_infinite
from icmem.lm_infinite import LMInfiniteError, enable, enabled, make_cache

WINDOW = 16


def naive_lm_infinite_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None = None,
    *,
    global_tokens: int,
    window: int,
    inputs_embeds: torch.Tensor | None = None,
    memory_positions: list[int] | None = None,
) -> torch.Tensor:
    """O(n²) forward written from the model's weights: the Λ mask and the distance cap by hand.

    Every (query i, key j) pair gets its own rotation by min(i - j, window - 1); the pair is
    visible when 0 <= i - j < window or j < global_tokens (and j <= i).

    With ``memory_positions`` the first tokens are a memory block at those positions and the rest
    follow at E, E + 1, ... (E one past the block): block queries see the block causally at
    true distances; later queries see every block key at distance min(p_i, window - 1) - p_j
    and the other keys when 0 <= p_i - p_j < window - E, at true distance.
    """
    config = model.config
    core = model.model
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    if inputs_embeds is None:
        inputs_embeds = core.embed_tokens(input_ids)
    n = inputs_embeds.shape[1]
    theta = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)

    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    distance = i - j
    visible = (distance >= 0) & ((distance < window) | (j < global_tokens))
    distance = distance.clamp(0, window - 1)
    if memory_positions is not None:
        g, extent = len(memory_positions), memory_positions[-1] + 1
        pos = torch.tensor(memory_positions + list(range(extent, extent + n - g)))
        p_i, p_j = pos[:, None], pos[None, :]
        true = p_i - p_j
        block_key, block_query = j < g, i < g
        visible = (i >= j) & (block_query | block_key | (true < window - extent))
        distance = torch.where(
            block_key & ~block_query, p_i.clamp(max=window - 1) - p_j, true
        ).clamp(min=0)
    angles = distance[..., None].double() * inv_freq.double()
    angles = angles.float()  # (n, n, D/2)
    cos, sin = angles.cos(), angles.sin()

    def rms_norm(x, norm):
        return norm.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        )

    def rotate(x):  # x: (H, n, D) -> rotated per pair (H, n, n, D) by the pair's distance
        x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
        x1, x2 = x1[:, :, None, :], x2[:, :, None, :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    hidden = inputs_embeds[0]  # (n, C)
    for layer in core.layers:
        attn = layer.self_attn
        x = rms_norm(hidden, layer.input_layernorm)
        q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(n, heads, dim).transpose(0, 1)
        k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(n, kv_heads, dim).transpose(0, 1)
        v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(n, kv_heads, dim).transpose(0, 1)
        k = k.repeat_interleave(heads // kv_heads, dim=0)
        v = v.repeat_interleave(heads // kv_heads, dim=0)
        scores = (rotate(q) * k[:, None, :, :]).sum(-1) / dim**0.5  # (H, n, n)
        scores = scores.masked_fill(~visible, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v  # (H, n, D)
        hidden = hidden + attn.o_proj(out.transpose(0, 1).reshape(n, heads * dim))
        x = rms_norm(hidden, layer.post_attention_layernorm)
        mlp = layer.mlp
        hidden = hidden + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    return model.lm_head(rms_norm(hidden, core.norm))[None]


def chunked_logits(model, input_ids, chunk_sizes):
    """Logits of a prefill split into chunks of the given (cycled) sizes through the cache."""
    cache = make_cache(model)
    outputs, start, step = [], 0, 0
    while start < input_ids.shape[1]:
        size = chunk_sizes[step % len(chunk_sizes)]
        piece = input_ids[:, start : start + size]
        outputs.append(model(piece, past_key_values=cache, use_cache=True).logits)
        start, step = start + size, step + 1
    return torch.cat(outputs, dim=1), cache


def ids(n, batch=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (batch, n), generator=generator)


@pytest.fixture(params=["llama_gqa", "llama_mha", "mistral", "qwen2"])
def model(request):
    if request.param.startswith("llama"):
        kv_heads = 2 if request.param == "llama_gqa" else 4
        return tiny_model("llama", heads=4, kv_heads=kv_heads, max_positions=WINDOW)
    return tiny_model(request.param, heads=4, kv_heads=2, max_positions=WINDOW)


@pytest.fixture
def llama():
    """Tiny grouped-query Llama pretrained (nominally) on WINDOW positions."""
    return tiny_model("llama", heads=4, kv_heads=2, max_positions=WINDOW)


@torch.no_grad()
def test_matches_stock_attention_up_to_window(model):
    tokens = ids(WINDOW, batch=2)
    stock = model(tokens).logits
    with enabled(model) as config:
        assert config.local_window == WINDOW  # read from max_position_embeddings
        full = model(tokens).logits
        cached = model(tokens, past_key_values=make_cache(model)).logits
    torch.testing.assert_close(full, stock)
    torch.testing.assert_close(cached, stock)


@torch.no_grad()
@pytest.mark.parametrize("global_tokens", [0, 3])
@pytest.mark.parametrize("query_block", [7, 512])
def test_matches_naive_reference_far_past_window(model, global_tokens, query_block):
    tokens = ids(3 * WINDOW + 17)
    reference = naive_lm_infinite_logits(model, tokens, global_tokens=global_tokens, window=WINDOW)
    with enabled(model, global_tokens=global_tokens, query_block=query_block):
        full = model(tokens).logits
        chunked, _ = chunked_logits(model, tokens, [5, 11, 23])
        stepwise, _ = chunked_logits(model, tokens, [1])
    torch.testing.assert_close(full, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stepwise, reference, rtol=1e-4, atol=1e-4)


MEMORY = [1, 3, 4, 6]  # a spread memory block: E = 7, so the local window is WINDOW - 7 wide


def memory_cache_logits(model, tokens, memory, chunk_sizes):
    """Logits of the memory block (one call at its positions) then the rest in chunks."""
    g = len(memory)
    cache = make_cache(model, memory_positions=memory)
    outputs = [model(tokens[:, :g], position_ids=torch.tensor([memory]), past_key_values=cache)]
    start, step = g, 0
    while start < tokens.shape[1]:
        size = chunk_sizes[step % len(chunk_sizes)]
        outputs.append(model(tokens[:, start : start + size], past_key_values=cache))
        start, step = start + size, step + 1
    return torch.cat([o.logits for o in outputs], dim=1), cache


@torch.no_grad()
def test_memory_block_matches_naive_reference_far_past_window(model):
    tokens = ids(len(MEMORY) + 3 * WINDOW + 5)
    reference = naive_lm_infinite_logits(
        model, tokens, global_tokens=0, window=WINDOW, memory_positions=MEMORY
    )
    with enabled(model, query_block=7):
        chunked, cache = memory_cache_logits(model, tokens, MEMORY, [5, 11, 23])
        stepwise, _ = memory_cache_logits(model, tokens, MEMORY, [1])
    torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stepwise, reference, rtol=1e-4, atol=1e-4)
    extent = MEMORY[-1] + 1
    end = extent + tokens.shape[1] - len(MEMORY)
    held = MEMORY + list(range(end - (WINDOW - extent), end))
    assert all(layer.held_positions() == held for layer in cache.layers)


@torch.no_grad()
def test_memory_block_is_stock_attention_inside_the_window(model):
    extent = MEMORY[-1] + 1
    tokens = ids(len(MEMORY) + WINDOW - extent)  # the last token sits at position WINDOW - 1
    positions = MEMORY + list(range(extent, WINDOW))
    stock = model(tokens, position_ids=torch.tensor([positions])).logits
    with enabled(model):
        cached, _ = memory_cache_logits(model, tokens, MEMORY, [3, 100])
    torch.testing.assert_close(cached, stock, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_memory_keeps_its_order_past_the_window(llama):
    """Beyond the window the memory is read at the distances of position WINDOW - 1, not all at
    the cap (which would make it a bag): swapping two memory tokens changes the answer."""
    tokens = ids(len(MEMORY) + 2 * WINDOW)
    swapped = tokens.clone()
    swapped[0, [0, 1]] = tokens[0, [1, 0]]
    with enabled(llama):
        logits, _ = memory_cache_logits(llama, tokens, MEMORY, [64])
        other, _ = memory_cache_logits(llama, swapped, MEMORY, [64])
    assert not torch.allclose(logits[0, -1], other[0, -1], atol=1e-4)


@pytest.mark.parametrize(
    ("memory", "match"),
    [([3, 2, 5], "increasing"), ([-1, 2], "increasing"), ([0, WINDOW - 1], "fewer spans")],
)
def test_bad_memory_positions_raise(llama, memory, match):
    with enabled(llama), pytest.raises(LMInfiniteError, match=match):
        make_cache(llama, memory_positions=memory)


@torch.no_grad()
def test_memory_cache_takes_the_block_first(llama):
    with enabled(llama):
        cache = make_cache(llama, memory_positions=MEMORY)
        with pytest.raises(LMInfiniteError, match="memory block alone first"):
            llama(ids(len(MEMORY) + 2), past_key_values=cache)


@torch.no_grad()
def test_reference_agrees_with_stock_inside_window(model):
    """Guards the reference itself: inside the window it must be ordinary attention."""
    tokens = ids(WINDOW)
    reference = naive_lm_infinite_logits(model, tokens, global_tokens=0, window=WINDOW)
    torch.testing.assert_close(reference, model(tokens).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_window_holds_the_last_window_tokens_query_included():
    """One layer, no global tokens: the last query sees exactly the last WINDOW tokens, so a
    key at distance WINDOW - 1 is inside and one at distance WINDOW is not."""
    model = tiny_model("llama", layers=1, max_positions=WINDOW)
    tokens = ids(WINDOW + 1)
    last_window = model(tokens[:, 1:]).logits[:, -1]  # keys at distances 0..WINDOW - 1
    with_first = model(tokens).logits[:, -1]  # also the key at distance WINDOW
    with enabled(model, global_tokens=0):
        ours = model(tokens).logits[:, -1]
    torch.testing.assert_close(ours, last_window)
    assert not torch.allclose(ours, with_first, atol=1e-4)


@torch.no_grad()
def test_full_forward_chunked_prefill_and_token_by_token_agree(model):
    tokens = ids(2 * WINDOW + 9)
    with enabled(model, global_tokens=2):
        full = model(tokens).logits
        chunked, _ = chunked_logits(model, tokens, [13])
        stepwise, cache = chunked_logits(model, tokens, [1])
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stepwise, full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == tokens.shape[1]


@torch.no_grad()
def test_cache_stays_bounded_while_generating_far_past_window(llama):
    prompt = ids(WINDOW // 2)
    with enabled(llama, global_tokens=4, local_window=WINDOW) as config:
        cache = make_cache(llama)
        out = llama.generate(
            prompt,
            past_key_values=cache,
            max_new_tokens=4 * WINDOW,
            min_new_tokens=4 * WINDOW,
            do_sample=False,
        )
    assert out.shape[1] == prompt.shape[1] + 4 * WINDOW
    assert config.cache_capacity == 4 + WINDOW
    for layer in cache.layers:
        assert layer.keys.shape[-2] == layer.values.shape[-2] == WINDOW  # the ring
        assert layer.global_keys.shape[-2] == layer.global_values.shape[-2] == 4
        window = list(range(layer.seen_tokens - WINDOW, layer.seen_tokens))
        assert layer.held_positions() == [0, 1, 2, 3, *window]
        assert len(layer.held_positions()) == config.cache_capacity


@torch.no_grad()
@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_with_bounded_cache_matches_default_cache(llama, do_sample):
    prompt = ids(WINDOW + 5, batch=2)
    kwargs = dict(max_new_tokens=WINDOW, min_new_tokens=WINDOW, do_sample=do_sample)
    with enabled(llama, global_tokens=2):
        torch.manual_seed(1)
        default = llama.generate(prompt, **kwargs)
        torch.manual_seed(1)
        bounded = llama.generate(prompt, past_key_values=make_cache(llama), **kwargs)
        torch.manual_seed(1)
        chunked = llama.generate(
            prompt, past_key_values=make_cache(llama), prefill_chunk_size=7, **kwargs
        )
    assert torch.equal(bounded, default)
    assert torch.equal(chunked, default)


@torch.no_grad()
def test_beam_search_reorders_the_bounded_cache(llama):
    prompt = ids(WINDOW - 3)
    kwargs = dict(max_new_tokens=WINDOW, min_new_tokens=WINDOW, num_beams=3, do_sample=False)
    with enabled(llama, global_tokens=2):
        default = llama.generate(prompt, **kwargs)
        bounded = llama.generate(prompt, past_key_values=make_cache(llama), **kwargs)
    assert torch.equal(bounded, default)


@torch.no_grad()
def test_generate_from_input_embeddings_prefix(llama):
    """A prefix of raw embeddings (how ICAE memory slots arrive) followed by prompt tokens:
    each greedy token must be the reference's argmax after everything before it."""
    embed = llama.get_input_embeddings()
    embeds = embed(ids(2 * WINDOW + 3))
    embeds[:, :5] = torch.randn(1, 5, embeds.shape[-1], generator=torch.Generator().manual_seed(3))
    with enabled(llama, global_tokens=3):
        generated = llama.generate(
            inputs_embeds=embeds,
            past_key_values=make_cache(llama),
            max_new_tokens=WINDOW,
            min_new_tokens=WINDOW,
            do_sample=False,
        )
    assert generated.shape == (1, WINDOW)
    sequence = torch.cat((embeds, embed(generated[:, :-1])), dim=1)
    reference = naive_lm_infinite_logits(
        llama, inputs_embeds=sequence, global_tokens=3, window=WINDOW
    )
    assert torch.equal(reference[0, embeds.shape[1] - 1 :].argmax(-1), generated[0])


@torch.no_grad()
def test_left_padded_batch_raises(llama, tokenizer):
    tokens = ids(6, batch=2)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    with enabled(llama), pytest.raises(LMInfiniteError, match="padded batch"):
        llama.generate(tokens, attention_mask=mask, max_new_tokens=2)


@torch.no_grad()
def test_peft_model_with_adapter_disabled(llama):
    peft = pytest.importorskip("peft")
    tokens = ids(2 * WINDOW + 1)
    with enabled(llama, global_tokens=2):
        expected = llama(tokens).logits
    lora = peft.get_peft_model(
        llama,
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    with enabled(lora, global_tokens=2), lora.disable_adapter():
        cache = make_cache(lora)
        got = lora(input_ids=tokens, past_key_values=cache).logits
    torch.testing.assert_close(got, expected)
    assert len(cache.layers[0].held_positions()) == 2 + WINDOW


def test_enable_disable_restore_attention_implementation(llama):
    before = llama.config._attn_implementation
    enable(llama, local_window=8)
    assert llama.config._attn_implementation == lm_infinite.ATTN_IMPLEMENTATION
    assert lm_infinite.is_enabled(llama)
    with enabled(llama, local_window=4) as inner:
        assert inner.local_window == 4
        assert make_cache(llama).config.local_window == 4
    assert make_cache(llama).config.local_window == 8  # outer settings come back
    lm_infinite.disable(llama)
    assert llama.config._attn_implementation == before
    assert not lm_infinite.is_enabled(llama)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(local_window=0), "local_window"),
        (dict(global_tokens=-1), "global_tokens"),
        (dict(top_k_middle=5), "top_k_middle"),
        (dict(query_block=0), "query_block"),
    ],
)
def test_bad_settings_raise(llama, kwargs, match):
    with pytest.raises(LMInfiniteError, match=match):
        enable(llama, **kwargs)
    assert not lm_infinite.is_enabled(llama)


def test_make_cache_needs_enable(llama):
    with pytest.raises(LMInfiniteError, match="enable"):
        make_cache(llama)


@torch.no_grad()
def test_sliding_window_cache_that_dropped_global_tokens_raises():
    from transformers import DynamicCache

    model = tiny_model("mistral", max_positions=WINDOW)
    model.config.sliding_window = 8
    cache = DynamicCache(config=model.config)
    with enabled(model, global_tokens=2), pytest.raises(LMInfiniteError, match="make_cache"):
        model(ids(12), past_key_values=cache)
        model(ids(4), past_key_values=cache)


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_matches_stock_inside_window_and_stays_finite_past_it(smollm2):
    model, tokenizer = smollm2
    text = "The quick brown fox jumps over the lazy dog. " * 40
    tokens = tokenizer(text, return_tensors="pt").input_ids[:, :300]
    stock = model(tokens).logits.float()
    with enabled(model, local_window=128, global_tokens=4):
        ours = model(tokens[:, :129]).logits.float()
        long = model(tokens, past_key_values=make_cache(model)).logits.float()
    torch.testing.assert_close(ours, stock[:, :129], rtol=2e-2, atol=2e-2)
    assert torch.isfinite(long).all()


@torch.no_grad()
def test_position_ids_that_skip_ahead_of_the_cache_raise(llama):
    with enabled(llama):
        cache = make_cache(llama)
        llama(ids(5), past_key_values=cache)
        with pytest.raises(LMInfiniteError, match="position_ids"):
            llama(ids(2), past_key_values=cache, position_ids=torch.tensor([[9, 10]]))


def test_bounded_cache_cannot_be_cropped(llama):
    with enabled(llama):
        cache = make_cache(llama)
        llama(ids(3), past_key_values=cache)
    with pytest.raises(LMInfiniteError, match="cropped"):
        cache.crop(1)


@torch.no_grad()
def test_bfloat16_model_matches_stock_inside_window(llama):
    model = llama.to(torch.bfloat16)
    tokens = ids(WINDOW)
    stock = model(tokens).logits.float()
    with enabled(model):
        ours = model(tokens, past_key_values=make_cache(model)).logits
        stepwise, _ = chunked_logits(model, tokens, [1])  # the decoding path, in bfloat16
    assert ours.dtype == stepwise.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), stock, rtol=0.05, atol=0.05)
    torch.testing.assert_close(stepwise.float(), stock, rtol=0.05, atol=0.05)


@torch.no_grad()
def test_relative_angles_stay_exact_at_huge_positions(llama):
    """RoPE depends on distances only, but float32 angles drift with the position: ten million
    positions in, stock attention's logits move; LM-Infinite's float64 rotations do not."""
    tokens = ids(WINDOW)
    far = torch.arange(WINDOW)[None] + 10_000_000
    stock_drift = (llama(tokens).logits - llama(tokens, position_ids=far).logits).abs().max()
    assert stock_drift > 1e-5  # the drift this test guards against is really there
    with enabled(llama, global_tokens=0):
        near = llama(tokens).logits
        moved = llama(tokens, position_ids=far).logits
    torch.testing.assert_close(moved, near, rtol=1e-5, atol=1e-5)
