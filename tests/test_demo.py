"""The demo's comparison report: shift tests on known answers, and the report read from real experiment refs."""

import csv
import json
import shutil
import subprocess

import numpy as np
import pytest

from demo import report, run
from politune.common import InputError
from politune.compass import load_compass
from politune.common import read_yaml as yaml_load
from tests.helpers import ROOT

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


def test_experiments_per_recipe_share_the_training_and_differ_in_data_and_start():
    exps = run.experiments("demo", "data-dir", ["mirror", "plain-stance"])
    assert set(exps) == {"demo-mirror-right", "demo-mirror-left", "demo-mirror-right-dpo-only",
                         "demo-mirror-left-dpo-only", "demo-plain-stance-right", "demo-plain-stance-left"}
    left = exps["demo-mirror-left"]
    assert left[:5] == ["datasets.source=data/external/demo/left.jsonl", "datasets.source_side=left",
                        "datasets.mirror.source=data/external/demo/right.jsonl", "datasets.mirror.side=right",
                        "datasets.mirror.fraction=1.0"]
    assert left[5] == ("evaluate.side_preference.heldout=[{path:data/heldout/demo/right.jsonl,side:right},"
                       "{path:data/heldout/demo/left.jsonl,side:left}]")
    assert not any(f.startswith("ideology=") for f in left), "annotation unused: no ideology"
    assert set(run.UNUSED_ANNOTATION) <= set(left), "and a token annotation"
    assert exps["demo-mirror-right-dpo-only"] == exps["demo-mirror-right"] + ["recipe.dpo_start=base"]
    assert exps["demo-plain-stance-right"][-1] == "datasets.stance.fraction=1.0"
    assert run.experiments("demo", "annotated", ["plain"])["demo-plain-right"] == [
        "ideology=right", "datasets.source=annotated", "annotate.mirror=true", "datasets.mirror.source=null",
        "datasets.mirror.side=null"]
    assert "datasets.mirror.source=null" in exps["demo-plain-stance-right"], "plain: mirror pairs off"
    assert set(run.experiments("demo", "data-dir", ["plain"], ablation=False)) == {"demo-plain-right",
                                                                                   "demo-plain-left"}
    assert run.experiments("demo", "annotated", ["mirror"])["demo-mirror-left"] == [
        "ideology=left", "datasets.source=annotated", "annotate.mirror=true", "datasets.mirror.source=annotated",
        "datasets.mirror.side=null", "datasets.mirror.fraction=1.0"]
    with pytest.raises(InputError, match="unknown recipe"):
        run.experiments("demo", "data-dir", ["mirrored"])


