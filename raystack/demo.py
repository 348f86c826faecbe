"""The end-to-end demo (``make demo``): train -> sweep -> serve -> batch inference on one local Ray, in minutes.

Each stage prints a progress line; the last one says where every output, dashboard and log is. Everything goes
under ``storage_path`` (default ``~/raystack_runs``): nothing is written into the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray import serve

from raystack.batch import BatchConfig, run_batch
from raystack.cluster import init_ray, start_serve
from raystack.config import from_dict
from raystack.serving import build_app
from raystack.sweep import load_space, run_sweep
from raystack.train import fit, load_train_config

STAGES = 5


def _stage(number: int, text: str, started: float) -> None:
    print(f"\n[raystack demo {number}/{STAGES}] {text}   (t = {time.monotonic() - started:.0f} s)", flush=True)


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def run(storage_path: str, train_steps: int, sweep_trials: int, batch_rows: int) -> dict:
    started = time.monotonic()
    storage = os.path.abspath(os.path.expanduser(storage_path))
    init_ray()
    where = {"ray logs": ray._private.worker._global_node.get_session_dir_path() + "/logs"}

    _stage(1, f"training the tiny GPT on the Python standard library ({train_steps} steps, 2 workers, Ray Train)",
           started)
    trained = _train(storage, train_steps, where)
    _stage(2, f"sweeping learning rate, warmup, width and depth ({sweep_trials} trials, Optuna TPE + ASHA)", started)
    best = _sweep(storage, sweep_trials, where)
    _stage(3, "serving the best model on Ray Serve (OpenAI-compatible) and sending completions", started)
    _serve(best, where)
    _stage(4, f"batch inference over a generated {batch_rows}-row parquet table (Ray Data, actor pool)", started)
    _batch(storage, best, batch_rows, where)

    default_artifact = os.path.join(os.path.expanduser("~/raystack_runs"), "raystack-tiny", "model")
    where["serve the trained model again"] = ("serve run serve_apps/llm.yaml" if trained == default_artifact
                                              else f"python jobs/deploy.py --model {trained}")
    _stage(5, "done: where everything is", started)
    for what, path in where.items():
        print(f"    {what:44s} {path}")
    print(f"\n[raystack demo] finished in {time.monotonic() - started:.0f} s", flush=True)
    serve.shutdown()
    return where


def _train(storage: str, steps: int, where: dict) -> str:
    """Stage 1; returns the trained model artifact."""
    # The default run name, so the artifact lands where the README's serving commands and serve_apps/llm.yaml look
    # (<storage_path>/raystack-tiny/model); a re-run resumes that run from its last checkpoint.
    train = fit(load_train_config(None, [f"storage_path={storage}", f"schedule.steps={steps}"]))
    where.update({"training run (checkpoints, metrics.jsonl)": train.run_dir, "trained model artifact": train.artifact})
    print(f"    final loss {train.metrics.get('loss', float('nan')):.3f}, validation loss "
          f"{train.metrics.get('val_loss', float('nan')):.3f}", flush=True)
    return train.artifact


def _sweep(storage: str, trials: int, where: dict) -> str:
    """Stage 2; returns the best trial's model artifact."""
    space = load_space(Path(__file__).resolve().parent.parent / "tune_spaces" / "gpt_tiny.yaml",
                       [f"storage_path={storage}", "name=demo-sweep", f"num_samples={trials}",
                        "base.data.max_documents=0", "base.schedule.steps=100", "base.eval.every=20",
                        "scheduler.grace_period=20"])
    sweep = run_sweep(space)
    where.update({"sweep dashboard": sweep.dashboard, "best model artifact (sweep)": sweep.artifact,
                  "TensorBoard logs": f"tensorboard --logdir {sweep.sweep_dir}"})
    print(f"    best val_loss {sweep.best_metric:.3f} with {json.dumps(sweep.best_config)}", flush=True)
    return sweep.artifact


def _serve(artifact: str, where: dict) -> None:
    """Stage 3: the model behind the OpenAI API on Ray Serve, and a few completions through it."""
    port = _free_port(8000)
    _, port = start_serve({"host": "127.0.0.1", "port": port})  # an already-running Serve keeps its port
    serve.run(build_app({"model": artifact, "min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5}),
              name="demo", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/completions"
    for prompt, extra in (("def fibonacci(n):", {"temperature": 0.7}), ("import ", {"temperature": 0.9, "top_p": 0.9}),
                          ("class Stack:", {"temperature": 0.8, "top_k": 20})):
        body = {"model": "raystack", "prompt": prompt, "max_tokens": 48, "seed": 7, **extra}
        reply = httpx.post(url, json=body, timeout=120).json()
        print(f"    POST /v1/completions {json.dumps({k: v for k, v in body.items() if k != 'model'})}")
        print("      -> " + repr(prompt + reply["choices"][0]["text"]))
    where["served API (stopped at the end)"] = f"http://127.0.0.1:{port}/v1"


def _batch(storage: str, artifact: str, rows: int, where: dict) -> None:
    """Stage 4: batch inference over a generated parquet table."""
    table = Path(storage) / "demo-batch" / "prompts.parquet"
    table.parent.mkdir(parents=True, exist_ok=True)
    starts = ["def ", "import ", "class ", "for i in ", "return ", "if __name__ == ", "with open(", "try:\n    "]
    pq.write_table(pa.table({"id": list(range(rows)), "prompt": [starts[i % len(starts)] for i in range(rows)]}),
                   table)
    output = Path(storage) / "demo-batch" / "completions"
    summary = run_batch(from_dict(BatchConfig, {"model": artifact, "input": str(table), "output": str(output),
                                                "overwrite": True, "sampling": {"max_tokens": 24, "temperature": 0.7},
                                                "num_cpus": 0.5, "max_actors": 2}))
    for row in pq.read_table(output).to_pandas().sort_values("id").head(3).itertuples():
        print(f"    row {row.id}: {row.prompt!r} -> {row.completion!r}")
    print(f"    {summary['rows']} rows written, {summary['errors']} with an error", flush=True)
    where.update({"batch input": str(table), "batch output (parquet)": str(output)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="raystack end to end: train, sweep, serve, batch inference")
    parser.add_argument("--storage-path", default="~/raystack_runs")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--sweep-trials", type=int, default=6)
    parser.add_argument("--batch-rows", type=int, default=64)
    args = parser.parse_args(argv)
    run(args.storage_path, args.train_steps, args.sweep_trials, args.batch_rows)
    return 0
