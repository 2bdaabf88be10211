"""Team workflows against real servers on loopback: an `mlflow server`, a queued DVC sweep, `dvc metrics diff`
between commits, and an S3 remote (moto's standalone server, as DVC's own tests use) with push, cache wipe, pull.

They run in file order on the session's one tiny pipeline (tests/conftest.py), after the end-to-end tests.
"""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from politune.tracking import repo_root
from tests.helpers import STAGES, run

FAKE_SECRET = "politune-fake-s3-secret-" + hashlib.sha256(os.urandom(8)).hexdigest()[:12]


def test_queued_experiment_copies_log_to_the_main_repository(monkeypatch, tmp_path):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"))
    assert repo_root() == tmp_path / "repo"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert repo_root() == tmp_path / "repo"


@pytest.fixture(scope="module")
def team_repo(pipeline):
    """The session's tiny pipeline, reproduced and committed (tests/test_pipeline_e2e.py ran on it first)."""
    return pipeline.root, pipeline.env


@pytest.mark.slow
def test_queued_sweep(team_repo):
    root, env = team_repo
    # An evaluation sweep (evaluate then export rerun; a training param's reruns are tested with `dvc repro --dry` in
    # tests/test_pipeline_e2e.py): the queue, its two workers, exp show / apply / metrics diff / push are the same.
    run(["dvc", "exp", "run", "--queue", "-S", "evaluate.bootstrap=60,80"], root, env)
    assert run(["dvc", "queue", "status"], root, env).count("Queued") == 2
    run(["dvc", "queue", "start", "-j", "2"], root, env)  # two at once, one per core
    deadline = time.monotonic() + 1500
    while True:
        status = run(["dvc", "queue", "status"], root, env)
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 2, status
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env))
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    swept = set()
    for exp in exps:
        for run_ in exp["revs"]:
            data = run_["data"]
            swept.add(data["params"]["params.yaml"]["data"]["evaluate"]["bootstrap"])
            metrics = data["metrics"]["reports/metrics.json"]["data"]
            assert {"economic", "social", "economic_ci_low"} <= set(metrics["dpo"])
            assert "score" in data["metrics"]["reports/judge.json"]["data"]["dpo"]
    assert swept == {60, 80}
    table = run(["dvc", "exp", "show", "--no-pager", "--md", "--only-changed", "--keep", "dpo.economic",
                 "--keep", "dpo.social", "--keep", "evaluate.bootstrap"], root, env)
    assert "evaluate.bootstrap" in table and "dpo.economic" in table, table


