"""The drainer's stop request reaches its own live training, never a stranger that took its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

from aeselect.cluster.drain import Drainer, is_live_descendant, signal_descendant
from aeselect.envvars import PIDFILE_ENV
from aeselect.sweep.claim_states import DRAIN_DIR
from aeselect.sweep.spec import load_phase

# The train stage's side of the protocol: StopRequest writes its pid to $AESELECT_PIDFILE.
TRAINING = """
import time
from aeselect.training.resume import StopRequest
stop = StopRequest()
print("training", flush=True)
while stop.requested is None:
    time.sleep(0.01)
print("stopped on", stop.requested, flush=True)
"""
# Stands in for `dvc exp run`: starts the training as its child, then lingers without reaping it
# (as dvc does while it runs the next stage), so the training's pid stays taken by a zombie.
DVC = """
import subprocess, sys
subprocess.Popen([sys.executable, "-c", sys.argv[1]])
sys.stdin.readline()
"""


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def _ended_by(process: subprocess.Popen) -> int:
    """The signal that ends `process`: a pending SIGUSR1 (10) is delivered before SIGTERM (15)."""
    process.terminate()
    return -process.wait(timeout=30)


def test_stop_request_reaches_only_a_live_training_under_the_experiment(tmp_path):
    pidfile = tmp_path / DRAIN_DIR / "p1-1-exp.pid"
    pidfile.parent.mkdir(parents=True)
    env = os.environ | {PIDFILE_ENV: str(pidfile)}
    dvc = subprocess.Popen(
        [sys.executable, "-c", DVC, TRAINING],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    stranger = subprocess.Popen(["sleep", "60"])  # a live process outside the experiment
    try:
        assert dvc.stdout.readline() == "training\n"
        training = int(pidfile.read_text())
        assert is_live_descendant(training, dvc.pid) and is_live_descendant(training, os.getpid())
        assert not is_live_descendant(stranger.pid, dvc.pid)
        drainer = Drainer(tmp_path, load_phase("1.1", ROOT / "phases"), jobs=1)
        drainer.running["p1-1-exp"] = dvc

        pidfile.write_text(str(stranger.pid))  # a stale file whose pid another process took
        drainer.on_signal(signal.SIGUSR1, None)
        pidfile.write_text(str(training))
        drainer.stop_signal = None  # a second signal, as after a requeue
        drainer.on_signal(signal.SIGUSR1, None)
        assert dvc.stdout.readline() == f"stopped on {signal.SIGUSR1}\n"

        deadline = time.monotonic() + 30
        while _state(training) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(training) == "Z"  # exited, pid still held: not a live training
        assert not signal_descendant(training, dvc.pid, signal.SIGUSR1)
        assert _ended_by(stranger) == signal.SIGTERM  # it never got the SIGUSR1
    finally:
        stranger.kill()
        dvc.communicate("\n", timeout=30)
    assert not signal_descendant(training, dvc.pid, signal.SIGUSR1)  # reaped: no such process
    assert not signal_descendant(dvc.pid, os.getpid(), signal.SIGUSR1)
