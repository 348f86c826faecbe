"""The sweep dashboard: one self-contained HTML page per sweep (no network, no external scripts).

``write_report(sweep_dir, space)`` reads every Tune trial directory under ``sweep_dir`` (``params.json``,
``result.json``) and writes ``dashboard.html`` with, drawn as SVG by an inline script:
the optimisation history (each trial's best metric in start order, and the best-so-far line); every trial's
validation-loss curve against steps (trials stopped early by ASHA dashed, ending in a cross); parallel coordinates of
the parameters against the metric; parameter importances (Optuna's PED-ANOVA on the sweep's study when it can be
computed, else |Spearman rank correlation| with the metric); and the table of trials.
``raystack sweep-report SWEEP_DIR`` writes it on demand; the sweep also rewrites it as trials report.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np
import optuna

from raystack.observability import SWEEP_DASHBOARD_TEMPLATE, read_jsonl, write_page

STATUS_FILE = "trial_status.json"


def _trial_dirs(sweep_dir: str) -> list[str]:
    out = []
    for name in sorted(os.listdir(sweep_dir)):
        path = os.path.join(sweep_dir, name)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "params.json")):
            out.append(path)
    return out


def collect(sweep_dir: str, space, statuses: Optional[dict] = None) -> dict:
    """Everything the page shows, as plain data."""
    status_path = os.path.join(sweep_dir, STATUS_FILE)
    known = {}
    if os.path.isfile(status_path):
        with open(status_path) as f:
            known = json.load(f)
    known.update(statuses or {})
    if statuses:
        with open(status_path, "w") as f:
            json.dump(known, f)
    metric, mode, max_steps = space.metric, space.mode, space.steps
    better = min if mode == "min" else max
    trials = []
    for path in _trial_dirs(sweep_dir):
        name = os.path.basename(path)
        with open(os.path.join(path, "params.json")) as f:
            params = {k: v for k, v in json.load(f).items() if k in space.parameters}
        results = read_jsonl(os.path.join(path, "result.json"))
        # A trial restored after its driver died re-reports the steps since its last saved checkpoint: keep the last.
        curve = sorted({r["step"]: [r["step"], r[metric]] for r in results if metric in r and "step" in r}.values())
        last_step = max((r.get("step", 0) for r in results), default=0)
        status = known.get(name, "RUNNING")
        if os.path.isfile(os.path.join(path, "error.txt")):
            status = "ERROR"
        if status == "TERMINATED" and last_step < max_steps:
            status = "STOPPED EARLY"
        started = min((r.get("timestamp", math.inf) for r in results), default=math.inf)
        trials.append({"name": name, "id": results[0].get("trial_id", name) if results else name, "params": params,
                       "curve": curve, "best": better(v for _, v in curve) if curve else None,
                       "steps": last_step, "status": status, "started": started})
    trials.sort(key=lambda t: (t["started"], t["name"]))
    for i, t in enumerate(trials):
        t["started"] = i
    return {"name": space.name, "metric": metric, "mode": mode, "max_steps": max_steps,
            "parameters": {k: {"distribution": p.distribution, "low": p.low, "high": p.high, "values": p.values}
                           for k, p in space.parameters.items()},
            "trials": trials, "importances": importances(sweep_dir, space, trials)}


def _spearman(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 3:
        return 0.0
    rx, ry = np.argsort(np.argsort(xs)), np.argsort(np.argsort(ys))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(abs(np.corrcoef(rx, ry)[0, 1]))


def importances(sweep_dir: str, space, trials: list[dict]) -> dict:
    """``{"method": str, "values": {param: share}}``."""
    try:
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        storage = space.optuna_storage or f"sqlite:///{os.path.join(sweep_dir, 'optuna.db')}"
        study = optuna.load_study(study_name=space.name, storage=storage)
        values = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        if values and all(math.isfinite(v) for v in values.values()):
            return {"method": "Optuna PED-ANOVA", "values": {k: float(v) for k, v in values.items()}}
    except Exception:
        pass
    done = [t for t in trials if t["best"] is not None]
    raw = {}
    for key, p in space.parameters.items():
        xs = [p.values.index(t["params"][key]) if p.distribution == "choice" and t["params"].get(key) in p.values
              else float(t["params"].get(key, 0)) for t in done]
        raw[key] = _spearman(xs, [t["best"] for t in done])
    total = sum(raw.values()) or 1.0
    return {"method": "|Spearman rank correlation| with the metric, normalised",
            "values": {k: v / total for k, v in raw.items()}}


def write_report(sweep_dir: str, space, statuses: Optional[dict] = None) -> str:
    data = collect(sweep_dir, space, statuses)
    return write_page(SWEEP_DASHBOARD_TEMPLATE, f"raystack sweep: {space.name}", data,
                      os.path.join(sweep_dir, "dashboard.html"))
