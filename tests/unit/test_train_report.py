"""The training-run report: events read from metrics.jsonl, and the page drawn in a real browser."""

import json
import math
from pathlib import Path

import pytest

from raystack.train_report import collect, events, write_report
from tests.helpers import chromium, console_errors, render


def write_run(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl as MetricsLog writes it: 2 workers, a restart from step 20 after a worker died (with
    one worker left: an elastic resize), evaluations and checkpoints every 20 steps, time in seconds."""
    rows, t = [], 1000.0
    for attempt, (steps, world, resumed) in enumerate([(range(10, 31, 10), 2, 0), (range(30, 61, 10), 1, 20)]):
        for step in steps:
            t += 5
            loss = 5.0 / (1 + step / 20)
            row = {"step": step, "loss": loss, "bits_per_byte": loss / math.log(2), "lr": 1e-3 * (1 - step / 80),
                   "tokens_per_s": 1000.0 * world, "model_flops_per_s": 2e9 * world, "world_size": world,
                   "resumed_from_step": resumed, "time": t, "checkpoint": step % 20 == 0}
            if step % 20 == 0:
                row["val_loss"] = loss + 0.1
            rows.append(row)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7')  # torn
    (run_dir / "run_config.json").write_text(json.dumps({"name": "demo", "optimizer": {"lr": 0.001}}))
    (run_dir / "samples.json").write_text(json.dumps([{"prompt": "def ", "completion": "main():\n    pass"}]))
    return rows


def test_events_mark_restarts_resizes_evaluations_and_checkpoints(tmp_path):
    rows = write_run(tmp_path / "run")
    found = events(rows)
    kinds = [e["kind"] for e in found]
    assert kinds.count("restart") == 1 and kinds.count("resize") == 1
    assert kinds.count("eval") == 3 and kinds.count("checkpoint") == 3  # steps 20, 40 and 60
    restart = next(e for e in found if e["kind"] == "restart")
    assert restart["step"] == 30 and "from step 20" in restart["text"]
    data = collect(str(tmp_path / "run"))
    assert len(data["series"]) == len(rows) and data["series"][0]["t"] == 0  # the torn last line is skipped
    assert data["final"]["step"] == 60 and data["config"]["name"] == "demo" and data["samples"][0]["prompt"] == "def "


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (make test installs it)")
def test_report_draws_every_chart_in_a_real_browser(tmp_path):
    write_run(tmp_path / "run")
    page = Path(write_report(str(tmp_path / "run")))
    dom, log = render(page)
    assert 'data-rendered="true"' in dom, log[-2000:]
    assert not console_errors(log), console_errors(log)
    for chart in ("loss", "lr", "throughput", "flops", "world"):
        assert f'id="{chart}" class="chart" data-drawn="true"' in dom, chart
    assert dom.count('class="line val series"') == 1 and dom.count('class="ev-eval event-mark"') == 3
    assert dom.count('class="ev-restart event-mark"') == 5 and dom.count('class="ev-resize event-mark"') == 5  # per chart
    assert dom.count('class="ev-checkpoint event-mark"') == 5 * 3
    assert "bits/byte" in dom and "main():" in dom and '"lr": 0.001' in dom
    assert dom.count('class="event-row"') == 1 + 1 + 3  # restart, resize, checkpoints (evaluations are dots)
