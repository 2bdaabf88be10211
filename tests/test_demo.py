"""The demo's comparison report: shift tests on known answers, and the report read from real experiment refs."""

import csv
import json
import subprocess

import numpy as np
import pytest

from demo import report, run
from stages.common import InputError
from stages.compass import load_compass
from tests.conftest import ROOT

COMPASS = ROOT / "data" / "compass" / "political_compass.json"


@pytest.fixture(scope="module")
def compass():
    return load_compass(COMPASS)


@pytest.mark.parametrize("axis", ["economic", "social"])
def test_shift_between_opposite_answer_sets_is_their_difference_and_significant(compass, axis):
    weights = getattr(compass, axis)
    a, b = weights.argmax(axis=1), weights.argmin(axis=1)  # the most right/authoritarian and left/libertarian
    one_hot = np.eye(4)
    s = report.shift_test(compass, a, b, n_boot=500, n_perm=500, seed=0, pa=one_hot[a], pb=one_hot[b])
    ea, sa = compass.coordinates(a)
    eb, sb = compass.coordinates(b)
    assert s["economic"] == pytest.approx(ea - eb, abs=0.01) and s["social"] == pytest.approx(sa - sb, abs=0.01)
    assert s[axis] > 5
    assert 0 < s[f"{axis}_ci_low"] <= s[axis] <= s[f"{axis}_ci_high"]
    assert s[f"{axis}_p"] < 0.01
    # one-hot probabilities: the expected-answer shift is the argmax shift
    assert s[f"{axis}_expected"] == pytest.approx(s[axis], abs=0.02)
    assert s["changed_answers"] == int((a != b).sum())


def test_no_shift_between_identical_answers(compass):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, 62)
    s = report.shift_test(compass, a, a.copy(), n_boot=200, n_perm=200, seed=0)
    assert s["economic"] == 0 and s["social"] == 0
    assert s["economic_ci_low"] == s["economic_ci_high"] == 0
    assert s["economic_p"] == 1.0 and s["social_p"] == 1.0


def test_unstable_paraphrases_widen_the_shift_interval(compass):
    """The same averaged answers, but each model's paraphrases disagree: the paired bootstrap over paraphrases
    must cover zero where the answers alone would call the shift certain."""
    a, b = compass.economic.argmax(axis=1), compass.economic.argmin(axis=1)
    one_hot = np.eye(4)
    firm = report.shift_test(compass, a, b, 500, 200, 0, pa=one_hot[a], pb=one_hot[b])
    # paraphrase 0 says a (resp. b) firmly, paraphrases 1 and 2 lean to the other model's answer
    pa = np.stack([one_hot[a] * 0.9 + 0.025, one_hot[b] * 0.45 + one_hot[a] * 0.35 + 0.05,
                   one_hot[b] * 0.45 + one_hot[a] * 0.35 + 0.05])
    pb = np.stack([one_hot[b] * 0.9 + 0.025, one_hot[a] * 0.45 + one_hot[b] * 0.35 + 0.05,
                   one_hot[a] * 0.45 + one_hot[b] * 0.35 + 0.05])
    assert (pa.mean(axis=0).argmax(axis=1) == a).all() and (pb.mean(axis=0).argmax(axis=1) == b).all()
    shaky = report.shift_test(compass, a, b, 500, 200, 0, pa=pa, pb=pb)
    assert shaky["economic"] == firm["economic"] > 5
    assert firm["economic_ci_low"] > 5
    assert shaky["economic_ci_low"] < 0 < shaky["economic_ci_high"]


def test_one_changed_proposition_is_not_significant(compass):
    a = np.full(62, 1)
    b = a.copy()
    b[0] = 3
    s = report.shift_test(compass, b, a, n_boot=500, n_perm=500, seed=0)
    assert s["changed_answers"] == 1
    assert s["economic_p"] > 0.3 and s["economic_ci_low"] <= 0 <= s["economic_ci_high"]


def test_experiments_share_the_recipe_and_differ_in_data_and_start():
    exps = run.experiments("demo", "data-dir", "r.jsonl", "l.jsonl")
    assert set(exps) == {"demo-right", "demo-left", "demo-right-dpo-only", "demo-left-dpo-only"}
    assert exps["demo-left"] == ["datasets.source=data/external/demo/l.jsonl"]  # annotation unused: no ideology
    assert exps["demo-right-dpo-only"] == exps["demo-right"] + ["recipe.dpo_start=base"]
    assert run.experiments("demo", "annotated", "r", "l")["demo-left"] == ["ideology=left", "datasets.source=annotated"]
    sets = run.settings(exps["demo-left"], ["dpo.beta=0.2"])
    assert sets[::2] == ["-S"] * (len(run.RECIPE) + 2) and sets[-1] == "dpo.beta=0.2"  # extras override the recipe
    assert run.settings(exps["demo-left"], [], recipe=False) == ["-S", "datasets.source=data/external/demo/l.jsonl"]


