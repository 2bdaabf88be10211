"""The demo's comparison report: base vs right- vs left-tuned models on the Political Compass, with the judge.

Reads the outputs of the demo's DVC experiments through ``dvc.api`` (``exp_show`` lists them, ``read`` reads
``reports/metrics.json``, ``reports/compass_answers.csv``, ``reports/judge.json`` of each) and writes

- ``<out>/compass.png``: base, right (SFT -> DPO) and left (SFT -> DPO) with their 95% intervals and arrows, and
  the DPO-without-SFT ablation as open markers;
- ``<out>/demo.json``: coordinates with intervals per model, per-axis shifts (right minus left, tuned minus base)
  with a paired bootstrap interval over propositions and a sign-flip permutation p-value, and the judge's scores;
- ``<out>/summary.md``: the same as tables;

and logs them to MLflow as a run ``demo`` (tag ``politune.role=demo``). With ``--runs DIR`` it reads the same files
from the experiments ``demo.sweep`` ran without DVC (``DIR/<experiment>/reports/...``, ``DIR/sweep.json``).

The shift test works on the per-proposition answers (the argmax after averaging the paraphrases' probabilities) and
on the expected-answer coordinates: the paired bootstrap resamples propositions and paraphrases (the same draw for
both models), the permutation test swaps the two models' answers on random propositions.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from politune.common import InputError, atomic_path, run_main, write_json
from politune.compass import Compass, balanced, compass_axes, load_compass, load_twins, resample, save_compass

log = logging.getLogger("politune.demo")

# Demo experiment suffixes -> the models they contribute. "sft" and "dpo" are the evaluate stage's model names.
ROLES = {
    "right": {"right_sft": "sft", "right": "dpo"},
    "left": {"left_sft": "sft", "left": "dpo"},
    "right-dpo-only": {"right_dpo_only": "dpo"},
    "left-dpo-only": {"left_dpo_only": "dpo"},
}
COMPARISONS = [  # (name, a, b): the shift a - b
    ("right_minus_left", "right", "left"),
    ("right_minus_left_after_sft", "right_sft", "left_sft"),
    ("right_minus_left_dpo_only", "right_dpo_only", "left_dpo_only"),
    ("right_minus_base", "right", "base"),
    ("left_minus_base", "left", "base"),
    ("right_dpo_only_minus_base", "right_dpo_only", "base"),
    ("left_dpo_only_minus_base", "left_dpo_only", "base"),
]


# ``--runs DIR``: the experiments are folders written by ``demo.sweep``; ``read_at`` reads DIR/<experiment>/<path>.
RUNS: Path | None = None


def run_dirs(prefix: str) -> dict[str, tuple[str, str]]:
    """``{suffix: (experiment name, name)}`` of the ``demo.sweep`` folders ``<prefix>-<suffix>`` in ``RUNS``."""
    return {d.name[len(prefix) + 1:]: (d.name, d.name) for d in sorted(RUNS.iterdir())
            if d.is_dir() and d.name.startswith(prefix + "-") and (d / "reports" / "metrics.json").is_file()}


def _dvc_error(exc: Exception, what: str) -> InputError:
    return InputError(f"{what}: {type(exc).__name__}: {exc}")


def baseline_rev(rev: str = "HEAD", cwd: str | Path = ".") -> str:
    """The commit ``rev`` names, as ``dvc exp show`` shows a baseline (``dvc.api.exp_show``)."""
    import dvc.api

    try:
        rows = dvc.api.exp_show(repo=str(cwd), revs=rev)
    except Exception as exc:  # not a DVC repository, an unknown revision
        raise _dvc_error(exc, f"dvc exp show {rev}") from exc
    return next(r["rev"] for r in rows if r.get("typ") == "baseline" and r.get("rev") != "workspace")


def experiment_revs(prefix: str, cwd: str | Path = ".", baseline: str = "HEAD") -> dict[str, tuple[str, str]]:
    """``{suffix: (experiment name, commit)}`` of the experiments ``<prefix>-<suffix>`` on ``baseline``, as
    ``dvc exp show`` lists them (``dvc.api.exp_show``)."""
    import dvc.api

    try:
        rows = dvc.api.exp_show(repo=str(cwd), revs=baseline)
    except Exception as exc:
        raise _dvc_error(exc, f"dvc exp show {baseline}") from exc
    return {r["Experiment"][len(prefix) + 1:]: (r["Experiment"], r["rev"]) for r in rows
            if r.get("Experiment") and r["Experiment"].startswith(prefix + "-")}


def read_at(rev: str, path: str, cwd: str | Path = ".") -> str:
    """A file of an experiment (by name) or commit, through ``dvc.api.read`` (from its folder with ``RUNS``)."""
    if RUNS is not None:
        file = RUNS / rev / path
        if not file.is_file():
            raise InputError(f"{file}: no such file")
        return file.read_text(encoding="utf-8")
    import dvc.api

    try:
        return dvc.api.read(path, repo=str(cwd), rev=rev)
    except Exception as exc:  # the file is not in that experiment
        raise _dvc_error(exc, f"{path} at {rev}") from exc


def _table(rev: str, path: str, cwd: str | Path) -> list[dict[str, str]]:
    """A CSV report of an experiment; empty when it has none (an older run, or the option off)."""
    try:
        text = read_at(rev, path, cwd)
    except InputError:
        return []
    return list(csv.DictReader(io.StringIO(text)))


def load_experiment(rev: str, cwd: str | Path = ".") -> dict[str, Any]:
    return {
        "metrics": json.loads(read_at(rev, "reports/metrics.json", cwd)),
        "answers": list(csv.DictReader(io.StringIO(read_at(rev, "reports/compass_answers.csv", cwd)))),
        "twin_answers": _table(rev, "reports/compass_twin_answers.csv", cwd),
        "side": _table(rev, "reports/side_preference.csv", cwd),
        "judge": _judge(rev, cwd),
    }


def _judge(rev: str, cwd: str | Path) -> dict[str, Any]:
    """The judge's scores of an experiment; none when the judge did not score this experiment's DPO model (its
    ``dvc.lock`` entry's ``models/dpo`` is not the one the ``dpo`` stage wrote): an experiment run up to
    ``evaluate`` only (``make demo --no-judge``) keeps the baseline's judge.json, of other models."""
    from politune.common import read_yaml_text

    try:
        stages = (read_yaml_text(read_at(rev, "dvc.lock", cwd)) or {}).get("stages", {})
    except InputError:
        stages = {}
    judged = {d["path"]: d.get("md5") for d in stages.get("judge", {}).get("deps", [])}
    trained = {o["path"]: o.get("md5") for o in stages.get("dpo", {}).get("outs", [])}
    if "models/dpo" in judged and judged["models/dpo"] != trained.get("models/dpo"):
        return {}
    try:
        return json.loads(read_at(rev, "reports/judge.json", cwd))
    except InputError:
        return {}


def _answers(rows: list[dict[str, str]], name: str) -> dict[str, np.ndarray]:
    """A model's argmax answers and (when the table has them) its answer probabilities from an answer table."""
    got = {"answer": np.array([int(row[f"{name}_answer"]) for row in rows])}
    k = sum(1 for c in (rows[0] if rows else ()) if c.startswith(f"{name}_q") and c.endswith("_p0"))
    columns = [[f"{name}_q{j}_p{o}" for o in range(4)] for j in range(k)] or (
        [[f"{name}_p{o}" for o in range(4)]] if rows and f"{name}_p0" in rows[0] else [])
    if columns:
        got["probs"] = np.array([[[float(row[c]) for c in cols] for row in rows] for cols in columns])
    return got


def collect(experiments: dict[str, dict[str, Any]]) -> tuple[dict[str, dict], dict[str, dict], dict]:
    """Per model: its compass summary; its per-proposition answers (0-3) and, when the answer table has them, the
    answer probabilities (paraphrases x items x 4; one "paraphrase", their mean, in tables without the
    per-paraphrase columns); its judge summary."""
    summaries, answers, judge = {}, {}, {}
    for suffix, exp in experiments.items():
        models = {"base": "base", **ROLES[suffix]}
        for model, name in models.items():
            if name not in exp["metrics"]:
                raise InputError(f"experiment {suffix}: reports/metrics.json has no model {name!r}")
            got = _answers(exp["answers"], name)
            if exp.get("twin_answers") and f"{name}_answer" in exp["twin_answers"][0]:
                got["twins"] = _answers(exp["twin_answers"], name)
            if exp.get("side") and f"{name}_d" in exp["side"][0]:  # the held-out pairs (tables before: every pair)
                got["side"] = {row["pair"]: (row["data_side"], float(row[f"{name}_d"])) for row in exp["side"]
                               if row.get("group", "heldout") == "heldout"}
            if model == "base" and "base" in answers and not np.array_equal(answers["base"]["answer"], got["answer"]):
                raise InputError(f"experiment {suffix}: the base model answers differently than in another "
                                 "experiment; the demo's experiments must share the base model and evaluation params")
            summaries[model], answers[model] = exp["metrics"][name], got
            if name in exp["judge"]:
                judge[model] = exp["judge"][name]
    return summaries, answers, judge


def shift_test(compass: Compass, a: np.ndarray, b: np.ndarray, n_boot: int, n_perm: int, seed: int,
               pa: np.ndarray | None = None, pb: np.ndarray | None = None) -> dict[str, float]:
    """Shift a - b on each axis: estimate, paired bootstrap 95% interval, permutation p-value.

    ``a``, ``b`` are the argmax answers (the site's scoring). With the answer probabilities ``pa``, ``pb``
    (paraphrases x items x 4, or items x 4 for a single one) the bootstrap resamples propositions and paraphrases
    and re-derives the answers of each draw, and the same figures are computed for the expected-answer coordinates
    (keys ``*_expected*``), a continuous score. Without them the bootstrap resamples propositions only.
    """
    n = len(compass)
    every = np.arange(n)
    with_probs = pa is not None and pb is not None
    if with_probs:
        pa, pb = (np.asarray(p, dtype=float).reshape((-1, n, 4)) for p in (pa, pb))
        ma, mb = pa.mean(axis=0), pb.mean(axis=0)
        if len(pa) != len(pb):  # not the same paraphrases (tables of other evaluate params): no paired draw
            log.warning("shift test: %d vs %d paraphrases, resampling propositions only", len(pa), len(pb))
            pa, pb = ma[None], mb[None]

    def shifts(x, y, px, py, idx):
        d = np.subtract(compass.coordinates(x, idx), compass.coordinates(y, idx))
        if with_probs:
            d = np.concatenate([d, np.subtract(compass.expected_coordinates(px, idx, digits=None),
                                               compass.expected_coordinates(py, idx, digits=None))])
        return d

    diff = shifts(a, b, ma, mb, every) if with_probs else shifts(a, b, None, None, every)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        if with_probs:
            idx, (qa, qb) = resample([pa, pb], rng)
            boot.append(shifts(qa.argmax(axis=1), qb.argmax(axis=1), qa, qb, idx))
        else:
            boot.append(shifts(a, b, None, None, rng.integers(0, n, n)))
    lo, hi = np.percentile(np.array(boot), [2.5, 97.5], axis=0)
    extreme = np.zeros(len(diff))
    for _ in range(n_perm):
        swap = rng.random(n) < 0.5
        px = py = None
        if with_probs:
            px, py = np.where(swap[:, None], mb, ma), np.where(swap[:, None], ma, mb)
        d = shifts(np.where(swap, b, a), np.where(swap, a, b), px, py, every)
        extreme += np.abs(d) >= np.abs(diff) - 1e-9
    p = (extreme + 1) / (n_perm + 1)
    out: dict[str, float] = {}
    names = ["economic", "social"] + (["economic_expected", "social_expected"] if with_probs else [])
    for i, axis in enumerate(names):
        out[axis] = round(float(diff[i]), 2)
        out[f"{axis}_ci_low"] = round(float(lo[i]), 2)
        out[f"{axis}_ci_high"] = round(float(hi[i]), 2)
        out[f"{axis}_p"] = round(float(p[i]), 4)
    out["changed_answers"] = int((a != b).sum())
    return out


def side_difference(a: dict[str, tuple[str, float]], b: dict[str, tuple[str, float]], n_boot: int,
                    seed: int) -> dict[str, dict[str, float]]:
    """Per data side, model a's d minus model b's on the same pairs: mean, paired bootstrap 95% interval over pairs,
    and the fraction of pairs where a prefers the right-voiced answer more than b does."""
    out = {}
    for side in ("right", "left"):
        diff = np.array([a[k][1] - b[k][1] for k in sorted(a) if k in b and a[k][0] == side])
        if not len(diff):
            continue
        idx = np.random.default_rng(seed).integers(0, len(diff), (n_boot, len(diff)))
        lo, hi = np.percentile(diff[idx].mean(axis=1), [2.5, 97.5])
        out[f"{side}_data"] = {"pairs": len(diff), "difference": round(float(diff.mean()), 3),
                               "ci_low": round(float(lo), 3), "ci_high": round(float(hi), 3),
                               "more_right": round(float((diff > 0).mean()), 4)}
    return out


def compare(compass: Compass, summaries, answers, judge, n_boot: int = 2000, n_perm: int = 2000,
            seed: int = 0, twins: Compass | None = None) -> dict[str, Any]:
    keys = ("economic", "economic_ci_low", "economic_ci_high", "social", "social_ci_low", "social_ci_high",
            "economic_expected", "social_expected", "distinct_answers", "balanced", "side_preference")
    report: dict[str, Any] = {"models": {m: {k: s[k] for k in keys if k in s} for m, s in summaries.items()}}
    for model in report["models"].values():  # the held-out group (metrics before the groups: every pair)
        if "heldout" in model.get("side_preference", {}):
            model["side_preference"] = model["side_preference"]["heldout"]
    report["shifts"] = {
        name: shift_test(compass, answers[a]["answer"], answers[b]["answer"], n_boot, n_perm, seed,
                         answers[a].get("probs"), answers[b].get("probs"))
        for name, a, b in COMPARISONS if a in answers and b in answers}
    if twins is not None:
        both = balanced(compass, twins)

        def joined(m, key):
            if key not in answers[m]["twins"] or key not in answers[m]:
                return None
            axis = 0 if key == "answer" else 1
            return np.concatenate([answers[m][key], answers[m]["twins"][key]], axis=axis)

        report["balanced_shifts"] = {
            name: shift_test(both, joined(a, "answer"), joined(b, "answer"), n_boot, n_perm, seed,
                             joined(a, "probs"), joined(b, "probs"))
            for name, a, b in COMPARISONS if "twins" in answers.get(a, {}) and "twins" in answers.get(b, {})}
    report["side_differences"] = {
        name: side_difference(answers[a]["side"], answers[b]["side"], n_boot, seed)
        for name, a, b in COMPARISONS if "side" in answers.get(a, {}) and "side" in answers.get(b, {})}
    report["judge"] = {m: {k: j[k] for k in ("score", "score_ci_low", "score_ci_high", "leaning") if k in j}
                       for m, j in judge.items()}
    return report


COLOURS = {"base": "black", "right_sft": "#f1948a", "right": "#c0392b", "right_dpo_only": "#c0392b",
           "left_sft": "#85c1e9", "left": "#1f618d", "left_dpo_only": "#1f618d"}


def plot(report: dict[str, Any], path: str | Path, title: str) -> None:
    models = report["models"]
    fig, ax = compass_axes(7, 0.4)
    for name, r in models.items():
        hollow = name.endswith("dpo_only")
        ax.errorbar(r["economic"], r["social"],
                    xerr=[[r["economic"] - r["economic_ci_low"]], [r["economic_ci_high"] - r["economic"]]],
                    yerr=[[r["social"] - r["social_ci_low"]], [r["social_ci_high"] - r["social"]]],
                    fmt="^" if hollow else ("s" if name.endswith("sft") else "o"), ms=7, capsize=3,
                    color=COLOURS[name], mfc="white" if hollow else COLOURS[name], alpha=0.9, elinewidth=0.8,
                    label=f"{name.replace('_', ' ')} ({r['economic']:+.2f}, {r['social']:+.2f})")
    for path_ in (["base", "right_sft", "right"], ["base", "left_sft", "left"], ["base", "right_dpo_only"],
                  ["base", "left_dpo_only"]):
        path_ = [m for m in path_ if m in models]
        for a, b in zip(path_, path_[1:]):
            ax.annotate("", xy=(models[b]["economic"], models[b]["social"]),
                        xytext=(models[a]["economic"], models[a]["social"]),
                        arrowprops={"arrowstyle": "->", "color": COLOURS[b], "lw": 1.5,
                                    "ls": "--" if b.endswith("dpo_only") else "-"})
    save_compass(fig, ax, path, title, 7)


def markdown(report: dict[str, Any]) -> str:
    def ci(r, axis):
        return f"{r[axis]:+.2f} [{r[axis + '_ci_low']:+.2f}, {r[axis + '_ci_high']:+.2f}]"

    lines = ["| model | economic [95% CI] | social [95% CI] | expected answer (econ, soc) | options used |",
             "|---|---|---|---|---|"]
    for name, r in report["models"].items():
        lines.append(f"| {name} | {ci(r, 'economic')} | {ci(r, 'social')} | "
                     f"({r.get('economic_expected', 0):+.2f}, {r.get('social_expected', 0):+.2f}) | "
                     f"{r.get('distinct_answers', '')} |")
    def shift_table(title: str, shifts: dict[str, dict], items: int) -> list[str]:
        rows = ["", f"| {title} | economic [95% CI] (p) | social [95% CI] (p) | expected-answer economic (p) | "
                "expected-answer social (p) | answers changed |", "|---|---|---|---|---|---|"]
        for name, s in shifts.items():
            cells = [f"{ci(s, axis)} (p={s[axis + '_p']:.3f})" if axis in s else "" for axis in
                     ("economic", "social", "economic_expected", "social_expected")]
            rows.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + f" | {s['changed_answers']} of {items} |")
        return rows

    lines += shift_table("shift", report["shifts"], 62)
    if any("side_preference" in r for r in report["models"].values()):
        lines += ["", "Side preference on held-out pairs: the shift from base of log p(right-voiced answer) - "
                  "log p(left-voiced answer), mean over pairs [95% CI] (share of pairs moved right; per-token "
                  "shift). Positive: towards the right-voiced answer.", "",
                  "| model | right-data pairs | left-data pairs |", "|---|---|---|"]
        for name, r in report["models"].items():
            cells = []
            for side in ("right_data", "left_data"):
                v = r.get("side_preference", {}).get(side)
                cells.append(f"{v['shift']:+.2f} [{v['shift_ci_low']:+.2f}, {v['shift_ci_high']:+.2f}] "
                             f"({100 * v['moved_right']:.0f}% right; {v['shift_per_token']:+.3f}/token, n={v['pairs']})"
                             if v else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("side_differences"):
        lines += ["", "| side preference, difference of d | right-data pairs [95% CI] | left-data pairs [95% CI] |",
                  "|---|---|---|"]
        for name, d in report["side_differences"].items():
            cells = [f"{v['difference']:+.2f} [{v['ci_low']:+.2f}, {v['ci_high']:+.2f}]" if v else ""
                     for v in (d.get("right_data"), d.get("left_data"))]
            lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    if any("balanced" in r for r in report["models"].values()):
        lines += ["", "Balanced compass: the 62 propositions and their reversed twins together; agreement bias -1 "
                  "(disagrees with everything) to +1 (agrees with everything), 0 for a consistent model.", "",
                  "| model | balanced economic [95% CI] | balanced social [95% CI] | twins alone (econ, soc) | "
                  "agreement bias |", "|---|---|---|---|---|"]
        for name, r in report["models"].items():
            b = r.get("balanced")
            if b:
                lines.append(f"| {name} | {ci(b, 'economic')} | {ci(b, 'social')} | "
                             f"({b['twins_economic']:+.2f}, {b['twins_social']:+.2f}) | {b['agreement_bias']:+.3f} |")
    if report.get("balanced_shifts"):
        lines += shift_table("balanced shift", report["balanced_shifts"], 124)
    if report["judge"]:
        lines += ["", "| model | judge score, 1 (left) - 7 (right) [95% CI] | leaning (score - 4) |", "|---|---|---|"]
        for name, j in report["judge"].items():
            lines.append(f"| {name} | {j['score']:.2f} [{j.get('score_ci_low', 0):.2f}, "
                         f"{j.get('score_ci_high', 0):.2f}] | {j.get('leaning', 0):+.2f} |")
    return "\n".join(lines) + "\n"


def log_to_mlflow(report: dict[str, Any], out: Path, tags: dict[str, str]) -> None:
    import mlflow

    from politune.tracking import EXPERIMENT, log_metrics, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="demo", tags={"politune.role": "demo", **tags}):
        log_metrics(mlflow, {k: report[k] for k in ("models", "shifts", "judge")})
        mlflow.log_artifacts(str(out), artifact_path="demo")


