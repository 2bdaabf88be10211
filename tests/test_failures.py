"""Failing services: the annotation endpoint dies mid-run; the stage fails clearly and leaves no partial output."""

import copy
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from politune.ingest import ingest
from politune import serve
from tests.conftest import PARAMS, ROOT, SERVE_ENGINE, section

pytestmark = pytest.mark.slow


def test_endpoint_killed_mid_run(tmp_path, smollm2_dir):
    params = copy.deepcopy(PARAMS)
    posts, _ = ingest(ROOT / "data" / "raw", section("ingest"))
    pd.DataFrame(posts).to_parquet(tmp_path / "posts.parquet")
    url, server = serve.start(smollm2_dir, SERVE_ENGINE, 0, tmp_path / "serve.log")
    try:
        params["annotate"].update(backend="openai")
        params["annotate"]["openai"].update(base_url=url, model=str(smollm2_dir), timeout=5, max_retries=1,
                                            concurrency=2, batch_size=8)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        out = {"out": tmp_path / "annotated.parquet", "report": tmp_path / "annotation.json",
               "sample": tmp_path / "sample.md"}
        cmd = [sys.executable, "-m", "stages.annotate", "--params", "params.yaml", "--posts", "posts.parquet",
               "--model", str(smollm2_dir)] + [a for k, v in out.items() for a in (f"--{k}", str(v))]
        stage_log = tmp_path / "stage.log"
        with stage_log.open("wb") as fh:  # a file, not a pipe: nobody reads while it runs
            stage = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=fh)
        log = tmp_path / "serve.log"
        deadline = time.monotonic() + 120
        while "POST /v1/completions" not in log.read_text(errors="replace"):  # scoring has started
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
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".annotated")], "no temporary left behind"
