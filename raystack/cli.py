"""The ``raystack`` command line: ``raystack train [--config FILE] [--set key=value ...]``.

``jobs/*.py`` are thin wrappers over these subcommands so that ``python jobs/train.py`` and ``ray job submit ... --
python jobs/train.py`` run the same code. Bad configs or inputs end with one ``raystack: error: ...`` line and exit
status 2, before any Ray work starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from raystack.checkpoint import CheckpointError
from raystack.config import ConfigError
from raystack.data import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (see README: config reference)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config key, e.g. --set train.steps=100 (repeatable)")


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
    print(f"[raystack] final metrics: {json.dumps({k: output.metrics[k] for k in ('step', 'loss', 'val_loss') if k in output.metrics})}")
    print(f"[raystack] checkpoints and metrics.jsonl: {output.run_dir}")
    print(f"[raystack] model artifact: {output.artifact}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raystack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the GPT on Ray Train and export a model artifact")
    _add_config_args(train)
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"raystack: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