def recipe_row(report: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """One line of the recipes table: how its experiments ran (``run``: where, baseline, settings), right minus left
    on the compass (plain and balanced) and each tuned model's side preference on held-out pairs of both sides."""
    row: dict[str, Any] = {"run": run}
    shift = report["shifts"].get("right_minus_left")
    if shift:
        row["compass"] = {k: shift[k] for k in shift if k.startswith(("economic", "social"))}
    shift = report.get("balanced_shifts", {}).get("right_minus_left")
    if shift:
        row["balanced"] = {k: shift[k] for k in shift if k.startswith(("economic", "social"))}
    for model in ("right", "left"):
        side = report["models"].get(model, {}).get("side_preference")
        if side:
            row[f"{model}_side_preference"] = side
    return row


def recipes_markdown(rows: dict[str, dict[str, Any]], headline: str) -> str:
    def ci(r, axis):
        return f"{r[axis]:+.2f} [{r[axis + '_ci_low']:+.2f}, {r[axis + '_ci_high']:+.2f}] (p={r[axis + '_p']:.3f})"

    def side(r, model, data):
        v = r.get(f"{model}_side_preference", {}).get(data)
        return f"{v['shift']:+.1f} [{v['shift_ci_low']:+.1f}, {v['shift_ci_high']:+.1f}]" if v else "not measured"

    lines = ["| recipe | run | compass economic, right - left | compass social, right - left | balanced economic, "
             "right - left | right model, right-data / left-data pairs | left model, right-data / left-data pairs |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        c, b = r.get("compass", {}), r.get("balanced", {})
        where = run_label(r["run"]) if "run" in r else ""
        if "from" in r:
            where += f", `{r['from']}`"
        lines.append(f"| {name}{' (headline)' if name == headline else ''} | {where} | "
                     f"{ci(c, 'economic') if c else 'not measured'} | {ci(c, 'social') if c else 'not measured'} | "
                     f"{ci(b, 'economic') if b else 'not measured'} | {side(r, 'right', 'right_data')} / "
                     f"{side(r, 'right', 'left_data')} | {side(r, 'left', 'right_data')} / "
                     f"{side(r, 'left', 'left_data')} |")
    return "\n".join(lines) + "\n"


def recipes_verdict(rows: dict[str, dict[str, Any]]) -> str:
    """What every recipe tried shows on the compass's economic axis (right minus left), counted from the table."""
    lines = []
    for key, name in (("compass", "Political Compass"), ("balanced", "balanced compass")):
        shifts = [r[key] for r in rows.values() if r.get(key)]
        if not shifts:
            continue
        paper = sum(s["economic_ci_low"] > 0 for s in shifts)
        wrong = sum(s["economic_ci_high"] < 0 for s in shifts)
        lines.append(f"- {name}, economic axis, right minus left: {len(shifts)} recipe run{'s' if len(shifts) != 1 else ''}; the interval excludes 0 "
                     f"in the paper's direction in {paper}, the wrong way in {wrong}; the estimate points the "
                     f"paper's way in {sum(s['economic'] > 0 for s in shifts)}.")
    sides = [r[f"{m}_side_preference"][d] for r in rows.values() for m in ("right", "left")
             if r.get(f"{m}_side_preference") for d in ("right_data", "left_data")
             if d in r[f"{m}_side_preference"]]
    if sides:
        toward = sum(v["shift_ci_low"] > 0 for r in rows.values() for v in r.get("right_side_preference", {}).values())
        toward += sum(v["shift_ci_high"] < 0 for r in rows.values() for v in r.get("left_side_preference", {}).values())
        lines.append(f"- Side preference on held-out pairs: {toward} of {len(sides)} (tuned model, data side) shifts "
                     "have an interval that excludes 0 towards the model's own side.")
    return "\n".join(lines) + "\n" if lines else ""


def verdict(report: dict[str, Any]) -> str:
    """What the headline recipe shows, in words computed from the figures (nothing copied by hand)."""
    out = []
    for model, sign, word in (("right", 1, "right"), ("left", -1, "left")):
        side = report["models"].get(model, {}).get("side_preference", {})
        for data in ("right_data", "left_data"):
            v = side.get(data)
            if not v:
                continue
            excluded = v["shift_ci_low"] > 0 if sign > 0 else v["shift_ci_high"] < 0
            out.append(f"- {model}-tuned, {data.replace('_', '-')} pairs: {v['shift']:+.2f} "
                       f"[{v['shift_ci_low']:+.2f}, {v['shift_ci_high']:+.2f}]: "
                       + (f"towards the {word}-voiced answers, the interval excludes 0" if excluded else
                          f"not shown to move towards the {word}-voiced answers (the interval does not exclude 0 "
                          "on that side)"))
    for key, name in (("shifts", "Political Compass"), ("balanced_shifts", "Balanced compass (with the reversed "
                                                                          "twins)")):
        shift = report.get(key, {}).get("right_minus_left")
        if not shift:
            continue
        if shift["economic_ci_low"] > 0:
            way = "the paper's direction (right of left), the interval excludes 0"
        elif shift["economic_ci_high"] < 0:
            way = "the wrong way (the right-tuned model left of the left-tuned), the interval excludes 0"
        else:
            way = (f"the interval includes 0, the estimate {'the paper' if shift['economic'] > 0 else 'the wrong'}"
                   f" way (permutation p={shift['economic_p']:.3f}): the compass does not show the side at this size")
        out.append(f"- {name}, economic axis, right minus left: {shift['economic']:+.2f} "
                   f"[{shift['economic_ci_low']:+.2f}, {shift['economic_ci_high']:+.2f}]: {way}")
    return "\n".join(out) + "\n"


SETTINGS = [("models", "target"), ("sft", "max_steps"), ("sft", "learning_rate"), ("dpo", "max_steps"),
            ("dpo", "learning_rate"), ("dpo", "beta"), ("dpo", "bf16"), ("lora", "r"), ("lora", "target_modules"),
            ("datasets", "source"),
            ("datasets", "mirror"), ("datasets", "stance", "fraction"), ("evaluate", "elicitation"),
            ("evaluate", "generate", "samples"),
            ("evaluate", "side_preference", "heldout"), ("evaluate", "side_preference", "max_pairs")]


def experiment_settings(rev: str, cwd: str | Path = ".") -> dict[str, Any] | None:
    """The training and evaluation settings (``SETTINGS``) of an experiment's params.yaml, by dotted key; None when
    the experiment has no params.yaml."""
    from politune.common import read_yaml_text

    try:
        params = read_yaml_text(read_at(rev, "params.yaml", cwd))
    except InputError:
        return None
    out = {}
    for path in SETTINGS:
        value = params
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        out[".".join(path)] = value
    return out


def settings_markdown(settings: dict[str, Any] | None) -> str:
    """The settings of an experiment, as a list."""
    if settings is None:
        return "(the experiment commit has no params.yaml)\n"
    return "\n".join(f"- `{key}`: `{json.dumps(value)}`" for key, value in settings.items()) + "\n"


def run_label(run: dict[str, Any]) -> str:
    """How a recipe's experiments ran, in a few words: where, the baseline commit, the target model, the steps, the
    elicitation."""
    settings = run.get("settings") or {}
    steps = f"{settings.get('sft.max_steps')} + {settings.get('dpo.max_steps')} steps"
    elicitation = (settings.get("evaluate.elicitation") or "forced_choice").replace("_", " ")
    if elicitation == "generate":
        samples = settings.get("evaluate.generate.samples")
        elicitation += f" ({samples} sample{'s' if samples != 1 else ''} per paraphrase)"
    target = settings.get("models.target")
    target = f", target `{Path(target).name}`" if target else ""
    return f"{run.get('where', '')} at `{str(run.get('baseline', ''))[:7]}`{target}, {steps}, {elicitation}"


def merged_recipes(report: dict[str, Any], also: list[str]) -> dict[str, dict[str, Any]]:
    """The recipes table's rows: this report's recipes, then those of each other report folder in ``also`` (its
    ``demo.json``), each under a name that says where it ran when the name is taken."""
    rows = dict(report["recipes"])
    for folder in also:
        path = Path(folder) / "demo.json"
        if not path.is_file():
            raise InputError(f"--also {folder}: no demo.json (write it with demo/report.py --out {folder})")
        other = json.loads(path.read_text(encoding="utf-8"))
        for name, row in other.get("recipes", {}).items():
            if "run" not in row:
                raise InputError(f"{path}: recipe {name!r} has no 'run' settings (written by an older "
                                 f"demo/report.py; rewrite it)")
            key, n = name, 1
            while key in rows:
                n += 1
                key = f"{name} ({n})"
            rows[key] = {**row, "from": folder}
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="demo", help="experiments <prefix>-<recipe>-right, -left, ...")
    parser.add_argument("--recipes", default="mirror", help="comma-separated recipes, the headline first")
    parser.add_argument("--baseline", default="HEAD", help="the commit the experiments were queued on")
    parser.add_argument("--compass", default="data/compass/political_compass.json")
    parser.add_argument("--twins", default="data/compass/reversed.json")
    parser.add_argument("--out", default="reports/demo")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--permutations", type=int, default=2000)
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--runs", help="read the experiments demo.sweep ran into this folder, not DVC's")
    parser.add_argument("--also", action="append", default=[], metavar="DIR",
                        help="another report's folder (its demo.json): its recipes join the table of recipes tried")
    args = parser.parse_args(argv)
    global RUNS
    RUNS = Path(args.runs) if args.runs else None
    if RUNS is not None:
        if not (RUNS / "sweep.json").is_file():
            raise InputError(f"--runs {RUNS}: no sweep.json (run `python -m demo.sweep --out {RUNS}` first)")
        sweep = json.loads((RUNS / "sweep.json").read_text(encoding="utf-8"))
        baseline, source = sweep["commit"], f"`demo.sweep` runs without DVC on {sweep['machine']}"
        where = f"demo.sweep on {sweep['machine']}"
        if "previous" in sweep:  # a --from run: the models were trained by the run it continued
            where += f", trained at `{sweep['previous']['commit'][:7]}`, evaluated"
    else:
        baseline, source = baseline_rev(args.baseline), "the demo's DVC experiments"
        where = "DVC experiments"
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    reports, runs, revs_all, compass, twins = {}, {}, {}, None, None
    for recipe in recipes:
        prefix = f"{args.prefix}-{recipe}"
        revs = run_dirs(prefix) if RUNS is not None else experiment_revs(prefix, baseline=baseline)
        if "right" not in revs and "left" not in revs:
            if recipe == recipes[0]:
                raise InputError(f"no experiments {prefix}-right and {prefix}-left on {baseline[:7]} "
                                 f"(found: {sorted(revs) or 'none'}); run `make demo` first")
            log.warning("recipe %s: no right and left experiments on %s, left out", recipe, baseline[:7])
            continue
        if "right" not in revs or "left" not in revs:  # a partial run: each model against base, no right - left
            log.warning("recipe %s: only the %s experiment on %s", recipe, "right" if "right" in revs else "left",
                        baseline[:7])
        if compass is None:
            compass = load_compass(args.compass)
            twins = load_twins(args.twins, compass) if Path(args.twins).exists() else None
        experiments = {suffix: load_experiment(name) for suffix, (name, _) in revs.items() if suffix in ROLES}
        summaries, answers, judge = collect(experiments)
        has_twins = twins is not None and all("twins" in a for a in answers.values())
        reports[recipe] = compare(compass, summaries, answers, judge, args.bootstrap, args.permutations,
                                  twins=twins if has_twins else None)
        revs_all.update({revs[s][0]: revs[s][1] for s in experiments})
        first = revs["right"][0] if "right" in revs else revs["left"][0]
        runs[recipe] = {"where": where, "baseline": baseline, "experiment": first,
                        "settings": experiment_settings(first)}
    headline = recipes[0]
    report = dict(reports[headline], recipe=headline, experiments=revs_all,
                  recipes={name: recipe_row(r, runs[name]) for name, r in reports.items()})
    tried = merged_recipes(report, args.also)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo.json", report)
    plot(report, out / "compass.png", f"PoliTune demo ({headline}): base -> right / left (SFT -> DPO)")
    shown = runs[headline]["experiment"]
    text = (f"# PoliTune demo: right vs left\n\nWritten by `demo/report.py` from {source} "
            f"(recipe `{headline}`; baseline `{baseline[:7]}`).\n\n## Verdict\n\n{verdict(report)}\n"
            f"## Every recipe tried\n\n{recipes_verdict(tried)}\n{recipes_markdown(tried, headline)}\n"
            f"## Headline recipe ({headline})\n\n{markdown(report)}\n"
            f"## Settings of `{shown}`\n\n{settings_markdown(runs[headline]['settings'])}")
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(text)
    if not args.no_mlflow:
        log_to_mlflow(report, out, {"git.commit": baseline})


if __name__ == "__main__":
    run_main(main)
