"""Training pieces without Ray: LR schedule, global-batch weighting, checkpoints and artifacts."""

import contextlib
import json
import os

import pytest
import torch

from raystack.checkpoint import (CheckpointError, load_artifact, load_checkpoint, save_artifact, save_checkpoint)
from raystack.model import GPT, ModelConfig
from raystack.train import OptimizerSection, ScheduleSection, build_optimizer, lr_at, rank_slice, train_step


def test_lr_warms_up_then_decays_to_the_floor():
    schedule = ScheduleSection(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 1.0, schedule) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_rank_slices_cover_the_global_batch_once():
    for world in (1, 2, 3, 5):
        covered = [i for r in range(world) for i in range(16)[rank_slice(16, r, world)]]
        assert covered == list(range(16))


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_gradient_is_the_global_mean_whatever_the_world_size():
    """Two simulated ranks (DDP averages their gradients) give one rank's gradient on the whole batch."""
    torch.manual_seed(0)
    schedule = ScheduleSection(batch_size=6, micro_batch_size=2)
    blocks = torch.randint(0, 257, (6, 17))
    no_autocast = contextlib.nullcontext

    def grads_for(world):
        per_rank = []
        for rank in range(world):
            torch.manual_seed(1)
            model = GPT(ModelConfig.from_preset("tiny"))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the weights, read the grads
            optimizer.step = lambda: None
            optimizer.zero_grad = lambda set_to_none=True: None
            train_step(model, optimizer, blocks[rank_slice(6, rank, world)], schedule, 0.0, world, no_autocast)
            per_rank.append(_grads(model))
        return torch.stack(per_rank).mean(0)

    torch.testing.assert_close(grads_for(2), grads_for(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads_for(3), grads_for(1), rtol=1e-5, atol=1e-7)


def test_checkpoint_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny"))
    optimizer = build_optimizer(model, OptimizerSection())
    model.loss(torch.randint(0, 257, (2, 9))).backward()
    optimizer.step()
    save_checkpoint(str(tmp_path), step=42, model=model, optimizer=optimizer, rank=0)
    expected_draw = torch.rand(3)

    restored = GPT(ModelConfig.from_preset("tiny"))
    restored_opt = build_optimizer(restored, OptimizerSection())
    meta = load_checkpoint(str(tmp_path), restored, restored_opt)
    assert meta["step"] == 42 and meta["rng_restored"]
    assert torch.equal(torch.rand(3), expected_draw)  # RNG continues where it was saved
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    assert restored_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_a_checkpoint_without_its_commit_marker_is_never_loaded(tmp_path):
    model = GPT(ModelConfig.from_preset("tiny"))
    save_checkpoint(str(tmp_path), 1, model, build_optimizer(model, OptimizerSection()))
    os.remove(tmp_path / ".metadata")
    with pytest.raises(CheckpointError, match="commit marker"):
        load_checkpoint(str(tmp_path), model)
    save_checkpoint(str(tmp_path), 1, model, build_optimizer(model, OptimizerSection()))
    os.remove(tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(str(tmp_path), model)


def test_artifact_round_trip_and_clear_errors(tmp_path):
    config = ModelConfig.from_preset("tiny")
    model = GPT(config)
    location = save_artifact(str(tmp_path / "art"), config, model.state_dict())
    manifest = json.loads((tmp_path / "art" / "_SUCCESS").read_text())
    assert sorted(os.listdir(location)) == sorted(["_SUCCESS", manifest["attempt"]])
    assert sorted(os.listdir(tmp_path / "art" / manifest["attempt"])) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    loaded, tokenizer = load_artifact(location)
    tokens = torch.tensor([tokenizer.encode("hello")])
    torch.testing.assert_close(loaded(tokens), model.eval()(tokens))

    with pytest.raises(CheckpointError, match="no committed output"):
        load_artifact(str(tmp_path / "nowhere"))
    wrong = ModelConfig.from_dict({**config.to_dict(), "n_layer": config.n_layer + 1})
    with pytest.raises(CheckpointError, match="weights that do not fit"):
        load_artifact(save_artifact(str(tmp_path / "wrong"), wrong, model.state_dict()))


def test_a_torn_or_replaced_artifact_is_refused_or_read_whole(tmp_path):
    """Re-export replaces an artifact at one step; a file changed under an unchanged manifest is refused."""
    config = ModelConfig.from_preset("tiny")
    first, second = GPT(config), GPT(config)
    location = save_artifact(str(tmp_path / "art"), config, first.state_dict())
    old_attempt = json.loads((tmp_path / "art" / "_SUCCESS").read_text())["attempt"]
    save_artifact(location, config, second.state_dict())
    attempt = json.loads((tmp_path / "art" / "_SUCCESS").read_text())["attempt"]
    assert sorted(os.listdir(location)) == sorted(["_SUCCESS", attempt]) and attempt != old_attempt
    loaded, _ = load_artifact(location)
    for a, b in zip(loaded.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    config_file = tmp_path / "art" / attempt / "config.json"
    config_file.write_text(config_file.read_text().replace('"n_head"', '"n_head" '))
    with pytest.raises(CheckpointError, match="torn"):
        load_artifact(location)
    weights = tmp_path / "art" / attempt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="torn"):
        load_artifact(location)


def register(run, names):
    """Ray Train's checkpoint-manager snapshot naming ``names`` (the part of it raystack reads)."""
    results = [{"checkpoint_dir_name": name, "metrics": {}} for name in names]
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": results}))


def _checkpoint_dirs(tmp_path, steps, config=None):
    """Registered checkpoints at ``steps`` in a run directory laid out as Ray Train's (``checkpoint_<time>``)."""
    model = GPT(config or ModelConfig.from_preset("tiny"))
    optimizer = build_optimizer(model, OptimizerSection())
    for i, step in enumerate(steps):
        with torch.no_grad():
            next(model.parameters()).fill_(float(step))
        save_checkpoint(str(tmp_path / f"checkpoint_2026-11-23_17-00-0{i}.000000"), step, model, optimizer,
                        extra={"model": model.config.to_dict(), "data": {"block_size": 64}})
    directories = sorted(tmp_path.glob("checkpoint_*"))
    register(tmp_path, [d.name for d in directories])
    return directories


def test_a_truncated_checkpoint_file_fails_validation(tmp_path):
    (directory,) = _checkpoint_dirs(tmp_path, [5])
    data = (directory / "optimizer.pt").read_bytes()
    (directory / "optimizer.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="torn: optimizer.pt has"):
        load_checkpoint(str(directory), GPT(ModelConfig.from_preset("tiny")))


def test_resume_skips_torn_checkpoints_for_the_newest_that_loads(tmp_path):
    import ray.train
    import pyarrow.fs as pafs

    from raystack.checkpoint import newest_valid_checkpoint
    from raystack.train.loop import NoUsableCheckpoint, _restore

    oldest, middle, latest = _checkpoint_dirs(tmp_path, [2, 4, 6])
    os.remove(latest / "model.safetensors")  # the newest is torn
    fs = pafs.LocalFileSystem()
    model = GPT(ModelConfig.from_preset("tiny"))
    meta = _restore(ray.train.Checkpoint(str(latest), filesystem=fs), model, None, 0, "cpu")
    assert meta["step"] == 4 and float(next(model.parameters()).detach().flatten()[0]) == 4.0
    path, meta, problems = newest_valid_checkpoint(str(tmp_path))
    assert path == str(middle) and meta["step"] == 4 and len(problems) == 1 and "incomplete" in problems[0]

    for directory in (oldest, middle):
        (directory / ".metadata").write_text("{not json")
    with pytest.raises(NoUsableCheckpoint, match="no checkpoint of this run can be loaded"):
        _restore(ray.train.Checkpoint(str(latest), filesystem=fs), model, None, 0, "cpu")
    assert newest_valid_checkpoint(str(tmp_path))[0] is None


def test_check_resumable_refuses_other_shapes_and_runs_without_a_usable_checkpoint(tmp_path):
    from raystack.train import TrainJobConfig, check_resumable, load_train_config
    from raystack.train.loop import _identity

    config = load_train_config(overrides=[f"storage_path={tmp_path}", "name=run"])
    assert isinstance(config, TrainJobConfig)
    check_resumable(config)  # nothing there yet: a fresh run
    run = tmp_path / "run"
    run.mkdir()
    model = GPT(config.model.build())
    save_checkpoint(str(run / "checkpoint_2026-11-23_17-00-00.000000"), 3, model,
                    build_optimizer(model, OptimizerSection()), extra=_identity(config))
    os.remove(run / "checkpoint_2026-11-23_17-00-00.000000" / "optimizer.pt")
    check_resumable(config)  # never registered (its upload was cut short): Ray Train starts afresh, and so may we
    save_checkpoint(str(run / "checkpoint_2026-11-23_17-00-00.000000"), 3, model,
                    build_optimizer(model, OptimizerSection()), extra=_identity(config))
    register(run, ["checkpoint_2026-11-23_17-00-00.000000"])
    check_resumable(config)  # the same shape and data: resumes
    wider = load_train_config(overrides=[f"storage_path={tmp_path}", "name=run",
                                         f"model.n_embd={config.model.build().n_embd * 2}",
                                         f"data.block_size={config.data.block_size // 2}"])
    with pytest.raises(CheckpointError, match=r"model\.n_embd: checkpoint .*; data\.block_size: checkpoint"):
        check_resumable(wider)
    os.remove(run / "checkpoint_2026-11-23_17-00-00.000000" / "optimizer.pt")
    with pytest.raises(CheckpointError, match="none of its 1 checkpoint"):
        check_resumable(config)


def test_a_worker_without_a_usable_checkpoint_ends_the_run_instead_of_restarting_it():
    from raystack.train import NoUsableCheckpoint, StopWithoutCheckpoint

    callback = StopWithoutCheckpoint()
    callback.after_exception(None, {0: ValueError("a passing failure"), 1: RuntimeError("oom")})  # retried as usual
    with pytest.raises(NoUsableCheckpoint, match="no checkpoint of this run can be loaded"):
        callback.after_exception(None, {1: NoUsableCheckpoint("no checkpoint of this run can be loaded: ...")})
    # As it reaches the controller from a worker: wrapped, with the worker's traceback in the text.
    with pytest.raises(NoUsableCheckpoint):
        callback.after_exception(None, {0: RuntimeError("Traceback ...\nraystack.train.loop.NoUsableCheckpoint: none")})


def test_ray_train_polls_for_reports_promptly_unless_the_user_chose_an_interval(monkeypatch):
    """Ray Train's controller takes one report per worker per poll (2 s apart by default); ``fit`` and data-parallel
    sweep trials poll faster around ``TorchTrainer.fit``, slower for larger groups, and leave a user's value alone."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE, HEALTH_CHECK_INTERVAL_S_ENV_VAR

    from raystack.train.job import POLL_ENV, polling_reports_promptly, report_poll_s

    # The variable Ray Train's controller reads, and one it takes from the driver's environment.
    assert POLL_ENV == HEALTH_CHECK_INTERVAL_S_ENV_VAR and POLL_ENV in ENV_VARS_TO_PROPAGATE
    assert [report_poll_s(n) for n in (1, 2, 10, 50, 200, 1000)] == [0.1, 0.1, 0.1, 0.5, 2.0, 2.0]
    monkeypatch.delenv(POLL_ENV, raising=False)
    with polling_reports_promptly(2):
        assert os.environ[POLL_ENV] == "0.1"
    assert POLL_ENV not in os.environ  # set for the fit only, so the next fit's group size counts
    with pytest.raises(RuntimeError), polling_reports_promptly(64):
        assert os.environ[POLL_ENV] == "0.64"
        raise RuntimeError("the run failed")
    assert POLL_ENV not in os.environ
    monkeypatch.setenv(POLL_ENV, "5")
    with polling_reports_promptly(2):
        assert os.environ[POLL_ENV] == "5"
    assert os.environ[POLL_ENV] == "5"


def test_a_preemption_hold_ends_after_its_grace_when_no_restart_comes(monkeypatch, capsys):
    """After a preemption notice the loop holds (its steps would be thrown away); a drain with no deadline does not
    hold at all, and a hold whose restart never comes ends after HOLD_GRACE_S instead of hanging the run."""
    import time as real_time

    from ray.train.v2.api.preemption import PreemptionInfo

    from raystack.train import loop

    clock = {"now": 1000.0}
    monkeypatch.setattr(loop.time, "time", lambda: clock["now"])
    monkeypatch.setattr(loop.time, "sleep", lambda s: clock.__setitem__("now", clock["now"] + s))
    started = real_time.monotonic()
    loop._hold_for_preemption(PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"n1": [0]}), 0, 5)
    assert clock["now"] == 1000.0 and "no deadline given" in capsys.readouterr().out
    loop._hold_for_preemption(PreemptionInfo(deadline_ms=1_020_000, preempted_node_to_ranks={"n1": [0]}), 0, 5)
    assert clock["now"] >= 1020 + loop.HOLD_GRACE_S and "training on" in capsys.readouterr().out
    assert real_time.monotonic() - started < 5


def test_preemption_asks_come_about_every_so_many_seconds_of_training():
    """Asking for a preemption notice is a collective through Ray Train's synchronization actor, so the loop asks
    about every ``checkpoint.preemption_check_s`` seconds, counted in steps from the last report's mean step time:
    every step until the first report, never when off."""
    from raystack.train.loop import _Asks

    def asked(asks, steps, step_s=None, start=1):
        if step_s is not None:
            asks.pace(step_s)
        return [done for done in range(start, start + steps) if asks.due(done)]

    assert asked(_Asks(0), 50, step_s=0.001) == []
    asks = _Asks(1.0)
    assert asked(asks, 5) == [1, 2, 3, 4, 5]  # no step time known yet
    assert asked(asks, 30, step_s=0.1, start=6) == [15, 25, 35]  # 10 steps of 0.1 s after the last ask (5)
    asks.pace(None)  # a step without a report keeps the pace
    assert asked(asks, 10, start=36) == [45]
    assert asked(asks, 3, step_s=4.0, start=46) == [46, 47, 48]  # steps longer than the interval: every step
    assert asked(_Asks(1e308), 1000, step_s=1e-3) == []  # the largest interval a config takes: no overflow


def test_a_report_returns_the_windows_mean_step_time(tmp_path):
    """The mean seconds per step that paces the preemption asks (the same number on every rank: the report
    all-reduces it with the loss); nothing between reports."""
    import time as real_time

    from raystack.train import load_train_config
    from raystack.train.loop import _Reporter

    config = load_train_config(None, [f"storage_path={tmp_path}", "logging.every=4", "eval.every=0",
                                      "checkpoint.every=100", "schedule.steps=100"])
    reports = []
    reporter = _Reporter(config, 0, 1, torch.device("cpu"), 0, 16, 1.0, lambda m, **kw: reports.append(m), None)
    step_times = []
    for done in range(1, 5):
        reporter.add(torch.tensor(2.0))
        real_time.sleep(0.02)
        step_times.append(reporter.maybe_report(done, 1e-3, None, None, lambda: None))
    assert step_times[:3] == [None, None, None] and 0.02 <= step_times[3] < 0.5
    assert len(reports) == 1 and reports[0]["loss"] == pytest.approx(2.0) and reports[0]["step"] == 4

