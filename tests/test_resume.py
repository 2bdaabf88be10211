"""Interruption: an SFT stage killed after a checkpoint resumes from it and ends with the same number of steps."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from politune.build_datasets import build, normalise, save
from politune.common import read_json
from politune.training import prepare_checkpoints
from tests.helpers import typed

pytestmark = pytest.mark.slow


def test_checkpoints_of_another_run_are_discarded(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert prepare_checkpoints(ckpt, "run-a") is False
    (ckpt / "checkpoint-2").mkdir()
    assert prepare_checkpoints(ckpt, "run-a") is True       # same params and inputs: resume
    assert prepare_checkpoints(ckpt, "run-b") is False      # anything changed: start afresh
    assert not (ckpt / "checkpoint-2").exists()


ROWS = [{"id": f"p{i:02d}", "prompt": f"What should we do about issue {i}?",
         "chosen": f"Cut taxes and regulations on issue {i}.",
         "rejected": f"Raise taxes and add regulations on issue {i}."} for i in range(24)]
# The tiny random model trains fast: enough steps that the run is still going when it is killed after checkpoint 2.
TRAIN = {"max_steps": 16, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1,
         "max_length": 64, "save_steps": 2, "bf16": False}
PARAMS = {"base": {"seed": 0}, "launch": {"training": "python"}, "recipe": {"dpo_start": "sft", "method": "dpo"},
          "sft": TRAIN, "dpo": TRAIN, "kto": TRAIN, "orpo": TRAIN, "cpo": TRAIN,
          "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                   "task_type": "CAUSAL_LM"}}


def test_sft_killed_after_checkpoint_resumes(tmp_path, tiny_model_dir):
    save(build(normalise(ROWS, "tiny"), seed=0, test_size=0.25)["sft"], tmp_path / "sft")
    kill_and_resume(tmp_path, ["stages.sft", "--model", str(tiny_model_dir), "--data", "sft"])


def test_dpo_killed_after_checkpoint_resumes(tmp_path, tiny_model_dir):
    from politune import sft

    built = build(normalise(ROWS, "tiny"), seed=0, test_size=0.25)
    save(built["sft"], tmp_path / "sft")
    save(built["dpo"], tmp_path / "dpo")
    sft.train(tiny_model_dir, tmp_path / "sft", tmp_path / "sft_adapter",
              typed(**dict(PARAMS, sft=dict(TRAIN, max_steps=1))),
              tmp_path / "sft_work")
    kill_and_resume(tmp_path, ["stages.dpo", "--model", str(tiny_model_dir), "--adapter", "sft_adapter", "--data",
                               "dpo"])


def kill_and_resume(tmp_path, stage_args):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS), encoding="utf-8")
    ckpt = tmp_path / "checkpoints"
    cmd = [sys.executable, "-m", *stage_args, "--out", "adapter", "--metrics", "metrics.json", "--curve",
           "curve.json", "--checkpoints", str(ckpt)]
    log = tmp_path / "first.log"
    with log.open("wb") as fh:  # a file, not a pipe: nobody reads while it trains
        first = subprocess.Popen(cmd, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (ckpt / "checkpoint-2" / "trainer_state.json").exists():
        assert first.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()
    saved = sorted(int(p.name.split("-")[1]) for p in ckpt.glob("checkpoint-*"))
    assert saved and saved[-1] < TRAIN["max_steps"], "killed after the run ended: nothing to resume"

    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {ckpt / f'checkpoint-{saved[-1]}'}" in second.stderr
    assert read_json(tmp_path / "metrics.json")["steps"] == TRAIN["max_steps"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not ckpt.exists(), "a finished run leaves no checkpoint to resume"