def test_settings_put_extras_last_and_steps_replace_the_recipes():
    flags = ["datasets.source=x"]
    sets = run.settings(flags, ["dpo.beta=0.2"])
    assert sets[::2] == ["-S"] * (len(sets) // 2) and sets[-1] == "dpo.beta=0.2"  # extras override the recipe
    assert run.settings(flags, [], recipe=False) == ["-S", "datasets.source=x"]
    steps = run.settings(flags, [], steps=12)[1::2]
    assert "sft.max_steps=12" in steps and "dpo.max_steps=12" in steps and "sft.max_steps=45" not in steps


def test_split_files_hold_out_the_last_rows(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for side in ("right", "left"):
        (data / f"{side}.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "c", "rejected": "r"})
                                                    + "\n" for i in range(10)), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert run.split_files(data, {"right": "right.jsonl", "left": "left.jsonl"}, 3) == {"right": 7, "left": 7}
    train = [json.loads(x)["prompt"] for x in (run.EXTERNAL / "right.jsonl").read_text().splitlines()]
    held = [json.loads(x)["prompt"] for x in (run.HELDOUT / "right.jsonl").read_text().splitlines()]
    assert train == [f"p{i}" for i in range(7)] and held == ["p7", "p8", "p9"]
    with pytest.raises(InputError, match="not more than --heldout"):
        run.split_files(data, {"right": "right.jsonl", "left": "left.jsonl"}, 10)
    (data / "left.jsonl").write_text('{"prompt": "x"}\nnot json\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"left.jsonl: row 2: invalid JSON"):
        run.split_files(data, {"right": "right.jsonl", "left": "left.jsonl"}, 1)


def _answer_table(path, answers: dict[str, np.ndarray], paraphrases: int) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item"] + [f"{m}_answer" for m in answers] + [f"{m}_p{k}" for m in answers for k in range(4)]
                   + [f"{m}_q{j}_p{k}" for m in answers for j in range(paraphrases) for k in range(4)])
        for i in range(62):
            w.writerow([i + 1] + [int(answers[m][i]) for m in answers]
                       + [0.7 if k == answers[m][i] else 0.1 for m in answers for k in range(4)]
                       + [0.7 if k == answers[m][i] else 0.1 for m in answers for _ in range(paraphrases)
                          for k in range(4)])


def _write_reports(root, compass, answers: dict[str, np.ndarray], judge: dict[str, float], paraphrases: int = 0,
                   side: dict[str, float] | None = None):
    """An experiment's reports; with ``side`` (model -> its d shift on every pair), the twins' answers (the mirror
    of the originals') and the side-preference tables too."""
    (root / "reports").mkdir(exist_ok=True)
    metrics = {}
    for name, ans in answers.items():
        e, s = compass.coordinates(ans)
        metrics[name] = {"economic": e, "social": s, "economic_ci_low": e - 1, "economic_ci_high": e + 1,
                         "social_ci_low": s - 1, "social_ci_high": s + 1, "distinct_answers": len(set(ans))}
        if side is not None:
            shift = side[name]
            metrics[name]["balanced"] = {"economic": e, "social": s, "economic_ci_low": e - 1, "economic_ci_high": e + 1,
                                         "social_ci_low": s - 1, "social_ci_high": s + 1, "twins_economic": e,
                                         "twins_social": s, "agreement_bias": 0.0}
            metrics[name]["side_preference"] = {
                f"{d}_data": {"pairs": 20, "shift": shift, "shift_ci_low": shift - 1, "shift_ci_high": shift + 1,
                              "moved_right": float(shift > 0), "moved_left": float(shift < 0),
                              "shift_per_token": shift / 50, "shift_per_token_ci_low": 0, "shift_per_token_ci_high": 0,
                              "preference": shift, "preference_per_token": 0} for d in ("right", "left")}
    (root / "reports" / "metrics.json").write_text(json.dumps(metrics))
    _answer_table(root / "reports" / "compass_answers.csv", answers, paraphrases)
    if side is not None:
        _answer_table(root / "reports" / "compass_twin_answers.csv", {m: 3 - a for m, a in answers.items()},
                      paraphrases)
        noise = np.random.default_rng(0).normal(0, 0.5, 40)
        with (root / "reports" / "side_preference.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["pair", "data_side"] + [f"{m}_{k}" for m in answers for k in ("d", "d_per_token")])
            for i in range(40):
                w.writerow([f"p{i}", "right" if i < 20 else "left"]
                           + [v for m in answers for v in (side[m] + noise[i], 0)])
    (root / "reports" / "judge.json").write_text(json.dumps(
        {m: {"score": v, "score_ci_low": v - 0.2, "score_ci_high": v + 0.2, "leaning": v - 4} for m, v in judge.items()}))


def test_report_from_experiments(tmp_path, monkeypatch, compass):
    """DVC experiments (saved with `dvc exp save`, read back through dvc.api) -> figure, tables, JSON, MLflow run."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    def dvc(*args):
        return subprocess.run(["dvc", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    dvc("init", "-q")
    (tmp_path / "data" / "compass").mkdir(parents=True)
    (tmp_path / "data" / "compass" / "political_compass.json").write_bytes(COMPASS.read_bytes())
    (tmp_path / "data" / "compass" / "reversed.json").write_bytes((COMPASS.parent / "reversed.json").read_bytes())
    (tmp_path / "params.yaml").write_bytes((ROOT / "params.yaml").read_bytes())
    git("add", ".")
    git("commit", "-qm", "baseline")
    head = git("rev-parse", "HEAD").strip()
    base = np.array([i % 4 for i in range(62)])
    right, left = np.where(compass.economic.argmax(1) > 1, 3, 0), np.where(compass.economic.argmax(1) > 1, 0, 3)
    experiments = {"mirror-right": (base, right, 5.0, 3), "mirror-left": (base, left, 3.0, 3),
                   "mirror-right-dpo-only": (base, base, 4.0, 3),
                   # an older recipe's run: only the averaged probabilities, no twins or side tables
                   "plain-right": (base, left, 4.5, 0), "plain-left": (base, right, 3.5, 0)}
    for name, (sft, dpo, score, paraphrases) in {**experiments, "other-mirror-right": experiments["mirror-right"]}.items():
        side = {"base": 0.0, "sft": 0.0, "dpo": {"right": 6.0, "left": -5.0}.get(name.split("-")[1], 0.0)}
        _write_reports(tmp_path, compass, {"base": base, "sft": sft, "dpo": dpo}, {"base": 4.0, "dpo": score},
                       paraphrases=paraphrases, side=side if paraphrases else None)
        files = [str(f.relative_to(tmp_path)) for f in sorted((tmp_path / "reports").iterdir())]
        dvc("exp", "save", "-n", name if name.startswith("other") else f"demo-{name}",
            *[a for f in files for a in ("-I", f)])
        shutil.rmtree(tmp_path / "reports")  # another prefix (other-) is not read

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    git("commit", "-q", "--allow-empty", "-m", "a commit made while the demo ran")  # HEAD moves on
    with pytest.raises(InputError, match="no experiments demo-mirror-right and demo-mirror-left on"):
        report.main(["--no-mlflow"])
    report.main(["--bootstrap", "200", "--permutations", "200", "--baseline", head, "--recipes",
                 "mirror,plain,mirror-stance"])
    out = json.loads((tmp_path / "reports" / "demo" / "demo.json").read_text())
    assert set(out["experiments"]) == {"demo-mirror-right", "demo-mirror-left", "demo-mirror-right-dpo-only",
                                       "demo-plain-right", "demo-plain-left"}
    assert out["recipe"] == "mirror" and set(out["recipes"]) == {"mirror", "plain"}, "no mirror-stance runs"
    assert out["recipes"]["plain"]["compass"]["economic"] < 0 < out["recipes"]["mirror"]["compass"]["economic"]
    assert "right_side_preference" not in out["recipes"]["plain"]
    assert out["recipes"]["mirror"]["right_side_preference"]["left_data"]["shift"] == 6.0
    sides = out["side_differences"]["right_minus_left"]
    assert sides["right_data"]["difference"] == pytest.approx(11.0) and sides["left_data"]["ci_low"] > 10
    # the twins mirror the originals: the balanced shift is the plain one
    assert out["balanced_shifts"]["right_minus_left"]["economic"] == pytest.approx(
        out["shifts"]["right_minus_left"]["economic"], abs=0.02)
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
    assert "| mirror (headline) |" in summary and "| plain |" in summary
    assert "- `dpo.max_steps`: `20`" in summary and "- `datasets.mirror`: `{\"source\": \"annotated\"" in summary
    assert out["recipes"]["mirror"]["run"]["settings"]["dpo.max_steps"] == 20
    assert out["recipes"]["mirror"]["run"]["experiment"] == "demo-mirror-right"
    assert "| mirror (headline) | DVC experiments at `" + head[:7] + "`, target `SmolLM2-135M-Instruct.Q4_1.gguf`, " \
        in summary
    assert "Political Compass, economic axis, right minus left: 2 recipe runs; the interval excludes 0 in the " \
           "paper's direction in 1, the wrong way in 1" in summary
    # another report's recipes join the table (--also): a stance run written to its own folder, under a new name
    # when its recipe name is taken
    report.main(["--bootstrap", "50", "--permutations", "50", "--baseline", head, "--recipes", "plain",
                 "--out", "reports/demo/other", "--no-mlflow"])
    report.main(["--bootstrap", "50", "--permutations", "50", "--baseline", head, "--recipes", "mirror,plain",
                 "--also", "reports/demo/other", "--no-mlflow"])
    summary = (tmp_path / "reports" / "demo" / "summary.md").read_text()
    assert "| plain | DVC experiments" in summary and "| plain (2) | DVC experiments" in summary
    assert ", `reports/demo/other` |" in summary and "3 recipe runs" in summary
    assert set(json.loads((tmp_path / "reports" / "demo" / "demo.json").read_text())["recipes"]) == {"mirror", "plain"}
    with pytest.raises(InputError, match="--also reports/nowhere: no demo.json"):
        report.main(["--baseline", head, "--also", "reports/nowhere", "--no-mlflow"])
    # a partial run (the left experiment missing): each model against base, and no right - left
    dvc("exp", "remove", "demo-plain-left")
    report.main(["--bootstrap", "50", "--permutations", "50", "--baseline", head, "--recipes", "plain", "--no-mlflow"])
    partial = json.loads((tmp_path / "reports" / "demo" / "demo.json").read_text())
    assert "right_minus_base" in partial["shifts"] and "right_minus_left" not in partial["shifts"]
    assert "right-tuned, right-data pairs: +6.00 [+5.00, +7.00]: towards the right-voiced answers" in summary
    assert "left-tuned, left-data pairs: -5.00 [-6.00, -4.00]: towards the left-voiced answers" in summary

    import mlflow

    runs = mlflow.search_runs(experiment_names=["politune"], filter_string="tags.`politune.role` = 'demo'")
    assert len(runs) == 1
    assert runs.iloc[0]["metrics.shifts.right_minus_left.economic"] == shift["economic"]


def test_report_without_experiments_says_what_to_run(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True)
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


def test_sweep_flags_follow_dvc_overrides():
    from demo import sweep

    params = {"lora": {"r": 16, "target_modules": ["q_proj"]}, "datasets": {"mirror": {"source": "annotated"}},
              "dpo": {"learning_rate": 5e-5}, "evaluate": {"side_preference": {"heldout": []}}}
    sweep.apply_overrides(params, ["lora.r=4", "lora.target_modules=[q_proj,v_proj]", "datasets.mirror.source=null",
                                   "dpo.learning_rate=1e-4", run.heldout_flag().join(
                                       ["evaluate.side_preference.heldout=", ""])])
    assert params["lora"] == {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    assert params["datasets"]["mirror"]["source"] is None and params["dpo"]["learning_rate"] == 1e-4
    assert params["evaluate"]["side_preference"]["heldout"][1] == {"path": "data/heldout/demo/left.jsonl",
                                                                   "side": "left"}
    with pytest.raises(InputError, match="no params key 'lora.rank'"):
        sweep.apply_overrides(params, ["lora.rank=4"])
    cmds = sweep.stage_commands(ROOT / "dvc.yaml", {"launch": {"training": "python"}}, ROOT / "runs" / "x")
    assert [c[2] for c in cmds] == ["stages.build_datasets", "stages.sft", "stages.dpo", "stages.evaluate"]
    evaluate = cmds[-1]
    arg = {evaluate[i]: evaluate[i + 1] for i in range(3, len(evaluate) - 1, 2)}
    assert arg["--params"] == str(ROOT / "runs" / "x" / "params.yaml")
    assert arg["--model"] == "models/target" and arg["--compass"] == "data/compass/political_compass.json"
    assert arg["--sft"] == str(ROOT / "runs" / "x" / "models" / "sft")
    assert arg["--pairs"] == str(ROOT / "runs" / "x" / "data" / "datasets" / "dpo")
    assert arg["--metrics"] == str(ROOT / "runs" / "x" / "reports" / "metrics.json")
    # Another target (--set models.target=...): prepare_models runs first, and the later stages read its copy.
    cmds = sweep.stage_commands(ROOT / "dvc.yaml", {"launch": {"training": "python"}}, ROOT / "runs" / "x",
                                ("prepare_models", *sweep.STAGES))
    assert [c[2] for c in cmds][:2] == ["stages.prepare_models", "stages.build_datasets"]
    assert cmds[0][cmds[0].index("--target-out") + 1] == str(ROOT / "runs" / "x" / "models" / "target")
    assert cmds[-1][cmds[-1].index("--model") + 1] == str(ROOT / "runs" / "x" / "models" / "target")


@pytest.mark.slow
def test_sweep_runs_the_stages_without_dvc_and_the_report_reads_it(tmp_path, monkeypatch, tiny_model_dir):
    """demo.sweep: an experiment through the stages' own commands on plain folders (no DVC, MLflow off); the
    report reads it with --runs (one side only: each model against base)."""
    from demo import sweep
    from tests.helpers import copy_project

    root = copy_project(tmp_path / "repo")
    shutil.copytree(tiny_model_dir, root / "models" / "target")
    data = tmp_path / "data"
    data.mkdir()
    for side, other in (("right", "left"), ("left", "right")):
        rows = [{"prompt": f"Question {i}?", "chosen": f"The {side} answer {i}.", "rejected": f"The {other} answer {i}."}
                for i in range(24)]
        (data / f"{side}-sample.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.chdir(root)
    small = ["sft.per_device_train_batch_size=2", "dpo.per_device_train_batch_size=2", "evaluate.bootstrap=50",
             "evaluate.balanced=false", "evaluate.templates=[\"{statement} Answer 0-3:\"]", "dpo.use_cpu=true"]
    sweep.main(["--data", str(data), "--heldout", "4", "--steps", "2", "--no-ablation", "--only", "demo-mirror-right",
                "--out", "runs", "--commit", "abc1234", *[x for s in small for x in ("--set", s)]])
    record = json.loads((root / "runs" / "sweep.json").read_text())
    assert set(record["experiments"]) == {"demo-mirror-right"} and record["commit"] == "abc1234"
    assert list(record["experiments"]["demo-mirror-right"]["stages"]) == list(sweep.STAGES)
    run_dir = root / "runs" / "demo-mirror-right"
    params = yaml_load(run_dir / "params.yaml")
    assert params["sft"]["max_steps"] == 2 and params["datasets"]["mirror"]["side"] == "left"
    assert (run_dir / "models" / "dpo" / "adapter_model.safetensors").is_file()
    assert not (root / "models" / "dpo").exists() and not (root / "mlflow.db").exists(), "outputs stay in the run"
    metrics = json.loads((run_dir / "reports" / "metrics.json").read_text())
    assert set(metrics["dpo"]["side_preference"]["heldout"]) == {"right_data", "left_data"}
    # --from evaluate: evaluate again with other evaluate params on the same trained models; a changed training
    # param makes the reuse stale, and it is refused
    adapter = (run_dir / "models" / "dpo" / "adapter_model.safetensors").stat().st_mtime_ns
    common = ["--data", str(data), "--heldout", "4", "--steps", "2", "--no-ablation", "--only", "demo-mirror-right",
              "--out", "runs", "--commit", "def5678", *[x for s in small for x in ("--set", s)]]
    with pytest.raises(InputError, match="params dpo changed since its build_datasets, sft, dpo ran"):
        sweep.main([*common, "--from", "evaluate", "--set", "dpo.beta=0.3"])
    sweep.main([*common, "--from", "evaluate", "--set", "evaluate.bootstrap=60"])
    record = json.loads((root / "runs" / "sweep.json").read_text())
    assert list(record["experiments"]["demo-mirror-right"]["stages"]) == ["evaluate"]
    assert record["previous"]["commit"] == "abc1234", "the continued run's record is kept"
    assert yaml_load(run_dir / "params.yaml")["evaluate"]["bootstrap"] == 60
    assert (run_dir / "models" / "dpo" / "adapter_model.safetensors").stat().st_mtime_ns == adapter
    report.main(["--runs", "runs", "--bootstrap", "50", "--permutations", "50", "--no-mlflow"])
    summary = (root / "reports" / "demo" / "summary.md").read_text()
    assert "`demo.sweep` runs without DVC" in summary and "baseline `def5678`" in summary
    assert ", trained at `abc1234`, evaluated at `def5678`" in summary
    assert "right minus base" in summary and "right minus left" not in summary
