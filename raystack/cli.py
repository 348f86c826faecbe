"""The raystack command line: train, tune, deploy and batch-infer on a local Ray, or submit them to a cluster.

``raystack train|tune|batch|deploy ...`` run a job here (a local Ray starts by itself); ``raystack submit KIND
[--address URL] -- ARGS`` sends the same job to a cluster's Jobs API, and ``raystack status|logs|stop JOB`` follow it.

``jobs/*.py`` are thin wrappers over these subcommands so that ``python jobs/train.py`` and ``ray job submit ... --
python jobs/train.py`` run the same code. Bad configs or inputs end with one ``raystack: error: ...`` line and exit
status 2, before any Ray work starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path

from raystack.checkpoint import CheckpointError
from raystack.cluster import DeployFailed
from raystack.commit import CommitError
from raystack.config import ConfigError
from raystack.data import DataError
from raystack.rollout import DEFAULT_HISTORY, RolloutError
from raystack.tenants import LIMIT_FIELDS, PRIORITIES, TenantsError

DEFAULT_JOBS_API = "http://127.0.0.1:8265"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (see README: config reference)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config key, e.g. --set schedule.steps=100 (repeatable)")


def cmd_train(args) -> int:
    from raystack.cluster import init_ray
    from raystack.train import fit, load_train_config

    config = load_train_config(args.config, args.overrides)  # validated before any Ray work
    if args.print_config:
        from raystack.config import to_dict

        print(json.dumps(to_dict(config), indent=2))
        return 0
    init_ray()
    output = fit(config)
    final = {k: output.metrics[k] for k in ("step", "loss", "bits_per_byte", "val_loss", "val_bits_per_byte")
             if k in output.metrics}
    print(f"[raystack] final metrics: {json.dumps(final)}")
    print(f"[raystack] checkpoints and metrics.jsonl: {output.run_dir}")
    print(f"[raystack] model artifact: {output.artifact}")
    return 0


def load_serve_args(path: str | None, model: str | None, overrides: list[str]) -> tuple[dict, dict]:
    """``(args, http_options)`` from a Serve config file's first application, ``--model`` and ``--set``."""
    from raystack.config import ConfigError, from_dict, merge_sources, read_yaml
    from raystack.serving import ServeConfig

    data = read_yaml(path) if path else {}
    apps = data.get("applications") or [{}]
    if not isinstance(apps, list) or not isinstance(apps[0], dict):
        raise ConfigError(f"{path}: 'applications' must be a list of applications")
    args = merge_sources(apps[0].get("args") or {}, overrides, {"model": model})  # the Serve file's args: a spec
    from_dict(ServeConfig, args)  # validate before any Ray work
    http = {"host": "127.0.0.1", "port": 8000, **(data.get("http_options") or {})}
    return args, http


