"""Memory slots: the compressed form of one span, as the decoder consumes it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from icmem.codec import Codec, decode_slots, encode_slots


@dataclass(frozen=True)
class MemorySlots:
    """The ``(k, d)`` slot vectors of one span plus what is needed to use them safely.

    ``fingerprint`` names the base model that produced the slots (``icmem.models.
    model_fingerprint``): slots fed to any other model are plausible-looking noise, so
    ``ICAE.generate`` refuses them. ``token_count`` is the length of the span they stand for
    (``None`` when unknown, e.g. for bytes whose row kept no count); reconstruction uses it to
    bound its output.
    """

    tensor: torch.Tensor  # (k, d)
    span_id: str | None
    token_count: int | None
    fingerprint: str

    def __post_init__(self) -> None:
        if self.tensor.ndim != 2 or 0 in self.tensor.shape:
            raise ValueError(
                f"memory slots must be a non-empty (k, d) tensor, got shape "
                f"{tuple(self.tensor.shape)}; pass one span's slots at a time"
            )

    @property
    def num_slots(self) -> int:
        return self.tensor.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.tensor.shape[1]

    def to_bytes(self, codec: Codec = "bf16") -> bytes:
        """Serialise with ``icmem.codec`` (bf16 by default; fp16, int8 and fp32 too)."""
        array = self.tensor.detach().to("cpu", torch.float32).numpy()
        return encode_slots(array, codec=codec, fingerprint=self.fingerprint)

    @classmethod
    def from_bytes(
        cls,
        blob: bytes | bytearray | memoryview,
        expected_fingerprint: str | None = None,
        *,
        span_id: str | None = None,
        token_count: int | None = None,
    ) -> MemorySlots:
        """Decode a blob from ``to_bytes`` into float32 slots.

        With ``expected_fingerprint`` a blob from another base model is refused before its
        payload is read. The blob carries no span id or token count (the store keeps those in
        its rows), so pass them back in here.
        """
        array, header = decode_slots(blob, expected_fingerprint=expected_fingerprint)
        return cls(
            tensor=torch.from_numpy(array),
            span_id=span_id,
            token_count=token_count,
            fingerprint=header.fingerprint,
        )
