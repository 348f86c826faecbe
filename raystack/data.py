"""Corpus pipeline: sources -> Ray Data (read, tokenize, split, pack) -> packed token blocks in storage -> batches.

Contract:
- ``DataConfig.sources`` are text files, directories, globs or parquet files (``.parquet``), local paths or object-store
  URIs (anything ``pyarrow.fs`` opens: ``s3://``, ``gs://``, ``file://``). Empty means the default corpus: the
  source code of the running Python's standard library (a real corpus on every machine, no download).
- ``prepare_blocks(config, out_dir)`` runs Ray Data over the sources: in parallel, each document is read,
  tokenized (byte tokenizer) and assigned to train or validation by a hash of its content (never by order). The
  documents are then joined with ``<|endoftext|>`` in key order (path, or content hash for parquet rows) and cut
  into fixed blocks of ``block_size + 1`` tokens, so the blocks do not depend on how Ray Data batched the work. The
  blocks are committed to ``out_dir`` by ``raystack.commit`` as ``train.npy`` / ``val.npy`` (uint16
  ``[N, block_size + 1]``) and ``meta.json``, with their checksums in the ``_SUCCESS`` manifest; a directory without
  a manifest is never read, a torn one is refused. A re-run with the same inputs reuses the blocks.
- A directory source is read through its ``_SUCCESS`` manifest when it has one; otherwise every file in it except
  hidden ones (a part starting with ``.``, ``_temporary/``, ``_SUCCESS``, ``_metadata``, ``_common_metadata``).
- ``batch_indices(step, batch_size, n_blocks, seed)`` says which blocks make up optimizer step ``step``: a
  permutation seeded by ``(seed, epoch)`` walked in order. The data position is therefore just the step counter,
  and a resumed run sees exactly the batches an uninterrupted one would, for any worker count.
- A missing source, a missing column, an unreadable file or an empty corpus raise ``DataError`` naming the source.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import json
import logging
import os
import posixpath
import sysconfig
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raystack import commit, storage
from raystack.tokenizer import EOT, ByteTokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: max_documents keeps the first documents in path order, in every process


class DataError(ValueError):
    """A corpus source is missing, unreadable, of the wrong shape, or empty."""


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=list)
    """Text files, directories, globs or ``.parquet`` files, local or URIs. Empty: the Python standard library."""
    text_column: str = "text"
    """Column holding the documents in parquet sources."""
    block_size: int = 128
    """Tokens per training example; blocks hold ``block_size + 1`` tokens (inputs plus shifted targets)."""
    val_fraction: float = 0.05
    """Share of documents (by content hash) held out for validation loss."""
    max_documents: int = 0
    """Read at most this many documents, the first in sorted path order (0 = all). Keeps tests and demos small."""

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"data.block_size must be >= 1, got {self.block_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_documents < 0:
            raise ValueError(f"data.max_documents must be >= 0 (0 = all), got {self.max_documents}")


# ----------------------------------------------------------------------------------------------------------------
# Sources


def default_corpus_dir() -> str:
    """The running Python's standard library source directory."""
    return sysconfig.get_paths()["stdlib"]