def _write_reports(root, compass, answers: dict[str, np.ndarray], judge: dict[str, float], paraphrases: int = 0):
    (root / "reports").mkdir(exist_ok=True)
    metrics = {}
    for name, ans in answers.items():
        e, s = compass.coordinates(ans)
        metrics[name] = {"economic": e, "social": s, "economic_ci_low": e - 1, "economic_ci_high": e + 1,
                         "social_ci_low": s - 1, "social_ci_high": s + 1, "distinct_answers": len(set(ans))}
    (root / "reports" / "metrics.json").write_text(json.dumps(metrics))
    with (root / "reports" / "compass_answers.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item"] + [f"{m}_answer" for m in answers] + [f"{m}_p{k}" for m in answers for k in range(4)]
                   + [f"{m}_q{j}_p{k}" for m in answers for j in range(paraphrases) for k in range(4)])
        for i in range(62):
            w.writerow([i + 1] + [int(answers[m][i]) for m in answers]
                       + [0.7 if k == answers[m][i] else 0.1 for m in answers for k in range(4)]
                       + [0.7 if k == answers[m][i] else 0.1 for m in answers for _ in range(paraphrases)
                          for k in range(4)])
    (root / "reports" / "judge.json").write_text(json.dumps(
        {m: {"score": v, "score_ci_low": v - 0.2, "score_ci_high": v + 0.2, "leaning": v - 4} for m, v in judge.items()}))


def test_report_from_experiment_refs(tmp_path, monkeypatch, compass):
    """Experiment commits under refs/exps (as DVC stores them) -> figure, tables, JSON and an MLflow run."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "data" / "compass").mkdir(parents=True)
    (tmp_path / "data" / "compass" / "political_compass.json").write_bytes(COMPASS.read_bytes())
    git("add", ".")
    git("commit", "-qm", "baseline")
    head = git("rev-parse", "HEAD").strip()
    base = np.array([i % 4 for i in range(62)])
    right, left = np.where(compass.economic.argmax(1) > 1, 3, 0), np.where(compass.economic.argmax(1) > 1, 0, 3)
    for suffix, (sft, dpo, score) in {"right": (base, right, 5.0), "left": (base, left, 3.0),
                                      "right-dpo-only": (base, base, 4.0)}.items():
        # the right experiment's table has 3 paraphrases' columns, the others only the averaged probabilities
        _write_reports(tmp_path, compass, {"base": base, "sft": sft, "dpo": dpo}, {"base": 4.0, "dpo": score},
                       paraphrases=3 if suffix == "right" else 0)
        git("add", "reports")
        git("commit", "-qm", suffix)
        git("update-ref", f"refs/exps/{head[:2]}/{head[2:]}/demo-{suffix}", "HEAD")
        git("reset", "-q", "--hard", head)
    git("update-ref", f"refs/exps/{head[:2]}/{head[2:]}/other-right", "HEAD")  # another prefix: not read

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    git("commit", "-q", "--allow-empty", "-m", "a commit made while the demo ran")  # HEAD moves on
    with pytest.raises(InputError, match="no experiments demo-right and demo-left on"):
        report.main(["--no-mlflow"])
    report.main(["--bootstrap", "200", "--permutations", "200", "--baseline", head])
    out = json.loads((tmp_path / "reports" / "demo" / "demo.json").read_text())
    assert set(out["experiments"]) == {"demo-right", "demo-left", "demo-right-dpo-only"}
    assert set(out["models"]) == {"base", "right_sft", "right", "left_sft", "left", "right_dpo_only"}
    shift = out["shifts"]["right_minus_left"]
    assert shift["economic"] > 0 and shift["economic_ci_low"] > 0 and shift["economic_p"] < 0.05
    assert shift["economic_expected"] > 0 and shift["economic_expected_ci_low"] > 0
    assert out["shifts"]["right_minus_left_after_sft"]["economic"] == 0
    assert out["shifts"]["right_dpo_only_minus_base"]["changed_answers"] == 0
    assert out["judge"]["right"]["score"] == 5.0 and out["judge"]["base"]["score"] == 4.0
    assert (tmp_path / "reports" / "demo" / "compass.png").read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "reports" / "demo" / "summary.md").read_text()
    assert "right minus left" in summary and "| left |" in summary

    import mlflow

    runs = mlflow.search_runs(experiment_names=["politune"], filter_string="tags.`politune.role` = 'demo'")
    assert len(runs) == 1
    assert runs.iloc[0]["metrics.shifts.right_minus_left.economic"] == shift["economic"]


def test_report_without_experiments_says_what_to_run(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="run `make demo` first"):
        report.main(["--no-mlflow"])


def test_base_answers_must_agree_across_experiments(compass):
    base = np.zeros(62, dtype=int)
    exps = {}
    for suffix, b in (("right", base), ("left", base + 1)):
        exps[suffix] = {"metrics": {m: {"economic": 0} for m in ("base", "sft", "dpo")}, "judge": {},
                        "answers": [{"base_answer": b[i], "sft_answer": 0, "dpo_answer": 0} for i in range(62)]}
    with pytest.raises(InputError, match="base model answers differently"):
        report.collect(exps)
