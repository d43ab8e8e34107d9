"""Weight-only int8 Linear layers for the decoder's copies (``Decoder.int8_weights``, opt-in).

A decode step of a small model on a CPU is paced by the bytes of weights it reads, not by its
arithmetic (``benchmarks/results/decode_step_options.json``): int8 weights read a quarter of
fp32's. Only the weights are quantized, symmetrically with one scale per output row, so a row's
largest weight is kept to within half a step and the activations keep their precision (unlike
``torch.ao``'s dynamic quantization, which also rounds every input vector to int8 and which
PyTorch deprecates). One token at a time goes through PyTorch's int8 matrix-vector kernel
(``aten._weight_int8pack_mm``, fast for bf16 inputs on AVX2 and AVX-512 alike); a prefill of
many positions multiplies by the dequantized weight instead, where that kernel is slower than
an fp32 matrix product.
"""

from __future__ import annotations

import torch
from torch import nn

# Rows (positions times batch) up to which a call takes the int8 kernel: a decode step of a
# lockstep batch, not a prefill.
INT8_KERNEL_MAX_ROWS = 8


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as int8 rows times an fp32 scale per row."""

    qweight: torch.Tensor
    scale: torch.Tensor
    kernel_scale: torch.Tensor  # the scale in bf16, as the int8 kernel takes it

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", quantized.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("kernel_scale", scale.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the int8 rows stand for, in ``dtype``."""
        return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > INT8_KERNEL_MAX_ROWS or x.device.type != "cpu":
            return nn.functional.linear(x, self.dequantized(x.dtype), self.bias)
        flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.kernel_scale)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_linears(module: nn.Module) -> nn.Module:
    """``module`` (a copy the decoder owns) with every ``nn.Linear`` swapped, in place, for an
    :class:`Int8Linear`; the float weights it shared are read, never changed."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
        else:
            quantize_linears(child)
    return module
