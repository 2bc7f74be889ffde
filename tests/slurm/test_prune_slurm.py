"""A budget-aware phase drained by a real SLURM job: the job's drainer pauses every run at the
rung, prunes the clear loser there and finishes the others."""

from __future__ import annotations

import re

import pytest
from conftest import git

from .test_drain_slurm import job_env, job_log, phase_project, results, submit_phase

STEPS = "train.max_steps: 24, train.eval_every: 6, train.log_every: 6"


@pytest.mark.slurm
@pytest.mark.slow
def test_a_drained_job_prunes_the_clear_loser_at_its_rung(slurm_cluster, tmp_path):
    project = phase_project(
        tmp_path,
        f"""\
        good: {{train.lr: 0.002, {STEPS}}}
        hot: {{train.lr: 0.05, {STEPS}}}
        """,
    )
    phase = project / "phases" / "phase1_1.yaml"
    phase.write_text(phase.read_text().replace("decide:", "budget: {rungs: [0.25]}\ndecide:"))
    git(project, "commit", "-qam", "budget")
    env = job_env(slurm_cluster)
    job = submit_phase(project, env)
    result = slurm_cluster.wait(job, timeout=300)
    out = job_log(project, job)
    assert result.ok, f"{result}\n{out}"
    assert re.search(r"rung: hot at step 6: .*: pruned", out), out
    assert "p1-1-hot: pruned at step 6" in out and "p1-1-good: success" in out
    rows = results(project)
    assert rows["p1-1-good"]["state"] == "Success" and rows["p1-1-hot"]["state"] == "Pruned"
