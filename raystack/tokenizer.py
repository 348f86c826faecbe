"""Byte-level tokenizer: ids 0-255 are the raw bytes, 256 is ``<|endoftext|>``.

Lossless on any input: ``decode_bytes(encode(b)) == b`` for every byte string ``b`` (text is UTF-8 encoded first).
The tokenizer description stored in a model artifact is ``ByteTokenizer().to_dict()``; ``from_dict`` refuses any
other kind so that an artifact built for another tokenizer fails loudly instead of producing garbage.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

EOT = 256
VOCAB_SIZE = 257
SPECIAL_TOKENS = {"<|endoftext|>": EOT}


class ByteTokenizer:
    kind = "byte"
    vocab_size = VOCAB_SIZE
    eot_id = EOT

    def encode(self, text: str | bytes) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return list(data)

    def encode_array(self, data: bytes):
        """``encode`` as a uint16 NumPy array (the hot path of corpus packing)."""

        return np.frombuffer(bytes(data), dtype=np.uint8).astype(np.uint16)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Bytes of the non-special ids (special tokens carry no bytes)."""
        return bytes(i for i in ids if 0 <= i < 256)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "special_tokens": dict(SPECIAL_TOKENS)}

    @classmethod
    def from_dict(cls, description: dict) -> "ByteTokenizer":
        if description.get("kind") != cls.kind or description.get("vocab_size") != VOCAB_SIZE:
            raise ValueError(
                f"unsupported tokenizer {description!r}: raystack reads only its byte tokenizer "
                f"(kind 'byte', vocab_size {VOCAB_SIZE})"
            )
        return cls()
