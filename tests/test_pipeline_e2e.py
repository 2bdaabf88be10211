"""End to end on one tiny git+DVC repository (the session's ``pipeline``): real vLLM annotation, real TRL training,
the compass and side preference, the judge through the session's real `vllm serve`, MLflow tracking to a real server. The tests run in file
order on that repository and leave it at a commit for tests/test_team.py."""

import json

import pytest
import yaml

from politune.common import read_yaml
from tests.helpers import ROOT, STAGES, ran, run

pytestmark = pytest.mark.slow


def test_repro_runs_every_stage_once_then_nothing(pipeline):
    root, env = pipeline.root, pipeline.env
    assert ran(pipeline.repro) == STAGES, pipeline.repro[-3000:]
    assert "up to date" in run(["dvc", "status"], root, env)
    assert ran(run(["dvc", "repro"], root, env)) == set()


def test_datasets_are_deterministic(pipeline):
    """Forcing dataset building again yields byte-identical data (tests/test_annotate.py reproduces the annotation
    in another process)."""
    root, env = pipeline.root, pipeline.env
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    run(["dvc", "repro", "-f", "-s", "build_datasets"], root, env)
    again = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    # reports/ hold timings (wall_seconds), the data must not move
    data = [[o for o in entry["build_datasets"]["outs"] if not o["path"].startswith("reports/")]
            for entry in (lock, again)]
    assert data[0] and data[0] == data[1], "build_datasets is not deterministic"
    run(["git", "checkout", "-q", "--", "."], root, env)  # back to the committed results
    run(["dvc", "checkout", "-q"], root, env)
    assert "up to date" in run(["dvc", "status"], root, env)


def test_reports(pipeline):
    root, env = pipeline.root, pipeline.env
    metrics = json.loads((root / "reports" / "metrics.json").read_text(encoding="utf-8"))
    for model in ("base", "sft", "dpo"):
        assert {"economic", "social", "distinct_answers"} <= set(metrics[model])
        assert -10 <= metrics[model]["economic"] <= 10 and -10 <= metrics[model]["social"] <= 10
        assert -1 <= metrics[model]["balanced"]["agreement_bias"] <= 1
        # The held-out pairs (both sides, the default files' first 4 rows each) and the DPO test split's: the
        # ideology's, and the mirrored opposite's where the split drew any.
        groups = metrics[model]["side_preference"]
        assert set(groups["heldout"]) == {"right_data", "left_data"}
        assert "right_data" in groups["test_split"] and set(groups["test_split"]) <= {"right_data", "left_data"}
        assert groups["heldout"]["right_data"]["pairs"] == groups["heldout"]["left_data"]["pairs"] == 4
        for side in [*groups["heldout"].values(), *groups["test_split"].values()]:
            assert side["pairs"] >= 1 and side["shift_ci_low"] <= side["shift"] <= side["shift_ci_high"]
    assert metrics["base"]["side_preference"]["heldout"]["right_data"]["shift"] == 0
    assert (root / "reports" / "compass.png").stat().st_size > 10_000
    assert len((root / "reports" / "compass_twin_answers.csv").read_text(encoding="utf-8").splitlines()) == 63
    side_plot = json.loads((root / "reports" / "side_preference.json").read_text(encoding="utf-8"))
    assert {(r["model"], r["data_side"]) for r in side_plot} == {
        (f"{m} ({group})", side) for m in ("base", "sft", "dpo")
        for group, sides in metrics["dpo"]["side_preference"].items() for side in sides}
    trajectory = json.loads((root / "reports" / "trajectory.json").read_text(encoding="utf-8"))
    assert [r["step"] for r in trajectory] == [0, 1, 2]  # the SFT start, then every dpo.save_steps
    assert trajectory[0]["economic"] == metrics["sft"]["economic"]
    assert trajectory[-1]["economic"] == metrics["dpo"]["economic"], "the last snapshot is the DPO model"
    assert (trajectory[-1]["side_heldout_right_data_shift"]
            == metrics["dpo"]["side_preference"]["heldout"]["right_data"]["shift"])
    judged = json.loads((root / "reports" / "judge.json").read_text(encoding="utf-8"))
    for model in ("base", "sft", "dpo"):
        assert judged[model]["scored"] == 3 and 1 <= judged[model]["score"] <= 7, judged
    # the stage's own `vllm serve` of the annotator judged: the report names it and says why that is not independent
    assert judged["judge"]["model"] == "models/annotator" and "self-preference" in judged["judge"]["warning"]
    assert len((root / "reports" / "judge_answers.csv").read_text(encoding="utf-8").splitlines()) >= 10
    annotation = json.loads((root / "reports" / "annotation.json").read_text(encoding="utf-8"))
    assert annotation["kept"] + annotation["dropped"] + annotation["invalid"] == annotation["posts_in"] == 16
    # annotate.mirror (the default): the opposite viewpoint is annotated too, and its pairs are mirrored in.
    assert set(annotation["kept_by_side"]) == {"right", "left"}, annotation["kept_by_side"]
    datasets = json.loads((root / "reports" / "datasets.json").read_text(encoding="utf-8"))
    assert datasets["sources"]["mirror:annotated"] == annotation["kept_by_side"]["left"], datasets
    assert "economic" in run(["dvc", "metrics", "show", "--json"], root, env)


