"""`make run`: the pipeline on the embedded synthetic data via `dvc exp run`, then its metrics."""

from __future__ import annotations

import argparse
import time

from aeselect.dvc import run_dvc

SHOWN_COLUMNS = [
    "mse",
    "psnr",
    "ssim",
    "edge_f1",
    "aux_miou",
    "latent.shape",
    "cost.params",
    "images_per_s",
    "gates.pass_all",
]


def run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    run_dvc(["exp", "run"], capture=False)
    print(f"\n`dvc exp run` took {time.perf_counter() - start:.0f} s\n")
    table = run_dvc(
        [
            "exp",
            "show",
            "--no-pager",
            "--md",
            "--only-changed",
            "-n",
            "1",
            "--drop",
            "Created|.*\\.(tsv|png)$|dvc\\.lock",
        ]
    )
    print(table.stdout)
    return 0
