"""Everything on a real S3 API (moto's server over HTTP, pyarrow's S3 filesystem): batch outputs committed and
replaced without loss, a killed batch job, training killed and resumed with checkpoints and artifact in a bucket,
and serving that artifact."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from raystack import commit
from raystack.batch import BatchConfig, run_batch
from raystack.checkpoint import load_artifact, registered_checkpoints, save_artifact
from raystack.config import from_dict
from raystack.model import GPT, ModelConfig
from raystack.train import load_train_config
from tests.helpers import TINY_OVERRIDES, free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bucket(s3_endpoint):
    import boto3

    name = f"raystack-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def s3_files(fs: pafs.FileSystem, path: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(posixpath_rel(i.path, path) for i in infos if i.type == pafs.FileType.File)


def posixpath_rel(path: str, root: str) -> str:
    return path[len(root.rstrip("/")) + 1:]


def read_output(uri: str):
    """The committed output at ``uri``, read through its manifest, rows sorted by id."""
    fs, root = pafs.FileSystem.from_uri(uri)
    paths = commit.listed_paths(fs, root)
    assert paths is not None, f"{uri} has no manifest"
    return pq.read_table(paths, filesystem=fs).to_pandas().sort_values("id").reset_index(drop=True)


def env_for_jobs() -> dict:
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def test_batch_to_s3_commits_replaces_whole_and_survives_a_killed_job(ray_session, bucket):
    fs = pafs.FileSystem.from_uri(f"s3://{bucket}")[0]
    pq.write_table(pa.table({"id": list(range(60)), "prompt": [f"row {i}:" for i in range(60)]}),
                   f"{bucket}/in/part-0.parquet", filesystem=fs)
    model = f"s3://{bucket}/model"
    torch.manual_seed(0)
    save_artifact(model, ModelConfig.from_preset("tiny"), GPT(ModelConfig.from_preset("tiny")).state_dict())

    # As the user ran it: the job script, a fresh s3:// output.
    job = [sys.executable, str(REPO / "jobs" / "batch_infer.py"), "--model", model, "--input", f"s3://{bucket}/in/",
           "--output", f"s3://{bucket}/out/", "--set", "sampling.max_tokens=4", "--set", "num_cpus=0.5"]
    first = subprocess.run(job, env=env_for_jobs(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    old = read_output(f"s3://{bucket}/out")
    assert sorted(old["id"]) == list(range(60)) and old["error"].isna().all()
    manifest = commit.read_manifest(f"s3://{bucket}/out")
    assert sum(f["rows"] for f in manifest["files"].values()) == 60
    # A plain directory read (pyarrow skips _-prefixed entries) sees the same rows once committed.
    assert sorted(pq.read_table(f"{bucket}/out", filesystem=fs).column("id").to_pylist()) == list(range(60))

    again = subprocess.run(job, env=env_for_jobs(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr

    # --overwrite, killed mid-way: the old output stays whole and readable. The killed run writes a part every 60 of
    # its 1200 rows (the default, 4096 rows a part, would stage its one part only at the very end, moments before the
    # commit), so the first part is staged long before the job could finish, however fast the machine is.
    for part in range(20):
        pq.write_table(pa.table({"id": list(range(part * 60, part * 60 + 60)),
                                 "prompt": [f"row {i}:" for i in range(part * 60, part * 60 + 60)]}),
                       f"{bucket}/big/part-{part:02d}.parquet", filesystem=fs)
    big = [a if a != f"s3://{bucket}/in/" else f"s3://{bucket}/big/" for a in job]
    killed = subprocess.Popen([*big, "--overwrite", "--set", "sampling.max_tokens=48", "--set", "batch_size=4",
                               "--set", "rows_per_file=60"],
                              env=env_for_jobs(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(
                p.endswith(".parquet") for p in s3_files(fs, f"{bucket}/out/_temporary")):
            assert killed.poll() is None, "the job ended before it could be killed"
            time.sleep(0.2)
        assert any(p.endswith(".parquet") for p in s3_files(fs, f"{bucket}/out/_temporary")), "nothing staged"
    finally:
        killed.kill()
        killed.wait()
    assert read_output(f"s3://{bucket}/out").equals(old)

    # The re-run completes: every id once, the new parameters, the crashed attempt's staging gone.
    summary = run_batch(from_dict(BatchConfig, {"model": model, "input": f"s3://{bucket}/in/",
                                                "output": f"s3://{bucket}/out/", "overwrite": True,
                                                "sampling": {"max_tokens": 2}, "num_cpus": 0.5}))
    new = read_output(f"s3://{bucket}/out")
    assert summary == {"output": f"s3://{bucket}/out/", "rows": 60, "errors": 0}
    assert sorted(new["id"]) == list(range(60)) and (new["completion_tokens"] <= 2).all()
    attempt = commit.read_manifest(f"s3://{bucket}/out")["attempt"]
    assert {p.split("/")[0] for p in s3_files(fs, f"{bucket}/out")} == {"_SUCCESS", attempt}


def test_training_on_s3_killed_and_resumed_then_served(ray_session, bucket):
    from ray import serve

    from raystack.cluster import start_serve, stop_serve
    from raystack.serving import build_app

    args = [*TINY_OVERRIDES, f"storage_path=s3://{bucket}/runs", "name=on-s3", "schedule.steps=60",
            "checkpoint.every=5", "eval.every=10", "scaling.num_workers=1"]
    cmd = [sys.executable, str(REPO / "jobs" / "train.py")] + [a for o in args for a in ("--set", o)]
    driver = subprocess.Popen(cmd, env=env_for_jobs(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not registered_checkpoints(f"s3://{bucket}/runs/on-s3"):
            assert driver.poll() is None, "training ended before it could be killed"
            time.sleep(0.2)
        assert registered_checkpoints(f"s3://{bucket}/runs/on-s3"), "no checkpoint registered in the bucket"
    finally:
        driver.kill()
        driver.wait()
    time.sleep(3)  # the dead driver's workers exit with it
    rerun = subprocess.run(cmd, env=env_for_jobs(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[raystack] resumed from step" in rerun.stdout, rerun.stdout[-3000:]
    assert "model artifact:" in rerun.stdout

    artifact = f"s3://{bucket}/runs/on-s3/model"
    model, _ = load_artifact(artifact)
    assert model.config == load_train_config(None, args).model.build()
    _, port = start_serve({"host": "127.0.0.1", "port": free_port()})
    try:
        serve.run(build_app({"model": artifact, "num_cpus": 0.5, "min_replicas": 1, "max_replicas": 1}),
                  name="from-s3", route_prefix="/s3")
        response = httpx.post(f"http://127.0.0.1:{port}/s3/v1/completions", timeout=60,
                              json={"model": "raystack", "prompt": "def ", "max_tokens": 4})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
    finally:
        stop_serve()
