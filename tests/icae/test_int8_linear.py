"""Weight-only int8 Linear layers: the rounding they promise and both of their paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from icmem.icae.int8_linear import INT8_KERNEL_MAX_ROWS, Int8Linear, quantize_linears


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    with torch.no_grad():
        layer.weight[3] = 0.0  # an all-zero row must not divide by zero
        layer.weight[5, 7] = 40.0  # one outlier sets only its own row's scale
    return layer


def test_each_weight_is_within_half_a_step_of_its_row(linear):
    int8 = Int8Linear.from_linear(linear)
    error = (int8.dequantized(torch.float32) - linear.weight).abs()
    step = linear.weight.abs().amax(dim=1) / 127
    assert torch.all(error <= step[:, None] / 2 + 1e-7)
    assert torch.equal(int8.dequantized(torch.float32)[3], torch.zeros(64))
    # the outlier's row is coarse, every other row keeps its own fine step
    assert step[5] > 10 * step[4]
    assert int8.qweight.dtype == torch.int8


@pytest.mark.parametrize("rows", [1, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1, 37])
def test_both_paths_multiply_by_the_dequantized_weight(linear, rows):
    """Decode steps (few rows) take the int8 kernel on bf16 inputs; prefills (many rows) an
    fp32 product with the dequantized weight: both equal that product up to bf16 rounding."""
    int8 = Int8Linear.from_linear(linear)
    x = torch.randn(1, rows, 64, generator=torch.Generator().manual_seed(rows))
    reference = nn.functional.linear(x, int8.dequantized(torch.float32), linear.bias)
    out = int8(x)
    assert out.shape == (1, rows, 48) and out.dtype == torch.float32
    tolerance = 0 if rows > INT8_KERNEL_MAX_ROWS else 0.02 * reference.abs().max()
    assert (out - reference).abs().max() <= tolerance + 1e-5
    assert (out - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


def test_quantize_linears_swaps_nested_layers_and_leaves_shared_weights(linear):
    model = nn.Sequential(linear, nn.ReLU(), nn.Sequential(nn.Linear(48, 8, bias=False)))
    before = linear.weight.detach().clone()
    quantize_linears(model)
    assert [type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__] == [
        "Int8Linear",
        "Int8Linear",
    ]
    assert torch.equal(linear.weight, before)
    assert model(torch.randn(2, 64)).shape == (2, 8)
