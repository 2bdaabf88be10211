"""How good the annotator's triplets are as training data, measured before any GPU hour is spent on them.

- **Copying.** A small annotator often copies its prompt back: the post as the instruction, the viewpoint
  description or the prompt's own instructions as the answers. ``copied_from`` measures each field's word n-gram
  overlap (the share of the field's n-grams that occur in a source text) against the post, the viewpoint
  descriptions, the prompt's instructions and the few-shot examples (an answer also against its instruction, the
  rejected answer against the chosen one); at or above the threshold the field is a copy.
  ``generate`` treats such a triplet as invalid (retried, then dropped and counted, as a schema failure).
- **Stance.** ``stance_margins``: the annotator's likelihood classifier (the ``score`` stage's prefixes, read
  without the generating prompt) applied to each answer: log p(answer | written by the side) - log p(answer |
  written by the opposite). A triplet is stance-correct when its chosen answer's margin exceeds its rejected
  answer's (a paired comparison: each viewpoint's prior and each answer's length cancel).
- **Distinctness.** Near-duplicate answers across triplets (n-gram Jaccard similarity at or above a threshold) and
  distinct-n (the share of distinct n-grams among all the answers' n-grams; Li et al. 2016).
- **Length** of each field in words.

Every rate carries a 95% bootstrap interval over triplets (``scipy.stats.bootstrap``, percentile method).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

WORD = re.compile(r"[a-z0-9']+")
FIELDS = ("instruction", "chosen", "rejected")
# what a field may copy: the post, a viewpoint description, the prompt's instructions, a few-shot example; an answer
# its own instruction, the rejected answer the chosen one
COPY_SOURCES = ("post", "viewpoint", "instructions", "examples", "instruction", "chosen")


def words(text: str) -> list[str]:
    return WORD.findall(str(text).lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The word n-grams of ``text`` (lower case, punctuation dropped); a text shorter than ``n`` words gives its one
    n-gram of all its words."""
    w = words(text)
    if len(w) < n:
        return {tuple(w)} if w else set()
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def overlap(text: str, source: set[tuple[str, ...]], n: int) -> float:
    """The share of ``text``'s word n-grams found in ``source`` (n-grams of the same ``n``)."""
    grams = ngrams(text, n)
    return len(grams & source) / len(grams) if grams else 0.0


class CopyCheck:
    """Whether a reply copies its prompt: ``sources`` maps a name (viewpoint, instructions, examples) to its texts;
    ``copied_from(fields, post, answered)`` names the first (field, source) at or above ``threshold``, else None.

    ``fields``: the reply's fields (a triplet's, or one of them); ``answered``: texts an answer field must not copy
    either (``instruction``: the question it answers; ``chosen``, for the rejected answer)."""

    def __init__(self, sources: Mapping[str, Iterable[str]], n: int, threshold: float) -> None:
        self.n, self.threshold = n, threshold
        self.sources = {name: set().union(*(ngrams(t, n) for t in texts)) if texts else set()
                        for name, texts in sources.items()}

    def copied_from(self, fields: Mapping[str, str], post: str,
                    answered: Mapping[str, str] | None = None) -> tuple[str, str] | None:
        sources = {"post": ngrams(post, self.n), **self.sources}
        for field in (f for f in FIELDS if f in fields):
            extra = {}
            if field != "instruction":  # an answer may not copy its question, nor the rejected the chosen
                extra = dict(answered or {})
                if "instruction" in fields:
                    extra["instruction"] = fields["instruction"]
                if field == "rejected" and "chosen" in fields:
                    extra["chosen"] = fields["chosen"]
            for name, grams in {**sources, **{k: ngrams(v, self.n) for k, v in extra.items()}}.items():
                if grams and overlap(fields[field], grams, self.n) >= self.threshold:
                    return field, name
        return None