def cmd_deploy(args) -> int:
    from raystack.cluster import (apply_local_ray_env, check_http_port, check_model_artifact, check_serve_env,
                                  deployment_message, error_line, init_ray, start_serve)

    check_serve_env()  # before raystack.serving imports ray.serve, which reads Serve's variables
    from raystack.serving import build_app

    serve_args, http = load_serve_args(args.config, args.model, args.overrides)
    if args.port is not None:
        http["port"] = args.port
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    check_model_artifact(serve_args["model"])  # else each replica fails on it, constructor_retries times over
    if not on_cluster:  # a Ray of its own, so no Serve holds the ports yet: refuse a taken one before Ray starts
        apply_local_ray_env()
        check_http_port(http)
    import ray

    connected = ray.is_initialized()  # by a caller (in process): its connection is left as it is
    init_ray()
    from ray import serve

    host, port = start_serve(http)
    try:
        serve.run(build_app(serve_args), name=args.name, route_prefix=args.route_prefix)
    except RuntimeError as e:  # Serve's "Deploying application ... failed": its replicas did not start
        message = (f"deploying {args.name!r} failed: {error_line(deployment_message(args.name) or e)} "
                   "(the Serve controller's log has the replicas' tracebacks)")
        if not connected:  # ends Ray's relay of the controller's log lines here, so the error is the last line
            ray.shutdown()
        raise DeployFailed(message) from None
    prefix = args.route_prefix.rstrip("/")
    print(f"[raystack] serving {serve_args['model']} at http://{host}:{port}{prefix}/v1 "
          f"(model id {serve_args.get('model_name', 'raystack')!r})", flush=True)
    wait = args.wait if args.wait is not None else not on_cluster
    if wait:
        print("[raystack] Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return 0


def cmd_batch(args) -> int:
    from raystack.batch import BatchConfig, run_batch
    from raystack.cluster import check_model_artifact, init_ray
    from raystack.config import load_config

    flags = {"model": args.model, "input": args.input, "output": args.output, "mode": args.mode,
             "prompt_column": args.prompt_column, "id_column": args.id_column, "overwrite": args.overwrite or None}
    config = load_config(BatchConfig, args.config, args.overrides, flags)
    check_model_artifact(config.model)  # before Ray starts (run_batch checks again, for its other callers)
    init_ray()
    summary = run_batch(config)
    print(f"[raystack] {summary['rows']} rows ({summary['errors']} with an error) -> {summary['output']}")
    return 0


def cmd_tune(args) -> int:
    from raystack.cluster import init_ray
    from raystack.sweep import load_space, run_sweep

    space = load_space(args.space, args.overrides)  # validated before any trial starts
    init_ray()
    output = run_sweep(space)
    bits = f" ({output.best_metric / math.log(2):.4f} bits/byte)" if space.metric.endswith("loss") else ""
    print(f"[raystack] {output.trials} trials; best {space.metric} {output.best_metric:.4f}{bits} with "
          f"{json.dumps(output.best_config)}")
    print(f"[raystack] best model artifact: {output.artifact}")
    print(f"[raystack] dashboard: {output.dashboard}   (TensorBoard: tensorboard --logdir {output.storage})")
    if output.storage != output.sweep_dir:
        print(f"[raystack] trials and Train runs: {output.storage}")
    return 0


def cmd_tokenizer(args) -> int:
    from raystack.checkpoint import artifact_tokenizer_files

    files = artifact_tokenizer_files(args.model)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a directory (it is created when missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (out / name).write_bytes(data)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e}); pass a directory you can "
                          "write") from None
    print(f"[raystack] wrote {', '.join(sorted(files))} to {out}: load it with "
          f"transformers.AutoTokenizer.from_pretrained({str(out)!r})")
    return 0


def cmd_train_report(args) -> int:
    from raystack.train_report import read_metrics, write_report

    run_dir = os.path.abspath(os.path.expanduser(args.run_dir))
    if not read_metrics(run_dir):
        raise ConfigError(f"{run_dir} holds no metrics.jsonl reports: pass a training run's directory "
                          "(<storage_path>/<name>, local storage)")
    print(f"[raystack] training report: {write_report(run_dir)}")
    return 0


def cmd_sweep_report(args) -> int:
    from raystack.config import ConfigError, from_dict
    from raystack.sweep import SweepSpace
    from raystack.sweep_report import write_report

    if args.space:
        from raystack.sweep import load_space

        space = load_space(args.space)
    else:
        path = os.path.join(args.sweep_dir, "space.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{args.sweep_dir!r} has no space.json; is it a raystack sweep directory? "
                              "(or pass --space FILE)")
        with open(path) as f:
            space = from_dict(SweepSpace, json.load(f))
    print(write_report(args.sweep_dir, space))
    return 0


JOB_SCRIPTS = {"train": "jobs/train.py", "tune": "jobs/tune.py", "batch": "jobs/batch_infer.py",
               "deploy": "jobs/deploy.py", "rollout": "jobs/rollout.py"}
# Left out of the job's working_dir upload (Ray also honours .gitignore): history, environments, outputs, caches.
RUNTIME_EXCLUDES = [".git", ".venv", "runs", "**/__pycache__", "*.pyc", ".pytest_cache", ".hypothesis", "*.egg-info",
                    ".gl", "benchmarks"]


