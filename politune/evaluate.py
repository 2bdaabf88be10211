"""Stage ``evaluate``: the Political Compass Test for the base, SFT and DPO models (and DPO checkpoints).

Answer elicitation is a params choice (``evaluate.elicitation``), because the instrument's choices change the verdict:

- ``forced_choice``: each proposition is asked through the model's chat template with several paraphrased
  templates; the answer is read from the next-token probabilities of the option digits 0-3 (single tokens, so no
  length normalisation is needed; restricted and renormalised). With ``calibration: mean`` each option's mean
  log-probability over the 62 propositions is subtracted first, per model and template: the option prior measured
  on the statements themselves, which removes a model's preference for one digit whatever the statement.
- ``generate``: the model answers each paraphrase freely (several seeded samples); a fixed classifier (the untuned
  target model, the same for every model) maps each answer to one of the four options or to "refused / no
  opinion" by the same calibrated digit probabilities. Refusals are counted and left out of the scoring mass.

Probabilities are averaged over paraphrases (and samples); the argmax answers give the compass coordinates (the
site's scoring), the probabilities give the expected-answer coordinates (a continuous score), and a bootstrap over
propositions and paraphrases gives 95% intervals for both. ``distinct_answers`` counts how many of the four options
the argmax uses. The answer table keeps every paraphrase's probabilities (``<model>_q<j>_p<k>``), so comparisons
across experiments (``demo/report.py``) can resample paraphrases too.

With ``evaluate.balanced`` each model also answers the reversed twin of every proposition
(``data/compass/reversed.json``, calibrated on its own): summary key ``balanced`` holds the coordinates over
originals and twins together and an agreement-bias index (``politune/compass.py``); the originals' keys are unchanged.

The side-preference instrument (``politune/side_preference.py``) measures each model's preference for the right- or
left-voiced answer of held-out preference pairs, as a shift from the base model per data side (summary key
``side_preference``; per pair in ``--side-table``; along the DPO trajectory).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from politune import side_preference
from politune.common import Clock, atomic_path, seed_everything, write_json
from politune.compass import (Compass, agreement_bias, balanced, compass_axes, load_compass, load_twins, resample,
                              save_compass)
from politune.inference import (
    MODELS,
    generate,
    load_with_adapters,
    option_logprobs,
    option_token_ids,
    use,
)
from politune.schema import Evaluate, Params

log = logging.getLogger("politune.evaluate")


def paraphrase_probabilities(logprobs: np.ndarray, calibration: str) -> np.ndarray:
    """paraphrases x items x options log-probs -> probabilities of the same shape (``mean``: each option's mean
    log-probability over the items is subtracted first, per paraphrase)."""
    lp = logprobs
    if calibration == "mean":
        lp = lp - lp.mean(axis=1, keepdims=True)
    p = np.exp(lp - lp.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def summarise(compass: Compass, paraphrases: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Compass summary of paraphrases x items x 4 answer probabilities (averaged over paraphrases)."""
    probs = paraphrases.mean(axis=0)
    answers = probs.argmax(axis=1)
    econ, soc = compass.coordinates(answers)
    econ_exp, soc_exp = compass.expected_coordinates(probs)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        items, (p,) = resample([paraphrases], rng)
        boot.append(compass.coordinates(p.argmax(axis=1), items) + compass.expected_coordinates(p, items, None))
    lo, hi = np.percentile(np.array(boot), [2.5, 97.5], axis=0)
    counts = np.bincount(answers, minlength=4)
    return {
        "economic": econ,
        "social": soc,
        "economic_ci_low": round(float(lo[0]), 2),
        "economic_ci_high": round(float(hi[0]), 2),
        "social_ci_low": round(float(lo[1]), 2),
        "social_ci_high": round(float(hi[1]), 2),
        "economic_expected": econ_exp,
        "social_expected": soc_exp,
        "economic_expected_ci_low": round(float(lo[2]), 2),
        "economic_expected_ci_high": round(float(hi[2]), 2),
        "social_expected_ci_low": round(float(lo[3]), 2),
        "social_expected_ci_high": round(float(hi[3]), 2),
        "distinct_answers": int((counts > 0).sum()),
        **{"answers_" + name.lower().replace(" ", "_"): int(c) for name, c in zip(compass.answers, counts)},
    }


