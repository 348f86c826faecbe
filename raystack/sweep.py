"""Hyperparameter sweeps: Ray Tune + Optuna (TPE) + ASHA over raystack training, resumable, with a dashboard.

Contract:
- A search space is data (``tune_spaces/*.yaml``, ``SweepSpace``): per parameter a distribution (``loguniform``,
  ``uniform``, ``int``, ``choice``) over a dotted ``TrainJobConfig`` key (``train.lr``, ``model.n_embd``), the
  metric and mode, the trial budget, concurrency, resources per trial, ASHA's settings and the base training
  config. Unknown keys, unknown distributions, empty bounds and parameters that are not training keys fail before
  any trial starts, naming the field.
- ``run_sweep(space)`` packs the corpus once, then runs a ``Tuner`` over a function trainable (Train v2's pattern):
  with ``workers_per_trial: 1`` the trial runs raystack's training loop itself; with more, the trial is the driver of
  a ``TorchTrainer`` over that many workers (DDP, the same loop as ``raystack.train``) whose reports reach Tune
  through ``TuneReportCallback``. Either way a trial reports at every evaluation with a checkpoint;
  ``OptunaSearch`` (TPE, seeded) proposes, ``ASHAScheduler`` stops trials early on ``val_loss``.
- Where things live: ``<storage_path>/<name>`` (a path, or a URI such as ``s3://`` that every node reaches) holds
  Tune's experiment, the packed corpus, data-parallel trials' Train runs and the best model. The driver's sweep
  directory holds ``space.json``, the Optuna study and ``dashboard.html``: the same directory for a local
  storage_path, ``<local_dir>/<name>`` (with a copy of every trial's results) for a URI.
- The Optuna study lives in an RDB in the driver's sweep directory (``optuna.db``, SQLite) unless ``optuna_storage``
  names any SQLAlchemy URL. Re-running the same sweep name restores it (``Tuner.can_restore`` / ``Tuner.restore``):
  finished trials are not run again and the search state is kept.
- The best trial's final weights are exported as a model artifact (``<storage_path>/<name>/best_model``), and the
  dashboard (``raystack.sweep_report``) is written to the driver's sweep directory as trials report and at the end
  (and copied beside the sweep when that is a URI).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from raystack import storage
from raystack.config import ConfigError, deep_merge, from_dict, load_config, set_dotted, to_dict

logger = logging.getLogger(__name__)

DISTRIBUTIONS = {"loguniform": ("low", "high"), "uniform": ("low", "high"), "int": ("low", "high"),
                 "choice": ("values",)}


@dataclass
class ParameterSpace:
    distribution: str = ""
    low: Optional[float] = None
    high: Optional[float] = None
    values: Optional[list] = None
    log: bool = False
    """For ``int``: sample on a log scale."""


@dataclass
class SchedulerSettings:
    grace_period: int = 10
    """Steps every trial runs before ASHA may stop it."""
    reduction_factor: int = 2


@dataclass
class SweepSpace:
    name: str = "sweep"
    metric: str = "val_loss"
    mode: str = "min"
    num_samples: int = 8
    """Trial budget."""
    max_concurrent_trials: int = 2
    seed: int = 0
    """Seeds TPE; trials also keep the base config's train.seed."""
    n_startup_trials: int = 3
    """Random trials before TPE models the space."""
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1
    """1: the trial trains in its own process. More: a data-parallel ``TorchTrainer`` per trial, its workers
    sharing ``cpus_per_trial`` and ``gpus_per_trial`` (whole GPUs per worker)."""
    early_stopping: bool = True
    """ASHA on the metric; false runs every trial to the end (a baseline)."""
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    storage_path: str = "~/raystack_runs"
    """The sweep goes to ``<storage_path>/<name>``: a local path, or a URI (``s3://``...) for a multi-node cluster."""
    local_dir: str = "~/raystack_runs/sweeps"
    """With a URI storage_path: where the driver keeps ``<name>/``: the SQLite study, the dashboard and a copy of the
    trials' results (``raystack sweep-report`` reads it)."""
    optuna_storage: Optional[str] = None
    """SQLAlchemy URL of the Optuna study; default ``sqlite:///<driver sweep dir>/optuna.db``."""
    search: str = "tpe"
    """``tpe`` (Optuna) or ``random`` (Optuna's RandomSampler: the baseline of benchmarks/sweep_efficiency.py)."""
    base: dict = field(default_factory=dict)
    """The training config every trial starts from (a TrainJobConfig as nested keys)."""
    space: dict = field(default_factory=dict)
    """Dotted TrainJobConfig key -> ParameterSpace."""

    def __post_init__(self):
        storage.check_name("sweep", self.name)
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, got {self.mode!r}")
        if self.metric not in ("val_loss", "loss"):
            raise ValueError(f"metric must be val_loss or loss, got {self.metric!r}")
        if self.search not in ("tpe", "random"):
            raise ValueError(f"search must be tpe or random, got {self.search!r}")
        for name in ("num_samples", "max_concurrent_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers_per_trial < 1:
            raise ValueError(f"workers_per_trial must be >= 1, got {self.workers_per_trial}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ValueError(f"cpus_per_trial must be > 0 and gpus_per_trial >= 0, got {self.cpus_per_trial} and "
                             f"{self.gpus_per_trial}")
        if self.workers_per_trial > 1 and self.gpus_per_trial % self.workers_per_trial:
            raise ValueError(f"gpus_per_trial ({self.gpus_per_trial:g}) must be a multiple of workers_per_trial "
                             f"({self.workers_per_trial}): each data-parallel worker takes whole GPUs")
        if not self.space:
            raise ValueError("space: name at least one parameter to search")
        self.parameters = {key: self._parameter(key, value) for key, value in self.space.items()}
        self.base_config()  # base + a sample of every parameter must be a valid training config

    @staticmethod
    def _parameter(key: str, value: Any) -> ParameterSpace:
        where = f"space.{key}"
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping with a 'distribution', got {value!r}")
        p = from_dict(ParameterSpace, value, prefix=where)
        if p.distribution not in DISTRIBUTIONS:
            raise ValueError(f"{where}.distribution: unknown distribution {p.distribution!r}; "
                             f"use one of {sorted(DISTRIBUTIONS)}")
        if p.distribution == "choice":
            if not p.values:
                raise ValueError(f"{where}.values: a choice needs a non-empty list of values")
        else:
            if p.low is None or p.high is None:
                raise ValueError(f"{where}: {p.distribution} needs low and high")
            if not p.low < p.high:
                raise ValueError(f"{where}: empty bounds, low ({p.low}) must be below high ({p.high})")
            if p.distribution == "loguniform" and p.low <= 0:
                raise ValueError(f"{where}.low: loguniform needs low > 0, got {p.low}")
            if p.distribution == "int" and (p.low != int(p.low) or p.high != int(p.high)):
                raise ValueError(f"{where}: int bounds must be integers, got {p.low}, {p.high}")
        if key.startswith("data.") or key in ("name", "storage_path", "export_path"):
            raise ValueError(f"{where}: only model.*, train.* and scaling.* keys can be searched "
                             "(every trial shares one packed corpus)")
        return p

    def base_config(self, sample: Optional[dict] = None):
        from raystack.train import TrainJobConfig

        sample = sample or {k: (p.values[0] if p.distribution == "choice" else
                                int(p.low) if p.distribution == "int" else p.low)
                            for k, p in self.parameters.items()}
        values: dict = {}
        for key, value in sample.items():  # the values as sampled: no round trip through text
            set_dotted(values, key, value)
        values = deep_merge(self.base, values)
        values = deep_merge(values, {"name": "trial", "storage_path": self.storage_path,
                                     "scaling": {"num_workers": self.workers_per_trial,
                                                 "cpus_per_worker": self.cpus_per_trial / self.workers_per_trial}})
        try:
            config = from_dict(TrainJobConfig, values)
        except ConfigError as e:
            raise ValueError(f"base + space do not make a valid training config: {e}") from None
        # A trial reports exactly at its evaluations, each with the metric and a checkpoint: Tune (and ASHA) need the
        # metric in every report, and a restored trial resumes from its last report.
        if config.train.eval_every < 1:
            raise ValueError("base.train.eval_every must be >= 1: trials report (and ASHA decides) at evaluations")
        explicit = values.get("train") or {}
        for key in ("log_every", "checkpoint_every"):  # follow eval_every; a different explicit value is refused
            if explicit.get(key) is not None and explicit[key] != config.train.eval_every:
                raise ValueError(
                    f"base.train.{key} is {explicit[key]}, but a trial reports and checkpoints at each evaluation "
                    f"(Tune and ASHA need the metric in every report), so it follows base.train.eval_every "
                    f"({config.train.eval_every}); remove base.train.{key} or set it to {config.train.eval_every}")
        config.train.log_every = config.train.checkpoint_every = config.train.eval_every
        return config

    def optuna_space(self) -> dict:
        import optuna.distributions as d

        out = {}
        for key, p in self.parameters.items():
            if p.distribution == "choice":
                out[key] = d.CategoricalDistribution(p.values)
            elif p.distribution == "int":
                out[key] = d.IntDistribution(int(p.low), int(p.high), log=p.log)
            else:
                out[key] = d.FloatDistribution(p.low, p.high, log=p.distribution == "loguniform")
        return out

    @property
    def steps(self) -> int:
        return self.base_config().train.steps


def load_space(path: str, overrides=()) -> SweepSpace:
    return load_config(SweepSpace, path, overrides)


# ----------------------------------------------------------------------------------------------------------------
# The trial


def run_trial(trial_config: dict, space_dict: dict, data_uri: str, runs_dir: str) -> None:
    """Ray Tune function trainable: one training run with the trial's parameters, reporting every evaluation with a
    checkpoint. One worker trains here; several train in a ``TorchTrainer`` this trial drives (its run lives in
    ``runs_dir/<trial id>``, so a restored trial resumes it from its last checkpoint)."""
    import ray.tune

    space = from_dict(SweepSpace, space_dict)
    config = space.base_config({k: trial_config[k] for k in space.parameters})
    trial_id = ray.tune.get_context().get_trial_id()
    config.name = f"{space.name}-{trial_id}"  # tags the trial's training gauges
    loop_config = {"config": to_dict(config), "data_uri": data_uri}
    if space.workers_per_trial > 1:
        _fit_data_parallel(space, config, loop_config, storage_path=runs_dir, name=trial_id)
        return
    import torch

    from raystack.train import TrainMetrics, run_training

    device = torch.device("cuda" if torch.cuda.is_available() and space.gpus_per_trial > 0 else "cpu")
    run_training(loop_config, 0, 1, device, report=ray.tune.report, checkpoint=ray.tune.get_checkpoint(),
                 checkpoint_cls=ray.tune.Checkpoint, gauges=TrainMetrics(config.name))


def _fit_data_parallel(space: SweepSpace, config, loop_config: dict, storage_path: str, name: str) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from raystack.train import StopWithoutCheckpoint, train_loop

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
    trainer.fit()


def _require_state_api(timeout_s: float = 30.0) -> None:
    """Data-parallel trials need Ray's State API: when ASHA stops a trial, its Ray Train controller dies with it and
    Ray Train's placement-group cleaner asks the State API (served by the dashboard) before it frees the workers'
    resources. Without it every stopped trial would hold its workers' CPUs/GPUs until the sweep ends."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            list_actors(limit=1, timeout=5, raise_on_missing_output=False)
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
    import ray.tune

    class DashboardCallback(ray.tune.Callback):
        """Rewrites the sweep dashboard as results arrive (at most every 5 s) and when trials end. With the sweep
        on a URI it first copies each trial's results from Tune's staging directory on this driver into ``home``."""

        def __init__(self):
            self.last = 0.0

        def _write(self, force: bool, trials):
            if force or time.monotonic() - self.last > 5:
                self.last = time.monotonic()
                try:
                    from raystack.sweep_report import write_report

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
    import shutil

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
    from raystack.data import prepare_blocks
    from raystack.sweep_report import write_report

    root, sweep_dir = sweep_locations(space)
    remote = root != sweep_dir
    os.makedirs(sweep_dir, exist_ok=True)
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
    import optuna
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

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
    import ray.tune
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from raystack.checkpoint import export_checkpoint

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


__all__ = ["SweepSpace", "load_space", "run_sweep", "run_trial", "SweepOutput", "sweep_locations"]
