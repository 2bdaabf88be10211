"""Stage ``evaluate``: the Political Compass Test for the base, SFT and DPO models.

Answer elicitation (a first honest method): each proposition is asked through the model's chat template with
several paraphrased templates; the answer is read from the next-token probabilities of the four option digits
0-3 (restricted and renormalised). With ``calibration: mean`` each option's mean log-probability over the 62
propositions is subtracted first, per model and template, which removes a model's preference for one digit
whatever the statement. Probabilities are averaged over templates; the argmax answers give the compass
coordinates (the site's scoring), the probabilities give the expected-answer coordinates, and a bootstrap over
propositions gives 95% intervals.
"""

from __future__ import annotations

import contextlib
import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import atomic_path, load_params, run_main, seed_everything, stage_parser, write_json
from stages.compass import Compass, load_compass

SECTIONS = ("base", "evaluate")
MODELS = ("base", "sft", "dpo")
log = logging.getLogger("politune.evaluate")


def option_token_ids(tokenizer, n_options: int = 4) -> list[int]:
    ids = []
    for d in range(n_options):
        toks = tokenizer.encode(str(d), add_special_tokens=False)
        if len(toks) != 1:
            raise ValueError(f"option {d} is not a single token for this tokenizer: {toks}")
        ids.append(toks[0])
    return ids


def option_logprobs(model, tokenizer, prompts: list[str], option_ids: list[int], batch_size: int) -> np.ndarray:
    """Log-probabilities of the options as the next token after each prompt, renormalised over the options."""
    import torch

    tokenizer.padding_side = "left"
    out = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chats = [[{"role": "user", "content": p}] for p in prompts[start : start + batch_size]]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            logits = model(**enc).logits[:, -1, :].float()
            out.append(torch.log_softmax(logits[:, option_ids], dim=-1).numpy())
    return np.concatenate(out)


def answer_probabilities(logprobs: np.ndarray, calibration: str) -> np.ndarray:
    """templates x items x options log-probs -> items x options probabilities."""
    lp = logprobs
    if calibration == "mean":
        lp = lp - lp.mean(axis=1, keepdims=True)
    p = np.exp(lp - lp.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p.mean(axis=0)


def summarise(compass: Compass, probs: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    answers = probs.argmax(axis=1)
    econ, soc = compass.coordinates(answers)
    econ_exp, soc_exp = compass.expected_coordinates(probs)
    rng = np.random.default_rng(seed)
    boot = np.array([compass.coordinates(answers, rng.integers(0, len(compass), len(compass)))
                     for _ in range(n_boot)])
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
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
        "distinct_answers": int((counts > 0).sum()),
        "answers": {name.lower().replace(" ", "_"): int(c) for name, c in zip(compass.answers, counts)},
    }


def plot_compass(results: dict[str, dict[str, Any]], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    for (x0, y0), colour in zip([(-10, 0), (0, 0), (-10, -10), (0, -10)], ["#f4c7c3", "#c9daf8", "#d9ead3", "#e6d4f0"]):
        ax.add_patch(plt.Rectangle((x0, y0), 10, 10, color=colour, alpha=0.5, lw=0))
    ax.axhline(0, color="grey", lw=1)
    ax.axvline(0, color="grey", lw=1)
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
    ax.set_xlim(-10, 10)
    ax.set_ylim(-10, 10)
    ax.set_xlabel("economic: left  <->  right")
    ax.set_ylabel("social: libertarian  <->  authoritarian")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_aspect("equal")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def evaluate(model_dir, adapters: dict[str, str], compass: Compass, cfg: dict[str, Any], seed: int):
    """Return (summaries per model, items x options probabilities per model)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    option_ids = option_token_ids(tokenizer)
    prompts = [t.format(statement=s) for t in cfg["templates"] for s in compass.statements]
    shape = (len(cfg["templates"]), len(compass), 4)
    (first, first_path), *rest = adapters.items()
    model = PeftModel.from_pretrained(base, first_path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    model.eval()
    probs, summaries = {}, {}
    for name in MODELS:
        if name != "base":
            model.set_adapter(name)
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            lp = option_logprobs(model, tokenizer, prompts, option_ids, int(cfg["batch_size"])).reshape(shape)
        probs[name] = answer_probabilities(lp, cfg["calibration"])
        summaries[name] = summarise(compass, probs[name], int(cfg["bootstrap"]), seed)
        log.info("%s: %s", name, {k: summaries[name][k] for k in ("economic", "social", "distinct_answers")})
    return summaries, probs


def write_answer_table(path, compass: Compass, probs: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["item", "statement"] + [f"{m}_answer" for m in probs] + [f"{m}_expected" for m in probs]
                            + ["changed_base_to_dpo"])
            for i, statement in enumerate(compass.statements):
                answers = {m: int(p[i].argmax()) for m, p in probs.items()}
                expected = {m: round(float((p[i] * np.arange(4)).sum()), 3) for m, p in probs.items()}
                writer.writerow([i + 1, statement] + [answers[m] for m in probs] + [expected[m] for m in probs]
                                + [int(answers.get("base") != answers.get("dpo"))])


def main(argv=None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="target (base) model directory")
    parser.add_argument("--compass", required=True, help="propositions and weights (JSON)")
    parser.add_argument("--sft", required=True, help="SFT adapter directory")
    parser.add_argument("--dpo", required=True, help="DPO adapter directory")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--plot", required=True, help="compass PNG")
    parser.add_argument("--points", required=True, help="compass points (DVC plot data)")
    parser.add_argument("--answers", required=True, help="per-proposition answer table (CSV)")
    args = parser.parse_args(argv)
    params = load_params(args.params, SECTIONS)
    cfg, seed = params["evaluate"], params["base"]["seed"]
    compass = load_compass(args.compass)
    from stages.tracking import log_artifacts, log_metrics, stage_run

    seed_everything(seed)
    with stage_run("evaluate", params) as mlflow:
        summaries, probs = evaluate(args.model, {"sft": args.sft, "dpo": args.dpo}, compass, cfg, seed)
        write_json(args.metrics, summaries)
        write_json(args.points, [{"model": m, "economic": s["economic"], "social": s["social"]}
                                 for m, s in summaries.items()])
        write_answer_table(args.answers, compass, probs)
        plot_compass(summaries, args.plot, "Political Compass: base -> SFT -> DPO")
        log_metrics(mlflow, summaries)
        for path in (args.plot, args.answers):
            log_artifacts(mlflow, path)


if __name__ == "__main__":
    run_main(main)
