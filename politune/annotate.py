"""Stage ``annotate``: score posts for the target ideology and write preference triplets, with vLLM.

Backends (``annotate.backend``, see ``politune/backends.py``): ``vllm`` (default), ``openai``, ``transformers``.

Step 1, scoring, ``annotate.score_method``. ``json``: the annotator rates each post as JSON constrained to a schema
(an integer 0-10 and a short reason), retried like the triplets; the score is the rating / 10. ``likelihood`` (the
default for the small CPU model): a small model follows rating instructions poorly (SmolLM2-135M gives every post the same digit), so
the score comes from token probabilities instead: the annotator reads each post after one prefix per viewpoint
(every ideology in ``annotate.viewpoints`` plus ``none``), and the post's log-likelihood under each prefix gives a
generative classifier. With ``calibrate: true`` each viewpoint's mean log-likelihood over the corpus is subtracted
first (the prior correction of contextual calibration). The score is P(target ideology | post) in [0, 1]; posts at
or above ``annotate.threshold`` are kept.

Step 2, generation. For each kept post the annotator writes, as JSON constrained to a schema by vLLM structured
outputs, an instruction the post could answer, a *chosen* answer in the ideology's voice and a *rejected* answer
that argues the opposite. Outputs that fail validation are retried (sampled, seeded) up to ``max_retries`` times,
then marked ``invalid`` and counted.

With ``annotate.mirror`` the opposite viewpoint (``prompts.<ideology>.opposite``) is annotated too: posts not kept
for the ideology whose score for the opposite reaches the threshold get triplets from the opposite's own prompts
(the likelihood scores already cover every viewpoint; ``json`` scoring rates the posts a second time). Every kept
row carries ``side``, the viewpoint its chosen answer voices; ``datasets.mirror.source: annotated`` turns the
opposite's rows into mirror pairs (docs/steering.md).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator

from politune.backends import make_backend
from politune.common import InputError, atomic_path, seed_everything, write_json
from politune.schema import Annotate, Params

log = logging.getLogger("politune.annotate")

TRIPLET_FIELDS = ("instruction", "chosen", "rejected")
SCORE_RANGE = (0, 10)


def _one_line(value: Any) -> Any:
    """Whitespace runs become one space (before the length checks)."""
    return " ".join(value.split()) if isinstance(value, str) else value


OneLine = Annotated[str, Strict(), BeforeValidator(_one_line)]


# A JSON rating (score_method: json): the schema sent to the engine and the check of its reply, from one class (no
# docstring: it would travel in the schema as a description).
class Rating(BaseModel):
    model_config = ConfigDict(extra="forbid")
    score: Annotated[int, Strict(), Field(ge=SCORE_RANGE[0], le=SCORE_RANGE[1])]
    reason: Annotated[OneLine, Field(min_length=1, max_length=200)]


def triplet_model(max_chars: int) -> type[BaseModel]:
    """The triplet of one annotated post, each field 8 to ``max_chars`` characters (``annotate.max_answer_chars``);
    chosen and rejected must differ."""
    text = Annotated[OneLine, Field(min_length=8, max_length=max_chars)]

    class Triplet(BaseModel):
        model_config = ConfigDict(extra="forbid")
        instruction: text
        chosen: text
        rejected: text

        @model_validator(mode="after")
        def _two_answers(self):
            if self.chosen.lower() == self.rejected.lower():
                raise ValueError("chosen and rejected are the same answer")
            return self

    return Triplet


def parser(model: type[BaseModel]):
    """``text -> dict`` of the fields, or ``None`` where the reply is not valid JSON of ``model``."""
    def parse(text: str) -> dict[str, Any] | None:
        try:
            return model.model_validate_json(text).model_dump()
        except ValidationError:
            return None

    return parse


def viewpoint_probabilities(loglik: np.ndarray, calibrate: bool) -> np.ndarray:
    """Posts x viewpoints log-likelihoods -> posterior probabilities (uniform prior, optional calibration)."""
    z = loglik - loglik.mean(axis=0, keepdims=True) if calibrate else loglik
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def build_chat(cfg: Annotate, ideology: str, post: str) -> list[dict[str, str]]:
    prompts = cfg.prompts[ideology]
    fill = {"post": post, "ideology": ideology, "viewpoint": cfg.viewpoints[ideology],
            "opposite": cfg.viewpoints[prompts.opposite]}
    return [
        {"role": "system", "content": prompts.system.format(**fill)},
        {"role": "user", "content": prompts.generate.format(**fill)},
    ]


def generate_validated(backend, chats: dict[Any, list], schema, parse, cfg: Annotate, seed: int):
    """Schema-constrained generation with bounded retries: returns ({key: parsed}, retries, [keys never valid]).

    The first attempt is greedy; each retry samples at ``retry_temperature`` with its own seed.
    """
    done, pending, retries = {}, list(chats), 0
    for attempt in range(cfg.max_retries + 1):
        if not pending:
            break
        if attempt:
            retries += len(pending)
        temperature = 0.0 if attempt == 0 else cfg.retry_temperature
        outputs = backend.generate_json([chats[k] for k in pending], schema, cfg.max_new_tokens, temperature,
                                        seed + attempt)
        still = []
        for key, text in zip(pending, outputs):
            parsed = parse(text)
            if parsed is None:
                still.append(key)
            else:
                done[key] = parsed
        pending = still
    return done, retries, pending


def json_scores(table, backend, ideology: str, cfg: Annotate, seed: int):
    """``score_method: json``: the annotator rates each post as JSON {score: 0..10, reason}; returns [0, 1] scores."""
    low, high = SCORE_RANGE
    prompts = cfg.prompts[ideology]
    chats = {i: [{"role": "system", "content": prompts.system.format(viewpoint=cfg.viewpoints[ideology])},
                 {"role": "user", "content": prompts.score.format(post=table.at[i, "text"], low=low, high=high,
                                                                     viewpoint=cfg.viewpoints[ideology])}]
             for i in table.index}
    done, retries, failed = generate_validated(backend, chats, Rating.model_json_schema(), parser(Rating), cfg,
                                              seed)
    scores = np.array([done[i]["score"] / high if i in done else np.nan for i in table.index])
    reasons = [done[i]["reason"] if i in done else None for i in table.index]
    return scores, reasons, retries, failed


def select(table, column: str, cfg: Annotate, eligible) -> np.ndarray:
    """Rows whose ``column`` score reaches ``annotate.threshold`` (among ``eligible``), the ``max_kept`` best."""
    keep = (table[column] >= cfg.threshold).to_numpy() & np.asarray(eligible, dtype=bool)
    if cfg.max_kept:
        order = table[keep].sort_values([column, "id"], ascending=[False, True]).index[: cfg.max_kept]
        keep = table.index.isin(order)
    return keep


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive's score > a negative's), ties counting a half (the Mann-Whitney form of the ROC AUC)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_with_interval(positive, negative, rng, n_boot: int = 1000) -> dict[str, Any]:
    """The ROC AUC and its 95% bootstrap interval (positives and negatives resampled separately)."""
    positive, negative = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    entry: dict[str, Any] = {"n_positive": len(positive), "n_negative": len(negative)}
    if not len(positive) or not len(negative):
        return {**entry, "auc": None, "ci_low": None, "ci_high": None}
    boot = [roc_auc(positive[rng.integers(0, len(positive), len(positive))],
                    negative[rng.integers(0, len(negative), len(negative))]) for _ in range(n_boot)]
    return {**entry, "auc": round(roc_auc(positive, negative), 4),
            "ci_low": round(float(np.percentile(boot, 2.5)), 4), "ci_high": round(float(np.percentile(boot, 97.5)), 4)}


def separation(table, political: np.ndarray, ideology: str, opposite: str, viewpoints, seed: int) -> dict[str, Any]:
    """How well the scores separate the corpus's own labels (``label``, where it has them), so that a change of
    scoring prompt or method is judged by a number: ``<ideology>_vs_<opposite>``, the ideology's score on posts
    labelled with the ideology against those labelled with the opposite; ``political_vs_off``, the political score
    (``political``: 1 - P(none) with likelihood scoring, the larger of the two sides' ratings with json) on posts
    labelled with any viewpoint against the rest. ROC AUC with a 95% bootstrap interval; 0.5 is chance."""
    rng = np.random.default_rng(seed)
    label = table["label"].to_numpy()
    score = table["score"].to_numpy(dtype=float)
    valid = ~np.isnan(score) & ~np.isnan(political)
    labelled = valid & (table["label"].notna().to_numpy())
    is_political = np.isin(label, list(viewpoints))
    return {f"{ideology}_vs_{opposite}": auc_with_interval(score[labelled & (label == ideology)],
                                                          score[labelled & (label == opposite)], rng),
            "political_vs_off": auc_with_interval(political[labelled & is_political],
                                                  political[labelled & ~is_political], rng)}


def annotate(posts, backend, ideology: str, cfg: Annotate, seed: int):
    """Return the annotated table (every post, with its status) and the report."""
    t0 = time.perf_counter()
    table = posts.copy()
    names = list(cfg.viewpoints) + ["none"]
    retries, score_invalid = 0, []
    probs = None
    if cfg.score_method == "json":
        scores, reasons, retries, score_invalid = json_scores(table, backend, ideology, cfg, seed)
        table["score"] = scores
        table["reason"] = reasons
        table["viewpoint"] = None
    else:
        prefixes = [cfg.score_prefix.format(viewpoint=cfg.viewpoints[n]) for n in cfg.viewpoints]
        prefixes.append(cfg.score_prefix.format(viewpoint=cfg.none_viewpoint))
        loglik = backend.loglikelihoods(prefixes, table["text"].tolist(), cfg.max_post_tokens)
        probs = viewpoint_probabilities(loglik, cfg.calibrate)
        table["score"] = probs[:, names.index(ideology)].round(6)
        table["viewpoint"] = [names[k] for k in probs.argmax(axis=1)]
    keep = select(table, "score", cfg, ~table.index.isin(score_invalid))
    table["side"] = np.where(keep, ideology, None)
    opposite = cfg.prompts[ideology].opposite
    if cfg.mirror:
        if cfg.score_method == "json":
            scores, _, more, invalid = json_scores(table, backend, opposite, cfg, seed)
            table["score_opposite"] = scores
            retries += more
        else:
            table["score_opposite"] = probs[:, names.index(opposite)].round(6)
            invalid = []
        other = select(table, "score_opposite", cfg, ~keep & ~table.index.isin(score_invalid + list(invalid)))
        table.loc[other, "side"] = opposite
        keep = keep | other
    table["status"] = np.where(keep, "pending", "dropped")
    table.loc[score_invalid, "status"] = "invalid"
    for name in TRIPLET_FIELDS:
        table[name] = None
    chats = {i: build_chat(cfg, table.at[i, "side"], table.at[i, "text"]) for i in table.index[keep]}
    triplet = triplet_model(cfg.max_answer_chars)
    done, triplet_retries, failed = generate_validated(backend, chats, triplet.model_json_schema(), parser(triplet),
                                                       cfg, seed)
    for i, triplet in done.items():
        for name in TRIPLET_FIELDS:
            table.at[i, name] = triplet[name]
        table.at[i, "status"] = "kept"
    table.loc[failed, "status"] = "invalid"
    kept = table[(table["status"] == "kept") & (table["side"] == ideology)]
    wall = time.perf_counter() - t0
    report = {
        "ideology": ideology,
        "score_method": cfg.score_method,
        "posts_in": int(len(table)),
        "kept": int((table["status"] == "kept").sum()),
        "kept_by_side": {side: int(((table["status"] == "kept") & (table["side"] == side)).sum())
                         for side in dict.fromkeys([ideology, opposite] if cfg.mirror else [ideology])},
        "dropped": int((table["status"] == "dropped").sum()),
        "invalid": int((table["status"] == "invalid").sum()),
        "invalid_scores": len(score_invalid),
        "retries": int(retries + triplet_retries),
        "mean_score_kept": round(float(kept["score"].mean()), 4) if len(kept) else None,  # the ideology's rows
        "tokens_generated": int(backend.tokens_generated),
        "wall_seconds": round(wall, 2),
        "posts_per_second": round(len(table) / wall, 3),
    }
    if "label" in table and table["label"].notna().any():
        quality = {}
        for label, group in table[table["label"].notna()].groupby("label"):
            quality[str(label)] = {
                "n": int(len(group)),
                "mean_score": round(float(group["score"].mean()), 4),
                "kept_rate": round(float((group["status"] != "dropped").mean()), 4),
                "viewpoint_match": round(float((group["viewpoint"] == label).mean()), 4)
                if label in names and cfg.score_method == "likelihood" else None,
            }
        report["quality"] = quality
        if probs is not None:
            political = 1 - probs[:, names.index("none")]
        elif "score_opposite" in table:
            political = np.fmax(table["score"].to_numpy(dtype=float), table["score_opposite"].to_numpy(dtype=float))
        else:
            political = table["score"].to_numpy(dtype=float)
        report["separation"] = separation(table, political, ideology, opposite, cfg.viewpoints, seed)
    return table, report


def score_distribution(scores, bins: int = 20) -> list[dict[str, Any]]:
    """Every post's score for the ideology as plot rows, one per bin of width 1/``bins``: ``threshold`` (the bin's
    lower edge), ``posts`` (scores in the bin) and ``kept_at_threshold`` (scores at or above it: what that
    ``annotate.threshold`` would keep before ``max_kept``). Posts without a score (invalid json ratings) are left out.
    """
    values = np.asarray(scores, dtype=float)
    values = values[~np.isnan(values)]
    edges = np.round(np.arange(bins) / bins, 6)
    index = np.minimum((values * bins + 1e-9).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    return [{"threshold": float(edge), "posts": int(count), "kept_at_threshold": int((values >= edge - 1e-9).sum())}
            for edge, count in zip(edges, counts)]


def sample_markdown(table, n: int) -> str:
    kept = table[table["status"] == "kept"].head(n)
    lines = ["# Annotation sample", "", f"{len(kept)} of the kept triplets, in corpus order.", ""]
    for _, row in kept.iterrows():
        lines += [f"## {row['id']} ({row['side']}, score {row['score']:.3f})", "", f"> {row['text']}", "",
                  f"- **instruction**: {row['instruction']}", f"- **chosen**: {row['chosen']}",
                  f"- **rejected**: {row['rejected']}", ""]
    return "\n".join(lines)


def run(params: Params, params_file: str, paths: argparse.Namespace) -> None:
    """Run the stage: ``params`` holds its validated sections, ``paths`` its files as ``dvc.yaml`` names them."""
    ideology, base, cfg = params.ideology, params.base, params.annotate
    import pandas as pd

    from politune.tracking import log_artifacts, log_metrics, stage_run

    seed_everything(base.seed)
    posts = pd.read_parquet(paths.posts)
    if cfg.max_posts:
        posts = posts.head(cfg.max_posts)
    with stage_run("annotate", params, params_file) as mlflow:
        backend = make_backend(cfg, paths.model, base.seed)
        table, report = annotate(posts, backend, ideology, cfg, base.seed)
        report["backend"] = cfg.backend
        if report["kept_by_side"][ideology] == 0:
            scores = table["score"]
            raise InputError(
                f"{paths.posts}: annotation kept no post for ideology {ideology!r} (scores {scores.min():.3f} to "
                f"{scores.max():.3f}, annotate.threshold={cfg.threshold}, {report['invalid']} invalid outputs); "
                "lower annotate.threshold, raise annotate.max_retries, or add posts to data/raw")
        with atomic_path(paths.out) as tmp:
            table.to_parquet(tmp, index=False)
        write_json(paths.report, report)
        with atomic_path(paths.sample) as tmp:
            tmp.write_text(sample_markdown(table, cfg.sample_size), encoding="utf-8")
        if getattr(paths, "score_plot", None):
            write_json(paths.score_plot, score_distribution(table["score"]))
        log_metrics(mlflow, report)
        log_artifacts(mlflow, paths.sample)
    log.info("annotation: %s", {k: report[k] for k in ("posts_in", "kept", "dropped", "invalid")})

