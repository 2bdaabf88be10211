"""The generate stage's selection logic with a scripted backend: threshold, max_kept, retries, invalid accounting and
the opposite viewpoint (annotate.mirror), at many values. The engines themselves are tested for real in
test_backends.py and the e2e test; this backend only replays scripted scores and replies."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from politune.annotate import annotate
from politune.backends import Backend
from politune.build_datasets import build, collect
from tests.helpers import PARAMS, section
# P(right), P(left), P(none) per post: posts 0-3 right-leaning, 4-6 left-leaning, 7-8 off-topic.
PROBS = np.array([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.45, 0.45, 0.1],
                  [0.1, 0.8, 0.1], [0.2, 0.6, 0.2], [0.3, 0.35, 0.35],
                  [0.05, 0.05, 0.9], [0.1, 0.1, 0.8]])


class Scripted(Backend):
    """Scores are PROBS (as log-likelihoods, uncalibrated); a reply is a valid triplet voicing the viewpoint named
    in the chat's system prompt, except for the posts in ``bad`` (invalid ``bad[post]`` times, then valid)."""

    def __init__(self, bad: dict[str, int] | None = None):
        self.bad = dict(bad or {})
        self.chats: list[list[dict[str, str]]] = []
        self.tokens_generated = 0

    def loglikelihoods(self, prefixes, texts, max_text_tokens):
        if len(prefixes) == 2:  # generate's stance measure (right, left): an answer reads as the side it names
            return np.array([[0.0 if "right" in t else -1.0, 0.0 if "left" in t else -1.0] for t in texts])
        assert len(prefixes) == 3
        return np.log(PROBS[[int(t.split()[1]) for t in texts]])

    def generate_json(self, chats, schema, max_tokens, temperature, seed):
        out = []
        for chat in chats:
            self.chats.append(chat)
            post = "p" + re.search(r"post p?(\d+)", chat[-1]["content"]).group(1)
            side = "right" if "right-wing" in chat[0]["content"] else "left"
            if self.bad.get(post, 0) > 0:
                self.bad[post] -= 1
                out.append('{"instruction": "too short"')
                continue
            reply = {"instruction": f"What about post {post}?", "chosen": f"The {side} view on {post}.",
                     "rejected": f"The other view on {post}."}
            if set(schema["properties"]) == {"answer"}:  # answers separate: one answer in the chat's voice
                reply = {"answer": f"The {side} view on {post}."}
            out.append(json.dumps({k: reply[k] for k in schema["properties"]}))
            self.tokens_generated += 10
        return out


def posts() -> pd.DataFrame:
    return pd.DataFrame({"id": [f"p{i}" for i in range(len(PROBS))],
                         "text": [f"post {i} text" for i in range(len(PROBS))]})


def cfg(**changes):
    """The default annotate section; the ideology's viewpoint only unless a test asks for the mirror; one reply per
    triplet (answers joint: the retry accounting counts replies)."""
    return section("annotate", **{"calibrate": False, "mirror": False, "answers": "joint", **changes})


@pytest.mark.parametrize("threshold, kept", [(0.0, 9), (0.3, 5), (0.45, 4), (0.5, 3), (0.7, 2), (0.95, 0)])
def test_threshold_keeps_the_posts_at_or_above_it(threshold, kept):
    table, report = annotate(posts(), Scripted(), "right", cfg(threshold=threshold), 0)
    assert report["kept"] == kept == int((PROBS[:, 0] >= threshold).sum())
    assert report["kept"] + report["dropped"] + report["invalid"] == report["posts_in"] == 9
    assert list(table.loc[table.status == "kept", "id"]) == [f"p{i}" for i in np.flatnonzero(PROBS[:, 0] >= threshold)]


@pytest.mark.parametrize("max_kept", [1, 2, 3, 5])
def test_max_kept_keeps_the_best_scores(max_kept):
    table, report = annotate(posts(), Scripted(), "left", cfg(threshold=0.1, max_kept=max_kept), 0)
    best = [f"p{i}" for i in np.argsort(-PROBS[:, 1], kind="stable")[:max_kept]]
    assert sorted(table.loc[table.status == "kept", "id"]) == sorted(best)
    assert report["kept_by_side"] == {"left": max_kept}