def _filesystem(source: str) -> tuple[pafs.FileSystem, str]:
    try:
        return storage.filesystem(source)
    except Exception as e:  # pyarrow raises several types for bad URIs and missing credentials
        raise DataError(f"cannot open data source {source!r}: {e}") from None


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def resolve_source(source: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and sorted file paths one source names (a file, a directory, or a glob)."""
    fs, path = _filesystem(source)
    if _is_glob(path):
        if isinstance(fs, pafs.LocalFileSystem):
            paths = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        else:
            base = path
            while _is_glob(base):
                base = posixpath.dirname(base)
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            paths = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data source {source!r} does not exist; pass existing files, directories or globs")
        if info.type == pafs.FileType.Directory:
            try:
                paths = commit.listed_paths(fs, path)
            except commit.CommitError as e:
                raise DataError(f"data source {source!r}: {e}") from None
            if paths is None:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                paths = [i.path for i in infos
                         if i.type == pafs.FileType.File and not commit.is_hidden(posixpath.relpath(i.path, path))]
        else:
            paths = [path]
    if not paths:
        raise DataError(f"data source {source!r} matches no files")
    return fs, sorted(paths)


@dataclass
class ResolvedSources:
    text: list[tuple[pafs.FileSystem, list[str]]]
    parquet: list[tuple[pafs.FileSystem, list[str]]]
    fingerprint: str
    description: str


def resolve_sources(config: DataConfig) -> ResolvedSources:
    sources = config.sources or [os.path.join(default_corpus_dir(), "*.py")]
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, config.text_column, config.block_size,
                                        config.val_fraction, config.max_documents]).encode())
    text, parquet = [], []
    for source in sources:
        fs, paths = resolve_source(source)
        pq_paths = [p for p in paths if p.endswith(".parquet")]
        txt_paths = [p for p in paths if not p.endswith(".parquet")]
        if pq_paths:
            check_parquet_column(source, fs, pq_paths, config.text_column, "data.text_column")
            parquet.append((fs, pq_paths))
        if txt_paths:
            text.append((fs, txt_paths))
        for info in fs.get_file_info(paths):
            digest.update(f"{source}|{info.path}|{info.size}|{info.mtime_ns}".encode())
    description = ", ".join(sources) if config.sources else f"Python standard library ({sources[0]})"
    return ResolvedSources(text, parquet, digest.hexdigest()[:16], description)


def _is_text(kind: pa.DataType) -> bool:
    """Whether a parquet column holds text: strings, or bytes (byte arrays without the UTF-8 annotation)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return any(check(kind) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                         pa.types.is_large_binary, pa.types.is_string_view, pa.types.is_binary_view))


def check_parquet_column(source: str, fs, paths: list[str], column: str, setting: str) -> list[str]:
    """The column names all ``paths`` share (read from footers only); ``DataError`` naming the file when one is
    unreadable or lacks ``column``, and ``setting``, the option that picks another column."""
    common: Optional[list[str]] = None
    for path in paths:
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except Exception as e:
            raise DataError(f"cannot read parquet file {path!r} (from source {source!r}): {e}") from None
        if column not in schema.names:
            raise DataError(f"parquet file {path!r} has no column {column!r} (it has {schema.names}); "
                            f"set {setting} to the column that holds the text")
        kind = schema.field(column).type
        if not _is_text(kind):
            raise DataError(f"parquet file {path!r}: column {column!r} holds {kind}, not text; set {setting} to a "
                            "string column")
        common = schema.names if common is None else [n for n in common if n in schema.names]
    return common or []


def read_parquet_rows(batch: dict, columns: list[str], id_column: Optional[str]):
    """``map_batches`` generator over file entries (``path``, ``file_index``, ``uri``): each file's ``columns``,
    row group by row group, with the id column named ``id`` (``id_column`` renamed, or with None, ``"<file
    index>:<row>"``, the same on every run). Imports nothing heavy: the Ray workers that read need no torch."""
    fs = _filesystem(batch["uri"][0])[0] if batch["uri"][0] else pafs.LocalFileSystem()
    for path, file_index in zip(batch["path"], batch["file_index"]):
        with fs.open_input_file(path) as f:
            offset = 0
            for record_batch in pq.ParquetFile(f).iter_batches(columns=columns, batch_size=1024):
                table = pa.Table.from_batches([record_batch])
                if id_column is None:
                    ids = [f"{file_index}:{offset + i}" for i in range(table.num_rows)]
                    table = table.append_column("id", pa.array(ids, pa.string()))
                elif id_column != "id":
                    table = table.rename_columns(["id" if name == id_column else name for name in table.column_names])
                offset += table.num_rows
                yield table


# ----------------------------------------------------------------------------------------------------------------
# Tokenize, split, pack (pure functions; Ray Data runs them in parallel)


