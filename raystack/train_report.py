"""The training-run report: one self-contained HTML page per run (no network, no external scripts), the training
twin of the sweep dashboard.

``write_report(run_dir)`` reads ``metrics.jsonl`` (every report rank 0 made, across restarts: the driver's
``MetricsLog`` appends them), ``run_config.json`` (the spec the run was started with) and ``samples.json``
(completions from the final model, when the run has finished) and writes ``report.html``, drawn as SVG by an inline
script: training and validation loss in nats and bits per byte, learning rate, tokens/s, model FLOP/s (and MFU where
the device's peak is known), world size, all against wall-clock time since the run started, with restarts, elastic
resizes, evaluations and checkpoints marked on the time axis; the config; the final figures; the samples.
``MetricsLog`` rewrites it at every report; ``raystack train-report RUN_DIR`` writes it on demand.
"""

from __future__ import annotations

import json
import math
import os

from raystack.observability import TRAIN_REPORT_TEMPLATE, read_jsonl, write_page

REPORT = "report.html"
CONFIG = "run_config.json"
SAMPLES = "samples.json"


def read_metrics(run_dir: str) -> list[dict]:
    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def events(rows: list[dict]) -> list[dict]:
    """What happened to the run, in time order: ``restart`` (a new attempt resumed from a checkpoint, or started
    over), ``resize`` (the worker group changed size), ``eval`` and ``checkpoint``."""
    out, previous = [], None
    for row in rows:
        at = {"time": row.get("time"), "step": row.get("step")}
        if previous is not None:
            if row.get("step", 0) <= previous.get("step", 0) or \
                    row.get("resumed_from_step") != previous.get("resumed_from_step"):
                out.append({**at, "kind": "restart", "text": f"restart from step {row.get('resumed_from_step', 0)}"})
            if row.get("world_size") != previous.get("world_size"):
                out.append({**at, "kind": "resize",
                            "text": f"world size {previous.get('world_size')} -> {row.get('world_size')}"})
        if "val_loss" in row:
            out.append({**at, "kind": "eval", "text": f"val_loss {row['val_loss']:.4f}"})
        if row.get("checkpoint"):
            out.append({**at, "kind": "checkpoint", "text": f"checkpoint at step {row.get('step')}"})
        previous = row
    return out


def collect(run_dir: str) -> dict:
    rows = [r for r in read_metrics(run_dir) if isinstance(r.get("time"), (int, float))]
    start = rows[0]["time"] if rows else 0.0
    series = [{"t": r["time"] - start, **{k: r[k] for k in ("step", "loss", "val_loss", "lr", "tokens_per_s",
                                                               "model_flops_per_s", "mfu", "world_size")
                                             if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])}}
              for r in rows]
    final = {}
    for r in rows:  # the last value of each figure
        final.update({k: v for k, v in r.items() if k != "time"})
    return {"name": os.path.basename(os.path.normpath(run_dir)), "series": series,
            "events": [{**e, "t": e["time"] - start} for e in events(rows)], "final": final,
            "config": _read_json(os.path.join(run_dir, CONFIG)), "samples": _read_json(os.path.join(run_dir, SAMPLES))}


def write_report(run_dir: str) -> str:
    """Write ``<run_dir>/report.html`` (atomically: a reader never sees half a page); return its path."""
    data = collect(run_dir)
    return write_page(TRAIN_REPORT_TEMPLATE, f"raystack run: {data['name']}", data, os.path.join(run_dir, REPORT))
