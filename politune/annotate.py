"""Stages ``score`` and ``generate``: score every post for every viewpoint, then write preference triplets for the
posts kept for the target ideology, with vLLM.

Backends (``annotate.backend``, see ``politune/backends.py``): ``vllm`` (default), ``openai``, ``transformers``.

Stage ``score`` (``annotate.score_method``), which reads neither the ideology nor the threshold, so that a change of
either reruns ``generate`` only. ``likelihood`` (the default for the small CPU model): a small model follows rating
instructions poorly (SmolLM2-135M gives every post the same digit), so the score comes from token probabilities
instead: the annotator reads each post after one prefix per viewpoint (every one in ``annotate.viewpoints`` plus
``none``), and the post's log-likelihood under each prefix gives a generative classifier. With ``calibrate: true``
each viewpoint's mean log-likelihood over the corpus is subtracted first (the prior correction of contextual
calibration). ``score_<viewpoint>`` is P(viewpoint | post) in [0, 1]. ``json``: the annotator rates each post for
each viewpoint as JSON constrained to a schema (an integer 0-10 and a short reason), retried like the triplets;
``score_<viewpoint>`` is the rating / 10.

Stage ``generate``: posts whose score for the ideology is at or above ``annotate.threshold`` are kept. For each, the
annotator writes, as JSON constrained to a schema by vLLM structured outputs, an instruction the post could answer, a
*chosen* answer in the ideology's voice and a *rejected* answer that argues the opposite: in one reply
(``annotate.answers: joint``) or in three (``separate``: the instruction, then each answer in a chat of its own
voice). ``annotate.few_shot`` example triplets go into each chat as earlier turns. Outputs that fail validation (the
schema, or a copy of the prompt: ``politune/triplet_quality.py``) are retried (sampled, seeded) up to
``max_retries`` times, then marked ``invalid`` and counted; the report's ``triplet_quality`` measures what was
kept.

With ``annotate.mirror`` the opposite viewpoint (``prompts.<ideology>.opposite``) is annotated too: posts not kept
for the ideology whose score for the opposite reaches the threshold get triplets from the opposite's own prompts.
Every kept row carries ``side``, the viewpoint its chosen answer voices; ``datasets.mirror.source: annotated`` turns
the opposite's rows into mirror pairs (docs/steering.md).

Both stages work in shards of ``annotate.shard_size`` posts that a killed stage resumes from (``politune/shards.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, create_model,
                      model_validator)

from politune import triplet_quality
from politune.backends import Backend, make_backend
from politune.common import InputError, atomic_path, fingerprint, seed_everything, write_json
from politune.schema import Annotate, Example, Params, Score, Triplets
from politune.shards import Shards, run_shards
from politune.triplet_quality import CopyCheck

log = logging.getLogger("politune.annotate")

TRIPLET_FIELDS = ("instruction", "chosen", "rejected")
# generate's per-post columns besides status and the triplet (generate_shard)
SHARD_COLUMNS = (*TRIPLET_FIELDS, "retries", "copy_first", "copy_kept", "invalid_reason", "stance_chosen",
                 "stance_rejected")
# The code that computes a shard: part of the shards' fingerprint, so that a killed run's shards are not resumed
# by changed code either.
CODE = tuple(Path(__file__).with_name(name) for name in ("annotate.py", "backends.py", "shards.py",
                                                          "triplet_quality.py"))
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


def field_model(name: str, max_chars: int) -> type[BaseModel]:
    """A reply of one field ``name`` (``answers: separate``: ``instruction`` or ``answer``), 8 to ``max_chars``
    characters."""
    text = Annotated[OneLine, Field(min_length=8, max_length=max_chars)]
    return create_model(name.capitalize(), __config__=ConfigDict(extra="forbid"), **{name: (text, ...)})


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


def _fill(cfg: Triplets, side: str) -> dict[str, str]:
    return {"ideology": side, "viewpoint": cfg.viewpoints[side], "opposite": cfg.viewpoints[cfg.prompts[side].opposite]}


def _chat(cfg: Triplets, side: str, template: str, examples, shown, reply, given: dict[str, str]) -> list[dict]:
    """``side``'s system prompt; each example as a user turn (``template`` filled with ``shown(example)``) and an
    assistant turn (``reply(example)`` as JSON); then the user turn of ``template`` filled with ``given``."""
    fill = _fill(cfg, side)
    chat = [{"role": "system", "content": cfg.prompts[side].system.format(**fill)}]
    for example in examples:
        chat += [{"role": "user", "content": template.format(**shown(example), **fill)},
                 {"role": "assistant", "content": json.dumps(reply(example), ensure_ascii=False)}]
    return chat + [{"role": "user", "content": template.format(**given, **fill)}]


def build_chat(cfg: Triplets, ideology: str, post: str, examples: list[Example] = ()) -> list[dict[str, str]]:
    """``answers: joint``: the system prompt, then each example as a user turn (its post in the generate prompt) and
    an assistant turn (its triplet as the JSON the schema asks for), then the post."""
    return _chat(cfg, ideology, cfg.prompts[ideology].generate, examples, lambda e: {"post": e.post},
                 lambda e: {k: getattr(e, k) for k in TRIPLET_FIELDS}, {"post": post})


def instruction_chat(cfg: Triplets, side: str, post: str, examples: list[Example] = ()) -> list[dict[str, str]]:
    """``answers: separate``, the first reply: the instruction the post answers, in the side's chat (examples: their
    post, then their instruction as JSON)."""
    return _chat(cfg, side, cfg.prompts[side].instruction, examples, lambda e: {"post": e.post},
                 lambda e: {"instruction": e.instruction}, {"post": post})


def answer_chat(cfg: Triplets, side: str, instruction: str, examples: list[Example] = ()) -> list[dict[str, str]]:
    """``answers: separate``: one answer to ``instruction`` in ``side``'s voice, in that side's chat (examples:
    their instruction, then their chosen answer, which voices that side, as JSON)."""
    return _chat(cfg, side, cfg.prompts[side].answer, examples, lambda e: {"instruction": e.instruction},
                 lambda e: {"answer": e.chosen}, {"instruction": instruction})


def load_examples(cfg: Triplets) -> dict[str, list[Example]]:
    """The few-shot examples of each viewpoint, the first ``few_shot.shots`` of its side in ``few_shot.path``, in
    file order; a bad row fails with the file, row and field."""
    shots, path = cfg.few_shot.shots, cfg.few_shot.path
    if not shots or not path:
        return {name: [] for name in cfg.viewpoints}
    if not Path(path).is_file():
        raise InputError(f"annotate.few_shot.path: {path}: no such file")
    examples: dict[str, list[Example]] = {name: [] for name in cfg.viewpoints}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = Example.model_validate_json(line)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "(row)"
            raise InputError(f"{path}: row {n}, field {field}: {err['msg']}") from None
        if example.side not in examples:
            raise InputError(f"{path}: row {n}, field side: {example.side!r} is not one of annotate.viewpoints "
                             f"({', '.join(cfg.viewpoints)})")
        examples[example.side].append(example)
    for name in cfg.prompts:
        if len(examples[name]) < shots:
            raise InputError(f"{path}: {len(examples[name])} examples of side {name!r}, fewer than "
                             f"annotate.few_shot.shots={shots}")
    return {name: rows[:shots] for name, rows in examples.items()}


def copy_checks(cfg: Triplets, examples: dict[str, list[Example]]) -> dict[str, CopyCheck]:
    """Per viewpoint: the copy check of its triplets against its prompt (the post is given per triplet)."""
    import re

    q = cfg.quality
    checks = {}
    for name, prompts in cfg.prompts.items():
        instructions = [piece for text in (prompts.system, prompts.generate, prompts.instruction, prompts.answer)
                        for piece in re.split(r"\{[a-z_]+\}", text)]
        shown = [getattr(e, k) for e in examples.get(name, []) for k in ("post", *TRIPLET_FIELDS)]
        checks[name] = CopyCheck({"viewpoint": list(cfg.viewpoints.values()), "instructions": instructions,
                                  "examples": shown}, q.ngram, q.copy_threshold)
    return checks


def generate_validated(backend, chats: dict[Any, list], schema, parse, cfg: Score | Triplets, seed: int,
                       check=None):
    """Schema-constrained generation with bounded retries: returns ({key: parsed}, {key: retries}, {key: why the
    first attempt failed, or None}, {key never valid: why its last attempt failed}).

    The first attempt is greedy; each retry samples at ``retry_temperature`` with its own seed. ``check(key,
    parsed)`` may reject a reply that is valid JSON (its reason, e.g. ``copy:post``, or None to accept); a reply
    that is not valid JSON of the schema fails with ``schema``.
    """
    done, pending = {}, list(chats)
    retries = dict.fromkeys(chats, 0)
    first: dict[Any, str | None] = {}
    failed: dict[Any, str] = {}
    for attempt in range(cfg.max_retries + 1):
        if not pending:
            break
        temperature = 0.0 if attempt == 0 else cfg.retry_temperature
        outputs = backend.generate_json([chats[k] for k in pending], schema, cfg.max_new_tokens, temperature,
                                        seed + attempt)
        still = []
        for key, text in zip(pending, outputs):
            retries[key] = attempt
            parsed = parse(text)
            reason = "schema" if parsed is None else (check(key, parsed) if check else None)
            if attempt == 0:
                first[key] = reason
            if reason is None:
                done[key] = parsed
                failed.pop(key, None)
            else:
                failed[key] = reason
                still.append(key)
        pending = still
    return done, retries, first, failed


def viewpoint_names(cfg: Score) -> list[str]:
    """The viewpoints a post is scored for under ``likelihood``: ``annotate.viewpoints`` and ``none``."""
    return list(cfg.viewpoints) + ["none"]


def score_shard(posts, backend, cfg: Score, seed: int):
    """One shard's raw scores, indexed like ``posts``: ``loglik_<viewpoint>`` (likelihood), or ``score_<viewpoint>``
    ([0, 1], NaN where no valid rating came), ``reason_<viewpoint>`` and ``retries_<viewpoint>`` (json)."""
    import pandas as pd

    tokens = backend.tokens_generated
    if cfg.score_method == "json":
        low, high = SCORE_RANGE
        columns = {}
        for name, viewpoint in cfg.viewpoints.items():
            chats = {i: [{"role": "system", "content": cfg.score_system.format(viewpoint=viewpoint)},
                         {"role": "user", "content": cfg.score_prompt.format(post=posts.at[i, "text"], low=low,
                                                                             high=high, viewpoint=viewpoint)}]
                     for i in posts.index}
            done, retries, _, _ = generate_validated(backend, chats, Rating.model_json_schema(), parser(Rating),
                                                     cfg, seed)
            columns[f"score_{name}"] = [done[i]["score"] / high if i in done else np.nan for i in posts.index]
            columns[f"reason_{name}"] = [done[i]["reason"] if i in done else None for i in posts.index]
            columns[f"retries_{name}"] = [retries[i] for i in posts.index]
    else:
        names = viewpoint_names(cfg)
        prefixes = [cfg.score_prefix.format(viewpoint=cfg.viewpoints[n]) for n in cfg.viewpoints]
        prefixes.append(cfg.score_prefix.format(viewpoint=cfg.none_viewpoint))
        loglik = backend.loglikelihoods(prefixes, posts["text"].tolist(), cfg.max_post_tokens)
        columns = {f"loglik_{name}": loglik[:, j] for j, name in enumerate(names)}
    return pd.DataFrame(columns, index=posts.index), {"tokens_generated": backend.tokens_generated - tokens}


def finish_scores(posts, raw, cfg: Score):
    """Every post with its scores for every viewpoint (``score_<viewpoint>``) from the shards' raw columns: under
    ``likelihood`` the posterior over the corpus (``calibrate`` needs all of it) and the likeliest ``viewpoint``."""
    table = posts.copy()
    for column in raw.columns:
        table[column] = raw[column].to_numpy()
    if cfg.score_method == "json":
        table["viewpoint"] = None
        return table
    names = viewpoint_names(cfg)
    probs = viewpoint_probabilities(raw[[f"loglik_{n}" for n in names]].to_numpy(), cfg.calibrate)
    for j, name in enumerate(names):
        table[f"score_{name}"] = probs[:, j].round(6)
    table["viewpoint"] = [names[k] for k in probs.argmax(axis=1)]
    return table


def score(posts, backend, cfg: Score, seed: int, shards: Shards | None = None):
    """Stage ``score``: every post's scores for every viewpoint, in shards of ``annotate.shard_size``; returns the
    scored table and the report. ``backend`` may be a callable that starts the engine, called only if a shard is
    left to compute (a resumed run whose shards are all done starts none)."""
    t0 = time.perf_counter()
    engine = _Engine(backend)
    try:
        raw, totals = run_shards(posts.index, cfg.shard_size,
                                 lambda keys: score_shard(posts.loc[keys], engine(), cfg, seed), shards, "score")
    finally:
        engine.close()
    if raw is None:
        raise InputError("score: no posts to score")
    table = finish_scores(posts, raw, cfg)
    wall = time.perf_counter() - t0
    report: dict[str, Any] = {"score_method": cfg.score_method, "posts": int(len(table)),
                              "shards": -(-len(table) // cfg.shard_size)}
    report["mean_score"] = {name: round(float(table[f"score_{name}"].mean()), 4)
                            for name in (cfg.viewpoints if cfg.score_method == "json" else viewpoint_names(cfg))}
    if cfg.score_method == "json":
        report["invalid"] = {name: int(table[f"score_{name}"].isna().sum()) for name in cfg.viewpoints}
        report["retries"] = int(sum(table[f"retries_{name}"].sum() for name in cfg.viewpoints))
    report.update(tokens_generated=int(totals.get("tokens_generated", 0)), wall_seconds=round(wall, 2),
                  posts_per_second=round(len(table) / wall, 3))
    return table, report


class _Engine:
    """The backend given, or the one a zero-argument factory makes on first use; ``close`` closes a backend made
    here (a ``serve`` backend's server) and leaves one given alone."""

    def __init__(self, backend) -> None:
        self.given = isinstance(backend, Backend)
        self.backend = backend if self.given else None
        self.factory = None if self.given else backend

    def __call__(self) -> Backend:
        if self.backend is None:
            self.backend = self.factory()
        return self.backend

    def close(self) -> None:
        if not self.given and self.backend is not None:
            self.backend.close()


def select(table, column: str, cfg: Triplets, eligible) -> np.ndarray:
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


def generate_shard(table, keys, backend, cfg: Triplets, seed: int, examples: dict[str, list[Example]] | None = None):
    """One shard's triplets: for the kept posts ``keys``, ``status`` (kept or invalid), the triplet's fields, the
    retries each took, ``copy_first`` (the prompt part the first, greedy reply copied, or None), ``invalid_reason``
    (schema, or copy:<part>, for an invalid one) and, with ``quality.stance``, each answer's stance margin
    (``stance_chosen``, ``stance_rejected``: log p(answer | its side) - log p(answer | the opposite))."""
    import pandas as pd

    tokens = backend.tokens_generated
    examples = load_examples(cfg) if examples is None else examples
    checks = copy_checks(cfg, examples)
    side = {i: table.at[i, "side"] for i in keys}
    post = {i: table.at[i, "text"] for i in keys}
    copies: dict[Any, str | None] = {}  # reject_copies false: the first copy of each post's kept replies

    def checker(copied_from):
        """generate_validated's check from ``copied_from(key, parsed)``: the reason of a copy, or (reject_copies
        false) None after noting it."""
        def check(key, parsed):
            copied = copied_from(key, parsed)
            reason = f"copy:{copied[1]}" if copied else None
            if cfg.quality.reject_copies:
                return reason
            copies[key] = copies.get(key) or reason
            return None
        return check

    if cfg.answers == "joint":
        chats = {i: build_chat(cfg, side[i], post[i], examples.get(side[i], [])) for i in keys}
        triplet = triplet_model(cfg.max_answer_chars)
        check = checker(lambda key, parsed: checks[side[key]].copied_from(parsed, post[key]))
        done, retries, first, failed = generate_validated(backend, chats, triplet.model_json_schema(),
                                                          parser(triplet), cfg, seed, check)
    else:
        done, retries, first, failed = _separate(backend, keys, side, post, cfg, seed, examples, checks, checker)
    if not cfg.quality.reject_copies:
        first = {k: copies.get(k) if v is None else v for k, v in first.items()}
    frame = pd.DataFrame({"status": ["kept" if i in done else "invalid" for i in keys],
                          **{name: [done[i][name] if i in done else None for i in keys] for name in TRIPLET_FIELDS},
                          "retries": [retries[i] for i in keys],
                          "copy_first": [first[i][5:] if (first.get(i) or "").startswith("copy:") else None
                                         for i in keys],
                          "copy_kept": [(copies.get(i) or "")[5:] or None if i in done else None for i in keys],
                          "invalid_reason": [failed.get(i) for i in keys]}, index=pd.Index(keys))
    frame["stance_chosen"] = frame["stance_rejected"] = np.nan
    kept = [i for i in keys if i in done]
    if cfg.quality.stance and kept:
        opposites = {name: p.opposite for name, p in cfg.prompts.items()}
        sides = [side[i] for i in kept]
        margins = triplet_quality.stance_margins(
            backend, cfg.score_prefix, cfg.viewpoints, sides * 2, opposites,
            [done[i]["chosen"] for i in kept] + [done[i]["rejected"] for i in kept], cfg.max_new_tokens)
        frame.loc[kept, "stance_chosen"] = margins[: len(kept)]
        frame.loc[kept, "stance_rejected"] = margins[len(kept) :]
        if cfg.quality.stance_filter:  # the classifier reads the rejected answer as more the side's: dropped
            wrong = frame.index.isin(kept) & (frame["stance_chosen"] <= frame["stance_rejected"]).to_numpy()
            frame.loc[wrong, "status"] = "invalid"
            frame.loc[wrong, "invalid_reason"] = "stance"
    return frame, {"tokens_generated": backend.tokens_generated - tokens}


def _separate(backend, keys, side, post, cfg: Triplets, seed: int, examples, checks, checker):
    """``answers: separate``: the instruction from the post in the side's chat, then the chosen answer in the side's
    chat and the rejected one in the opposite's, each reply validated and retried on its own; a post is kept when
    all three are. Returns what ``generate_validated`` returns, over the three replies (``first``: the first
    failure among the three replies' first attempts)."""
    got: dict[Any, dict[str, str]] = {i: {} for i in keys}
    retries = dict.fromkeys(keys, 0)
    first: dict[Any, str | None] = dict.fromkeys(keys)
    failed: dict[Any, str] = {}
    pending = list(keys)
    for field in TRIPLET_FIELDS:
        if not pending:
            break
        voice = {i: cfg.prompts[side[i]].opposite if field == "rejected" else side[i] for i in pending}
        name = "instruction" if field == "instruction" else "answer"
        chats = {i: (instruction_chat if field == "instruction" else answer_chat)(
            cfg, voice[i], post[i] if field == "instruction" else got[i]["instruction"], examples.get(voice[i], []))
            for i in pending}
        model = field_model(name, cfg.max_answer_chars)
        check = checker(lambda key, parsed, field=field, name=name, voice=voice:
                        checks[voice[key]].copied_from({field: parsed[name]}, post[key], got[key]))
        done, tries, firsts, bad = generate_validated(backend, chats, model.model_json_schema(), parser(model), cfg,
                                                      seed, check)
        for i in pending:
            retries[i] += tries[i]
            first[i] = first[i] or firsts.get(i)
        failed.update(bad)
        for i, parsed in done.items():
            got[i][field] = parsed[name]
        pending = [i for i in pending if i in done]
    return {i: got[i] for i in pending}, retries, first, failed


def quality_report(table, cfg: Triplets, seed: int) -> dict[str, Any]:
    """``triplet_quality`` of the annotation report: copy rates, stance accuracy (overall and per side),
    near-duplicates and lengths of the posts annotated (``status`` kept or invalid)."""
    q = cfg.quality
    annotated = table[table["status"].isin(["kept", "invalid"]) & table["side"].notna()]
    kept = annotated[annotated["status"] == "kept"]
    correct = None
    if q.stance:  # every valid triplet, before stance_filter drops the ones it reads as wrong
        scored = annotated[annotated["stance_chosen"].notna()]
        correct = triplet_quality.stance_correct(scored["stance_chosen"], scored["stance_rejected"])
    def names(column):  # None where no copy (a column of None reads back from Parquet as None or NaN)
        return [value if isinstance(value, str) else None for value in column]

    out = triplet_quality.report({f: kept[f].tolist() for f in TRIPLET_FIELDS}, names(annotated["copy_first"]),
                                 names(kept["copy_kept"]), correct, q.ngram, q.duplicate_threshold, q.bootstrap,
                                 seed)
    reasons = annotated["invalid_reason"].dropna()
    out["invalid_schema"] = int((reasons == "schema").sum())
    out["invalid_copy"] = int(reasons.str.startswith("copy:").sum())
    out["invalid_stance"] = int((reasons == "stance").sum())
    if correct is not None:
        sides = scored["side"].to_numpy()
        out["stance_accuracy_by_side"] = {name: triplet_quality.rate(correct[sides == name], q.bootstrap, seed)
                                          for name in cfg.viewpoints}
    return out


def generate(scored, backend, ideology: str, cfg: Triplets, seed: int, shards: Shards | None = None):
    """Stage ``generate``: select the posts for the ideology (and with ``mirror`` for its opposite) from their
    scores, write their triplets in shards; returns the annotated table (every post, with its status) and the
    report. ``backend``: as for ``score``."""
    t0 = time.perf_counter()
    engine = _Engine(backend)
    table = scored.copy()
    opposite = cfg.prompts[ideology].opposite
    for name in (ideology, opposite) if cfg.mirror else (ideology,):
        if f"score_{name}" not in table:
            raise InputError(f"the scores have no column score_{name}: score the viewpoint {name!r} "
                             "(annotate.viewpoints) before generating for it")
    table["score"] = table[f"score_{ideology}"]
    if f"reason_{ideology}" in table:  # json ratings: the reason given with the ideology's
        table["reason"] = table[f"reason_{ideology}"]
    score_invalid = table["score"].isna().to_numpy()
    keep = select(table, "score", cfg, ~score_invalid)
    table["side"] = np.where(keep, ideology, None)
    if cfg.mirror:
        table["score_opposite"] = table[f"score_{opposite}"]
        other = select(table, "score_opposite", cfg, ~keep & ~score_invalid & table["score_opposite"].notna())
        table.loc[other, "side"] = opposite
        keep = keep | other
    table["status"] = np.where(keep, "pending", "dropped")
    table.loc[score_invalid, "status"] = "invalid"
    examples = load_examples(cfg)
    try:
        rows, totals = run_shards(table.index[keep], cfg.shard_size,
                                  lambda keys: generate_shard(table, keys, engine(), cfg, seed, examples), shards,
                                  "generate")
    finally:
        engine.close()
    for name in SHARD_COLUMNS:
        table[name] = np.nan if name.startswith("stance_") else None
    if rows is not None:
        for name in ("status", *SHARD_COLUMNS):
            table.loc[rows.index, name] = rows[name].to_numpy()
    kept = table[(table["status"] == "kept") & (table["side"] == ideology)]
    wall = time.perf_counter() - t0
    names = list(cfg.viewpoints) + (["none"] if "score_none" in table else [])
    report = {
        "ideology": ideology,
        "posts_in": int(len(table)),
        "kept": int((table["status"] == "kept").sum()),
        "kept_by_side": {side: int(((table["status"] == "kept") & (table["side"] == side)).sum())
                         for side in dict.fromkeys([ideology, opposite] if cfg.mirror else [ideology])},
        "dropped": int((table["status"] == "dropped").sum()),
        "invalid": int((table["status"] == "invalid").sum()),
        "invalid_scores": int(score_invalid.sum()),
        "retries": int(rows["retries"].sum()) if rows is not None else 0,
        "mean_score_kept": round(float(kept["score"].mean()), 4) if len(kept) else None,  # the ideology's rows
        "tokens_generated": int(totals.get("tokens_generated", 0)),
        "wall_seconds": round(wall, 2),
        "posts_per_second": round(len(table) / wall, 3),
        "few_shot": cfg.few_shot.shots if cfg.few_shot.path else 0,
        "triplet_quality": quality_report(table, cfg, seed),
    }
    if "label" in table and table["label"].notna().any():
        likelihood = "score_none" in table
        quality = {}
        for label, group in table[table["label"].notna()].groupby("label"):
            quality[str(label)] = {
                "n": int(len(group)),
                "mean_score": round(float(group["score"].mean()), 4),
                "kept_rate": round(float((group["status"] != "dropped").mean()), 4),
                "viewpoint_match": round(float((group["viewpoint"] == label).mean()), 4)
                if label in names and likelihood else None,
            }
        report["quality"] = quality
        if likelihood:
            political = 1 - table["score_none"].to_numpy(dtype=float)
        else:  # json: the larger of the viewpoints' ratings
            political = np.fmax.reduce([table[f"score_{n}"].to_numpy(dtype=float) for n in cfg.viewpoints])
        report["separation"] = separation(table, political, ideology, opposite, cfg.viewpoints, seed)
    return table, report


def annotate(posts, backend, ideology: str, cfg: Annotate, seed: int):
    """Both stages in one call (the library's way to annotate a table, and the tests'): ``score`` then
    ``generate``; the report is generate's with the scores' method, retries and generated tokens added in."""
    scored, scores_report = score(posts, backend, cfg, seed)
    table, report = generate(scored, backend, ideology, cfg, seed)
    report["score_method"] = cfg.score_method
    report["retries"] += scores_report.get("retries", 0)
    report["tokens_generated"] += scores_report["tokens_generated"]
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


def score_plot(table, viewpoints, bins: int = 20) -> list[dict[str, Any]]:
    """The scores as one DVC plot: per bin edge (``threshold``), ``<viewpoint>_posts`` and
    ``<viewpoint>_kept_at_threshold`` for each viewpoint (``score_distribution``)."""
    series = {name: score_distribution(table[f"score_{name}"], bins) for name in viewpoints}
    return [{"threshold": entries[0]["threshold"],
             **{f"{name}_{key}": entry[key] for name, entry in zip(series, entries)
                for key in ("posts", "kept_at_threshold")}}
            for entries in zip(*series.values())]


def run_score(params: Params, params_file: str, paths: argparse.Namespace) -> None:
    """Run the ``score`` stage: ``params`` holds its validated keys, ``paths`` its files as ``dvc.yaml`` names them."""
    import pandas as pd

    from politune.tracking import log_metrics, stage_run

    cfg, seed = params.annotate, params.base.seed
    seed_everything(seed)
    posts = pd.read_parquet(paths.posts)
    if cfg.max_posts:
        posts = posts.head(cfg.max_posts)
    shards = Shards(paths.work, fingerprint(params, paths.posts, paths.model, *CODE))
    with stage_run("score", params, params_file) as mlflow:
        table, report = score(posts, lambda: make_backend(cfg, paths.model, seed), cfg, seed, shards)
        report["backend"] = cfg.backend
        with atomic_path(paths.out) as tmp:
            table.to_parquet(tmp, index=False)
        write_json(paths.report, report)
        write_json(paths.plot, score_plot(table, cfg.viewpoints))
        log_metrics(mlflow, report)
    shards.clear()
    log.info("scores: %s", {k: report[k] for k in ("posts", "mean_score", "wall_seconds")})


def run_generate(params: Params, params_file: str, paths: argparse.Namespace) -> None:
    """Run the ``generate`` stage: ``params`` holds its validated sections and keys, ``paths`` its files."""
    import pandas as pd

    from politune.tracking import log_artifacts, log_metrics, stage_run

    ideology, cfg, seed = params.ideology, params.annotate, params.base.seed
    seed_everything(seed)
    scored = pd.read_parquet(paths.scores)
    inputs = [cfg.few_shot.path] if cfg.few_shot.path and cfg.few_shot.shots else []
    shards = Shards(paths.work, fingerprint(params, paths.scores, paths.model, *CODE, *inputs))
    with stage_run("generate", params, params_file) as mlflow:
        table, report = generate(scored, lambda: make_backend(cfg, paths.model, seed), ideology, cfg, seed, shards)
        report["backend"] = cfg.backend
        if report["kept_by_side"][ideology] == 0:
            scores = table["score"]
            raise InputError(
                f"{paths.scores}: annotation kept no post for ideology {ideology!r} (scores {scores.min():.3f} to "
                f"{scores.max():.3f}, annotate.threshold={cfg.threshold}, {report['invalid']} invalid outputs); "
                "lower annotate.threshold, raise annotate.max_retries, or add posts to data/raw")
        with atomic_path(paths.out) as tmp:
            table.to_parquet(tmp, index=False)
        write_json(paths.report, report)
        with atomic_path(paths.sample) as tmp:
            tmp.write_text(sample_markdown(table, cfg.sample_size), encoding="utf-8")
        log_metrics(mlflow, report)
        log_artifacts(mlflow, paths.sample)
    shards.clear()
    log.info("annotation: %s", {k: report[k] for k in ("posts_in", "kept", "dropped", "invalid")})
