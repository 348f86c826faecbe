"""Training on a real local Ray (shared by the session): learning, worker and driver failures, elasticity."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from raystack.checkpoint import load_artifact
from raystack.data import DataConfig, DataError, prepare_blocks
from raystack.train import fit, load_train_config
from tests.helpers import TINY_OVERRIDES

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

# Every run here uses the same shape so their losses can be compared exactly.
RUN = ["schedule.steps=20", "logging.every=1", "eval.every=10", "checkpoint.every=5",
       "scaling.num_workers=2"]


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def our_train_workers() -> list[psutil.Process]:
    """Ray Train worker processes of this session's Ray (children of its raylet), never anyone else's."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    workers = []
    for process in psutil.Process(raylet).children(recursive=True):
        try:
            if process.status() != psutil.STATUS_ZOMBIE and "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:  # exited while we looked
            pass
    return workers


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``directory``, read as TensorBoard reads them (TFRecord
    frames of ``Event`` protos)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


@pytest.fixture(scope="module")
def reference_run(ray_session, tmp_path_factory):
    overrides = TINY_OVERRIDES
    storage = tmp_path_factory.mktemp("reference")
    config = load_train_config(None, [*overrides, *RUN, f"storage_path={storage}", "name=reference"])
    return overrides, fit(config)


def test_two_workers_lower_validation_loss_and_export_a_loadable_artifact(reference_run):
    _, output = reference_run
    metrics = read_metrics(output.run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= m.keys() for m in metrics)
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 2 and val[-1] < val[0] < 5.6  # ln(257) = 5.55 is the untrained loss
    for m in metrics:  # bits per byte beside every loss: nats / ln 2 (a byte token per byte)
        assert m["bits_per_byte"] == pytest.approx(m["loss"] / math.log(2))
        assert "val_loss" not in m or m["val_bits_per_byte"] == pytest.approx(m["val_loss"] / math.log(2))
    # The run's report, TensorBoard events, config and samples, written as it went and at the end.
    run = Path(output.run_dir)
    page = (run / "report.html").read_text()
    assert '"step": 20' in page and "bits per byte" in page
    assert json.loads((run / "run_config.json").read_text())["name"] == "reference"
    samples = json.loads((run / "samples.json").read_text())
    assert [s["prompt"] for s in samples] == ["def ", "import ", "class "] and all("completion" in s for s in samples)
    scalars = tensorboard_scalars(run / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 21))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([m["loss"] for m in metrics])
    assert len(scalars["train/val_loss"]) == 2
    assert {m["world_size"] for m in metrics} == {2}
    # A report every step, yet no step waits for Ray Train's 2 s default poll (38 s or more from step 1 to 20):
    # fit polls every 0.1 s for two workers (raystack.train.job.report_poll_s).
    assert metrics[-1]["time"] - metrics[0]["time"] < 19.0, [round(m["time"] - metrics[0]["time"], 2) for m in metrics]
    model, tokenizer = load_artifact(output.artifact)
    logits = model(torch.tensor([tokenizer.encode("def ")]))
    assert logits.shape == (1, 4, 257)


def test_killed_worker_restarts_from_last_checkpoint_and_matches_uninterrupted_run(reference_run, tmp_path):
    overrides, reference = reference_run
    config = load_train_config(None, [*overrides, *RUN, f"storage_path={tmp_path}", "name=killed"])
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("output", fit(config)), daemon=True)
    runner.start()
    # Kill after the step-5 checkpoint is registered (its report reached the controller), before the end.
    wait_for(lambda: any(m["step"] >= 7 for m in read_metrics(config.run_dir)), 240, "step 7")
    victims = our_train_workers()
    assert victims, "no Ray Train worker process found"
    victims[0].send_signal(signal.SIGKILL)
    runner.join(timeout=300)
    assert "output" in outcome, "training did not complete after the worker was killed"

    steps = [m["step"] for m in read_metrics(config.run_dir)]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    before, after = steps[:restart], steps[restart:]
    resumed_from = read_metrics(config.run_dir)[restart]["resumed_from_step"]
    assert resumed_from in (5, 10, 15) and resumed_from <= before[-1]
    assert after == list(range(resumed_from + 1, 21))  # no step twice after the restart, none missing
    # Same seed and worker count: the resumed run lands exactly where the uninterrupted one did.
    final, ref_final = read_metrics(config.run_dir)[-1], read_metrics(reference.run_dir)[-1]
    assert final["loss"] == ref_final["loss"] and final["val_loss"] == ref_final["val_loss"]


