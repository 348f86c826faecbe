"""Batch inference rows driven without Ray: a row's own bad values end in that row's ``error``, never the batch."""

import numpy as np
import pytest
import torch

from raystack.batch import BatchConfig, Predictor, _refuse_overlap
from raystack.checkpoint import save_artifact
from raystack.data import DataError
from raystack.engine import GenerationParams
from raystack.model import GPT, ModelConfig


def test_hostile_row_values_fail_their_row_alone(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny")
    artifact = save_artifact(str(tmp_path / "model"), config, GPT(config).state_dict())
    predictor = Predictor(BatchConfig(model=artifact, input="in", output="out", batch_size=8, num_cpus=1,
                                      sampling=GenerationParams(max_tokens=4, seed=0)), "prompt")
    batch = {
        "id": np.arange(7),
        "prompt": np.array(["a", "b", "c", "d", "e", "f", "g"], dtype=object),
        "max_tokens": np.array([4.0, np.inf, 4.0, 4.0, 4.0, np.nan, 4.0]),  # an int column with nulls is float64
        "top_k": np.array([0.0, 0.0, np.inf, 0.0, 1e300, 5.0, 0.0]),
        "seed": np.array([1, 2, 3, 2**63, 5, 6, 7], dtype=np.uint64),
        "top_p": np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1e-50]),
    }
    out = predictor(batch).to_pydict()
    errors = out["error"]
    assert errors[0] is None and errors[5] is None, errors
    assert "max_tokens" in errors[1] and "top_k" in errors[2] and "seed" in errors[3] and "top_k" in errors[4]
    assert "top_p" in errors[6]
    assert out["completion_tokens"][0] >= 1 and out["completion_tokens"][5] >= 1  # NaN: the job's max_tokens
    assert [out["completion"][i] for i in (1, 2, 3, 4, 6)] == [None] * 5


def test_a_binary_text_column_is_read_as_utf8_text_not_as_its_repr(tmp_path):
    """Parquet byte arrays written without the UTF-8 annotation arrive as bytes; ``str(b"ab")`` is ``"b'ab'"``."""
    config = ModelConfig.from_preset("tiny")
    artifact = save_artifact(str(tmp_path / "model"), config, GPT(config).state_dict())
    for mode, column in (("generate", "prompt"), ("score", "text")):
        predictor = Predictor(BatchConfig(model=artifact, input="in", output="out", batch_size=8, num_cpus=1,
                                          mode=mode, sampling=GenerationParams(max_tokens=4, temperature=0.0)), column)
        batch = {"id": np.arange(4), column: np.array(["déf f(", "déf f(".encode(), b"\xff\xfe", b""], dtype=object)}
        out = predictor(batch).to_pydict()
        assert out[column][:2] == ["déf f(", "déf f("] and out[column][2] == "\ufffd\ufffd", out[column]
        assert out["error"] == [None, None, f"{column} is not UTF-8 text", f"{column} is null or empty"]
        produced = "completion" if mode == "generate" else "log_likelihood"
        assert out[produced][0] == out[produced][1] is not None


def test_a_column_that_holds_no_text_is_refused_naming_file_and_type(tmp_path):
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from raystack.data import check_parquet_column

    for name, values in (("ints", pa.array([1, 2])), ("lists", pa.array([["a"], ["b"]]))):
        pq.write_table(pa.table({"prompt": values}), tmp_path / f"{name}.parquet")
        with pytest.raises(DataError, match=f"{name}.parquet': column 'prompt' holds .*, not text; set prompt_column"):
            check_parquet_column("in", pafs.LocalFileSystem(), [str(tmp_path / f"{name}.parquet")], "prompt",
                                 "prompt_column")
    for values in (pa.array(["a"]), pa.array([b"a"]), pa.array(["a"]).dictionary_encode(),
                   pa.array(["a"], pa.large_string())):
        pq.write_table(pa.table({"prompt": values}), tmp_path / "text.parquet")
        check_parquet_column("in", pafs.LocalFileSystem(), [str(tmp_path / "text.parquet")], "prompt", "prompt_column")


@pytest.mark.parametrize("source, output", [
    ("data/", "data/out"), ("data", "data"), ("data/*.parquet", "data/out"), ("data/in/x.parquet", "data"),
    ("s3://b/in/", "s3://b/in/out"), ("s3://b/in/*.parquet", "s3://b/in/run1"),
])
def test_an_output_overlapping_its_input_is_refused_before_any_work(tmp_path, monkeypatch, source, output):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="overlaps --input"):
        _refuse_overlap(source, output)


def test_separate_outputs_are_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for source, output in (("data/", "data-out"), ("s3://b/in/", "s3://b/out/"), ("data/", "s3://b/data/"),
                           ("s3://b/in/", "gs://b/in/out")):
        _refuse_overlap(source, output)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1, r"'temperature' must be in \[0.0, 2.0\], got -1.0"),
    ("temperature", 3.0, r"'temperature' must be in \[0.0, 2.0\], got 3.0"),
    ("top_p", 0.0, r"'top_p' must be in \(0.0, 1.0\], got 0.0"),
    ("min_p", 1.5, r"'min_p' must be in \[0.0, 1.0\]"),
    ("top_k", -2, "'top_k'"),
    ("seed", 2**63, "'seed'"),
    ("stop", ["a"] * 5, "'stop' takes at most 4"),
])
def test_job_wide_sampling_values_obey_the_same_rules_as_a_rows(field, value, message):
    """One parser for the job's defaults, a row's columns and the HTTP API: what a row may not say, the job may
    not either."""
    with pytest.raises(ValueError, match=f"^sampling.{field}: {message}"):
        BatchConfig(model="m", input="in", output="out", sampling=GenerationParams(**{field: value}))
    BatchConfig(model="m", input="in", output="out",
                sampling=GenerationParams(temperature=2.0, top_k=-1, min_p=1.0, seed=2**63 - 1))


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("rows_per_file", 0), ("rows_per_file", -5)])
def test_sizes_below_one_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be >= 1, got {value}$"):
        BatchConfig(model="m", input="in", output="out", **{field: value})


def test_an_output_that_is_a_file_is_refused_even_with_overwrite(tmp_path):
    from raystack.batch import run_batch
    from raystack.data import DataError

    (tmp_path / "out.parquet").write_bytes(b"someone's file")
    with pytest.raises(DataError, match="is a file; the output is a directory"):
        run_batch(BatchConfig(model="m", input=str(tmp_path / "in"), output=str(tmp_path / "out.parquet"),
                              overwrite=True))
    assert (tmp_path / "out.parquet").read_bytes() == b"someone's file"


def test_a_predictor_let_go_stops_its_engine_cleanly(tmp_path, caplog):
    """Ray Data drops the pool's callable when it lets an actor go; the engine's scheduler task must end with it,
    not be destroyed pending (asyncio logs that as an error in every batch actor's output)."""
    import gc

    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny")
    artifact = save_artifact(str(tmp_path / "model"), config, GPT(config).state_dict())
    predictor = Predictor(BatchConfig(model=artifact, input="in", output="out", batch_size=4, num_cpus=1,
                                      sampling=GenerationParams(max_tokens=2, seed=0)), "prompt")
    assert predictor({"id": np.arange(2), "prompt": np.array(["a", "b"], dtype=object)}).num_rows == 2
    loop = predictor.loop
    with caplog.at_level("ERROR", logger="asyncio"):
        del predictor
        gc.collect()
    assert loop.is_closed()
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()], caplog.text