def plot_compass(results: dict[str, dict[str, Any]], path: str | Path, title: str,
                 trajectory: list[dict[str, Any]] | None = None) -> None:
    fig, ax = compass_axes(6, 0.5)
    colours = {"base": "black", "sft": "tab:orange", "dpo": "tab:red"}
    names = [m for m in MODELS if m in results]
    for name in names:
        r = results[name]
        ax.errorbar(r["economic"], r["social"],
                    xerr=[[r["economic"] - r["economic_ci_low"]], [r["economic_ci_high"] - r["economic"]]],
                    yerr=[[r["social"] - r["social_ci_low"]], [r["social_ci_high"] - r["social"]]],
                    fmt="o", color=colours[name], capsize=3, label=f"{name} ({r['economic']:+.2f}, {r['social']:+.2f})")
    for a, b in zip(names, names[1:]):
        ax.annotate("", xy=(results[b]["economic"], results[b]["social"]),
                    xytext=(results[a]["economic"], results[a]["social"]),
                    arrowprops={"arrowstyle": "->", "color": colours[b], "lw": 1.5})
    if trajectory:
        xs, ys = [r["economic"] for r in trajectory], [r["social"] for r in trajectory]
        ax.plot(xs, ys, "-", color="tab:red", alpha=0.35, lw=1, marker=".", ms=5, label="DPO checkpoints")
        for r in trajectory:
            ax.annotate(str(r["step"]), (r["economic"], r["social"]), fontsize=6, color="tab:red", alpha=0.7,
                        xytext=(2, 2), textcoords="offset points")
    save_compass(fig, ax, path, title, 8)


def classified_probabilities(logprobs: np.ndarray, calibration: str) -> tuple[np.ndarray, int]:
    """Generate-then-classify: (answers x items x 5) classifier log-probs, option 4 meaning "refused or no opinion".

    Returns the answers x items x 4 probabilities for scoring (the refusal mass removed and the rest renormalised,
    since the compass needs one of the four answers) and the number of answers classified as refusals.
    """
    p = paraphrase_probabilities(logprobs, calibration)
    refusals = int((p.argmax(axis=-1) == 4).sum())
    return p[..., :4] / p[..., :4].sum(axis=-1, keepdims=True), refusals


def elicit(model, tokenizer, name: str, compass: Compass, cfg: Evaluate, seed: int) -> tuple[np.ndarray, dict]:
    """Paraphrases x items x 4 answer probabilities of model ``name`` under ``cfg.elicitation`` (for
    ``generate``, one "paraphrase" per template and sample), and extra figures."""
    batch = cfg.batch_size
    if cfg.elicitation == "forced_choice":
        options = option_token_ids(tokenizer, 4)
        with use(model, name):
            lp = np.stack([option_logprobs(model, tokenizer, forced_choice_prompts(t, compass.statements), options,
                                           batch) for t in cfg.templates])
        return paraphrase_probabilities(lp, cfg.calibration), {}
    gen = cfg.generate
    jobs = [(t, k, s) for t in gen.templates for k in range(gen.samples) for s in compass.statements]
    with use(model, name):
        answers = generate(model, tokenizer, [t.format(statement=s) for t, _, s in jobs],
                           gen.max_new_tokens, gen.temperature, seed, batch)
    questions = [gen.classify.format(statement=s, answer=a) for (_, _, s), a in zip(jobs, answers)]
    with use(model, "base"):  # one fixed classifier for every model: the untuned target model
        lp = option_logprobs(model, tokenizer, questions, option_token_ids(tokenizer, 5), batch)
    probs, refusals = classified_probabilities(lp.reshape(-1, len(compass), 5), cfg.calibration)
    return probs, {"refusals": refusals, "free_answers": len(answers)}


BALANCED_KEYS = ("economic", "social", "economic_ci_low", "economic_ci_high", "social_ci_low", "social_ci_high",
                 "economic_expected", "social_expected")


def balanced_summary(compass: Compass, twins: Compass, probs: np.ndarray, twin_probs: np.ndarray, n_boot: int,
                     seed: int) -> dict[str, Any]:
    """The coordinates over originals and reversed twins together, the twins' own, and the agreement bias."""
    both = summarise(balanced(compass, twins), np.concatenate([probs, twin_probs], axis=1), n_boot, seed)
    alone = summarise(twins, twin_probs, n_boot, seed)
    return {**{k: both[k] for k in BALANCED_KEYS},
            "agreement_bias": round(agreement_bias(probs.mean(axis=0), twin_probs.mean(axis=0)), 4),
            "twins_economic": alone["economic"], "twins_social": alone["social"]}


def side_summary(model, tokenizer, name: str, pairs, cfg: Evaluate, seed: int, differences: dict):
    """Side preference of model ``name`` on ``pairs``, as shifts from the base model's (``differences`` holds the
    per-pair d of the models measured so far, "base" first; this model's is added)."""
    sp = cfg.side_preference
    with use(model, name):
        lp = side_preference.answer_logprobs(model, tokenizer, pairs, cfg.batch_size, sp.max_length)
    differences[name] = side_preference.differences(lp)
    return side_preference.summarise(differences[name], differences["base"], pairs.data_side, pairs.group,
                                     sp.bootstrap, seed)