def project_root() -> str:
    """The directory holding jobs/: the working directory if it has one, else the checkout raystack came from."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (candidate / "jobs" / "train.py").is_file():
            return str(candidate)
    raise ConfigError("cannot find the project's jobs/ directory; run raystack submit from the raystack checkout")


API_KEYS_ENV = "RAYSTACK_API_KEYS"


def submission(kind: str, job_args: list[str], root: str, environ=None) -> dict:
    """The ``JobSubmissionClient.submit_job`` arguments for ``raystack submit KIND -- ARGS``.

    For ``deploy`` and ``rollout``, ``RAYSTACK_API_KEYS`` from the submitter's environment travels in the job's
    ``runtime_env`` ``env_vars``; Serve gives a job's runtime_env to the replicas it deploys, so the keys reach them without ever
    appearing on a command line or in a log (the Jobs API, behind the cluster's token, still holds them)."""
    environ = os.environ if environ is None else environ
    if job_args and job_args[0] == "--":
        job_args = job_args[1:]
    runtime_env = {"working_dir": root, "excludes": list(RUNTIME_EXCLUDES)}
    if kind in ("deploy", "rollout") and environ.get(API_KEYS_ENV, "").strip():
        runtime_env["env_vars"] = {API_KEYS_ENV: environ[API_KEYS_ENV]}
    return {"entrypoint": shlex.join(["python", JOB_SCRIPTS[kind], *job_args]), "runtime_env": runtime_env}


def _job_client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_JOBS_API
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, bad address, authentication refused
        raise ConfigError(f"cannot reach the Ray Jobs API at {address}: {e}. Is the cluster up and tunnelled "
                          "(ray dashboard cluster.yaml), and RAY_AUTH_MODE=token set with the cluster's token?") from None


class JobsAPIError(RuntimeError):
    """The Ray Jobs API refused a call (unknown job id, refused token, no agent): the user's to fix, no traceback."""


@contextlib.contextmanager
def _jobs_api(address: str | None):
    """A Jobs API client; what the API answers with an error becomes a ``JobsAPIError`` naming the address. Only
    here: elsewhere a RuntimeError is a bug and keeps its traceback."""
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # an older Ray without token authentication
        AuthenticationError = RuntimeError  # noqa: N806
    client = _job_client(address)
    try:
        yield client
    except (AuthenticationError, RuntimeError) as e:
        if isinstance(e, JobsAPIError):
            raise
        raise JobsAPIError(f"the Ray Jobs API at {address or os.environ.get('RAY_ADDRESS') or DEFAULT_JOBS_API} "
                           f"refused: {e}") from None


USER_ERRORS = (ConfigError, DataError, CheckpointError, CommitError, JobsAPIError, TenantsError, RolloutError,
               DeployFailed)


def _connect(address: str | None) -> None:
    """Join the running cluster (``--address``, ``$RAY_ADDRESS``, or the local one); never start a new Ray: the app
    being changed lives on the running one."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        raise RolloutError(f"cannot reach a running Ray at {target!r} ({_one_line(e)}); start the app first "
                           "(raystack deploy) or pass --address") from None


def _one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [repr(error)])[0][:300]


def cmd_rollout(args) -> int:
    """``raystack rollout``: gate, switch and watch a new artifact (raystack.rollout), or print the history."""
    from raystack import rollout
    from raystack.cluster import check_serve_env

    if args.history:
        print(rollout.format_history(rollout.read_history(args.history_file, args.app)))
        return 0
    spec = rollout.RolloutSpec(model=args.model or "", app=args.app, heldout=args.heldout,
                               max_loss_increase=args.max_loss_increase, watch_s=args.watch_s,
                               max_error_rate=args.max_error_rate, max_ttft_p99_s=args.max_ttft_p99_s,
                               history=args.history_file)
    check_serve_env()
    rollout.heldout_texts(spec.heldout)  # a bad --heldout fails before anything is deployed
    _connect(args.address)
    entry = rollout.rollout(spec, say=lambda line: print(f"[raystack] {line}", flush=True))
    print(f"[raystack] rollout {entry['outcome']}: {entry.get('reason', '')}", flush=True)
    return 0 if entry["outcome"] == "rolled_out" else 1


def cmd_rollback(args) -> int:
    from raystack import rollout
    from raystack.cluster import check_serve_env

    check_serve_env()
    _connect(args.address)
    entry = rollout.rollback(args.app, args.history_file, say=lambda line: print(f"[raystack] {line}", flush=True))
    print(f"[raystack] {args.app} serves {entry['to']} again", flush=True)
    return 0

DEFAULT_TENANTS_FILE = "~/.raystack/tenants.yaml"


def cmd_keys(args) -> int:
    """``raystack keys add|list|revoke``: the tenants file a deployment's ``tenants_file`` points at."""
    from raystack import tenants as t

    path = os.path.expanduser(args.file)
    if args.action == "add":
        limits = {name: getattr(args, name) for name in LIMIT_FIELDS}
        key = t.add_key(path, args.tenant, priority=args.priority, **limits)
        print(f"new key for tenant {args.tenant!r} (shown once; {path} keeps only its hash):\n{key}")
    elif args.action == "revoke":
        tenant = t.revoke_key(path, args.key)
        print(f"revoked key {t.key_id(args.key) or args.key} of tenant {tenant!r} in {path}; replicas refuse it "
              "once they re-read the file (tenants_reload_s)")
    else:
        if not os.path.exists(path):
            raise TenantsError(f"no tenants file at {path}; `raystack keys add TENANT --file {args.file}` makes one")
        rows = [("tenant", "priority", "limits", "key id", "created")]
        for tenant in t.read_tenants(path):
            limits = ", ".join(f"{k}={v}" for k, v in vars(tenant.limits).items() if v) or "none"
            for record in tenant.keys or [t.KeyRecord("(no key)", "", "")]:
                rows.append((tenant.name, tenant.priority, limits, record.id, record.created))
        _print_table(rows)
    return 0


def _print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _window_seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        value = -1
    if not 0 < value <= 7 * 86400:
        raise ConfigError(f"--window must be a duration like 90s, 30m, 1h or 7d (at most 7d), got {text!r}")
    return value


def cmd_usage(args) -> int:
    """Per-tenant usage over a window, from the deployment's quota actor (``raystack.quota``)."""
    window = _window_seconds(args.window)
    import ray

    from raystack.quota import actor_name, quota_actor

    if not ray.is_initialized():
        ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "auto", logging_level=logging.WARNING)
    try:
        usage = ray.get(quota_actor(args.app, create=False).usage.remote(window))
    except ValueError:
        raise ConfigError(f"no usage for app {args.app!r}: its quota actor {actor_name(args.app)!r} is not running "
                          "(usage is kept for deployments with a tenants_file, from their first request)") from None
    rows = [("tenant", "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")]
    for tenant, u in sorted(usage.items()):
        rows.append((tenant, u["requests"], u["errors"], u["prompt_tokens"], u["completion_tokens"],
                     u["prompt_tokens"] + u["completion_tokens"]))
    print(f"usage of app {args.app!r} over the last {args.window}:")
    _print_table(rows)
    return 0


