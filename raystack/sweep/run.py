"""Where Ray begins for sweeps: the trial (a Ray Tune function trainable), the Tuner (Optuna TPE + ASHA),
the best model's export and the dashboard callbacks."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass

import optuna
import ray.train
import ray.tune
import ray.util.state
import torch
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from raystack import storage
from raystack.checkpoint import export_checkpoint
from raystack.config import ConfigError, from_dict, to_dict
from raystack.data import prepare_blocks
from raystack.sweep.space import SweepSpace
from raystack.sweep_report import write_report
from raystack.train import StopWithoutCheckpoint, TrainMetrics, run_training, train_loop
from raystack.train.job import polling_reports_promptly

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# The trial


def run_trial(trial_config: dict, space_dict: dict, data_uri: str, runs_dir: str) -> None:
    """Ray Tune function trainable: one training run with the trial's parameters, reporting every evaluation with a
    checkpoint. One worker trains here; several train in a ``TorchTrainer`` this trial drives (its run lives in
    ``runs_dir/<trial id>``, so a restored trial resumes it from its last checkpoint)."""

    space = from_dict(SweepSpace, space_dict)
    config = space.base_config({k: trial_config[k] for k in space.parameters})
    trial_id = ray.tune.get_context().get_trial_id()
    config.name = f"{space.name}-{trial_id}"  # tags the trial's training gauges
    loop_config = {"config": to_dict(config), "data_uri": data_uri}
    if space.workers_per_trial > 1:
        _fit_data_parallel(space, config, loop_config, storage_path=runs_dir, name=trial_id)
        return

    device = torch.device("cuda" if torch.cuda.is_available() and space.gpus_per_trial > 0 else "cpu")
    run_training(loop_config, 0, 1, device, report=ray.tune.report, checkpoint=ray.tune.get_checkpoint(),
                 checkpoint_cls=ray.tune.Checkpoint, gauges=TrainMetrics(config.name))


def _fit_data_parallel(space: SweepSpace, config, loop_config: dict, storage_path: str, name: str) -> None:
    workers = space.workers_per_trial
    per_worker = {"CPU": space.cpus_per_trial / workers}
    if space.gpus_per_trial:
        per_worker["GPU"] = space.gpus_per_trial / workers
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=space.gpus_per_trial > 0,
                                               resources_per_worker=per_worker,
                                               placement_strategy=config.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=config.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # rank 0's reports (with their checkpoint's path) become Tune's
            callbacks=[TuneReportCallback(), StopWithoutCheckpoint()],
        ),
    )
    with polling_reports_promptly(workers):
        trainer.fit()


def _require_state_api(timeout_s: float = 30.0) -> None:
    """Data-parallel trials need Ray's State API: when ASHA stops a trial, its Ray Train controller dies with it and
    Ray Train's placement-group cleaner asks the State API (served by the dashboard) before it frees the workers'
    resources. Without it every stopped trial would hold its workers' CPUs/GPUs until the sweep ends."""

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.util.state.list_actors(limit=1, timeout=5, raise_on_missing_output=False)
            return
        except Exception as e:  # the dashboard may still be starting
            if time.monotonic() > deadline:
                raise ConfigError(
                    "workers_per_trial > 1: data-parallel trials need Ray's State API (the dashboard) so that Ray "
                    "Train can free the workers of trials ASHA stops early, and it is not reachable "
                    f"({type(e).__name__}: {str(e)[:160]}); start Ray with its dashboard (the default: `ray start "
                    "--head` without --include-dashboard=false) or set workers_per_trial: 1") from None
            time.sleep(1)


# ----------------------------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepOutput:
    sweep_dir: str
    best_config: dict
    best_metric: float
    artifact: str
    dashboard: str
    trials: int
    storage: str = ""
    """Where the sweep's trials, Train runs and best model are (== sweep_dir unless storage_path is a URI)."""


