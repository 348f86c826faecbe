"""Hyperparameter sweeps: Ray Tune + Optuna (TPE) + ASHA over raystack training, resumable, with a dashboard.

Contract:
- A search space is data (``tune_spaces/*.yaml``, ``SweepSpace``): per parameter a distribution (``loguniform``,
  ``uniform``, ``int``, ``choice``) over a dotted ``TrainJobConfig`` key (``optimizer.lr``, ``model.n_embd``), the
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

from raystack.sweep.space import DISTRIBUTIONS, ParameterSpace, SchedulerSettings, SweepSpace, load_space

_RUN = ("run_sweep", "run_trial", "SweepOutput", "sweep_locations")


def __getattr__(name: str):
    if name in _RUN:  # the Ray Tune side, imported when first asked for
        from raystack.sweep import run

        return getattr(run, name)
    raise AttributeError(f"module 'raystack.sweep' has no attribute {name!r}")


__all__ = ["SweepSpace", "ParameterSpace", "SchedulerSettings", "DISTRIBUTIONS", "load_space", *_RUN]