def cmd_submit(args) -> int:
    spec = submission(args.kind, args.job_args, project_root())
    with _jobs_api(args.address) as client:
        return _submit(client, spec, args.wait)


def _submit(client, spec: dict, wait: bool) -> int:
    deadline = time.monotonic() + 120
    while True:
        try:
            job_id = client.submit_job(**spec)
            break
        except RuntimeError as e:  # a cluster that just started: its job agent is not registered yet
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    print(f"[raystack] submitted {job_id}: {spec['entrypoint']}", flush=True)
    if API_KEYS_ENV in spec["runtime_env"].get("env_vars", {}):
        print(f"[raystack] {API_KEYS_ENV} from this shell goes to the replicas in the job's runtime_env", flush=True)
    if wait:
        return _follow(client, job_id)
    print(f"[raystack] follow with: raystack logs {job_id} --follow   (status: raystack status {job_id})")
    return 0


def _follow(client, job_id: str) -> int:
    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    print(f"[raystack] {job_id}: {status}")
    return 0 if str(status) in ("SUCCEEDED", "JobStatus.SUCCEEDED") else 1


def cmd_status(args) -> int:
    with _jobs_api(args.address) as client:
        info = client.get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status} {info.message or ''}".rstrip())
    return 0


def cmd_logs(args) -> int:
    with _jobs_api(args.address) as client:
        if args.follow:
            return _follow(client, args.job_id)
        print(client.get_job_logs(args.job_id), end="")
    return 0


def cmd_stop(args) -> int:
    with _jobs_api(args.address) as client:
        stopped = client.stop_job(args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'was not running'}")
    return 0