def _dashboard_callback(home: str, space: SweepSpace, mirror: bool):

    class DashboardCallback(ray.tune.Callback):
        """Rewrites the sweep dashboard as results arrive (at most every 5 s) and when trials end. With the sweep
        on a URI it first copies each trial's results from Tune's staging directory on this driver into ``home``."""

        def __init__(self):
            self.last = 0.0

        def _write(self, force: bool, trials):
            if force or time.monotonic() - self.last > 5:
                self.last = time.monotonic()
                try:
                    if mirror:
                        _mirror_trial_results(trials, home)
                    statuses = {os.path.basename(str(t.path).rstrip("/")): t.status for t in trials}
                    write_report(home, space, statuses=statuses)
                except Exception:  # a dashboard must never fail the sweep
                    logger.exception("could not write the sweep dashboard")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._write(False, trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._write(True, trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._write(True, trials)

        def on_experiment_end(self, trials, **info):
            if mirror:
                _mirror_trial_results(trials, home)

    return DashboardCallback()


def _mirror_trial_results(trials, home: str) -> None:
    """Copy each trial's ``params.json``, ``result.json`` and ``error.txt`` from Tune's staging directory on the
    driver (``trial.local_path``, which Tune syncs to the URI) into ``home/<trial dir>``."""

    for trial in trials:
        source = trial.local_path
        if not source or not os.path.isdir(source):
            continue
        target = os.path.join(home, os.path.basename(source.rstrip("/")))
        os.makedirs(target, exist_ok=True)
        for name in ("params.json", "result.json", "error.txt"):
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(target, name + ".tmp"))
                os.replace(os.path.join(target, name + ".tmp"), os.path.join(target, name))


def sweep_locations(space: SweepSpace) -> tuple[str, str]:
    """``(root, home)``: the sweep's storage (a path or URI) and the driver's sweep directory (a local path; the
    same as root unless root is a URI)."""
    root = storage.join(space.storage_path, space.name)
    if not storage.is_uri(root):
        return root, root
    return root, os.path.join(os.path.abspath(os.path.expanduser(space.local_dir)), space.name)


def _upload(home: str, root: str, names) -> None:
    fs, path = storage.filesystem(root)
    for name in names:
        with open(os.path.join(home, name), "rb") as f, fs.open_output_stream(f"{path}/{name}") as out:
            out.write(f.read())


def run_sweep(space: SweepSpace) -> SweepOutput:
    """Run (or resume) the sweep; export the best trial's model; write the dashboard. Needs a connected Ray."""

    root, sweep_dir = sweep_locations(space)
    remote = root != sweep_dir
    storage.make_local_dir(sweep_dir, "local_dir" if remote else "storage_path")
    with open(os.path.join(sweep_dir, "space.json"), "w") as f:  # for `raystack sweep-report SWEEP_DIR`
        json.dump(to_dict(space), f, indent=2)
    if space.workers_per_trial > 1:
        _require_state_api()
    data_uri = prepare_blocks(space.base_config().data, storage.join(root, "data"))
    results = _tuner(space, root, sweep_dir, data_uri).fit()
    best = results.get_best_result(metric=space.metric, mode=space.mode, scope="all")
    best_config = {k: best.config[k] for k in space.parameters}
    artifact = _export_best(best, space, best_config, root)
    statuses = {r.path.rstrip("/").rsplit("/", 1)[-1]: ("ERROR" if r.error else "TERMINATED") for r in results}
    dashboard = write_report(sweep_dir, space, statuses=statuses)
    if remote:  # beside the sweep too, for whoever fetches it from the bucket
        _upload(sweep_dir, root, ["space.json", "dashboard.html"])
    return SweepOutput(sweep_dir, best_config, _best_metric(best, space), artifact, dashboard, len(results), root)


def _tuner(space: SweepSpace, root: str, sweep_dir: str, data_uri: str):
    """The Tuner: restored when the sweep at ``root`` ran before, else new (Optuna TPE + ASHA, study in SQLite)."""

    trainable = ray.tune.with_parameters(run_trial, space_dict=to_dict(space), data_uri=data_uri,
                                         runs_dir=storage.join(root, "train_runs"))
    # One worker trains inside the trial, which holds its resources. Several train in the TorchTrainer's own
    # placement group, so the trial itself (the Train driver) takes a sliver of a CPU; max_concurrent_trials then
    # bounds how many worker groups run at once, and a group that does not fit yet waits for resources.
    resources = ({"cpu": space.cpus_per_trial, "gpu": space.gpus_per_trial} if space.workers_per_trial == 1
                 else {"cpu": 0.01})
    trainable = ray.tune.with_resources(trainable, resources)
    if ray.tune.Tuner.can_restore(root):
        logger.info("resuming sweep %s", root)
        return ray.tune.Tuner.restore(root, trainable, resume_errored=True)
    study_storage = optuna.storages.RDBStorage(space.optuna_storage or f"sqlite:///{sweep_dir}/optuna.db")
    sampler = (optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=space.n_startup_trials)
               if space.search == "tpe" else optuna.samplers.RandomSampler(seed=space.seed))
    searcher = OptunaSearch(space=space.optuna_space(), metric=space.metric, mode=space.mode, sampler=sampler,
                            study_name=space.name, storage=study_storage)
    scheduler = (ASHAScheduler(time_attr="step", max_t=space.steps, grace_period=space.scheduler.grace_period,
                               reduction_factor=space.scheduler.reduction_factor)
                 if space.early_stopping else FIFOScheduler())
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=searcher,
                                        scheduler=scheduler, num_samples=space.num_samples,
                                        max_concurrent_trials=space.max_concurrent_trials),
        run_config=ray.tune.RunConfig(name=space.name, storage_path=storage.join(space.storage_path),
                                      callbacks=[_dashboard_callback(sweep_dir, space, mirror=root != sweep_dir)],
                                      checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=2)),
    )


def _export_best(best, space: SweepSpace, best_config: dict, root: str) -> str:
    """Commit the best trial's final weights as the model artifact ``<root>/best_model``; return its location."""
    artifact = storage.join(root, "best_model")
    checkpoint = best.checkpoint  # a data-parallel trial's checkpoints live in its Train run; Tune has their path
    if checkpoint is None and best.metrics.get(CHECKPOINT_PATH_KEY):
        checkpoint = ray.tune.Checkpoint(best.metrics[CHECKPOINT_PATH_KEY], filesystem=storage.filesystem(root)[0])
    if checkpoint is None:
        raise RuntimeError(f"the best trial ({best.path}) reported no checkpoint")
    with checkpoint.as_directory() as directory:
        export_checkpoint(directory, space.base_config(best_config).model.build(), artifact)
    return artifact


def _best_metric(result, space: SweepSpace) -> float:
    history = result.metrics_dataframe
    values = history[space.metric].dropna() if history is not None and space.metric in history else []
    if len(values) == 0:
        return float(result.metrics.get(space.metric, math.nan))
    return float(values.min() if space.mode == "min" else values.max())
