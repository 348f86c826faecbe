"""The byte tokenizer is lossless on any bytes and refuses other tokenizer descriptions."""

import os

import pytest

from raystack.tokenizer import EOT, ByteTokenizer


@pytest.mark.parametrize("data", [b"", b"hello", "héllo wörld ✓ 🚀".encode(), bytes(range(256)), os.urandom(1000)])
def test_round_trip_is_lossless(data):
    tok = ByteTokenizer()
    ids = tok.encode(data)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode_bytes(ids) == data


def test_text_round_trip_and_special_tokens_carry_no_bytes():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("naïve café") + [EOT]) == "naïve café"


def test_description_round_trip_and_refusal():
    tok = ByteTokenizer()
    assert ByteTokenizer.from_dict(tok.to_dict()).vocab_size == 257
    with pytest.raises(ValueError, match="unsupported tokenizer"):
        ByteTokenizer.from_dict({"kind": "bpe", "vocab_size": 50257})