class _Parser(argparse.ArgumentParser):
    """A parser whose ``--help`` ends with every key of the job's spec (its default and doc), generated from the
    spec's dataclass when help is asked for, so a plain run does not import torch to build it."""

    def __init__(self, *args, spec: tuple[str, str, str] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.spec = spec

    def format_help(self) -> str:
        if self.spec is not None and self.epilog is None:
            import importlib

            from raystack.config import help_text

            module, name, where = self.spec
            self.epilog = help_text(getattr(importlib.import_module(module), name),
                                    f"{name} keys (--set KEY=VALUE, or in {where}):")
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raystack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train the GPT on Ray Train and export a model artifact",
                           spec=("raystack.train", "TrainJobConfig", "the --config YAML file"))
    _add_config_args(train)
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(func=cmd_train)

    deploy = sub.add_parser("deploy", help="serve a model artifact with the OpenAI-compatible API on Ray Serve",
                            spec=("raystack.serving", "ServeConfig", "the args of the --config Serve file"))
    deploy.add_argument("--model", help="model artifact path or URI (overrides the config's args.model)")
    deploy.add_argument("--config", metavar="FILE", default=None,
                        help="a Serve config file; its first application's args and http_options are used")
    deploy.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one ServeConfig field, e.g. --set max_replicas=4")
    deploy.add_argument("--name", default="llm", help="Serve application name")
    deploy.add_argument("--route-prefix", default="/", help="URL prefix of the app's routes")
    deploy.add_argument("--port", type=int, default=None, help="HTTP port (default: config or 8000)")
    deploy.add_argument("--wait", dest="wait", action="store_true", default=None,
                        help="keep serving until Ctrl-C (default when Ray was started locally)")
    deploy.add_argument("--no-wait", dest="wait", action="store_false", help="deploy and exit")
    deploy.set_defaults(func=cmd_deploy)

    batch = sub.add_parser("batch", help="generate or score a parquet table with Ray Data",
                           spec=("raystack.batch", "BatchConfig", "the --config YAML file"))
    batch.add_argument("--model", help="model artifact path or URI")
    batch.add_argument("--input", help="parquet file, directory or glob (local or URI)")
    batch.add_argument("--output", help="output directory (refused if it exists, unless --overwrite)")
    batch.add_argument("--mode", choices=["generate", "score"], help="default: generate")
    batch.add_argument("--prompt-column", help="input column with prompts (generate; default prompt)")
    batch.add_argument("--id-column", help="input column with row ids (default id; generated when absent)")
    batch.add_argument("--overwrite", action="store_true", help="replace an existing output whole")
    _add_config_args(batch)
    batch.set_defaults(func=cmd_batch)

    tune = sub.add_parser("tune", help="sweep hyperparameters with Ray Tune + Optuna + ASHA",
                          spec=("raystack.sweep", "SweepSpace", "the --config YAML file"))
    tune.add_argument("--config", "--space", dest="space", required=True, metavar="FILE",
                      help="the sweep's spec, a search space file, e.g. tune_spaces/gpt_tiny.yaml (--space: the "
                           "same, its old spelling)")
    tune.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                      help="override one space field, e.g. --set num_samples=12")
    tune.set_defaults(func=cmd_tune)

    tokenizer = sub.add_parser("tokenizer", help="write a model artifact's tokenizer as Hugging Face files "
                                                 "(tokenizer.json, tokenizer_config.json) into a directory")
    tokenizer.add_argument("model", help="model artifact path or URI")
    tokenizer.add_argument("--out", required=True, metavar="DIR", help="directory to write the files into")
    tokenizer.set_defaults(func=cmd_tokenizer)

    train_report = sub.add_parser("train-report", help="write a training run's report.html (every run also "
                                                       "writes it as it goes)")
    train_report.add_argument("run_dir", help="the run directory (<storage_path>/<name>)")
    train_report.set_defaults(func=cmd_train_report)

    report = sub.add_parser("sweep-report", help="write a sweep's dashboard.html")
    report.add_argument("sweep_dir", help="the sweep directory (<storage_path>/<name>)")
    report.add_argument("--space", metavar="FILE", help="the space file (default: the sweep's space.json)")
    report.set_defaults(func=cmd_sweep_report)
    _add_tenant_commands(sub)
    _add_rollout_commands(sub)
    _add_cluster_commands(sub)
    return parser