@pytest.mark.slow
def test_metrics_diff_between_commits(team_repo):
    root, env = team_repo
    names = run(["dvc", "exp", "ls", "--name-only"], root, env).split()
    assert len(names) == 2, names
    run(["dvc", "exp", "apply", names[0]], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", f"adopt experiment {names[0]}"], root, env)
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD~1", "HEAD", "--all", "--json"], root, env))
    compass = diff["reports/metrics.json"]
    for key in ("base.economic", "dpo.economic", "dpo.social", "dpo.economic_ci_low", "sft.distinct_answers"):
        assert {"old", "new"} <= set(compass[key]), compass.get(key)
    now = json.loads((root / "reports" / "metrics.json").read_text(encoding="utf-8"))
    assert compass["dpo.economic"]["new"] == now["dpo"]["economic"]
    assert compass["base.economic"]["diff"] == 0, "the base model did not change"
    assert {"old", "new"} <= set(diff["reports/judge.json"]["dpo.score"])
    # The metrics files are small, one entry per model (compass, balanced compass, side preference per group of
    # pairs and data side),
    # with a stable key order.
    text = (root / "reports" / "metrics.json").read_text(encoding="utf-8")
    assert len(text) < 12000 and list(json.loads(text)) == ["base", "sft", "dpo"]
    assert list(json.loads(text)["dpo"])[-2:] == ["balanced", "side_preference"]
    assert "dpo.side_preference.heldout.right_data.shift" in compass
    plots = run(["dvc", "plots", "diff", "HEAD~1", "--json"], root, env)
    assert "compass_points.json" in plots


@pytest.mark.slow
def test_mlflow_server_holds_parent_and_nested_runs(team_repo, servers):
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=servers["mlflow"])
    exp = client.get_experiment_by_name("pipeline")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("politune.role") == "pipeline"]
    names = {p.data.tags["dvc.exp_name"] for p in parents}
    swept = names - {"workspace", "byo", "threshold"}  # dvc repro, the end-to-end tests' experiments, the two queued
    assert "workspace" in names and len(swept) == 2, names
    by_id = {p.info.run_id: p for p in parents}
    children = [r for r in runs if "politune.stage" in r.data.tags]
    for child in children:
        assert child.data.tags.get("mlflow.parentRunId") in by_id, child.data.tags
        assert child.data.tags["git.commit"] == by_id[child.data.tags["mlflow.parentRunId"]].data.tags["git.commit"]
    def stages_of(parent):
        return {c.data.tags["politune.stage"]: c for c in children
                if c.data.tags["mlflow.parentRunId"] == parent.info.run_id}

    # The first `dvc repro` ran every stage; later workspace runs (forced reruns, one commit later) have parents of
    # their own.
    stages = max((stages_of(p) for p in parents if p.data.tags["dvc.exp_name"] == "workspace"), key=len)
    assert set(stages) == STAGES
    for queued in (p for p in parents if p.data.tags["dvc.exp_name"] in swept):
        mine = {c.data.tags["politune.stage"] for c in children
                if c.data.tags["mlflow.parentRunId"] == queued.info.run_id}
        assert mine == {"evaluate", "export"}, mine  # evaluate.bootstrap: the models are reused
    # The adapter is logged as files (safetensors + config), not a pickled model.
    files = {a.path for a in client.list_artifacts(stages["dpo"].info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= files, files
    assert -10 <= stages["evaluate"].data.metrics["dpo.economic"] <= 10  # a compass coordinate


def digests(root: Path) -> dict[str, str]:
    out = {}
    for base in ("data/posts.parquet", "data/annotated.parquet", "data/datasets", "models/sft", "models/dpo"):
        path = root / base
        for f in sorted([path] if path.is_file() else path.rglob("*")):
            if f.is_file() and f.name != ".gitignore":
                out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.mark.slow
def test_s3_remote_push_wipe_pull(team_repo, servers):
    import boto3

    root, env = team_repo
    env = dict(env, AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3", endpoint_url=servers["s3"], aws_access_key_id="AKIAFAKE", aws_secret_access_key=FAKE_SECRET,
                 region_name="us-east-1").create_bucket(Bucket="politune-team")
    run(["dvc", "remote", "add", "-d", "team", "s3://politune-team/dvc"], root, env)
    run(["dvc", "remote", "modify", "team", "endpointurl", servers["s3"]], root, env)
    # Credentials only in the git-ignored local config (or the environment), never in .dvc/config.
    run(["dvc", "remote", "modify", "--local", "team", "access_key_id", "AKIAFAKE"], root, env)
    run(["dvc", "remote", "modify", "--local", "team", "secret_access_key", FAKE_SECRET], root, env)
    run(["git", "add", ".dvc/config"], root, env)
    run(["git", "commit", "-qm", "team remote"], root, env)
    assert FAKE_SECRET not in (root / ".dvc" / "config").read_text(encoding="utf-8")
    assert FAKE_SECRET in (root / ".dvc" / "config.local").read_text(encoding="utf-8")
    run(["git", "check-ignore", "-q", ".dvc/config.local"], root, env)
    tracked = run(["git", "ls-files"], root, env).split()
    assert not [f for f in tracked if FAKE_SECRET in (root / f).read_text(encoding="utf-8", errors="replace")]

    before = digests(root)
    assert len(before) >= 8, before
    run(["dvc", "push"], root, env)
    shutil.rmtree(root / ".dvc" / "cache")
    for base in ("data/posts.parquet", "data/annotated.parquet", "data/datasets", "models"):
        path = root / base
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert "deleted" in run(["dvc", "status"], root, env)
    # A teammate's clone: no config.local, the credentials in the environment instead.
    (root / ".dvc" / "config.local").unlink()
    env = dict(env, AWS_ACCESS_KEY_ID="AKIAFAKE", AWS_SECRET_ACCESS_KEY=FAKE_SECRET)
    run(["dvc", "pull"], root, env)
    assert "up to date" in run(["dvc", "status"], root, env)
    assert digests(root) == before
    # With environment credentials, older commits (before the remote existed) still compare.
    assert "reports/metrics.json" in run(["dvc", "metrics", "diff", "HEAD~2", "--all"], root, env)
