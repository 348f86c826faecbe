"""Batch inference over parquet tables with Ray Data: generate completions or score texts, row by row.

Contract:
- Input: parquet (a file, directory or glob; local or object-store URI) with a prompt column (``generate``) or a
  text column (``score``) and optionally an id column. Without an id column each row gets ``"<file>:<row>"`` (the
  file's index in sorted order and the row's index in that file), the same on every run.
- Ray Data streams the files (row group by row group, cut into blocks of ``batch_size`` rows) into ``map_batches``
  with a callable class that loads the model artifact once per actor, on an autoscaling actor pool
  (``ActorPoolStrategy(min_size, max_size)``), with ``num_gpus``/``num_cpus`` per actor and one block per call, so
  even a single file spreads over every actor; results stream into parquet parts of at least ``rows_per_file``
  rows (the last part may hold fewer), each written as soon as it is full.
  Tables larger than memory work: nothing is materialised.
- ``generate`` rows get ``completion``, ``prompt_tokens``, ``completion_tokens``, ``finish_reason`` (and
  ``logprobs``, on request) through the continuous-batching engine and the sampling op. Sampling parameters are
  the job's ``sampling`` section (the serve spec's type, ``GenerationParams``), or per row from columns named like
  its fields (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, the penalties) when the
  input has them, checked by the HTTP API's parser. A row without a seed gets one derived from ``sampling.seed``
  and its id, so a re-run gives identical output (``sampling.seed: null``: a fresh random seed per row).
- ``score`` rows get ``log_likelihood`` (natural log, of the text's tokens after an end-of-text token) and
  ``perplexity`` (``exp(-log_likelihood / tokens)``), and ``tokens``.
- A row that cannot be processed (null or empty input, too long for the model) gets its reason in ``error`` and
  nulls elsewhere; the job goes on. A missing column or unreadable input ends the job with one ``DataError``.
- Output: a directory committed by ``raystack.commit``: parquet parts under ``<attempt>/`` and the ``_SUCCESS``
  manifest (each part's size and row count) written last; ``pd.read_parquet(output)`` reads it (``_``-prefixed
  entries are skipped). An existing output is refused unless ``overwrite``; then the new output is staged beside it
  and replaces it at one step, never a mix of old and new rows, and a crash at any point leaves one of the two.
  An input directory with a manifest is read through it: staging leftovers and replaced parts are never input.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from raystack import commit, storage
from raystack.cluster import check_model_artifact, error_line
from raystack.data import DataError, check_parquet_column, read_parquet_rows, resolve_source
from raystack.engine import (Engine, EngineConfig, GenerationParams, SequenceFailed, check_quantize, check_threads,
                             generate_text)
from raystack.model import causal_lm_loss
from raystack.openai_api import (SAMPLING_FIELDS, APIError, RequestLimits, check_sampling_section,
                                 generation_params)

logger = logging.getLogger(__name__)

OUTPUT_TYPES = {
    "completion": pa.string(), "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(),
    "finish_reason": pa.string(), "logprobs": pa.list_(pa.float64()), "error": pa.string(),
    "log_likelihood": pa.float64(), "perplexity": pa.float64(), "tokens": pa.int64(),
}


@dataclass
class BatchConfig:
    model: str = ""
    """Model artifact path or URI."""
    input: str = ""
    """Parquet file, directory or glob (local or URI)."""
    output: str = ""
    """Output directory (local or URI)."""
    mode: str = "generate"
    """``generate`` completions or ``score`` texts."""
    prompt_column: str = "prompt"
    text_column: str = "text"
    id_column: str = "id"
    """Used when the input has it; otherwise ids are generated as ``<file>:<row>``."""
    overwrite: bool = False
    sampling: GenerationParams = field(default_factory=lambda: GenerationParams(max_tokens=32, seed=0))
    """Sampling for every row (a row's own columns of these names win); ``seed`` is the job seed each row's is
    derived from."""
    batch_size: int = 32
    """Rows per map_batches call (and KV-cache slots per actor)."""
    min_actors: int = 1
    max_actors: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    quantize: str = "none"
    """``none`` or ``int8`` (int8 weights in the linear layers, CPU actors; ``raystack.engine.EngineConfig``)."""
    prefix_caching: bool = True
    """Reuse the keys and values a finished row left in its KV slot for a prompt that starts with its tokens (a shared
    preamble): only the rest is prefilled (``raystack.engine.EngineConfig``). False prefills every prompt whole, so a
    seeded row's output never depends on the rows before it."""
    threads: int = 0
    """torch threads per actor; 0 = num_cpus."""
    rows_per_file: int = 4096
    """Rows the writer gathers into one output parquet part (the last may hold fewer); blocks are ``batch_size``
    rows, so a smaller value stages parts sooner and in more files."""

    RENAMED: ClassVar[dict] = {name: f"sampling.{name}" for name in (*SAMPLING_FIELDS, "stop", "logprobs")}

    def __post_init__(self):
        for name in ("model", "input", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required (--{name} ...)")
        if self.mode not in ("generate", "score"):
            raise ValueError(f"mode must be generate or score, got {self.mode!r}")
        if not 1 <= self.min_actors <= self.max_actors:
            raise ValueError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}, {self.max_actors}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {self.rows_per_file}")
        check_quantize(self.quantize)
        check_threads(self.threads)
        check_sampling_section(self.sampling)


# ----------------------------------------------------------------------------------------------------------------
# Reading (``raystack.data.read_parquet_rows``: one task per file, row groups streamed, ids stable across runs)


def _plan_input(config: BatchConfig) -> tuple[list[str], list[str], Optional[str], str]:
    """Files, columns to read, the id column (None = generate) and the input column; clear errors up front."""
    fs, paths = resolve_source(config.input)
    paths = [p for p in paths if p.endswith(".parquet")] or paths
    column = config.prompt_column if config.mode == "generate" else config.text_column
    id_column: Optional[str] = config.id_column
    names = check_parquet_column(config.input, fs, paths, column,
                                 "prompt_column" if config.mode == "generate" else "text_column")
    if id_column not in names:
        id_column = None
    columns = [column] + ([id_column] if id_column else [])
    if config.mode == "generate":
        columns += [c for c in SAMPLING_FIELDS if c in names]
    return paths, columns, id_column, column


# ----------------------------------------------------------------------------------------------------------------
# The per-actor callable


def row_seed(job_seed: int, row_id) -> int:
    digest = hashlib.blake2b(f"{job_seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _plain(name: str, value):
    """A parquet cell as the plain Python number the API checks see: NumPy scalars unwrapped, and an integral float
    (an integer column with nulls reads as float64) as an int for the integer fields; ``inf`` stays a float, so it
    is refused by name."""
    if isinstance(value, np.generic):
        value = value.item()
    if name in ("max_tokens", "top_k", "seed") and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _cell_text(value, errors: str = "strict") -> Optional[str]:
    """A prompt or text cell as ``str`` (None for null): a binary column's bytes (parquet byte arrays written without
    the UTF-8 annotation) decoded as UTF-8, where ``str()`` would give ``"b'...'"``. ``check_parquet_column`` lets
    only string and binary columns through."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors)
    return str(value)


class Predictor:
    """Loads the artifact once per actor; each call generates or scores a batch of rows."""

    def __init__(self, config: BatchConfig, input_column: str):
        self.config = config
        self.column = input_column
        torch.set_num_threads(config.threads or max(1, int(config.num_cpus)))
        self.engine = Engine.from_artifact(config.model, EngineConfig(max_batch_size=config.batch_size,
                                                                      quantize=config.quantize,
                                                                      prefix_caching=config.prefix_caching))
        self.limits = RequestLimits(vocab_size=self.engine.tokenizer.vocab_size,
                                    max_model_len=self.engine.max_model_len)
        self.loop = asyncio.new_event_loop()

    def __call__(self, batch: dict) -> pa.Table:
        rows = len(batch[self.column])
        if self.config.mode == "score":
            outputs = self._score(batch[self.column])
        else:
            outputs = self.loop.run_until_complete(self._generate(batch, rows))
        # Explicit types: every block must write the same schema, even one whose errors are all null.
        columns = {"id": pa.array(list(batch["id"])),
                   self.column: pa.array([_cell_text(v, errors="replace") for v in batch[self.column]], pa.string())}
        for name, values in outputs.items():
            columns[name] = pa.array(list(values), OUTPUT_TYPES[name])
        return pa.table(columns)

    async def _generate(self, batch: dict, rows: int) -> dict:
        cfg = self.config
        out = {"completion": [None] * rows, "prompt_tokens": [None] * rows, "completion_tokens": [None] * rows,
               "finish_reason": [None] * rows, "error": [None] * rows}
        if cfg.sampling.logprobs:
            out["logprobs"] = [None] * rows
        jobs = []
        for i in range(rows):
            prompt = self._text(batch[self.column][i], out["error"], i)
            if prompt is None:
                continue
            try:
                values = {name: _plain(name, self._value(batch, name, i)) for name in SAMPLING_FIELDS}
                if values["seed"] is None and cfg.sampling.seed is not None:  # the job's seed is not a row's seed
                    values["seed"] = row_seed(cfg.sampling.seed, batch["id"][i])
                params = generation_params(values, self.limits, cfg.sampling)
                tokens = self.engine.encode_prompt(prompt)
                self.engine.check_request(len(tokens), params.max_tokens)
            except APIError as e:  # the row's own values: the same rules, in the engine's precision, as the HTTP API
                out["error"][i] = e.message
                continue
            except ValueError as e:
                out["error"][i] = str(e)
                continue
            jobs.append((i, tokens, params))
        results = await asyncio.gather(*(generate_text(self.engine, tokens, params) for _, tokens, params in jobs),
                                       return_exceptions=True)
        for (i, tokens, _), result in zip(jobs, results):
            if isinstance(result, SequenceFailed):  # that row failed in the engine; the batch goes on
                out["error"][i] = str(result)
                continue
            if isinstance(result, BaseException):
                raise result
            out["completion"][i] = result["text"]
            out["prompt_tokens"][i] = len(tokens)
            out["completion_tokens"][i] = len(result["tokens"])
            out["finish_reason"][i] = result["finish_reason"]
            if cfg.sampling.logprobs:
                out["logprobs"][i] = result["logprobs"]
        return out

    def __del__(self):
        """Ray Data calls it when the pool lets the actor go: the engine's scheduler task ends and its loop closes,
        rather than being destroyed pending at exit (asyncio's "Task was destroyed but it is pending!")."""
        loop = getattr(self, "loop", None)
        if loop is not None and not loop.is_closed() and not loop.is_running():
            loop.run_until_complete(self.engine.shutdown())
            loop.close()

    def _text(self, value, errors: list, i: int) -> Optional[str]:
        """Row ``i``'s text; None once ``errors[i]`` says why it has none (null, empty, bytes that are not UTF-8)."""
        try:
            text = _cell_text(value)
        except UnicodeDecodeError:
            errors[i] = f"{self.column} is not UTF-8 text"
            return None
        if not text:
            errors[i] = f"{self.column} is null or empty"
            return None
        return text

    @staticmethod
    def _value(batch: dict, name: str, i: int):
        """The row's own value of sampling field ``name``; None (the job's ``sampling`` applies) when absent."""
        if name in batch and batch[name][i] is not None and not (isinstance(batch[name][i], float)
                                                                  and np.isnan(batch[name][i])):
            return batch[name][i]
        return None

    def _score(self, texts) -> dict:
        engine, eot = self.engine, self.engine.tokenizer.eot_id
        limit = engine.runner.model.config.max_seq_len
        out = {"log_likelihood": [None] * len(texts), "perplexity": [None] * len(texts),
               "tokens": [None] * len(texts), "error": [None] * len(texts)}
        for i, text in enumerate(texts):
            text = self._text(text, out["error"], i)
            if text is None:
                continue
            tokens = [eot] + engine.tokenizer.encode(text)
            if len(tokens) > limit:
                out["error"][i] = (f"text has {len(tokens) - 1} tokens; the model scores at most {limit - 1} "
                                   "(its context less the leading end-of-text token)")
                continue
            with torch.inference_mode():
                batch = torch.tensor([tokens], device=engine.runner.device)
                total = -causal_lm_loss(engine.runner.model, batch, reduction="sum").item()
            n = len(tokens) - 1
            out["log_likelihood"][i], out["perplexity"][i], out["tokens"][i] = total, float(np.exp(-total / n)), n
        return out


# ----------------------------------------------------------------------------------------------------------------
# The job


def _refuse_overlap(source: str, output: str) -> None:
    """``DataError`` when the output lies inside the input (it, and its staging directory beside it, would be read
    back as input on the next run) or the input inside the output (``--overwrite`` would delete it)."""
    def where(location: str) -> tuple[str, str]:  # (scheme, path); no filesystem is opened: it may be unreachable
        if storage.is_uri(location):
            scheme, path = location.split("://", 1)
            return scheme, posixpath.normpath(path)
        return "", os.path.abspath(os.path.expanduser(location))

    (source_scheme, base), (output_scheme, target) = where(source), where(output)
    if source_scheme != output_scheme:
        return
    while any(c in posixpath.basename(base) for c in "*?["):  # a glob: its directory part
        base = posixpath.dirname(base)
    if target == base or target.startswith(base + "/") or base.startswith(target + "/"):
        raise DataError(f"--output {output!r} overlaps --input {source!r}: the output (and its staging directory) "
                        "would be read as input, or --overwrite would delete the input; write the output elsewhere")


def run_batch(config: BatchConfig) -> dict:
    """Run the job; return ``{"output", "rows", "errors"}``. Needs a connected Ray."""
    import ray
    import ray.data

    _refuse_overlap(config.input, config.output)
    fs, out_path = storage.filesystem(config.output)
    if fs.get_file_info(out_path).type == pafs.FileType.File:
        raise DataError(f"--output {config.output!r} is a file; the output is a directory (parquet parts and a "
                        "_SUCCESS manifest): name a directory")
    if commit.has_data(config.output) and not config.overwrite:
        raise DataError(f"output {config.output!r} already exists; choose another --output or pass --overwrite "
                        "to replace it whole")
    paths, columns, id_column, column = _plan_input(config)
    check_model_artifact(config.model)  # else the pool's actors die on it, one traceback each
    uri = config.input if storage.is_uri(config.input) else ""
    files = ray.data.from_items([{"path": p, "file_index": i, "uri": uri} for i, p in enumerate(paths)],
                                override_num_blocks=max(1, len(paths)))
    rows = files.map_batches(read_parquet_rows, batch_size=1, fn_kwargs={"columns": columns, "id_column": id_column})
    # Blocks of batch_size rows: each is one call on whichever actor is free, so one large file spreads over the
    # whole pool (read whole, a file was one actor's task), results stream to the writer as they finish, and a
    # killed actor costs only the blocks it held.
    rows = rows.repartition(target_num_rows_per_block=config.batch_size)
    results = rows.map_batches(
        Predictor, fn_constructor_args=(config, column), batch_size=config.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=config.min_actors, max_size=config.max_actors),
        num_cpus=config.num_cpus, num_gpus=config.num_gpus or None)

    attempt = commit.begin(config.output)  # the previous output stays whole until the commit point
    try:
        results.write_parquet(attempt.staging, filesystem=attempt.fs, min_rows_per_file=config.rows_per_file)
    except Exception as e:
        attempt.abort()
        cause = getattr(e, "cause", None) or e  # a task's error, whose text may hold the worker's traceback
        raise DataError(f"batch inference over {config.input!r} failed: "
                        f"{error_line(f'{type(cause).__name__}: {cause}')}") from None
    errors = []

    def count(fs, path: str) -> int:  # rows and error rows of each part, for the manifest and the summary
        with fs.open_input_file(path) as f:
            column = pq.read_table(f, columns=["error"]).column("error")
        errors.append(len(column) - column.null_count)
        return len(column)

    manifest = attempt.commit(meta={"input": config.input, "mode": config.mode, "model": config.model},
                              checksums=False, rows=count, replace_all=True)
    total = sum(entry["rows"] for entry in manifest["files"].values())
    return {"output": config.output, "rows": total, "errors": sum(errors)}