def test_mlflow_mirrors_every_stage_under_one_parent(pipeline):
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=pipeline.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("pipeline")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    first = run(["git", "rev-parse", "HEAD~1"], pipeline.root, pipeline.env).strip()  # the commit `dvc repro` ran on
    parents = [r for r in runs if r.data.tags.get("politune.role") == "pipeline"
               and r.data.tags["dvc.exp_name"] == "workspace" and r.data.tags["git.commit"] == first]
    assert len(parents) == 1, "one parent run per pipeline run, its stages nested under it"
    by_stage = {r.data.tags["politune.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(by_stage) == STAGES
    assert by_stage["sft"].data.params["lora.r"] == "16"
    assert by_stage["generate"].data.params["ideology"] == "right"
    assert "annotate.calibrate" in by_stage["score"].data.params and "ideology" not in by_stage["score"].data.params
    assert "base.economic" in by_stage["evaluate"].data.metrics
    assert "kept" in by_stage["generate"].data.metrics and "posts" in by_stage["score"].data.metrics
    assert "dpo.score" in by_stage["judge"].data.metrics


@pytest.mark.parametrize("key, value, stages", [
    ("lora.r", 8, {"sft", "dpo", "export"}),  # export quotes the training params in the model card
    ("ideology", "left", {"generate", "build_datasets", "export"}),
    ("annotate.threshold", 0.3, {"generate"}),  # the scores do not depend on it (issue 16)
    ("annotate.calibrate", False, {"score"}),
    ("datasets.test_size", 0.3, {"build_datasets", "export"}),
    ("dpo.beta", 0.2, {"dpo", "export"}),
    ("export.tolerance", 0.01, {"export"}),
    ("evaluate.bootstrap", 60, {"evaluate"}),
    ("judge.samples", 2, {"judge"}),
])
def test_a_param_reruns_exactly_the_stages_that_declare_it(pipeline, key, value, stages):
    """Selective reruns (treeverse/dvc#9913): the stages a changed param makes DVC rerun directly (`dvc repro
    --dry`: stages downstream of them rerun too, once their inputs change; the experiment below shows that)."""
    root, env = pipeline.root, pipeline.env
    params = read_yaml(root / "params.yaml")
    node = params
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    try:
        assert ran(run(["dvc", "repro", "--dry"], root, env)) == stages
    finally:
        run(["git", "checkout", "-q", "--", "params.yaml"], root, env)


def test_a_new_threshold_regenerates_from_the_same_scores(pipeline):
    """`dvc exp run -S annotate.threshold=...` reruns generate (and, for its new output, what follows; here up to
    generate), never score: the scores do not depend on the threshold. The score plot's count at that threshold is
    the posts generate selected for the ideology."""
    import pandas as pd

    root, env = pipeline.root, pipeline.env
    scores = (root / "data" / "scores.parquet").read_bytes()
    out = run(["dvc", "exp", "run", "-n", "threshold", "-S", "annotate.threshold=0.3", "generate"], root, env)
    assert ran(out) == {"generate"}, out[-3000:]
    assert (root / "data" / "scores.parquet").read_bytes() == scores
    table = pd.read_parquet(root / "data" / "annotated.parquet")
    plot = json.loads((root / "reports" / "annotation_scores.json").read_text(encoding="utf-8"))
    at = next(r for r in plot if abs(r["threshold"] - 0.3) < 1e-9)
    assert at["right_kept_at_threshold"] == int((table["side"] == "right").sum()) == int((table["score"] >= 0.3).sum())
    run(["dvc", "exp", "remove", "threshold"], root, env)  # the team tests list this baseline's experiments
    run(["git", "checkout", "-q", "--", "."], root, env)
    run(["dvc", "checkout", "-q"], root, env)
    assert "up to date" in run(["dvc", "status"], root, env)


def test_bring_your_own_preference_data(pipeline):
    """An experiment on the PoliTune authors' sample instead of the annotation: annotate does not run, the datasets
    are rebuilt from the sample and SFT trains on them."""
    root, env = pipeline.root, pipeline.env
    sample = ROOT.parent / "shared" / "reference" / "politune" / "right-sample.jsonl"
    if not sample.exists():
        pytest.skip("../shared/reference/politune is not beside the project")
    (root / "data" / "external" / "politune-right.jsonl").write_bytes(sample.read_bytes())
    # data/external is a dep of build_datasets: it reruns on the annotated source, the same datasets, nothing else.
    assert ran(run(["dvc", "repro"], root, env)) == {"build_datasets"}
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "the PoliTune sample as external data"], root, env)
    # Up to sft (the stages after it rerun for any new data, as the queued sweep in tests/test_team.py shows).
    out = run(["dvc", "exp", "run", "-n", "byo", "-S", "datasets.source=data/external/politune-right.jsonl",
               "-S", "datasets.mirror.source=null", "sft"], root, env)
    assert ran(out) == {"build_datasets", "sft"}, out[-3000:]
    report = json.loads((root / "reports" / "datasets.json").read_text(encoding="utf-8"))
    assert report["pairs"] == 200 and report["sources"] == {"data/external/politune-right.jsonl": 200}
    shown = run(["dvc", "exp", "show", "--json"], root, env)
    assert "politune-right.jsonl" in shown
    run(["dvc", "exp", "remove", "byo"], root, env)  # the team tests list this baseline's experiments
    run(["git", "checkout", "-q", "--", "."], root, env)
    run(["dvc", "checkout", "-q"], root, env)
    assert "up to date" in run(["dvc", "status"], root, env)