def test_rerunning_a_job_whose_driver_died_resumes_it(reference_run, ray_session, tmp_path):
    overrides, reference = reference_run
    import ray

    args = [*overrides, *RUN, f"storage_path={tmp_path}", "name=driver-killed"]
    cmd = [sys.executable, str(REPO / "jobs" / "train.py")] + [a for o in args for a in ("--set", o)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "driver-killed"
    try:
        wait_for(lambda: any(m["step"] >= 7 for m in read_metrics(run_dir)), 240, "step 7 of the first driver")
    finally:
        driver.kill()
        driver.wait()
    # The job's actors die with their driver; wait until its workers are gone before re-running.
    wait_for(lambda: not our_train_workers(), 60, "the dead driver's workers to exit")
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metrics = read_metrics(run_dir)
    second = [m for m in metrics if m["resumed_from_step"] > 0]
    assert second and second[0]["resumed_from_step"] in (5, 10, 15)
    assert [m["step"] for m in second] == list(range(second[0]["resumed_from_step"] + 1, 21))
    assert second[-1]["loss"] == read_metrics(reference.run_dir)[-1]["loss"]
    assert "model artifact:" in rerun.stdout


def test_elastic_one_to_two_workers_trains_and_exports_metrics(ray_session, tiny_overrides):
    import httpx
    import ray

    config = load_train_config(None, [*tiny_overrides, "schedule.steps=100", "logging.every=4",
                                      "checkpoint.every=50", "scaling.num_workers=[1,2]", "name=elastic"])
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("output", fit(config)), daemon=True)
    runner.start()
    port = ray._private.worker._global_node.metrics_export_port
    wanted = ["ray_raystack_train_step", "ray_raystack_train_loss", "ray_raystack_train_tokens_per_s"]
    seen = ""
    deadline = time.monotonic() + 180
    while runner.is_alive() and time.monotonic() < deadline:
        seen = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(f'{name}{{' in seen and 'run="elastic"' in seen for name in wanted):
            break
        time.sleep(1)
    runner.join(timeout=300)
    assert all(name in seen for name in wanted), "training metrics never reached Ray's Prometheus endpoint"
    output = outcome["output"]
    metrics = read_metrics(output.run_dir)
    assert metrics[-1]["step"] == 100 and "val_loss" in metrics[-1]
    assert {m["world_size"] for m in metrics} <= {1, 2}


def test_corpus_errors_name_the_source(ray_session, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.txt.*yields no training block"):
        prepare_blocks(DataConfig(sources=[str(empty)], val_fraction=0.0), str(tmp_path / "out"))
    # A corrupt parquet file is unreadable whoever runs the test (root reads files of any mode).
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(DataError, match="broken.parquet"):
        prepare_blocks(DataConfig(sources=[str(broken)]), str(tmp_path / "out2"))


def test_packed_blocks_do_not_depend_on_ray_data_parallelism(ray_session, tmp_path):
    import numpy as np
    import ray
    import ray.data

    from raystack.data import load_blocks

    context = ray.data.DataContext.get_current()
    saved = context.read_op_min_num_blocks
    config = DataConfig(max_documents=25, block_size=64)
    try:
        arrays = []
        for i, min_blocks in enumerate((1, 64)):
            context.read_op_min_num_blocks = min_blocks
            train, val, _ = load_blocks(prepare_blocks(config, str(tmp_path / f"out{i}")))
            arrays.append((train, val))
    finally:
        context.read_op_min_num_blocks = saved
    assert np.array_equal(arrays[0][0], arrays[1][0]) and np.array_equal(arrays[0][1], arrays[1][1])
    # A fresh process (a job's driver) packs the same blocks as this long-lived one.
    script = ("import sys; from raystack.cluster import init_ray; from raystack.data import DataConfig, prepare_blocks;"
              "init_ray(); print(prepare_blocks(DataConfig(max_documents=25, block_size=64), sys.argv[1]))")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    fresh = subprocess.run([sys.executable, "-c", script, str(tmp_path / "fresh")], env=env, capture_output=True,
                           text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    train, val, _ = load_blocks(fresh.stdout.strip().splitlines()[-1])
    assert np.array_equal(train, arrays[0][0]) and np.array_equal(val, arrays[0][1])
