"""Corpus pieces without Ray: source resolution, the content-hash split, block packing, batch order."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raystack.data import (DataConfig, DataError, batch_indices, is_validation, pack_documents, resolve_source,
                           resolve_sources)
from raystack.tokenizer import EOT


def test_pack_documents_joins_with_eot_and_cuts_full_blocks():
    docs = [b"abcdefg", b"hij", b"klmnopqrstu"]
    packed = pack_documents(docs, block_size=4, val_fraction=0.0)
    stream = list(b"abcdefg") + [EOT] + list(b"hij") + [EOT] + list(b"klmnopqrstu") + [EOT]
    n = len(stream) // 5
    assert packed["train"].dtype == np.uint16
    assert packed["train"].tolist() == np.array(stream[: n * 5]).reshape(n, 5).tolist()
    assert packed["val"].shape == (0, 5)


def test_split_is_by_content_not_order():
    docs = [f"document number {i}".encode() * 3 for i in range(400)]
    forward = pack_documents(docs, block_size=8, val_fraction=0.2)
    val_docs = {d for d in docs if is_validation(d, 0.2)}
    assert 40 < len(val_docs) < 120  # ~20% by hash
    assert all(is_validation(d, 0.2) == is_validation(d, 0.2) for d in docs)  # deterministic
    backward = pack_documents(list(reversed(docs)), block_size=8, val_fraction=0.2)
    assert sum(map(len, forward.values())) == sum(map(len, backward.values()))
    # A validation document's bytes never land in train.
    some_val = next(iter(val_docs))
    train_bytes = bytes(forward["train"].astype(np.uint8).ravel()[forward["train"].ravel() < 256])
    assert some_val[:24] not in train_bytes


def test_batch_indices_walk_a_seeded_permutation_per_epoch():
    n, batch = 10, 4
    seen = np.concatenate([batch_indices(step, batch, n, seed=7) for step in range(5)])  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # a fresh permutation per epoch
    assert np.array_equal(batch_indices(3, batch, n, seed=7), seen[12:16])  # position = step, nothing else
    assert not np.array_equal(batch_indices(0, batch, n, seed=8), seen[:4])


def test_missing_source_names_it(tmp_path):
    with pytest.raises(DataError, match="does-not-exist"):
        resolve_source(str(tmp_path / "does-not-exist.txt"))
    with pytest.raises(DataError, match="matches no files"):
        resolve_source(str(tmp_path / "*.nothing"))


def test_parquet_without_the_text_column_names_file_and_columns(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    with pytest.raises(DataError, match=r"no column 'text'.*\['body'\].*data.text_column"):
        resolve_sources(DataConfig(sources=[str(path)]))


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="cannot read parquet file.*broken.parquet"):
        resolve_sources(DataConfig(sources=[str(path)]))


def test_globs_and_directories_resolve_sorted(tmp_path):
    for name in ["b.txt", "a.txt", "sub/c.txt"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    _, paths = resolve_source(str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["a.txt", "b.txt", "c.txt"]
    _, paths = resolve_source(str(tmp_path / "*.txt"))
    assert len(paths) == 2


def test_default_corpus_is_the_standard_library():
    resolved = resolve_sources(DataConfig())
    (fs, paths), = resolved.text
    assert any(p.endswith("/os.py") for p in paths)
    assert "standard library" in resolved.description
