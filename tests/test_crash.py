"""Crash safety of qmiss-train: a run SIGKILLed mid-checkpoint resumes to the same adapter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import qmiss
from qmiss import train
from tests.helpers import train_args as args

# Runs qmiss-train and SIGKILLs itself while writing checkpoint-KILL_AT: after the adapter, before the optimizer.
KILLER = """
import os, signal, sys
from qmiss import train

kill_at = int(os.environ["KILL_AT_STEP"])
save = train.QMissTrainer._save_optimizer_and_scheduler

def save_or_die(self, output_dir):
    if self.state.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, output_dir)

train.QMissTrainer._save_optimizer_and_scheduler = save_or_die
train.run(sys.argv[1:])
"""


def test_sigkill_mid_checkpoint_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir: str, jsonl: str) -> None:
    schedule = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--seed", "7"]
    train.run(args(tiny_model_dir, jsonl, tmp_path / "straight", *schedule))

    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, *args(tiny_model_dir, jsonl, killed, *schedule)],
                          env={**os.environ, "KILL_AT_STEP": "4"}, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (killed / "checkpoint-2" / train.COMPLETE_MARKER).is_file()
    assert (killed / "checkpoint-4").is_dir() and not (killed / "checkpoint-4" / train.COMPLETE_MARKER).exists()
    assert train.last_complete_checkpoint(str(killed)) is not None

    with pytest.raises(ValueError, match="checkpoint-4: the checkpoint is incomplete"):
        train.run(args(tiny_model_dir, jsonl, killed, *schedule, "--resume_from_checkpoint",
                       str(killed / "checkpoint-4")))
    with pytest.warns(UserWarning, match="checkpoint-4 is incomplete"):
        summary = train.run(args(tiny_model_dir, jsonl, killed, *schedule, "--resume_from_checkpoint", "last"))
    assert summary["steps"] == 6
    straight = qmiss.read_adapter(tmp_path / "straight")[1]
    resumed = qmiss.read_adapter(killed)[1]
    worst = max((straight[n] - resumed[n]).abs().max().item() for n in straight)
    assert worst <= 1e-6, worst


def test_resume_last_without_checkpoints_is_an_error(tmp_path, tiny_model_dir: str, jsonl: str) -> None:
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
        train.run(args(tiny_model_dir, jsonl, tmp_path, "--max_steps", "1", "--resume_from_checkpoint", "last"))
