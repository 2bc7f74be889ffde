"""`aeselect phase ...` subcommands (filled in by the phases work)."""

from __future__ import annotations

import argparse


def add_phase_commands(commands: argparse._SubParsersAction) -> None:
    commands.add_parser("phase", help="Phase 1 sweeps: queue, run, status, compare, promote, show")
