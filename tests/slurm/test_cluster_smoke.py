"""Smoke tests of the local SLURM test cluster (fixture in conftest.py).

They check the SLURM features the experiment-queue jobs rely on: fake GPUs
(--gres=gpu:N -> CUDA_VISIBLE_DEVICES), the pre-timeout warning signal reaching
a bash trap, requeue with SLURM_RESTART_COUNT, and exit codes read back.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slurm

# Each job signals it runs, then waits (max 15 s) until the other one runs too:
# both succeed only if the two 1-GPU jobs ran at the same time.
GPU_JOB = """#!/bin/bash
echo "$CUDA_VISIBLE_DEVICES" > "$OUTDIR/cvd.$SLURM_JOB_ID"
touch "$OUTDIR/running.$SLURM_JOB_ID"
for _ in $(seq 150); do
    [ "$(ls "$OUTDIR" | grep -c '^running\\.')" -ge 2 ] && exit 0
    sleep 0.1
done
echo "the other GPU job never ran concurrently" >&2
exit 7
"""


def test_gpu_jobs_get_distinct_cuda_visible_devices(slurm_cluster, tmp_path):
    ids = [
        slurm_cluster.submit(
            GPU_JOB,
            "--gres=gpu:1",
            f"--output={tmp_path}/%j.out",
            env={"OUTDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": "unset-by-test"},
        )
        for _ in range(2)
    ]
    results = [slurm_cluster.wait(i, timeout=40) for i in ids]
    for r in results:
        assert r.ok, f"{r}\n{(tmp_path / f'{r.job_id}.out').read_text()}"
    cvd = [(tmp_path / f"cvd.{i}").read_text().strip() for i in ids]
    assert set(cvd) == {"0", "1"}, cvd


# `cmd & wait $!`: bash runs a trap only between commands, and `wait` returns
# at once on a signal.  The trap kills AND reaps the child before exiting: a
# child still alive when the batch shell exits makes slurmstepd's process-group
# kill loop delay the end of the job by ~3 s.
TRAP_JOB = """#!/bin/bash
on_usr1() {
    echo "USR1 restart=${SLURM_RESTART_COUNT:-0}" > "$OUTDIR/usr1.marker"
    kill $child; wait $child; exit 0
}
trap on_usr1 USR1
touch "$OUTDIR/started"
sleep 120 & child=$!
wait $child
exit 9
"""


def test_usr1_reaches_batch_script_trap(slurm_cluster, tmp_path):
    # --signal=B:USR1@60 as in production; the timed signal cannot fire in a
    # short test, so send the same signal to the batch shell by hand.
    job = slurm_cluster.submit(
        TRAP_JOB,
        "--signal=B:USR1@60",
        f"--output={tmp_path}/%j.out",
        env={"OUTDIR": str(tmp_path)},
    )
    slurm_cluster.wait_for_file(tmp_path / "started", timeout=30)
    slurm_cluster.signal(job, "USR1", batch=True)
    marker = slurm_cluster.wait_for_file(tmp_path / "usr1.marker", timeout=10)
    assert marker.read_text().strip() == "USR1 restart=0"
    result = slurm_cluster.wait(job, timeout=30)
    assert result.ok, result


REQUEUE_JOB = """#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
echo "run restart_count=${SLURM_RESTART_COUNT:-0}"
touch "$OUTDIR/run.${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then
    sleep 120 & wait $!
fi
echo "finished"
"""


def test_requeue_runs_again_with_restart_count(slurm_cluster, tmp_path):
    job = slurm_cluster.submit(
        REQUEUE_JOB, f"--output={tmp_path}/%j.out", env={"OUTDIR": str(tmp_path)}
    )
    slurm_cluster.wait_for_file(tmp_path / "run.0", timeout=30)
    t0 = time.monotonic()
    slurm_cluster.requeue(job)
    # A requeued job is held back ~cred_expire+1 s (AuthInfo cred_expire=10).
    result = slurm_cluster.wait(job, timeout=45)
    assert result.ok, result
    assert result.info["Restarts"] == "1"
    assert (tmp_path / "run.1").exists()
    out = (tmp_path / f"{job}.out").read_text()
    assert "run restart_count=0" in out  # --open-mode=append kept the first run's output
    assert "run restart_count=1" in out
    assert out.rstrip().endswith("finished")
    assert time.monotonic() - t0 < 40


@pytest.mark.parametrize(
    ("body", "state", "exit_code", "signal"),
    [
        ("exit 3", "FAILED", 3, 0),
        ("kill -KILL $$", "FAILED", 0, 9),
        ("true", "COMPLETED", 0, 0),
    ],
    ids=["exit-3", "sigkill", "ok"],
)
def test_exit_code_is_read_back(slurm_cluster, tmp_path, body, state, exit_code, signal):
    job = slurm_cluster.submit(f"#!/bin/bash\n{body}\n", f"--output={tmp_path}/%j.out")
    result = slurm_cluster.wait(job, timeout=30)
    assert (result.state, result.exit_code, result.signal) == (state, exit_code, signal), result
    # The same from the jobcomp/filetxt record (what wait() falls back to once
    # the controller has forgotten the job).
    rec = slurm_cluster.jobcomp(job)
    assert rec is not None, slurm_cluster.jobcomp_path.read_text()
    assert rec["JobState"] == state
    assert rec["ExitCode"] == f"{exit_code}:{signal}"