@pytest.mark.parametrize("max_retries, bad, invalid, retries", [
    (2, {"p0": 1}, 0, 1),           # fixed on the first retry
    (2, {"p0": 2, "p1": 1}, 0, 3),  # p0 on the second, p1 on the first
    (1, {"p0": 2}, 1, 1),           # out of retries: invalid, counted
    (0, {"p0": 1, "p1": 5}, 2, 0),  # no retries
])
def test_retries_and_invalid_accounting(max_retries, bad, invalid, retries):
    table, report = annotate(posts(), Scripted(bad), "right", cfg(threshold=0.5, max_retries=max_retries), 0)
    assert report["invalid"] == invalid and report["retries"] == retries
    assert report["kept"] == 3 - invalid
    assert report["kept"] + report["dropped"] + report["invalid"] == 9
    assert table.loc[table.status == "invalid", "instruction"].isna().all()


@pytest.mark.parametrize("threshold", [0.3, 0.45, 0.6])
def test_mirror_annotates_the_opposite_with_its_own_prompts(threshold):
    backend = Scripted()
    table, report = annotate(posts(), backend, "right", cfg(threshold=threshold, mirror=True), 0)
    right = PROBS[:, 0] >= threshold
    left = (PROBS[:, 1] >= threshold) & ~right  # a post kept for the ideology is not annotated twice
    assert report["kept_by_side"] == {"right": int(right.sum()), "left": int(left.sum())}
    assert list(table.loc[table.side == "left", "id"]) == [f"p{i}" for i in np.flatnonzero(left)]
    for _, row in table[table.status == "kept"].iterrows():
        assert row["chosen"].startswith(f"The {row['side']} view")
    viewpoints = PARAMS["annotate"]["viewpoints"]
    systems = {c[0]["content"] for c in backend.chats}
    assert any(viewpoints["left"] in s for s in systems) == bool(left.any())
    assert report["mean_score_kept"] == round(float(PROBS[right, 0].mean()), 4) if right.any() else True


def test_without_mirror_the_table_holds_the_ideology_only():
    table, report = annotate(posts(), Scripted(), "right", cfg(threshold=0.3), 0)
    assert set(table.loc[table.status == "kept", "side"]) == {"right"} and "score_opposite" not in table
    assert report["kept_by_side"] == {"right": 5}


def test_mirror_pairs_from_the_annotation(tmp_path):
    table, _ = annotate(posts(), Scripted(), "right", cfg(threshold=0.3, mirror=True), 0)
    table.to_parquet(tmp_path / "annotated.parquet", index=False)
    datasets = section("datasets", mirror={"source": "annotated", "side": None, "fraction": 1.0})
    pairs, drawn = collect(datasets, 0, tmp_path / "annotated.parquet", tmp_path, "right")
    assert drawn == {"annotated": 5, "mirror:annotated": 2}
    mirrored = [p for p in pairs if p["origin"] == "left"]
    assert [p["id"] for p in mirrored] == ["p4", "p5"]
    for p in pairs:  # every chosen answer voices the right, the left's own answers now rejected
        assert p["side"] == "right"
        voice = p["chosen"][0]["content"] if p["origin"] == "right" else p["rejected"][0]["content"]
        assert voice.startswith(f"The {p['origin']} view")
    plain, _ = collect(section("datasets", mirror={"source": None, "side": None, "fraction": 1.0}), 0, tmp_path / "annotated.parquet", tmp_path, "right")
    assert [p["id"] for p in plain] == ["p0", "p1", "p2", "p3", "p6"], "plain pairs: the ideology's rows only"
    test = build(pairs, 0, 0.3)["dpo"]["test"]
    assert len(test) == 3 and set(test["side"]) == {"right"}


