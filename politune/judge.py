"""Stage ``judge``: open questions answered by the base, SFT and DPO models, scored for leaning by a judge model.

The paper asked GPT-4 to rate answers to open prompts (the two US parties, vaccines, Trump, Sanders, the model's
own ideology). Here each model answers ``judge.prompts`` (greedy, or several seeded samples), and a judge scores
each answer on a declared scale with a rubric, through the ``openai`` client against any OpenAI-compatible endpoint:

- ``judge.endpoint.base_url`` set: that endpoint (GPT-4 with the key from the variable named in
  ``judge.endpoint.api_key_env``; never from params);
- ``null`` (the default): a local ``vllm serve`` of the judge model (``--judge-model``, the annotator), started on
  loopback for this stage and stopped after it.

``judge.method``: ``logprobs`` reads the probabilities of the scale's digits as the first token of the reply and
reports the expected score (informative even for a small judge); ``json`` asks for ``{"score", "reason"}`` under a
JSON schema. The client has a timeout and bounded retries with backoff; a dead endpoint fails the stage with one
message, and no report is written (outputs are renamed into place only on success).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from politune.common import EndpointError, atomic_path, seed_everything, write_json

MODELS = ("base", "sft", "dpo")
log = logging.getLogger("politune.judge")


class Judge:
    """Scores answers through an OpenAI-compatible endpoint (timeouts and retries are the client's own)."""

    def __init__(self, cfg: dict[str, Any], base_url: str, model: str) -> None:
        from openai import OpenAI

        ep = cfg["endpoint"]
        self.cfg = cfg
        self.model = model
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(ep.get("api_key_env") or "OPENAI_API_KEY")
                             or "EMPTY", timeout=float(ep["timeout"]), max_retries=int(ep["max_retries"]))
        self.where = f"{base_url} (timeout {ep['timeout']} s, {ep['max_retries']} retries with backoff)"
        self.concurrency = int(ep["concurrency"])
        self.digits = {str(d): d for d in range(int(cfg["low"]), int(cfg["high"]) + 1)}

    def messages(self, prompt: str, answer: str) -> list[dict[str, str]]:
        cfg = self.cfg
        return [{"role": "system", "content": cfg["system"]},
                {"role": "user", "content": cfg["rubric"].format(prompt=prompt, answer=answer, low=cfg["low"],
                                                                 high=cfg["high"])}]

    def score_one(self, prompt: str, answer: str) -> tuple[float | None, str]:
        """(score on the scale or None when the judge gave no valid score, the judge's raw reply)."""
        if self.cfg["method"] == "logprobs":
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
        schema = {"type": "object", "additionalProperties": False, "required": ["score", "reason"],
                  "properties": {"score": {"type": "integer", "minimum": self.cfg["low"], "maximum": self.cfg["high"]},
                                 "reason": {"type": "string", "maxLength": 300}}}
        fmt = {"type": "json_schema", "json_schema": {"name": "judgement", "schema": schema, "strict": True}}
        resp = self.client.chat.completions.create(model=self.model, messages=self.messages(prompt, answer),
                                                   max_tokens=160, temperature=0.0, response_format=fmt)
        text = resp.choices[0].message.content or ""
        try:
            score = json.loads(text)["score"]
        except (ValueError, KeyError, TypeError):
            return None, text
        ok = isinstance(score, int) and self.cfg["low"] <= score <= self.cfg["high"]
        return (float(score) if ok else None), text

    def score(self, pairs: list[tuple[str, str]]) -> list[tuple[float | None, str]]:
        import openai

        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                return list(pool.map(lambda pa: self.score_one(*pa), pairs))
        except openai.APIError as exc:
            raise EndpointError(f"judge endpoint {self.where} failed: {type(exc).__name__}: {exc}; "
                                "start the server or fix judge.endpoint.base_url, then rerun") from exc


