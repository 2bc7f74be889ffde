"""`aeselect` command line: config checks, phases, the demo, and the stages by hand.

Heavy modules (torch, dvclive) are imported inside the commands that need them, so that
`aeselect phase status` and config errors answer quickly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from aeselect.config import PARAMS_FILE, ConfigError, load_config


def _stage(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from aeselect.stages import main as run_stage

        return run_stage([name, "--params", args.params])

    return run


def _check(args: argparse.Namespace) -> int:
    cfg = load_config(args.params)
    h, w, c = cfg.latent_shape
    print(f"{args.params}: valid; latent {h}x{w}x{c}, channels {cfg.model.channel_schedule()}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from aeselect.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aeselect", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("prepare", "stage: build the data manifest and the prepared array cache"),
        ("train", "stage: train the autoencoder, log with dvclive, write checkpoints"),
        ("evaluate", "stage: evaluate the best checkpoint on the val split"),
        ("probe", "stage: how hard the exported latent is to diffuse (probe.loss)"),
        ("check", "validate params.yaml and print the derived latent shape"),
    ]:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
        sub.set_defaults(func=_check if name == "check" else _stage(name))

    demo = commands.add_parser("demo", help="what `make run` does: all of Phase 1 on demo data")
    from aeselect.demo import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    from aeselect.phase_cli import add_phase_commands

    add_phase_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"aeselect: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