def rate(values: Sequence[float], n_boot: int, seed: int) -> dict[str, Any]:
    """The mean of per-triplet values (0/1 for a rate) with its 95% percentile bootstrap interval."""
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return {"n": 0, "value": None, "ci_low": None, "ci_high": None}
    if len(x) == 1 or np.all(x == x[0]):  # no spread to resample: the interval is the value
        lo = hi = float(x.mean())
    else:
        res = bootstrap((x,), np.mean, n_resamples=n_boot, method="percentile", confidence_level=0.95,
                        rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"n": int(len(x)), "value": round(float(x.mean()), 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4)}


def stance_correct(chosen_margin: Sequence[float], rejected_margin: Sequence[float]) -> np.ndarray:
    """Per triplet: 1 where the chosen answer reads more like the side than the rejected one, 0.5 on a tie."""
    c, r = np.asarray(chosen_margin, dtype=float), np.asarray(rejected_margin, dtype=float)
    return np.where(c > r, 1.0, np.where(c < r, 0.0, 0.5))


def stance_margins(backend, prefix: str, viewpoints: Mapping[str, str], sides: Sequence[str],
                   opposites: Mapping[str, str], texts: Sequence[str], max_tokens: int) -> np.ndarray:
    """Per text: log p(text | ``prefix`` of its side's viewpoint) - log p(text | the opposite's), through the
    annotator backend's ``loglikelihoods`` (the ``score`` stage's likelihood scoring)."""
    names = list(viewpoints)
    prefixes = [prefix.format(viewpoint=viewpoints[name]) for name in names]
    if not texts:
        return np.zeros(0)
    ll = backend.loglikelihoods(prefixes, list(texts), max_tokens)
    col = {name: j for j, name in enumerate(names)}
    return np.array([ll[i, col[s]] - ll[i, col[opposites[s]]] for i, s in enumerate(sides)])


def near_duplicates(texts: Sequence[str], n: int, threshold: float) -> np.ndarray:
    """Per text: 1 where another text of the list has an n-gram Jaccard similarity at or above ``threshold``."""
    grams = [ngrams(t, n) for t in texts]
    dup = np.zeros(len(texts))
    for i in range(len(grams)):
        for j in range(i + 1, len(grams)):
            union = grams[i] | grams[j]
            if union and len(grams[i] & grams[j]) / len(union) >= threshold:
                dup[i] = dup[j] = 1.0
    return dup


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams of the texts (1.0: no n-gram repeats anywhere)."""
    all_grams = []
    for t in texts:
        w = words(t)
        all_grams += [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return round(len(set(all_grams)) / len(all_grams), 4) if all_grams else None


def report(kept: Mapping[str, Sequence[str]], first_copies: Sequence[str | None], final_copies: Sequence[str | None],
           correct: np.ndarray | None, n: int, duplicate_threshold: float, n_boot: int, seed: int) -> dict[str, Any]:
    """The quality block of the generate stage's report (``triplet_quality``).

    ``kept``: the kept triplets' fields; ``first_copies``: per generated triplet (every post annotated), the source
    its first, greedy output copied (None: no copy, or not valid JSON); ``final_copies``: the same for the kept
    triplets as kept (None everywhere when copies are rejected); ``correct``: per kept triplet, stance-correct (1),
    wrong (0) or a tie (0.5), or None where stance was not measured."""
    first = list(first_copies)
    out: dict[str, Any] = {
        "copy_rate_first_attempt": rate([c is not None for c in first], n_boot, seed),
        "copy_sources_first_attempt": {name: sum(c == name for c in first)
                                       for name in COPY_SOURCES},
        "copy_rate_kept": rate([c is not None for c in final_copies], n_boot, seed),
        "stance_accuracy": rate(correct, n_boot, seed) if correct is not None else None,
    }
    answers = list(kept.get("chosen", [])) + list(kept.get("rejected", []))
    out["duplicate_rate"] = rate(near_duplicates(answers, n, duplicate_threshold), n_boot, seed)
    out["distinct_n"] = distinct_n(answers, n)
    out["words"] = {field: rate([len(words(t)) for t in kept.get(field, [])], n_boot, seed) for field in FIELDS}
    return out
