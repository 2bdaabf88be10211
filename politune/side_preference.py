"""The side-preference instrument: does a tuned model prefer the right-voiced or the left-voiced answer?

For each held-out preference pair (a prompt, one answer in the right's voice and one in the left's), the model's
summed log-probability of each answer given the prompt, through the chat template the training used, gives

    d = log p(right-voiced answer | prompt) - log p(left-voiced answer | prompt)

(and a length-normalised variant, the per-token means). A model's *shift* on a pair is its d minus the base model's
d on the same pair: positive means it moved towards the right-voiced answer. Reported per *data side* (the side
whose dataset the pair comes from: its original chosen answer voices that side), so that a model that merely learnt
the register of one dataset's chosen answers shows opposite signs on the two sides, while a model that learnt the
side moves the same way on both. A scale-free check: it reads the answers the data holds, not a digit the model must
produce, so it works for a 135M model as for a 70B one.

Pairs come from held-out files named in ``evaluate.side_preference.heldout`` with the side their chosen answers
voice (group ``heldout``: by default the PoliTune authors' pairs in ``data/heldout/politune/``, which no stage trains
on, so this group answers "did the run steer the model") and from the DPO test split (group ``test_split``; columns
``side``: the side the chosen answer voices, and ``origin``: the data side; written by ``build_datasets``), which
comes from the same annotation as the training pairs and so also rewards learning that annotation's artefacts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from politune.common import InputError
from politune.schema import SidePreference

log = logging.getLogger("politune.side_preference")
SIDES = ("right", "left")
GROUPS = ("heldout", "test_split")


@dataclass
class Pairs:
    """Held-out pairs, each with its right-voiced and left-voiced answer (chat messages) and its data side."""

    ids: list[str] = field(default_factory=list)
    prompts: list[list[dict[str, str]]] = field(default_factory=list)
    right: list[list[dict[str, str]]] = field(default_factory=list)
    left: list[list[dict[str, str]]] = field(default_factory=list)
    data_side: list[str] = field(default_factory=list)
    group: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, pair_id: str, prompt, chosen, rejected, chosen_side: str, data_side: str, group: str) -> None:
        if chosen_side not in SIDES or data_side not in SIDES:
            raise InputError(f"pair {pair_id}: side must be one of {SIDES}, got {chosen_side!r} / {data_side!r}")
        self.ids.append(pair_id)
        self.prompts.append(list(prompt))
        right, left = (chosen, rejected) if chosen_side == "right" else (rejected, chosen)
        self.right.append(list(right))
        self.left.append(list(left))
        self.data_side.append(data_side)
        self.group.append(group)


def _messages(value) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def from_test_split(data_dir: str | Path, pairs: Pairs) -> int:
    """Add the DPO test split's pairs that carry a side (stance pairs, format practice, are left out); returns the
    number of test pairs without a side (an external source whose side params do not name)."""
    import pandas as pd

    path = Path(data_dir) / "test.parquet"
    if not path.exists():
        return 0
    table = pd.read_parquet(path)
    if "side" not in table:
        return len(table)
    unknown = 0
    for row in table.itertuples():
        if ":stance-" in row.id:
            continue
        if row.side not in SIDES or row.origin not in SIDES:
            unknown += 1
            continue
        pairs.add(f"test:{row.id}", _messages(row.prompt), _messages(row.chosen), _messages(row.rejected),
                  row.side, row.origin, "test_split")
    return unknown


def from_file(path: str | Path, side: str, max_pairs: int | None, pairs: Pairs) -> int:
    """Add a held-out preference file whose chosen answers voice ``side`` (its data side); returns the count."""
    from politune.build_datasets import normalise, read_rows

    if not Path(path).exists():
        raise InputError(f"evaluate.side_preference.heldout: {path}: no such file")
    rows = normalise(read_rows(Path(path)), str(path))
    if max_pairs:
        rows = rows[:max_pairs]
    for row in rows:
        pairs.add(f"{Path(path).name}:{row['id']}", row["prompt"], row["chosen"], row["rejected"], side, side,
                  "heldout")
    return len(rows)


def collect(test_split: str | Path | None, cfg: SidePreference) -> tuple[Pairs, dict[str, Any]]:
    """The instrument's pairs: the test split's, then each held-out file's (``cfg`` is the params section)."""
    pairs = Pairs()
    sources: dict[str, Any] = {}
    if test_split:
        before = len(pairs)
        unknown = from_test_split(test_split, pairs)
        sources["test_split"] = len(pairs) - before
        if unknown:
            sources["test_split_without_side"] = unknown
            log.warning("%d test pairs have no side (set datasets.source_side): left out of side preference", unknown)
    for item in cfg.heldout:
        sources[item.path] = from_file(item.path, item.side, cfg.max_pairs, pairs)
    return pairs, sources


