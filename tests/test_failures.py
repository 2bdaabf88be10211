"""Failing services: the annotation endpoint dies mid-run, the judge endpoint is dead; the stage fails clearly and
leaves no partial output."""

import copy
import os
import secrets
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from politune.ingest import ingest
from politune import serve
from politune.serve import free_port
from tests.helpers import PARAMS, ROOT, section

pytestmark = pytest.mark.slow


def test_endpoint_killed_mid_run(tmp_path, smollm2_dir, lora_server):
    """The score stage's endpoint dies while it scores: the session's `make serve` server (tests/conftest.py; the
    last test to use it), serving SmolLM2 as "base"."""
    params = copy.deepcopy(PARAMS)
    posts, _ = ingest(ROOT / "data" / "raw", section("ingest"))
    pd.DataFrame(posts).to_parquet(tmp_path / "posts.parquet")
    url, server, log = lora_server.url, lora_server.proc, lora_server.log
    try:
        params["annotate"].update(backend="openai")
        params["annotate"]["openai"].update(base_url=url, model="base", timeout=5, max_retries=1,
                                            concurrency=2, batch_size=8)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        out = {"out": tmp_path / "scores.parquet", "report": tmp_path / "scores.json", "plot": tmp_path / "plot.json"}
        cmd = [sys.executable, "-m", "stages.score", "--params", "params.yaml", "--posts", "posts.parquet",
               "--model", str(smollm2_dir), "--work", str(tmp_path / "work")] + [
               a for k, v in out.items() for a in (f"--{k}", str(v))]
        stage_log = tmp_path / "stage.log"
        with stage_log.open("wb") as fh:  # a file, not a pipe: nobody reads while it runs
            stage = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=fh)
        seen = len(log.read_text(errors="replace"))  # the chat test's requests came before
        deadline = time.monotonic() + 120
        while "POST /v1/completions" not in log.read_text(errors="replace")[seen:]:  # scoring has started
            assert stage.poll() is None, stage_log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the stage never reached the endpoint"
            time.sleep(0.5)
        time.sleep(2)
        os.killpg(server.pid, signal.SIGKILL)
        stage.wait(timeout=180)
        stderr = stage_log.read_text(errors="replace")
    finally:
        serve.stop(server)
    assert stage.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: annotation endpoint " + url) and "retries" in last, last
    assert not any(p.exists() for p in out.values()), "no partial output may be left"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".scores")], "no temporary left behind"


PROMPTS = ["What do you think about taxes?", "What do you think about health care?", "What is your favourite food?"]


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_dir, tmp_path_factory):
    """Untrained LoRA adapters on the tiny model: the judge stage only needs something to load."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapters")
    for name in ("sft", "dpo"):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        model.save_pretrained(out / name)
    return out


@pytest.mark.slow
def test_dead_endpoint_fails_clearly_and_writes_nothing(tmp_path, tiny_model_dir, tiny_adapters):
    port = free_port()  # nothing listens here
    params = {"base": PARAMS["base"], "judge": dict(PARAMS["judge"], prompts=PROMPTS,
                                                    max_new_tokens=8)}
    params["judge"]["endpoint"] = dict(params["judge"]["endpoint"], base_url=f"http://127.0.0.1:{port}/v1",
                                       model="gpt-4", timeout=2, max_retries=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    cmd = [sys.executable, "-m", "stages.judge", "--params", "params.yaml", "--model", str(tiny_model_dir),
           "--sft", str(tiny_adapters / "sft"), "--dpo", str(tiny_adapters / "dpo"), "--judge-model", "unused",
           "--metrics", "judge.json", "--answers", "judge_answers.csv"]
    key = "sk-politune-FAKE-" + secrets.token_hex(12)  # the judge's key, only in the environment
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db", "OPENAI_API_KEY": key}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: judge endpoint http://127.0.0.1:{port}/v1 (timeout 2") and "retries" in last, last
    assert not (tmp_path / "judge.json").exists() and not (tmp_path / "judge_answers.csv").exists()
    assert key not in proc.stdout + proc.stderr, "the error must not echo the key"
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
