"""Byte-level tokenizer: ids 0-255 are the raw bytes, 256 is ``<|endoftext|>``.

Lossless on any input: ``decode_bytes(encode(b)) == b`` for every byte string ``b`` (text is UTF-8 encoded first).
Text is only ever bytes: the characters ``<|endoftext|>`` in a prompt are 13 byte tokens, never the special token.

The description stored in a model artifact (``tokenizer.json``, ``ByteTokenizer().to_dict()``) is the Hugging Face
``tokenizers`` format, with ``tokenizer_config.json`` (``hf_tokenizer_config()``) beside it, so
``transformers.AutoTokenizer.from_pretrained(artifact_dir)`` and ``tokenizers.Tokenizer.from_file`` load the same
tokenizer: GPT-2's byte-to-character map with no merges (each byte one token, id = byte value), and
``<|endoftext|>`` as special token 256 that text never produces (``split_special_tokens``). ``encode`` is identical;
``decode(ids, skip_special_tokens=True)`` equals raystack's ``decode`` (special tokens carry no text here).
``from_dict`` reads that file (and the ``{"kind": "byte"}`` description of older artifacts) and refuses anything
else, so an artifact built for another tokenizer fails loudly instead of producing garbage.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

EOT = 256
VOCAB_SIZE = 257
EOT_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = {EOT_TEXT: EOT}

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""The plain chat template of raystack's base models (Jinja, as Hugging Face chat templates): one ``role: content``
line per message, then ``assistant:`` for the model to continue. Stored in the artifact's tokenizer_config.json."""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the ``ByteLevel`` pre-tokenizer's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


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
        """The Hugging Face ``tokenizers`` JSON of this tokenizer (what an artifact's tokenizer.json holds)."""
        level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        vocab = {char: b for b, char in byte_to_unicode().items()}
        vocab[EOT_TEXT] = EOT  # reachable only as the added special token: no merges build it from bytes
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": EOT, "content": EOT_TEXT, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None, "pre_tokenizer": level, "post_processor": None, "decoder": level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": []},
        }

    @staticmethod
    def hf_tokenizer_config(chat_template: str = DEFAULT_CHAT_TEMPLATE, max_length: int | None = None) -> dict:
        """tokenizer_config.json for ``transformers.AutoTokenizer`` (next to tokenizer.json in an artifact)."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT_TEXT, "bos_token": EOT_TEXT,
                  "unk_token": None, "pad_token": None, "add_bos_token": False, "add_eos_token": False,
                  "split_special_tokens": True, "clean_up_tokenization_spaces": False,
                  "chat_template": chat_template}
        if max_length:
            config["model_max_length"] = max_length
        return config

    @classmethod
    def from_dict(cls, description: dict) -> "ByteTokenizer":
        if description.get("kind") == cls.kind and description.get("vocab_size") == VOCAB_SIZE:
            return cls()  # the description older artifacts hold
        if description == cls().to_dict():
            return cls()
        model = description.get("model") if isinstance(description.get("model"), dict) else {}
        shown = {k: description[k] for k in ("kind", "vocab_size") if k in description} or \
            {"model": model.get("type"), "vocab entries": len(model.get("vocab") or {})}
        raise ValueError(
            f"unsupported tokenizer {shown!r}: raystack reads only its byte tokenizer (256 byte tokens and "
            f"<|endoftext|> = {EOT}, as ByteTokenizer().to_dict() writes it)"
        )
