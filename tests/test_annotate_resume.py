"""Resumable annotation (issue 16, item 4): the score and generate stages, killed after their first finished shard,
resume from their shards on the next run and end byte-identical to an uninterrupted run; shards of another run are
discarded. The stages run for real on SmolLM2 through the transformers backend (no engine start: the shards'
logic is the same for every backend, and the pipeline's own vLLM run is tests/test_pipeline_e2e.py's)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from politune.shards import Shards, run_shards
from tests.helpers import PARAMS, annotation_posts, with_absolute_paths

pytestmark = pytest.mark.slow

OUTS = {"score": ("scores.parquet", "scores.json", "plot.json"), "generate": ("annotated.parquet", "annotation.json",
                                                                           "sample.md")}


def test_shards_of_another_run_are_discarded_and_every_shard_is_read_back(tmp_path):
    calls = []

    def compute(keys):
        calls.append(list(keys))
        return pd.DataFrame({"twice": [2 * k for k in keys]}, index=pd.Index(keys)), {"n": len(keys)}

    shards = Shards(tmp_path / "work", "run-a")
    frame, totals = run_shards(range(5), 2, compute, shards, "test")
    assert calls == [[0, 1], [2, 3], [4]] and totals == {"n": 5} and list(frame["twice"]) == [0, 2, 4, 6, 8]
    calls.clear()
    again, _ = run_shards(range(5), 2, compute, Shards(tmp_path / "work", "run-a"), "test")
    assert calls == [] and again.equals(frame)  # the same run: every shard is already done
    run_shards(range(5), 2, compute, Shards(tmp_path / "work", "run-b"), "test")
    assert calls == [[0, 1], [2, 3], [4]], "another run's shards are never used"


def stage_cmd(stage, model, tmp_path):
    out, report, extra = (str(tmp_path / name) for name in OUTS[stage])
    if stage == "score":
        args = ["--posts", "posts.parquet", "--out", out, "--report", report, "--plot", extra]
    else:
        args = ["--scores", "scores.parquet", "--out", out, "--report", report, "--sample", extra]
    return [sys.executable, "-m", f"stages.{stage}", "--params", "params.yaml", "--model", str(model), *args,
            "--work", str(tmp_path / "work" / stage)]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_stage(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.parametrize("stage", ["score", "generate"])
def test_a_killed_stage_resumes_from_its_shards_byte_identical(stage, tmp_path, smollm2_dir):
    params = with_absolute_paths(PARAMS)  # the stages run in tmp_path
    # 160 new tokens: SmolLM2's greedy triplets for these posts are complete JSON (tests/test_backend_transformers.py)
    params["annotate"].update(backend="transformers", threshold=0.0, max_new_tokens=160, max_retries=0,
                              mirror=False, shard_size=2 if stage == "score" else 1)
    params["annotate"]["transformers"].update(batch_size=2)
    posts = pd.concat([annotation_posts()] * 2, ignore_index=True)  # 12 posts: 6 shards to score
    if stage == "generate":
        posts = posts.head(2)  # 2 shards of triplets
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {}
    for name in ("uninterrupted", "killed"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        posts.to_parquet(folder / "posts.parquet")
        if stage == "generate":  # the scores it reads, from the score stage
            if name == "uninterrupted":
                run_stage(stage_cmd("score", smollm2_dir, folder), folder, env)
            (folder / "scores.parquet").write_bytes((tmp_path / "uninterrupted" / OUTS["score"][0]).read_bytes())
        runs[name] = folder
    out = OUTS[stage][0]
    log = run_stage(stage_cmd(stage, smollm2_dir, runs["uninterrupted"]), runs["uninterrupted"], env)
    assert re.search(rf"{stage}: 100%.*\| {len(posts)}/{len(posts)} \[.*(post/s|s/post)\]", log), \
        "a progress bar with posts/s and an ETA"
    assert not (runs["uninterrupted"] / "work" / stage).exists(), "the shards are dropped once the stage is done"

    folder = runs["killed"]
    work = folder / "work" / stage
    with (folder / "stage.log").open("wb") as fh:
        proc = subprocess.Popen(stage_cmd(stage, smollm2_dir, folder), cwd=folder, env=env, stdout=fh, stderr=fh)
    deadline = time.monotonic() + 300
    while not (work / "shard-000000.parquet").exists():
        assert proc.poll() is None, (folder / "stage.log").read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "no shard was finished"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in work.glob("shard-*.parquet"))
    assert not (folder / out).exists() and 1 <= len(done) < len(posts) // params["annotate"]["shard_size"], done
    log = run_stage(stage_cmd(stage, smollm2_dir, folder), folder, env)
    assert f"{len(done)} of" in log and "resuming" in log, log[-2000:]
    assert digest(folder / out) == digest(runs["uninterrupted"] / out), "the resumed run's output differs"

    if stage == "generate":
        return
    # Another run's shards (another fingerprint) are discarded, not resumed from.
    (work / "politune-run-id").parent.mkdir(parents=True, exist_ok=True)
    (work / "politune-run-id").write_text("an older run", encoding="utf-8")
    (work / "shard-000000.parquet").write_bytes(b"not a shard of this run")
    run_stage(stage_cmd(stage, smollm2_dir, folder), folder, env)
    assert digest(folder / out) == digest(runs["uninterrupted"] / out)
