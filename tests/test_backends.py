"""The openai annotation backend against a real `vllm serve` on loopback (the transformers backend:
tests/test_backend_transformers.py)."""

import os

import pandas as pd
import pytest
import yaml

from politune.annotate import annotate
from politune.common import read_yaml
from tests.helpers import PARAMS, ROOT, annotation_posts, check_annotation, section, with_absolute_paths

pytestmark = pytest.mark.slow


def test_openai_backend_against_vllm_serve(vllm_server, monkeypatch):
    from politune.backends import OpenAIBackend

    base_url, model = vllm_server
    monkeypatch.setenv("POLITUNE_TEST_KEY", "sk-test-not-a-secret")
    cfg = section("annotate", backend="openai", threshold=0.0, max_new_tokens=160, max_retries=1,
                  openai=dict(PARAMS["annotate"]["openai"], base_url=base_url, model=model,
                              api_key_env="POLITUNE_TEST_KEY"))
    backend = OpenAIBackend(cfg.openai, model)
    assert backend.client.api_key == "sk-test-not-a-secret" and backend.model == model
    table, report = annotate(annotation_posts(), backend, "right", cfg, seed=0)
    check_annotation(table, report, cfg)


def test_api_key_never_leaves_the_environment(vllm_server, tmp_path):
    """A recognisable fake key in the environment ends up in no output, MLflow param or tag, or file the stages
    write."""
    import secrets
    import subprocess
    import sys

    import mlflow

    from politune.ingest import ingest

    base_url, model = vllm_server
    key = "sk-politune-FAKE-" + secrets.token_hex(12)  # made at run time: no file can hold it by accident
    params = with_absolute_paths(read_yaml(ROOT / "params.yaml"))  # the stages run in tmp_path
    posts, _ = ingest(ROOT / "data" / "raw", section("ingest"))
    pd.DataFrame(posts[:2]).to_parquet(tmp_path / "posts.parquet")
    params["annotate"].update(backend="openai", threshold=0.0, max_new_tokens=160, max_retries=1)
    params["annotate"]["quality"]["reject_copies"] = False  # this test is about the key: keep what the model writes
    params["annotate"]["openai"].update(base_url=base_url, model=model)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = dict(os.environ, OPENAI_API_KEY=key)
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (["stages.score", "--posts", "posts.parquet", "--out", "scores.parquet", "--report", "scores.json",
                 "--plot", "plot.json"],
                ["stages.generate", "--scores", "scores.parquet", "--out", "annotated.parquet", "--report",
                 "annotation.json", "--sample", "sample.md"]):
        proc = subprocess.run([sys.executable, "-m", *cmd, "--model", model, "--work", "work"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert key not in proc.stdout + proc.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), f"key written to {path}"
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("politune").experiment_id])
    assert runs and all(key not in str(r.data.params) + str(r.data.tags) for r in runs)