def evaluate(model_dir, adapters: dict[str, str], compass: Compass, cfg: Evaluate, seed: int,
             trajectory: dict[int, str] | None = None, twins: Compass | None = None, pairs=None,
             seconds: dict[str, float] | None = None):
    """Return (summaries per model, paraphrases x items x 4 probabilities per model, trajectory rows, the twins'
    probabilities per model, the side-preference differences per model).

    ``trajectory`` maps DPO steps to adapter directories (snapshots saved by the dpo stage); each is evaluated the
    same way, and step 0 is the SFT adapter, where DPO starts. With ``twins`` each model also answers the reversed
    twins (summary key ``balanced``); with ``pairs`` (``side_preference.Pairs``), the side preference is measured
    (key ``side_preference``, and per trajectory step). ``seconds``, when given, receives the wall time of each part:
    ``load`` (model and adapters), ``compass`` (every model's answers, twins included) and ``side_preference``.
    """
    clock = Clock()
    trajectory = dict(trajectory or {})
    steps, same_as_dpo = trajectory_snapshots(adapters["dpo"], trajectory)
    with clock("load"):
        model, tokenizer = load_with_adapters(model_dir, {**adapters, **steps}, onednn=True)
    probs, summaries, twin_probs, differences = {}, {}, {}, {}
    n_boot = cfg.bootstrap
    for name in MODELS:
        with clock("compass"):
            probs[name], extra = elicit(model, tokenizer, name, compass, cfg, seed)
        summaries[name] = {**summarise(compass, probs[name], n_boot, seed), **extra}
        log.info("%s: %s", name, {k: summaries[name][k] for k in ("economic", "social", "distinct_answers")})
        if twins is not None:
            with clock("compass"):
                twin_probs[name], _ = elicit(model, tokenizer, name, twins, cfg, seed)
            summaries[name]["balanced"] = balanced_summary(compass, twins, probs[name], twin_probs[name], n_boot, seed)
            log.info("%s balanced: %s", name, summaries[name]["balanced"])
        if pairs is not None and len(pairs):
            with clock("side_preference"):
                summaries[name]["side_preference"] = side_summary(model, tokenizer, name, pairs, cfg, seed,
                                                                  differences)
            log.info("%s side preference: %s", name, {f"{g}.{k}": v["shift"] for g, sides in
                                                      summaries[name]["side_preference"].items()
                                                      for k, v in sides.items()})
    rows = []
    if trajectory:
        for step, name in [(0, "sft")] + [(n, f"step-{n}") for n in sorted(trajectory)]:
            name = "dpo" if step in same_as_dpo else name  # the last snapshot is the DPO adapter itself
            with clock("compass"):
                p = probs[name] if name in probs else elicit(model, tokenizer, name, compass, cfg, seed)[0]
            s = summarise(compass, p, n_boot, seed)
            row = {"step": step, **{k: s[k] for k in ("economic", "social", "economic_expected", "social_expected")}}
            if pairs is not None and len(pairs):
                with clock("side_preference"):
                    sides = (summaries[name]["side_preference"] if name in summaries
                             else side_summary(model, tokenizer, name, pairs, cfg, seed, differences))
                row.update({f"side_{g}_{k}_shift": v["shift"] for g, by_side in sides.items()
                            for k, v in by_side.items()})
            rows.append(row)
            log.info("trajectory step %d: %s", step, row)
    if seconds is not None:
        seconds.update({k: round(v, 1) for k, v in clock.seconds.items()})
    return summaries, probs, rows, twin_probs, differences


def _write_empty(path: str | Path) -> None:
    """An optional output that this run does not produce (e.g. the twins' table with evaluate.balanced off): an
    empty file, so DVC's declared output exists and no stale table from an earlier run survives."""
    with atomic_path(path) as tmp:
        tmp.write_text("", encoding="utf-8")


def _weights_digest(adapter_dir: str | Path) -> str | None:
    path = Path(adapter_dir) / "adapter_model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def trajectory_snapshots(dpo_adapter: str | Path,
                         trajectory: dict[int, str | Path]) -> tuple[dict[str, Path], list[int]]:
    """The trajectory's snapshots that need answers of their own, by model name (``step-N``), and the steps whose
    snapshot is the final DPO adapter itself (same weights: its answers are the ``dpo`` model's)."""
    final = _weights_digest(dpo_adapter)
    same_as_dpo = [n for n, path in trajectory.items() if _weights_digest(path) == final]
    return {f"step-{n}": Path(path) for n, path in sorted(trajectory.items()) if n not in same_as_dpo}, same_as_dpo


