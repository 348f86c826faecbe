"""A sweep's spec: the search space as data (``tune_spaces/*.yaml``, ``SweepSpace``), loaded and checked before any
trial starts; Ray-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import optuna.distributions as optuna_distributions

from raystack import storage
from raystack.config import ConfigError, deep_merge, from_dict, load_config, set_dotted
from raystack.train.config import TrainJobConfig


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
    """Seeds TPE; trials also keep the base config's seed."""
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
            raise ValueError(f"{where}: data.* and storage keys cannot be searched (every trial shares one packed "
                             "corpus and the sweep's directory)")
        return p

    def base_config(self, sample: Optional[dict] = None):
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
        every = config.eval.every
        if every < 1:
            raise ValueError("base.eval.every must be >= 1: trials report (and ASHA decides) at evaluations")
        for section in ("logging", "checkpoint"):  # follow eval.every; a different explicit value is refused
            explicit = (values.get(section) or {}).get("every")
            if explicit is not None and explicit != every:
                raise ValueError(
                    f"base.{section}.every is {explicit}, but a trial reports and checkpoints at each evaluation "
                    f"(Tune and ASHA need the metric in every report), so it follows base.eval.every ({every}); "
                    f"remove base.{section}.every or set it to {every}")
        config.logging.every = config.checkpoint.every = every
        return config

    def optuna_space(self) -> dict:
        out = {}
        for key, p in self.parameters.items():
            if p.distribution == "choice":
                out[key] = optuna_distributions.CategoricalDistribution(p.values)
            elif p.distribution == "int":
                out[key] = optuna_distributions.IntDistribution(int(p.low), int(p.high), log=p.log)
            else:
                out[key] = optuna_distributions.FloatDistribution(p.low, p.high, log=p.distribution == "loguniform")
        return out

    @property
    def steps(self) -> int:
        return self.base_config().schedule.steps


def load_space(path: str, overrides=()) -> SweepSpace:
    return load_config(SweepSpace, path, overrides)
