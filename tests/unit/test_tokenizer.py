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


def test_old_artifact_description_still_loads_and_others_are_named():
    assert ByteTokenizer.from_dict({"kind": "byte", "vocab_size": 257}).vocab_size == 257
    other = {**ByteTokenizer().to_dict(), "model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a", "b"]]}}
    with pytest.raises(ValueError, match="'vocab entries': 1"):
        ByteTokenizer.from_dict(other)


def test_hugging_face_tokenizers_reads_the_artifact_file_and_agrees_on_any_text(tmp_path):
    """The artifact's tokenizer.json loaded by Hugging Face's own library encodes and decodes as raystack does,
    on property-based text (surrogate-free Unicode, the special token's spelling included) and on raw bytes."""
    import json

    from hypothesis import given, settings
    from hypothesis import strategies as st

    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(ByteTokenizer().to_dict()))
    hf = tokenizers.Tokenizer.from_file(str(path))
    hf.encode_special_tokens = True  # what tokenizer_config.json's split_special_tokens sets in transformers
    ours = ByteTokenizer()
    assert hf.get_vocab_size() == 257 and hf.token_to_id("<|endoftext|>") == EOT

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(st.one_of(st.text(st.characters(blacklist_categories=("Cs",))), st.just("a<|endoftext|>b\n")),
           st.binary(max_size=24))
    def agree(text, data):
        assert hf.encode(text, add_special_tokens=True).ids == ours.encode(text)
        ids = ours.encode(text) + [EOT]
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)
        assert hf.decode(list(data)) == ours.decode(list(data))  # invalid UTF-8 replaced alike

    agree()
