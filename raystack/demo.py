"""The end-to-end demo (``make demo``): train -> sweep -> serve -> batch inference on one local Ray, in minutes.

Each stage prints a progress line; the last one says where every output, dashboard and log is. Everything goes
under ``storage_path`` (default ``~/raystack_runs``): nothing is written into the checkout.
"""

from __future__ import annotations

import argparse
import json
import math
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
from raystack.cluster import free_local_port, init_ray, start_serve
from raystack.config import from_dict
from raystack.serving import build_app
from raystack.sweep import load_space, run_sweep
from raystack.train import fit, load_train_config

STAGES = 5
RUN_NAME = "raystack-demo"
TRAIN_RECIPE = [  # a shape and schedule that learn fast on 2 CPU cores: ~1.3 nats/byte held out in ~4 minutes
    "model.preset=tiny", "model.n_layer=4", "model.n_embd=128", "model.n_head=4",
    "schedule.batch_size=16", "schedule.micro_batch_size=8", "schedule.warmup_steps=50", "optimizer.lr=3e-3",
    "eval.every=300", "eval.blocks=64", "checkpoint.every=300", "logging.every=100",
]
"""The demo's training run (``--set`` overrides of the default spec): 4 layers x 128 wide (0.8 M parameters),
128-byte blocks, 16 sequences a step on 2 data-parallel workers, cosine from 3e-3. README "Measured" has its loss."""


def bits(nats: float) -> str:
    """A loss in nats per byte, with its bits per byte (the unit byte-level models are compared in)."""
    return f"{nats:.3f} nats/byte ({nats / math.log(2):.3f} bits/byte)"


def _stage(number: int, text: str, started: float) -> None:
    print(f"\n[raystack demo {number}/{STAGES}] {text}   (t = {time.monotonic() - started:.0f} s)", flush=True)


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_local_port()


def run(storage_path: str, train_steps: int, sweep_trials: int, batch_rows: int) -> dict:
    started = time.monotonic()
    storage = os.path.abspath(os.path.expanduser(storage_path))
    init_ray()
    where = {"ray logs": ray._private.worker._global_node.get_session_dir_path() + "/logs"}

    _stage(1, f"training a 4-layer GPT on the Python standard library ({train_steps} steps, 2 workers, Ray Train)",
           started)
    trained, trained_loss = _train(storage, train_steps, where)
    _stage(2, f"sweeping learning rate, warmup, width and depth ({sweep_trials} trials, Optuna TPE + ASHA)", started)
    best, best_loss = _sweep(storage, sweep_trials, where)
    if best_loss < trained_loss:
        print(f"    the sweep's best, {bits(best_loss)}, beats the first run's {bits(trained_loss)}: serving it")
        served = best
    else:
        print(f"    the sweep's best, {bits(best_loss)}, does not beat the first run's {bits(trained_loss)}: its "
              "trials are short (100 steps, small shapes) so that they compare learning rates and shapes in "
              "seconds; serving the first run's model")
        served = trained
    _stage(3, "serving the better model on Ray Serve (OpenAI-compatible) and sending completions", started)
    _serve(served, where)
    _stage(4, f"batch inference over a generated {batch_rows}-row parquet table (Ray Data, actor pool)", started)
    _batch(storage, served, batch_rows, where)

    where["serve the trained model again"] = f"python jobs/deploy.py --model {served}"
    _stage(5, "done: where everything is", started)
    for what, path in where.items():
        print(f"    {what:44s} {path}")
    print(f"\n[raystack demo] finished in {time.monotonic() - started:.0f} s", flush=True)
    serve.shutdown()
    return where


def _train(storage: str, steps: int, where: dict) -> tuple[str, float]:
    """Stage 1; returns the trained model artifact and its validation loss."""
    # A re-run resumes <storage_path>/raystack-demo from its last checkpoint.
    train = fit(load_train_config(None, [f"storage_path={storage}", f"name={RUN_NAME}", *TRAIN_RECIPE,
                                         f"schedule.steps={steps}"]))
    where.update({"training run (checkpoints, metrics.jsonl)": train.run_dir,
                  "training run report": os.path.join(train.run_dir, "report.html"),
                  "trained model artifact": train.artifact})
    val = train.metrics.get("val_loss", float("nan"))
    print(f"    final training loss {bits(train.metrics.get('loss', float('nan')))}, validation loss on held-out "
          f"standard-library files {bits(val)}", flush=True)
    return train.artifact, val


def _sweep(storage: str, trials: int, where: dict) -> str:
    """Stage 2; returns the best trial's model artifact."""
    space = load_space(Path(__file__).resolve().parent.parent / "tune_spaces" / "gpt_tiny.yaml",
                       [f"storage_path={storage}", "name=demo-sweep", f"num_samples={trials}",
                        "base.data.max_documents=0", "base.schedule.steps=100", "base.eval.every=20",
                        "scheduler.grace_period=20"])
    sweep = run_sweep(space)
    where.update({"sweep dashboard": sweep.dashboard, "best model artifact (sweep)": sweep.artifact,
                  "TensorBoard logs": f"tensorboard --logdir {sweep.sweep_dir}"})
    print(f"    best validation loss {bits(sweep.best_metric)} with {json.dumps(sweep.best_config)}", flush=True)
    return sweep.artifact, sweep.best_metric


def _serve(artifact: str, where: dict) -> None:
    """Stage 3: the model behind the OpenAI API on Ray Serve, and a few completions through it."""
    port = _free_port(8000)
    _, port = start_serve({"host": "127.0.0.1", "port": port})  # an already-running Serve keeps its port
    serve.run(build_app({"model": artifact, "min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5}),
              name="demo", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/completions"
    for prompt, extra in (("def ", {"temperature": 0.6}), ("import ", {"temperature": 0.7, "top_p": 0.9}),
                          ("class ", {"temperature": 0.6, "top_k": 20})):
        body = {"model": "raystack", "prompt": prompt, "max_tokens": 80, "seed": 7, **extra}
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
    parser.add_argument("--train-steps", type=int, default=1200)
    parser.add_argument("--sweep-trials", type=int, default=6)
    parser.add_argument("--batch-rows", type=int, default=64)
    args = parser.parse_args(argv)
    run(args.storage_path, args.train_steps, args.sweep_trials, args.batch_rows)
    return 0