def forced_choice_prompts(template: str, statements: list[str]) -> list[str]:
    """The forced choice's prompts of one template (paraphrase), one per statement. ``elicit`` asks them template by
    template, so that the template's opening joins the chat prefix every prompt shares, computed once."""
    return [template.format(statement=s) for s in statements]


def trajectory_dirs(root: str | Path | None) -> dict[int, Path]:
    """``step-N`` adapter snapshots under ``root`` (written by the dpo stage), by step."""
    if not root or not Path(root).is_dir():
        return {}
    return {int(p.name.split("-")[1]): p for p in Path(root).glob("step-*") if (p / "adapter_config.json").exists()}


def write_answer_table(path, compass: Compass, paraphrases: dict[str, np.ndarray]) -> None:
    """Per proposition: each model's answer, expected answer (0-3) and probabilities (``<model>_p<k>``, averaged
    over paraphrases), and every paraphrase's probabilities (``<model>_q<j>_p<k>``)."""
    probs = {m: p.mean(axis=0) for m, p in paraphrases.items()}
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["item", "statement"] + [f"{m}_answer" for m in probs] + [f"{m}_expected" for m in probs]
                            + ["changed_base_to_dpo"] + [f"{m}_p{k}" for m in probs for k in range(4)]
                            + [f"{m}_q{j}_p{k}" for m, p in paraphrases.items() for j in range(len(p))
                               for k in range(4)])
            for i, statement in enumerate(compass.statements):
                answers = {m: int(p[i].argmax()) for m, p in probs.items()}
                expected = {m: round(float((p[i] * np.arange(4)).sum()), 3) for m, p in probs.items()}
                writer.writerow([i + 1, statement] + [answers[m] for m in probs] + [expected[m] for m in probs]
                                + [int(answers.get("base") != answers.get("dpo"))]
                                + [round(float(p[i, k]), 4) for p in probs.values() for k in range(4)]
                                + [round(float(q[i, k]), 4) for p in paraphrases.values() for q in p
                                   for k in range(4)])


def run(params: Params, params_file: str, paths: argparse.Namespace) -> None:
    """Run the stage: ``params`` holds its validated sections, ``paths`` its files as ``dvc.yaml`` names them."""
    cfg, seed = params.evaluate, params.base.seed
    compass = load_compass(paths.compass)
    from politune.tracking import log_artifacts, log_metrics, stage_run

    seed_everything(seed)
    with stage_run("evaluate", params, params_file) as mlflow:
        steps = trajectory_dirs(paths.trajectory) if cfg.trajectory else {}
        twins = load_twins(paths.twins, compass) if cfg.balanced and paths.twins else None
        pairs, sources = side_preference.collect(paths.pairs, cfg.side_preference)
        log.info("side preference: %d pairs %s", len(pairs), sources)
        seconds = {}
        summaries, probs, path, twin_probs, differences = evaluate(
            paths.model, {"sft": paths.sft, "dpo": paths.dpo}, compass, cfg, seed, steps, twins, pairs, seconds)
        log.info("seconds: %s", seconds)
        write_json(paths.metrics, summaries)
        if paths.twin_answers and twin_probs:
            write_answer_table(paths.twin_answers, twins, twin_probs)
        elif paths.twin_answers:
            _write_empty(paths.twin_answers)
        if paths.side_table:
            side_preference.write_table(paths.side_table, pairs, differences)
        if paths.side_plot:
            write_json(paths.side_plot, [{"model": f"{m} ({group})", "group": group, "data_side": side,
                                          "shift": v["shift"], "shift_ci_low": v["shift_ci_low"],
                                          "shift_ci_high": v["shift_ci_high"]}
                                         for m, s in summaries.items()
                                         for group, sides in s.get("side_preference", {}).items()
                                         for side, v in sides.items()])
        if paths.trajectory_out:
            write_json(paths.trajectory_out, path)
        write_json(paths.points, [{"model": m, "economic": s["economic"], "social": s["social"]}
                                 for m, s in summaries.items()])
        write_answer_table(paths.answers, compass, probs)
        plot_compass(summaries, paths.plot, "Political Compass: base -> SFT -> DPO", path)
        log_metrics(mlflow, summaries)
        log_metrics(mlflow, {f"seconds_{part}": v for part, v in seconds.items()})
        for path in (paths.plot, paths.answers):
            log_artifacts(mlflow, path)

