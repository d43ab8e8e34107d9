"""Slot blobs as the store sees them: verified whole (header and checksum) without decoding.

The blob format belongs to ``icmem.codec``; this only re-runs its CRC-32 over the stored bytes so
that a flipped payload bit is caught when a blob is written and when it is read back, not when a
model finally decodes it.
"""

from __future__ import annotations

import zlib

from icmem.codec import _CRC_OFFSET, CorruptSlotBlobError, SlotBlobHeader, read_slot_header

__all__ = ["verify_slot_blob"]


def verify_slot_blob(blob: bytes | bytearray | memoryview) -> SlotBlobHeader:
    """The blob's header once its sizes and checksum verify; CorruptSlotBlobError otherwise."""
    header = read_slot_header(blob)
    view = memoryview(blob)
    head = bytearray(view[: header.header_nbytes])
    head[_CRC_OFFSET : _CRC_OFFSET + 4] = b"\0\0\0\0"
    if zlib.crc32(view[header.header_nbytes :], zlib.crc32(head)) != header.checksum:
        raise CorruptSlotBlobError(
            "slot blob checksum does not match its contents; the bytes were damaged in storage "
            "or transit, re-encode the span"
        )
    return header