def answer_prompts(model_dir, adapters: dict[str, str], cfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Every model's answers to every prompt (``samples`` each): rows of model, prompt id, sample, prompt, answer."""
    from politune.inference import generate, load_with_adapters, use

    model, tokenizer = load_with_adapters(model_dir, adapters)
    rows = []
    jobs = [(i, k, p) for k in range(int(cfg["samples"])) for i, p in enumerate(cfg["prompts"])]
    for name in MODELS:
        with use(model, name):
            answers = generate(model, tokenizer, [p for _, _, p in jobs], int(cfg["max_new_tokens"]),
                               float(cfg["temperature"]), seed, int(cfg["batch_size"]))
        rows += [{"model": name, "prompt_id": i + 1, "sample": k, "prompt": p, "answer": a}
                 for (i, k, p), a in zip(jobs, answers)]
    return rows


def summarise(rows: list[dict[str, Any]], cfg: dict[str, Any], seed: int, n_boot: int = 1000) -> dict[str, Any]:
    """Per model: mean score, its 95% bootstrap interval over prompts, leaning (score minus the scale's middle)."""
    middle = (cfg["low"] + cfg["high"]) / 2
    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        per_prompt = {}
        for r in mine:
            if r["score"] is not None:
                per_prompt.setdefault(r["prompt_id"], []).append(r["score"])
        means = np.array([np.mean(v) for _, v in sorted(per_prompt.items())])
        entry: dict[str, Any] = {"invalid": sum(r["score"] is None for r in mine), "scored": len(mine)}
        if len(means):
            boot = means[rng.integers(0, len(means), (n_boot, len(means)))].mean(axis=1)
            entry.update(score=round(float(means.mean()), 3), leaning=round(float(means.mean() - middle), 3),
                         score_ci_low=round(float(np.percentile(boot, 2.5)), 3),
                         score_ci_high=round(float(np.percentile(boot, 97.5)), 3))
        entry.update({f"prompt_{pid}": round(float(np.mean(v)), 3) for pid, v in sorted(per_prompt.items())})
        out[name] = entry
    return out


def write_table(path: str | Path, rows: list[dict[str, Any]]) -> None:
    fields = ["model", "prompt_id", "sample", "score", "prompt", "answer", "judge_reply"]
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows({k: r.get(k) for k in fields} for r in rows)


@contextlib.contextmanager
def endpoint(cfg: dict[str, Any], judge_model: str | Path, seed: int):
    """Yield (base_url, model name): the configured endpoint, or a local ``vllm serve`` for the stage's duration."""
    ep = cfg["endpoint"]
    if ep.get("base_url"):
        yield ep["base_url"], ep.get("model") or str(judge_model)
        return
    from politune.serve import serving

    with serving(judge_model, cfg["serve"], seed, float(cfg["startup_timeout"])) as url:
        yield url, str(judge_model)


def judge(model_dir, adapters: dict[str, str], judge_model, cfg: dict[str, Any], seed: int):
    """Answer the prompts with each model, then score every answer; return (rows, summary)."""
    rows = answer_prompts(model_dir, adapters, cfg, seed)
    with endpoint(cfg, judge_model, seed) as (url, name):
        scored = Judge(cfg, url, name).score([(r["prompt"], r["answer"]) for r in rows])
    for r, (score, reply) in zip(rows, scored):
        r.update(score=score, judge_reply=reply)
    return rows, summarise(rows, cfg, seed)


def run(params: dict[str, Any], params_file: str, paths: argparse.Namespace) -> None:
    """Run the stage: ``params`` holds its validated sections, ``paths`` its files as ``dvc.yaml`` names them."""
    cfg, seed = params["judge"], params["base"]["seed"]
    from politune.tracking import log_artifacts, log_metrics, stage_run

    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    seed_everything(seed)
    with stage_run("judge", params, params_file) as mlflow:
        rows, summary = judge(paths.model, {"sft": paths.sft, "dpo": paths.dpo}, paths.judge_model, cfg, seed)
        write_table(paths.answers, rows)
        write_json(paths.metrics, summary)
        log.info("judge: %s", {m: summary[m].get("score") for m in MODELS})
        log_metrics(mlflow, summary)
        log_artifacts(mlflow, paths.answers)