def answer_logprobs(model, tokenizer, pairs: Pairs, batch_size: int, max_length: int) -> dict[str, np.ndarray]:
    """Summed log-probabilities and token counts of each pair's right- and left-voiced answers."""
    from politune.inference import continuation_logprobs

    n = len(pairs)  # both sides' answers in one call: fuller batches of similar lengths
    total, count = continuation_logprobs(model, tokenizer, pairs.prompts * len(SIDES),
                                         [a for side in SIDES for a in getattr(pairs, side)], batch_size, max_length)
    out = {}
    for k, side in enumerate(SIDES):
        out[f"{side}_sum"], out[f"{side}_tokens"] = total[k * n : (k + 1) * n], count[k * n : (k + 1) * n]
    return out


def differences(lp: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per pair: d (summed) and d per token (each answer's mean token log-probability)."""
    return {"sum": lp["right_sum"] - lp["left_sum"],
            "per_token": lp["right_sum"] / lp["right_tokens"] - lp["left_sum"] / lp["left_tokens"]}


def _interval(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    if len(values) == 0:
        return float("nan"), float("nan")
    idx = rng.integers(0, len(values), (n_boot, len(values)))
    lo, hi = np.percentile(values[idx].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def summarise(d: dict[str, np.ndarray], base: dict[str, np.ndarray], data_side: list[str], groups: list[str],
              n_boot: int, seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Per group of pairs (``GROUPS``: ``heldout``, the files no training used, answers "did the run steer the
    model"; ``test_split``, the DPO test split, drawn from the training data's own distribution) and per data side:
    the mean shift from base (summed and per token) with bootstrap 95% intervals over pairs, the fraction of pairs
    that moved towards the right-voiced answer, and the model's own mean preference d."""
    out = {}
    for group in GROUPS:
        mask = np.asarray(groups) == group
        if mask.any():
            out[group] = _by_side(d, base, np.where(mask, np.asarray(data_side), ""), n_boot, seed)
    return out


def _by_side(d, base, sides: np.ndarray, n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    out = {}
    for side in SIDES:
        mask = sides == side
        if not mask.any():
            continue
        rng = np.random.default_rng(seed)
        shift = d["sum"][mask] - base["sum"][mask]
        per_token = d["per_token"][mask] - base["per_token"][mask]
        lo, hi = _interval(shift, n_boot, rng)
        lo_t, hi_t = _interval(per_token, n_boot, rng)
        out[f"{side}_data"] = {
            "pairs": int(mask.sum()),
            "shift": round(float(shift.mean()), 3),
            "shift_ci_low": round(lo, 3),
            "shift_ci_high": round(hi, 3),
            "moved_right": round(float((shift > 0).mean()), 4),
            "moved_left": round(float((shift < 0).mean()), 4),
            "shift_per_token": round(float(per_token.mean()), 4),
            "shift_per_token_ci_low": round(lo_t, 4),
            "shift_per_token_ci_high": round(hi_t, 4),
            "preference": round(float(d["sum"][mask].mean()), 3),
            "preference_per_token": round(float(d["per_token"][mask].mean()), 4),
        }
    return out


def write_table(path: str | Path, pairs: Pairs, per_model: dict[str, dict[str, np.ndarray]]) -> None:
    """Per pair: its id and data side, and each model's d (summed and per token), for comparisons across runs."""
    import csv

    from politune.common import atomic_path

    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["pair", "group", "data_side"]
                            + [f"{m}_{k}" for m in per_model for k in ("d", "d_per_token")])
            for i, pair_id in enumerate(pairs.ids):
                writer.writerow([pair_id, pairs.group[i], pairs.data_side[i]]
                                + [round(float(per_model[m][k][i]), 4) for m in per_model
                                   for k in ("sum", "per_token")])