def test_separation_aucs_from_the_corpus_labels():
    """ROC AUC by hand: right posts 0-3 against left posts 4-6 on P(right), and political 0-6 against off-topic 7-8
    on 1 - P(none); each with an interval around it."""
    from politune.annotate import roc_auc

    assert roc_auc(np.array([0.9, 0.8]), np.array([0.1, 0.85])) == 0.75
    assert roc_auc(np.array([0.5]), np.array([0.5])) == 0.5
    frame = posts()
    frame["label"] = ["right"] * 4 + ["left"] * 3 + ["off"] * 2
    cfg = section("annotate", calibrate=False, mirror=False)
    _, report = annotate(frame, Scripted(), "right", cfg, seed=0)
    sep = report["separation"]
    # P(right): right posts 0.9, 0.7, 0.5, 0.45 against left 0.1, 0.2, 0.3: every pair ordered.
    assert sep["right_vs_left"]["auc"] == 1.0 and sep["right_vs_left"]["n_positive"] == 4
    # 1 - P(none): political 0.95, 0.9, 0.8, 0.9, 0.9, 0.8, 0.65 against off 0.1, 0.2: all ordered.
    assert sep["political_vs_off"]["auc"] == 1.0 and sep["political_vs_off"]["n_negative"] == 2
    frame["label"] = ["off"] + ["right"] * 3 + ["left"] * 3 + ["off", "right"]  # two mislabelled posts
    _, report = annotate(frame, Scripted(), "right", cfg, seed=0)
    sep = report["separation"]["right_vs_left"]
    assert sep["auc"] < 1.0 and sep["ci_low"] <= sep["auc"] <= sep["ci_high"]
    assert report["separation"]["political_vs_off"]["auc"] < 1.0


def test_score_distribution_counts_what_each_threshold_keeps():
    from politune.annotate import score_distribution

    rows = score_distribution([0.0, 0.04, 0.05, 0.4, 0.41, 1.0, float("nan")])
    assert len(rows) == 20 and rows[0] == {"threshold": 0.0, "posts": 2, "kept_at_threshold": 6}
    assert rows[1] == {"threshold": 0.05, "posts": 1, "kept_at_threshold": 4}
    assert rows[8] == {"threshold": 0.4, "posts": 2, "kept_at_threshold": 3}
    assert rows[19] == {"threshold": 0.95, "posts": 1, "kept_at_threshold": 1}
    assert sum(r["posts"] for r in rows) == 6
    # The plot's count at a threshold is what annotate keeps there (the ideology's side, no max_kept).
    for threshold in (0.3, 0.45, 0.5, 0.7):
        table, report = annotate(posts(), Scripted(), "right", cfg(threshold=threshold), seed=0)
        at = next(r for r in score_distribution(table["score"]) if abs(r["threshold"] - threshold) < 1e-9)
        assert at["kept_at_threshold"] == report["kept_by_side"]["right"]


def test_scores_cover_every_viewpoint_and_generate_reads_them_without_scoring():
    """The score stage's table holds every viewpoint's score, whatever the ideology; generate selects from it for any
    ideology and threshold and never scores again (so a threshold change reruns generate only)."""
    from politune.annotate import generate, score, score_plot

    backend = Scripted()
    scored, report = score(posts(), backend, cfg(), 0)
    assert report["posts"] == 9 and report["shards"] == 1
    for j, name in enumerate(("right", "left", "none")):
        assert np.allclose(scored[f"score_{name}"], PROBS[:, j], atol=1e-6)
    backend.loglikelihoods = None  # generate may not score (without its stance measure, which reads answers)
    no_stance = {**PARAMS["annotate"]["quality"], "stance": False}
    for ideology, column, threshold in (("right", 0, 0.45), ("left", 1, 0.3)):
        table, report = generate(scored, backend, ideology, cfg(threshold=threshold, quality=no_stance), 0)
        assert report["kept_by_side"] == {ideology: int((PROBS[:, column] >= threshold).sum())}
        at = next(r for r in score_plot(scored, ["right", "left"]) if abs(r["threshold"] - threshold) < 1e-9)
        assert at[f"{ideology}_kept_at_threshold"] == report["kept_by_side"][ideology]
    # shards of any size give the same table
    again, _ = score(posts(), Scripted(), cfg(shard_size=2), 0)
    assert again.equals(scored)
