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

import html
import json
import math
import os
from typing import Optional

import numpy as np

STATUS_FILE = "trial_status.json"


def _trial_dirs(sweep_dir: str) -> list[str]:
    out = []
    for name in sorted(os.listdir(sweep_dir)):
        path = os.path.join(sweep_dir, name)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "params.json")):
            out.append(path)
    return out


def _read_results(path: str) -> list[dict]:
    results = []
    result_file = os.path.join(path, "result.json")
    if os.path.isfile(result_file):
        with open(result_file) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        results.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line being written right now
    return results


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
        results = _read_results(path)
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
        import optuna

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
    page = TEMPLATE.replace("__TITLE__", html.escape(f"raystack sweep: {space.name}")).replace(
        "__DATA__", json.dumps(data).replace("</", "<\\/"))
    path = os.path.join(sweep_dir, "dashboard.html")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
header{padding:16px 24px;background:#1d2430;color:#fff}header h1{margin:0;font-size:20px}
header .sub{opacity:.75;margin-top:4px}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:16px;padding:16px 24px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:12px 16px}
section h2{font-size:15px;margin:0 0 8px}section.wide{grid-column:1/-1}
svg{width:100%;height:auto;display:block}.axis{stroke:#889;stroke-width:1}.grid{stroke:#eee}
text{font-size:11px;fill:#445}.best{stroke:#d33;stroke-width:2;fill:none}
.legend span{display:inline-block;margin-right:12px}.note{color:#667;font-size:12px}
table{border-collapse:collapse;width:100%;font-size:12px}th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:right}
th{background:#f0f2f5;position:sticky;top:0}td.l,th.l{text-align:left}tr.top td{background:#fff4d6;font-weight:600}
.st-STOPPED{color:#b26b00}.st-ERROR{color:#c00}.st-TERMINATED{color:#207a3c}.st-RUNNING{color:#2a62c9}
</style></head>
<body>
<header><h1>__TITLE__</h1><div class="sub" id="summary"></div></header>
<main>
<section><h2>Optimisation history</h2><div id="history"></div>
<div class="note">Each dot: a trial's best <span class="m"></span>, in start order. Red line: best so far.</div></section>
<section><h2>Validation curves</h2><div id="curves"></div>
<div class="note">Dashed, ending in a cross: stopped early by ASHA.</div></section>
<section><h2>Parameters against the metric</h2><div id="parallel"></div>
<div class="note">Parallel coordinates; darker lines are better trials.</div></section>
<section><h2>Parameter importance</h2><div id="importance"></div><div class="note" id="importance-method"></div></section>
<section class="wide"><h2>Trials</h2><div id="table"></div></section>
</main>
<script id="sweep-data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("sweep-data").textContent);
const NS = "http://www.w3.org/2000/svg";
const W = 520, H = 300, M = {l: 56, r: 16, t: 12, b: 36};
const better = (a, b) => D.mode === "min" ? a < b : a > b;
const palette = i => `hsl(${(i * 137.5) % 360},62%,45%)`;
function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}
function svg(id) {
  const s = el("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "data-chart": id});
  document.getElementById(id).appendChild(s);
  return s;
}
function scale(d0, d1, r0, r1) {
  const span = (d1 - d0) || 1;
  return v => r0 + (v - d0) / span * (r1 - r0);
}
function extent(values) {
  const v = values.filter(Number.isFinite);
  if (!v.length) return [0, 1];
  let lo = Math.min(...v), hi = Math.max(...v);
  if (lo === hi) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.05;
  return [lo - pad, hi + pad];
}
function axes(s, x, y, xd, yd, xlabel, ylabel, xticks) {
  for (let i = 0; i <= 4; i++) {
    const yv = yd[0] + (yd[1] - yd[0]) * i / 4, yy = y(yv);
    el("line", {x1: M.l, x2: W - M.r, y1: yy, y2: yy, class: "grid"}, s);
    el("text", {x: M.l - 6, y: yy + 4, "text-anchor": "end"}, s).textContent = yv.toFixed(3);
    if (xticks) continue;
    const xv = xd[0] + (xd[1] - xd[0]) * i / 4;
    el("text", {x: x(xv), y: H - M.b + 16, "text-anchor": "middle"}, s).textContent =
      Math.abs(xv) >= 10 ? Math.round(xv) : xv.toFixed(1);
  }
  (xticks || []).forEach(([v, label]) => {
    el("text", {x: x(v), y: H - M.b + 16, "text-anchor": "middle"}, s).textContent = label;
  });
  el("line", {x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b, class: "axis"}, s);
  el("line", {x1: M.l, x2: M.l, y1: M.t, y2: H - M.b, class: "axis"}, s);
  el("text", {x: (W + M.l) / 2, y: H - 4, "text-anchor": "middle"}, s).textContent = xlabel;
  el("text", {x: 12, y: H / 2, transform: `rotate(-90 12 ${H / 2})`, "text-anchor": "middle"}, s).textContent = ylabel;
}
const done = D.trials.filter(t => t.best !== null);
const bestTrial = done.reduce((b, t) => (b === null || better(t.best, b.best)) ? t : b, null);
document.querySelectorAll(".m").forEach(e => e.textContent = D.metric);
document.getElementById("summary").textContent =
  `${D.trials.length} trials · ${D.trials.filter(t => t.status === "STOPPED EARLY").length} stopped early · ` +
  `metric ${D.metric} (${D.mode})` + (bestTrial ? ` · best ${bestTrial.best.toFixed(4)} (${bestTrial.id})` : "");

function history() {
  const s = svg("history");
  const xd = [-0.5, Math.max(1, D.trials.length) - 0.5], yd = extent(done.map(t => t.best));
  const x = scale(xd[0], xd[1], M.l, W - M.r), y = scale(yd[0], yd[1], H - M.b, M.t);
  const every = Math.max(1, Math.ceil(D.trials.length / 12));
  axes(s, x, y, xd, yd, "trial (start order)", D.metric,
       D.trials.map((t, i) => [i, String(i + 1)]).filter((_, i) => i % every === 0));
  let run = null, pts = [];
  D.trials.forEach((t, i) => {
    if (t.best === null) return;
    run = run === null || better(t.best, run) ? t.best : run;
    pts.push(`${x(i)},${y(run)}`);
    const c = el("circle", {cx: x(i), cy: y(t.best), r: 4, fill: palette(i), class: "trial-point"}, s);
    el("title", {}, c).textContent = `${t.id}: ${t.best.toFixed(4)}`;
  });
  if (pts.length) el("polyline", {points: pts.join(" "), class: "best"}, s);
}
function curves() {
  const s = svg("curves");
  const all = D.trials.flatMap(t => t.curve);
  const xd = [0, Math.max(D.max_steps, ...all.map(p => p[0]))], yd = extent(all.map(p => p[1]));
  const x = scale(xd[0], xd[1], M.l, W - M.r), y = scale(yd[0], yd[1], H - M.b, M.t);
  axes(s, x, y, xd, yd, "step", D.metric);
  D.trials.forEach((t, i) => {
    if (!t.curve.length) return;
    const early = t.status === "STOPPED EARLY";
    const line = el("polyline", {points: t.curve.map(p => `${x(p[0])},${y(p[1])}`).join(" "), fill: "none",
      stroke: palette(i), "stroke-width": t === bestTrial ? 3 : 1.5, "stroke-dasharray": early ? "5 4" : "none",
      class: early ? "curve early" : "curve"}, s);
    el("title", {}, line).textContent = `${t.id} (${t.status})`;
    const last = t.curve[t.curve.length - 1];
    if (early) {
      const cx = x(last[0]), cy = y(last[1]);
      el("path", {d: `M${cx - 4},${cy - 4}L${cx + 4},${cy + 4}M${cx - 4},${cy + 4}L${cx + 4},${cy - 4}`,
                  stroke: palette(i), "stroke-width": 2, class: "stop-mark"}, s);
    }
  });
}
function parallel() {
  const s = svg("parallel");
  const keys = Object.keys(D.parameters);
  const dims = [...keys, D.metric];
  const xs = scale(0, Math.max(1, dims.length - 1), M.l, W - M.r - 28);
  const scales = dims.map(k => {
    if (k === D.metric) { const e = extent(done.map(t => t.best)); return v => scale(e[0], e[1], H - M.b, M.t)(v); }
    const p = D.parameters[k];
    if (p.distribution === "choice") {
      return v => scale(-0.5, p.values.length - 0.5, H - M.b, M.t)(p.values.findIndex(w => w === v));
    }
    const log = p.distribution === "loguniform";
    const f = log ? Math.log : (v => v);
    return v => scale(f(p.low), f(p.high), H - M.b, M.t)(f(v));
  });
  dims.forEach((k, j) => {
    el("line", {x1: xs(j), x2: xs(j), y1: M.t, y2: H - M.b, class: "axis"}, s);
    el("text", {x: xs(j), y: H - M.b + 16, "text-anchor": "middle"}, s).textContent = k.split(".").pop();
  });
  const e = extent(done.map(t => t.best));
  done.forEach(t => {
    const q = (t.best - e[0]) / (e[1] - e[0]);
    const shade = D.mode === "min" ? 1 - q : q;
    const pts = dims.map((k, j) => `${xs(j)},${scales[j](k === D.metric ? t.best : t.params[k])}`);
    const line = el("polyline", {points: pts.join(" "), fill: "none", stroke: `rgba(30,60,160,${0.15 + 0.8 * shade})`,
      "stroke-width": 1.5, class: "pc-line"}, s);
    el("title", {}, line).textContent = `${t.id}: ${t.best.toFixed(4)}`;
  });
}
function importance() {
  const s = svg("importance");
  const entries = Object.entries(D.importances.values).sort((a, b) => b[1] - a[1]);
  const top = Math.max(1e-9, ...entries.map(e => e[1]));
  const rowH = Math.min(36, (H - M.t - M.b) / Math.max(1, entries.length));
  entries.forEach(([k, v], i) => {
    const yy = M.t + i * rowH;
    el("text", {x: 150, y: yy + rowH / 2 + 4, "text-anchor": "end"}, s).textContent = k;
    el("rect", {x: 156, y: yy + 4, height: rowH - 8, width: Math.max(1, (W - 220) * v / top), fill: "#3b6fd4",
                class: "importance-bar"}, s);
    el("text", {x: 160 + (W - 220) * v / top, y: yy + rowH / 2 + 4}, s).textContent = v.toFixed(2);
  });
  document.getElementById("importance-method").textContent = "Method: " + D.importances.method;
}
function table() {
  const keys = Object.keys(D.parameters);
  const t = document.createElement("table");
  const head = t.createTHead().insertRow();
  ["trial", "status", ...keys, "steps", "best " + D.metric].forEach((h, i) => {
    const th = document.createElement("th"); th.textContent = h; if (i < 2) th.className = "l"; head.appendChild(th);
  });
  const body = t.createTBody();
  [...D.trials].sort((a, b) => a.best === null ? 1 : b.best === null ? -1 : (better(a.best, b.best) ? -1 : 1))
    .forEach(tr => {
      const row = body.insertRow();
      if (tr === bestTrial) row.className = "top";
      const cells = [tr.id, tr.status, ...keys.map(k => {
        const v = tr.params[k]; return typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(3) : String(v);
      }), String(tr.steps), tr.best === null ? "–" : tr.best.toFixed(4)];
      cells.forEach((c, i) => {
        const td = row.insertCell(); td.textContent = c;
        if (i < 2) td.className = "l"; if (i === 1) td.classList.add("st-" + c.split(" ")[0]);
      });
    });
  document.getElementById("table").appendChild(t);
}
history(); curves(); parallel(); importance(); table();
document.body.setAttribute("data-rendered", "true");
</script>
</body></html>
"""
