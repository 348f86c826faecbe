"""Sweeps on the shared local Ray: ASHA stops trials, the best model serves, the dashboard draws, resume works."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raystack.checkpoint import load_artifact
from raystack.commit import read_manifest
from raystack.engine import Engine, GenerationParams, generate_text
from raystack.sweep import load_space, run_sweep
from tests.helpers import chromium, render

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SPACE = REPO / "tune_spaces" / "gpt_tiny.yaml"
FAST = ["base.data.max_documents=30", "base.schedule.steps=30", "base.eval.every=5",
        "base.checkpoint.every=5", "base.logging.every=5", "scheduler.grace_period=5",
        "scheduler.reduction_factor=3", "num_samples=6"]


SWEEP_DEADLINE_S = 360


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory):
    space = load_space(SPACE, [*FAST, f"storage_path={tmp_path_factory.mktemp('sweeps')}", "name=tiny"])
    return space, run_sweep(space)


def test_tiny_sweep_runs_its_budget_and_asha_stops_some(sweep):
    space, output = sweep
    status = json.loads((Path(output.sweep_dir) / "trial_status.json").read_text())
    assert output.trials == 6 and len(status) == 6 and set(status.values()) == {"TERMINATED"}
    from raystack.sweep_report import collect

    trials = collect(output.sweep_dir, space)["trials"]
    early = [t for t in trials if t["status"] == "STOPPED EARLY"]
    assert early, "ASHA stopped no trial"
    assert all(t["steps"] < 30 for t in early) and any(t["steps"] == 30 for t in trials)
    assert output.best_metric == min(t["best"] for t in trials)
    assert (Path(output.sweep_dir) / "optuna.db").exists()


def test_best_artifact_loads_and_generates(sweep):
    _, output = sweep

    async def go():
        engine = Engine.from_artifact(output.artifact)
        result = await generate_text(engine, "def ", GenerationParams(max_tokens=8, seed=1))
        await engine.shutdown()
        return result

    result = asyncio.run(go())
    assert len(result["tokens"]) >= 1 and result["finish_reason"] in ("length", "stop")


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (make test installs it)")
def test_dashboard_draws_in_a_real_browser_without_errors(sweep):
    space, output = sweep
    page = Path(output.dashboard)
    dom, log = render(page)
    assert 'data-rendered="true"' in dom, log[-2000:]
    errors = [line for line in log.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    assert not errors, errors
    assert dom.count('class="trial-point"') == 6
    assert dom.count('class="curve') == 6 and 'class="curve early"' in dom and 'class="stop-mark"' in dom
    assert dom.count('class="pc-line"') == 6
    assert dom.count('class="importance-bar"') == len(space.parameters)
    assert dom.count("<tr") == 7  # header + one row per trial
    assert "<th>bits/byte</th>" in dom and f"({output.best_metric / math.log(2):.3f} bits/byte)" in dom


def test_sweep_report_cli_rewrites_the_page(sweep):
    _, output = sweep
    os.remove(output.dashboard)
    result = subprocess.run([sys.executable, "-m", "raystack.cli", "sweep-report", output.sweep_dir],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(output.dashboard).exists() and result.stdout.strip() == output.dashboard
    bad = subprocess.run([sys.executable, "-m", "raystack.cli", "sweep-report", str(REPO)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no space.json" in bad.stderr


def test_a_sweep_whose_driver_died_resumes_without_rerunning_trials(ray_session, tmp_path):
    import ray

    from raystack.sweep_report import _trial_dirs

    args = [*FAST, "num_samples=5", f"storage_path={tmp_path}", "name=resumed"]
    cmd = [sys.executable, str(REPO / "jobs" / "tune.py"), "--space", str(SPACE)]
    cmd += [a for o in args for a in ("--set", o)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    sweep_dir = tmp_path / "resumed"

    def finished() -> dict[str, str]:
        """Trial dir -> result.json of trials that reported their last step or were stopped (so far)."""
        out = {}
        for d in _trial_dirs(str(sweep_dir)) if sweep_dir.exists() else []:
            result = Path(d) / "result.json"
            if result.exists() and any(json.loads(line).get("done") for line in result.read_text().splitlines()
                                       if line.strip()):
                out[d] = result.read_text()
        return out

    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(finished()) < 2 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.2)
    finally:
        driver.kill()
        driver.wait()
    before = finished()
    assert 2 <= len(before) < 5, "the driver should die mid-sweep"
    time.sleep(3)  # the dead driver's trial actors go with it
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = _trial_dirs(str(sweep_dir))
    assert len(trials) == 5, [os.path.basename(t) for t in trials]
    for d, text in before.items():  # finished trials were not run again
        assert (Path(d) / "result.json").read_text() == text
    for d in trials:
        steps = [json.loads(line)["step"] for line in (Path(d) / "result.json").read_text().splitlines()
                 if line.strip()]
        # A trial running when the driver died resumes from its last checkpoint Tune had saved, so the steps after
        # it may be reported again, once; nothing else repeats.
        restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
        assert len(restarts) <= 1, f"{os.path.basename(d)}: {steps}"
        for attempt in [steps[:restarts[0]], steps[restarts[0]:]] if restarts else [steps]:
            assert attempt == sorted(set(attempt)), f"{os.path.basename(d)}: {steps}"
        assert sorted(set(steps)) == list(range(5, 5 * len(set(steps)) + 1, 5)), f"an evaluation missing: {steps}"
    assert "best model artifact:" in rerun.stdout



def test_data_parallel_trials_train_on_two_workers_and_free_them_when_stopped(ray_session, tmp_path):
    """workers_per_trial: 2 -> each trial drives a 2-worker TorchTrainer. ASHA stops the bad trial; every worker
    group's placement group must be gone afterwards (a stopped trial must not keep its workers' CPUs)."""
    import ray
    import yaml

    base = yaml.safe_load(SPACE.read_text())["base"]
    base["data"]["max_documents"] = 30
    base["schedule"]["steps"] = 10
    base["eval"]["every"] = 5
    # Trials run one at a time, so the search (random, seed 0: lr 1e-5, 0.01, 1e-5) and ASHA's decision are
    # deterministic: at step 5 trial 3 is below the 2/3 quantile of the two before it and is stopped.
    space_file = tmp_path / "dp.yaml"
    space_file.write_text(yaml.safe_dump({
        "name": "dp", "num_samples": 3, "max_concurrent_trials": 1, "search": "random", "seed": 0,
        "workers_per_trial": 2, "cpus_per_trial": 1, "storage_path": str(tmp_path),
        "scheduler": {"grace_period": 5, "reduction_factor": 3}, "base": base,
        "space": {"optimizer.lr": {"distribution": "choice", "values": [0.01, 0.00001]}}}))
    space = load_space(space_file)
    placement_groups_before = set(ray.util.placement_group_table())

    def held() -> list[dict]:
        return [pg for key, pg in ray.util.placement_group_table().items()
                if key not in placement_groups_before and pg["state"] != "REMOVED"]

    # Leaked worker groups would starve later trials forever, so the sweep gets a deadline instead of hanging CI.
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(output=run_sweep(space)), daemon=True)
    thread.start()
    thread.join(timeout=SWEEP_DEADLINE_S)
    assert not thread.is_alive(), f"the sweep did not finish in {SWEEP_DEADLINE_S} s; placement groups: {held()}"
    assert "output" in box, "the sweep failed (see the log above)"
    output = box["output"]

    from raystack.sweep_report import collect

    trials = collect(output.sweep_dir, space)["trials"]
    assert output.trials == 3 and len(trials) == 3
    for d in Path(output.sweep_dir).glob("run_trial_*"):
        reports = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
        assert reports and all(r["world_size"] == 2 for r in reports), (d.name, trials)
    early = [t for t in trials if t["status"] == "STOPPED EARLY"]
    assert len(early) == 1 and all(t["steps"] == 5 and t["params"]["optimizer.lr"] == 0.00001 for t in early), trials
    assert output.best_config == {"optimizer.lr": 0.01}
    # Each trial's Train run holds its checkpoints; the best one became the artifact.
    assert sorted(p.name for p in (Path(output.sweep_dir) / "train_runs").iterdir()) == sorted(t["id"] for t in trials)
    assert "model.safetensors" in read_manifest(output.artifact)["files"]

    deadline = time.monotonic() + 60
    while held() and time.monotonic() < deadline:
        time.sleep(1)
    assert not held(), f"placement groups still held after the sweep: {held()}"


def test_a_sweep_on_s3_keeps_its_study_and_dashboard_on_the_driver(ray_session, s3_endpoint, tmp_path):
    """storage_path on a real S3 API (moto over HTTP): trials, Train data and the best model go there through
    pyarrow; the driver keeps the study, the dashboard and a copy of every trial's results."""
    import boto3
    import pyarrow.fs as pafs

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="sweeps")
    home = tmp_path / "home"
    space = load_space(SPACE, [*FAST, "num_samples=2", "storage_path=s3://sweeps", f"local_dir={home}",
                               "name=remote", "base.schedule.steps=10", "early_stopping=false"])  # no ASHA luck
    output = run_sweep(space)
    assert output.sweep_dir == str(home / "remote") and output.storage == "s3://sweeps/remote"
    fs = pafs.FileSystem.from_uri("s3://sweeps")[0]
    stored = [i.path for i in fs.get_file_info(pafs.FileSelector("sweeps/remote", recursive=True))]
    assert any(p.startswith("sweeps/remote/data/") and p.endswith("/_SUCCESS") for p in stored)
    assert output.artifact == "s3://sweeps/remote/best_model" and load_artifact(output.artifact)[0] is not None
    with fs.open_input_stream("sweeps/remote/dashboard.html") as f:
        assert f.read().decode() == Path(output.dashboard).read_text()
    assert (home / "remote" / "optuna.db").exists() and "sweeps/remote/optuna.db" not in stored
    from raystack.sweep_report import collect

    trials = collect(output.sweep_dir, space)["trials"]
    assert len(trials) == 2 and all(t["steps"] == 10 and len(t["curve"]) == 2 for t in trials), trials
    results = [p for p in stored if p.startswith("sweeps/remote/run_trial_") and p.endswith("/result.json")]
    assert len(results) == 2  # Tune's own copy on the URI

    async def go():
        engine = Engine.from_artifact(output.artifact)
        result = await generate_text(engine, "def ", GenerationParams(max_tokens=4, seed=1))
        await engine.shutdown()
        return result

    assert len(asyncio.run(go())["tokens"]) >= 1