def is_validation(document: bytes, val_fraction: float) -> bool:
    """Deterministic split by content: the same document lands on the same side on every run and machine."""
    h = int.from_bytes(hashlib.blake2b(document, digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


def pack_tokens(documents: list[np.ndarray], block_size: int) -> np.ndarray:
    """Join token arrays with ``<|endoftext|>`` after each and cut ``[n, block_size + 1]`` uint16 blocks; the tail
    shorter than one block is dropped (at most ``block_size`` tokens per split)."""
    width = block_size + 1
    if not documents:
        return np.zeros((0, width), np.uint16)
    eot = np.array([EOT], dtype=np.uint16)
    stream = np.concatenate([piece for doc in documents for piece in (np.asarray(doc, np.uint16), eot)])
    n = len(stream) // width
    return stream[: n * width].reshape(n, width)


def pack_documents(documents: list[bytes], block_size: int, val_fraction: float) -> dict[str, np.ndarray]:
    """Tokenize, split by content hash and pack ``documents`` in the given order (the pure form of the pipeline)."""
    tokenizer = ByteTokenizer()
    splits: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for doc in documents:
        splits["val" if is_validation(doc, val_fraction) else "train"].append(tokenizer.encode_array(doc))
    return {split: pack_tokens(docs, block_size) for split, docs in splits.items()}


def _tokenize_batch(batch: dict, val_fraction: float) -> dict:
    """Ray Data ``map_batches`` body: each document -> its key, its split and its tokens."""
    tokenizer = ByteTokenizer()
    tokens = np.empty(len(batch["doc"]), dtype=object)
    splits = []
    for i, doc in enumerate(batch["doc"]):
        doc = bytes(doc)
        tokens[i] = tokenizer.encode_array(doc)
        splits.append("val" if is_validation(doc, val_fraction) else "train")
    return {"key": np.array(list(batch["key"]), dtype=object), "split": np.array(splits, dtype=object),
            "tokens": tokens}


def _text_documents(batch: dict) -> dict:
    return {"key": np.array(list(batch["path"]), dtype=object), "doc": np.array(list(batch["bytes"]), dtype=object)}


def _parquet_documents(batch: dict, column: str) -> dict:
    keys, docs = [], []
    for value in batch[column]:
        if value is None:
            continue  # a null row has no text to learn from; counted as skipped in meta.json
        doc = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        keys.append(hashlib.blake2b(doc, digest_size=16).hexdigest())
        docs.append(doc)
    return {"key": np.array(keys, dtype=object), "doc": np.array(docs, dtype=object)}


# ----------------------------------------------------------------------------------------------------------------
# Storage of packed blocks


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load_blocks(uri: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(train, val, meta)`` from a committed block directory written by ``prepare_blocks``, checksums checked."""
    try:
        manifest, files = commit.read_files(uri, ["train.npy", "val.npy"])
    except commit.CommitError as e:
        raise DataError(f"no usable token blocks: {e}") from None
    train, val = (np.load(io.BytesIO(files[name]), allow_pickle=False) for name in ("train.npy", "val.npy"))
    return train, val, manifest["meta"]


def prepare_blocks(config: DataConfig, out_root: str) -> str:
    """Pack the corpus into ``out_root/<fingerprint>`` (reusing it when already committed); return that URI."""
    resolved = resolve_sources(config)
    out_uri = storage.join(out_root, resolved.fingerprint)
    try:
        if commit.listed_paths(*storage.filesystem(out_uri)) is not None:
            logger.info("reusing packed token blocks at %s", out_uri)
            return out_uri
    except commit.CommitError as e:
        logger.warning("packing again: %s", e)
    documents = _read_documents(_tokenized_dataset(config, resolved), resolved.description)
    blocks = _pack_splits(documents, config, resolved.description)
    meta = {"format_version": FORMAT_VERSION, "sources": resolved.description, "block_size": config.block_size,
            "train_blocks": len(blocks["train"]), "val_blocks": len(blocks["val"]),
            "train_tokens": int(blocks["train"].size), "val_tokens": int(blocks["val"].size)}
    attempt = commit.begin(out_uri)
    attempt.write("train.npy", _npy_bytes(blocks["train"]))
    attempt.write("val.npy", _npy_bytes(blocks["val"]))
    attempt.write("meta.json", json.dumps(meta, indent=2).encode())
    attempt.commit(meta=meta, replace_all=True)  # the directory is ours: <run>/data/<fingerprint>
    logger.info("packed %d train / %d val blocks from %s into %s", meta["train_blocks"], meta["val_blocks"],
                resolved.description, out_uri)
    return out_uri


def _tokenized_dataset(config: DataConfig, resolved: ResolvedSources):
    """One Ray Dataset of ``{key, split, tokens}`` rows over every source, at most ``max_documents`` of them."""
    import ray.data

    # Ray Data snapshots the context when a dataset is created: order must be fixed before building it, or `limit`
    # keeps whichever documents finish first (a fresh process's first call differed from later ones).
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    datasets, budget = [], config.max_documents or None
    for fs, paths in resolved.text:
        if budget is not None:  # text files are documents: the first N in path order, without reading the rest
            paths, budget = paths[:budget], budget - min(budget, len(paths))
        if paths:
            ds = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True)
            datasets.append(ds.map_batches(_text_documents, batch_format="numpy"))
    for fs, paths in resolved.parquet:
        if budget == 0:
            break
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=[config.text_column])
        ds = ds.map_batches(_parquet_documents, fn_kwargs={"column": config.text_column}, batch_format="numpy")
        datasets.append(ds.limit(budget) if budget else ds)
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    if config.max_documents:
        ds = ds.limit(config.max_documents)
    return ds.map_batches(_tokenize_batch, batch_format="numpy", fn_kwargs={"val_fraction": config.val_fraction})


def _read_documents(tokenized, description: str) -> dict[str, list[tuple[str, np.ndarray]]]:
    """``{split: [(key, tokens)]}`` as Ray Data produces them; a read failure becomes one ``DataError``."""
    documents: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "val": []}
    try:
        for batch in tokenized.iter_batches(batch_format="numpy", batch_size=1024):
            for key, split, tokens in zip(batch["key"], batch["split"], batch["tokens"]):
                documents[split].append((key, np.asarray(tokens, np.uint16)))
    except Exception as e:  # a read failure surfaces here, wrapped in Ray's task errors
        cause = getattr(e, "cause", None) or e
        raise DataError(f"cannot read the corpus {description}: {type(cause).__name__}: {cause}") from None
    return documents


def _pack_splits(documents: dict, config: DataConfig, description: str) -> dict[str, np.ndarray]:
    """Each split's documents joined in key order (path, or content hash for parquet rows), not in the order Ray
    Data produced them: the same inputs give the same blocks on every run, whatever the cluster's parallelism."""
    blocks = {split: pack_tokens([t for _, t in sorted(docs, key=lambda d: d[0])], config.block_size)
              for split, docs in documents.items()}
    if len(blocks["train"]) == 0:
        raise DataError(f"the corpus {description} yields no training block of {config.block_size + 1} tokens; "
                        "add text or lower data.block_size")
    if len(blocks["val"]) == 0 and config.val_fraction > 0:
        # Too few documents for a hash split to hold any out: keep the last blocks of train for validation.
        n_val = max(1, int(round(config.val_fraction * len(blocks["train"]))))
        if n_val >= len(blocks["train"]):
            raise DataError(f"the corpus {description} is too small to hold out a validation block")
        blocks["val"], blocks["train"] = blocks["train"][-n_val:], blocks["train"][:-n_val]
        logger.warning("no document hashed into validation; held out the last %d training blocks", n_val)
    return blocks


# ----------------------------------------------------------------------------------------------------------------
# Batches by index


def batch_indices(step: int, batch_size: int, n_blocks: int, seed: int) -> np.ndarray:
    """Block indices of optimizer step ``step`` (0-based): positions ``step * batch_size ...`` of the stream formed
    by concatenating one permutation of ``range(n_blocks)`` per epoch, each seeded by ``(seed, epoch)``."""
    flat = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(flat, n_blocks)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n_blocks)
        mask = epochs == epoch
        out[mask] = perm[offsets[mask]]
    return out
