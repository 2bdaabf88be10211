"""End to end: a throwaway git+DVC repo with a tiny configuration, real vLLM, real TRL, real MLflow store."""

import json
import os
import re
import subprocess

import pytest
import yaml

from tests.conftest import ROOT, copy_project

pytestmark = pytest.mark.slow
STAGES = {"prepare_models", "ingest", "annotate", "build_datasets", "sft", "dpo", "evaluate", "judge"}


def run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def ran(output):
    return set(re.findall(r"Running stage '([^']+)'", output))


def tiny_params(params, model_dir):
    params["models"] = {"annotator": str(model_dir), "target": str(model_dir)}
    params["annotate"].update(max_posts=16, threshold=0.2, max_new_tokens=160, max_retries=1, sample_size=3)
    params["datasets"].update(min_pairs=4, test_size=0.25)
    small = {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 128, "logging_steps": 1}
    params["sft"].update(small)
    params["dpo"].update(small, save_steps=1)
    params["evaluate"].update(templates=params["evaluate"]["templates"][:1], bootstrap=50, batch_size=32)
    params["judge"].update(prompts=params["judge"]["prompts"][:3], max_new_tokens=24)
    return params


@pytest.fixture()
def repo(tmp_path, smollm2_dir):
    root = copy_project(tmp_path / "repo")
    params = tiny_params(yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")), smollm2_dir)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_EXP"))}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny politune"], root, env)
    return root, env


def test_repro_then_selective_reruns(repo):
    root, env = repo
    out = run(["dvc", "repro"], root, env)
    assert ran(out) == STAGES, out[-3000:]
    assert "up to date" in run(["dvc", "status"], root, env)
    assert ran(run(["dvc", "repro"], root, env)) == set()

    # Determinism: forcing annotation (greedy) and dataset building again yields byte-identical outputs.
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    run(["dvc", "repro", "-f", "-s", "annotate"], root, env)
    run(["dvc", "repro", "-f", "-s", "build_datasets"], root, env)
    again = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    for stage in ("annotate", "build_datasets"):  # reports/ hold timings (wall_seconds), the data must not move
        data = [[o for o in entry[stage]["outs"] if not o["path"].startswith("reports/")] for entry in (lock, again)]
        assert data[0] and data[0] == data[1], f"{stage} is not deterministic"
    assert "up to date" in run(["dvc", "status"], root, env)

    metrics = json.loads((root / "reports" / "metrics.json").read_text(encoding="utf-8"))
    for model in ("base", "sft", "dpo"):
        assert {"economic", "social", "distinct_answers"} <= set(metrics[model])
        assert -10 <= metrics[model]["economic"] <= 10 and -10 <= metrics[model]["social"] <= 10
        assert -1 <= metrics[model]["balanced"]["agreement_bias"] <= 1
        side = metrics[model]["side_preference"]["right_data"]  # annotated pairs: the ideology's side only
        assert side["pairs"] >= 1 and side["shift_ci_low"] <= side["shift"] <= side["shift_ci_high"]
    assert metrics["base"]["side_preference"]["right_data"]["shift"] == 0
    assert (root / "reports" / "compass.png").stat().st_size > 10_000
    assert len((root / "reports" / "compass_twin_answers.csv").read_text(encoding="utf-8").splitlines()) == 63
    side_plot = json.loads((root / "reports" / "side_preference.json").read_text(encoding="utf-8"))
    assert {(r["model"], r["data_side"]) for r in side_plot} == {(m, "right_data") for m in ("base", "sft", "dpo")}
    trajectory = json.loads((root / "reports" / "trajectory.json").read_text(encoding="utf-8"))
    assert [r["step"] for r in trajectory] == [0, 1, 2]  # the SFT start, then every dpo.save_steps
    assert trajectory[0]["economic"] == metrics["sft"]["economic"]
    assert trajectory[-1]["economic"] == metrics["dpo"]["economic"], "the last snapshot is the DPO model"
    assert trajectory[-1]["side_right_data_shift"] == metrics["dpo"]["side_preference"]["right_data"]["shift"]
    judged = json.loads((root / "reports" / "judge.json").read_text(encoding="utf-8"))
    for model in ("base", "sft", "dpo"):
        assert judged[model]["scored"] == 3 and 1 <= judged[model]["score"] <= 7, judged
    assert len((root / "reports" / "judge_answers.csv").read_text(encoding="utf-8").splitlines()) >= 10
    annotation = json.loads((root / "reports" / "annotation.json").read_text(encoding="utf-8"))
    assert annotation["kept"] + annotation["dropped"] + annotation["invalid"] == annotation["posts_in"] == 16
    shown = run(["dvc", "metrics", "show", "--json"], root, env)
    assert "economic" in shown

    # MLflow holds one run per stage, with its params and metrics.
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("politune")
    runs = client.search_runs([exp.experiment_id])
    by_stage = {r.data.tags["politune.stage"]: r for r in runs if "politune.stage" in r.data.tags}
    assert set(by_stage) == STAGES
    parents = [r for r in runs if r.data.tags.get("politune.role") == "pipeline"]
    assert len(parents) == 1 and parents[0].data.tags["dvc.exp_name"] == "workspace"
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in by_stage.values())
    assert by_stage["sft"].data.params["lora.r"] == "16"
    assert by_stage["annotate"].data.params["ideology"] == "right"
    assert "base.economic" in by_stage["evaluate"].data.metrics
    assert "kept" in by_stage["annotate"].data.metrics
    assert "dpo.score" in by_stage["judge"].data.metrics

    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "baseline results"], root, env)

    out = run(["dvc", "exp", "run", "-S", "lora.r=8"], root, env)
    assert ran(out) == {"sft", "dpo", "evaluate", "judge"}, out[-3000:]

    out = run(["dvc", "exp", "run", "-S", "ideology=left"], root, env)
    assert "annotate" in ran(out) and not {"prepare_models", "ingest"} & ran(out), out[-3000:]
    annotation = json.loads((root / "reports" / "annotation.json").read_text(encoding="utf-8"))
    assert annotation["ideology"] == "left"
    exps = run(["dvc", "exp", "show", "--json"], root, env)
    assert '"ideology": "left"' in exps and '"r": 8' in exps, exps[:2000]

    # Bring your own preference data: the PoliTune authors' sample, without running annotation.
    sample = ROOT.parent / "shared" / "reference" / "politune" / "right-sample.jsonl"
    if not sample.exists():
        pytest.skip("../shared/reference/politune is not beside the project: bring-your-own step not run")
    run(["git", "checkout", "-q", "--", "."], root, env)
    run(["dvc", "checkout", "-q"], root, env)
    (root / "data" / "external" / "politune-right.jsonl").write_bytes(sample.read_bytes())
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "results, and the PoliTune sample as external data"], root, env)
    out = run(["dvc", "exp", "run", "-S", "datasets.source=data/external/politune-right.jsonl"], root, env)
    assert "annotate" not in ran(out) and {"build_datasets", "sft", "dpo", "evaluate", "judge"} <= ran(out), out[-3000:]
    report = json.loads((root / "reports" / "datasets.json").read_text(encoding="utf-8"))
    assert report["pairs"] == 200 and report["sources"] == {"data/external/politune-right.jsonl": 200}
