"""Each stage process reports its own wall time in the experiment's log (bench/slots.py reads
it); under torchrun only the launcher does, not every rank."""

from __future__ import annotations

import re

import yaml
from conftest import ROOT, TINY

from aeselect.config import apply_overrides, read_yaml
from aeselect.stages import main

STAGE_TIME = re.compile(r"^\[prepare\] stage process: \d+\.\d\d s$", re.M)


def test_a_stage_prints_its_wall_time_once_and_a_rank_does_not(tmp_path, monkeypatch, capsys):
    raw = apply_overrides(read_yaml(ROOT / "params.yaml"), TINY)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["prepare"]) == 0
    assert len(STAGE_TIME.findall(capsys.readouterr().err)) == 1
    monkeypatch.setenv("LOCAL_RANK", "1")  # as torchrun sets it for each rank
    assert main(["prepare"]) == 0
    assert "stage process" not in capsys.readouterr().err