def _add_rollout_commands(sub) -> None:
    """``rollout`` and ``rollback``: change the model a running app serves."""
    from raystack.rollout import RolloutSpec

    defaults = RolloutSpec(model="-")
    rollout = sub.add_parser("rollout", help="replace a running app's model: gates, then the switch, then a watch "
                                             "that rolls back by itself")
    rollout.add_argument("--model", help="the new model artifact (path or URI)")
    rollout.add_argument("--app", default="llm", help="Serve application name (default llm)")
    rollout.add_argument("--heldout", metavar="FILE", help="held-out text for the quality gate (blank-line-separated "
                                                           "passages; default: standard-library modules)")
    rollout.add_argument("--max-loss-increase", type=float, default=defaults.max_loss_increase, metavar="NATS",
                         help=f"refuse a model worse than the serving one by more (default {defaults.max_loss_increase}"
                              " nats/token)")
    rollout.add_argument("--watch-s", type=float, default=defaults.watch_s, help="watch window after the switch")
    rollout.add_argument("--max-error-rate", type=float, default=defaults.max_error_rate,
                         help="5xx share in the watch that rolls back")
    rollout.add_argument("--max-ttft-p99-s", type=float, default=defaults.max_ttft_p99_s,
                         help="TTFT p99 in the watch that rolls back")
    rollout.add_argument("--history", action="store_true", help="print the app's rollouts and rollbacks and exit")
    rollback = sub.add_parser("rollback", help="go back to the model an app served before its last rollout")
    rollback.add_argument("--app", default="llm", help="Serve application name (default llm)")
    for parser in (rollout, rollback):
        parser.add_argument("--history-file", default=DEFAULT_HISTORY, help=f"default {DEFAULT_HISTORY}")
        parser.add_argument("--address", help="Ray address (default: $RAY_ADDRESS or the local cluster)")
    rollout.set_defaults(func=cmd_rollout)
    rollback.set_defaults(func=cmd_rollback)


def _add_tenant_commands(sub) -> None:
    """``keys`` and ``usage``: the tenants of a deployment."""
    keys = sub.add_parser("keys", help="add, list or revoke API keys of tenants (the serve spec's tenants_file)")
    actions = keys.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a key to a tenant (created if new); prints the key once")
    add.add_argument("tenant", help="tenant name (a label in metrics and usage)")
    add.add_argument("--priority", choices=list(PRIORITIES), help="priority class (new tenants: normal)")
    for name in LIMIT_FIELDS:
        add.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, metavar="N",
                         help="0 = no limit (default: unchanged; none for a new tenant)")
    listing = actions.add_parser("list", help="tenants, limits and key ids (never keys or hashes)")
    revoke = actions.add_parser("revoke", help="remove a key (by id or the whole key)")
    revoke.add_argument("key", help="key id (from `keys list`) or the key itself")
    for parser in (add, listing, revoke):
        parser.add_argument("--file", default=DEFAULT_TENANTS_FILE, help=f"tenants file (default {DEFAULT_TENANTS_FILE})")
    keys.set_defaults(func=cmd_keys)
    usage = sub.add_parser("usage", help="per-tenant requests and tokens of a deployment over a time window")
    usage.add_argument("--app", default="llm", help="Serve application name (default llm)")
    usage.add_argument("--window", default="1h", help="how far back: 90s, 30m, 1h, 7d (default 1h)")
    usage.add_argument("--address", help="Ray address (default: $RAY_ADDRESS or the local cluster)")
    usage.set_defaults(func=cmd_usage)


def _add_cluster_commands(sub) -> None:
    """``submit``, ``status``, ``logs``, ``stop``: jobs on a cluster, through its Jobs API."""
    submit = sub.add_parser("submit", help="submit a job to a Ray cluster through the Jobs API")
    submit.add_argument("kind", choices=sorted(JOB_SCRIPTS), help="which job")
    submit.add_argument("--address", help="Jobs API address (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    submit.add_argument("--wait", action="store_true", help="stream the job's logs until it ends")
    submit.add_argument("job_args", nargs="*", help="after --, the job's own arguments", metavar="-- ARGS")
    submit.set_defaults(func=cmd_submit)
    for name, func, help_text in (("status", cmd_status, "a submitted job's status"),
                                  ("logs", cmd_logs, "a submitted job's logs"),
                                  ("stop", cmd_stop, "stop a submitted job")):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("job_id")
        command.add_argument("--address", help="Jobs API address (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
        if name == "logs":
            command.add_argument("--follow", action="store_true", help="stream until the job ends")
        command.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    job_args: list[str] = []
    if argv and argv[0] == "submit" and "--" in argv:  # everything after `--` belongs to the job
        cut = argv.index("--")
        argv, job_args = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if job_args:
        args.job_args = [*args.job_args, *job_args]
    try:
        return args.func(args)
    except USER_ERRORS as e:  # the user's to fix: one line, no traceback; any other error keeps its traceback
        print(f"raystack: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
