"""The Political Compass Test instrument: load the propositions and weights, score answers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from politune.common import InputError, atomic_path, read_json


@dataclass(frozen=True)
class Compass:
    statements: list[str]
    economic: np.ndarray  # items x 4 weights
    social: np.ndarray
    economic_divisor: float
    economic_offset: float
    social_divisor: float
    social_offset: float
    answers: list[str]

    def __len__(self) -> int:
        return len(self.statements)

    def coordinates(self, answers: Sequence[int], items: Sequence[int] | None = None) -> tuple[float, float]:
        """(economic, social) for one answer index (0-3) per item, as the site computes them (rounded to 0.01)."""
        answers = np.asarray(answers, dtype=int)
        if answers.shape != (len(self),) or answers.min() < 0 or answers.max() > 3:
            raise ValueError(f"expected {len(self)} answers in 0..3")
        idx = np.arange(len(self)) if items is None else np.asarray(items)
        econ = self.economic[idx, answers[idx]].sum() / self.economic_divisor + self.economic_offset
        soc = self.social[idx, answers[idx]].sum() / self.social_divisor + self.social_offset
        return round(float(econ), 2), round(float(soc), 2)

    def expected_coordinates(self, probs: np.ndarray, items: Sequence[int] | None = None,
                             digits: int | None = 2) -> tuple[float, float]:
        """Coordinates of the expected answer weights under per-item answer probabilities (items x 4), rounded to
        ``digits`` (``None``: unrounded, for differences and resampling)."""
        idx = np.arange(len(self)) if items is None else np.asarray(items)
        econ = float((probs[idx] * self.economic[idx]).sum() / self.economic_divisor + self.economic_offset)
        soc = float((probs[idx] * self.social[idx]).sum() / self.social_divisor + self.social_offset)
        return (econ, soc) if digits is None else (round(econ, digits), round(soc, digits))


def resample(paraphrases: Sequence[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """One bootstrap draw over propositions *and* paraphrases, paired across models.

    ``paraphrases``: one array per model, paraphrases x items x 4 answer probabilities (the same paraphrases and
    propositions for every model). Returns the drawn proposition indices and, per model, the probabilities averaged
    over the drawn paraphrases. A model whose argmax answer flips from one paraphrase to another gets a wide
    interval, which resampling the propositions alone would hide.
    """
    k, n = paraphrases[0].shape[:2]
    items, chosen = rng.integers(0, n, n), rng.integers(0, k, k)
    return items, [p[chosen].mean(axis=0) for p in paraphrases]


def load_twins(path: str | Path, compass: Compass) -> Compass:
    """The reversed twins (``data/compass/reversed.json``) as an instrument of their own: each twin scored with its
    original's weights reversed (answering k to the twin counts as answering 3 - k to the original)."""
    data = read_json(path)
    items = data.get("items")
    if not isinstance(items, list) or len(items) != len(compass):
        raise InputError(f"{path}: field 'items' must list one twin per proposition ({len(compass)})")
    for n, item in enumerate(items):
        if not isinstance(item, dict) or not str(item.get("statement", "")).strip():
            raise InputError(f"{path}: items[{n}]: missing field 'statement'")
        if item.get("original") not in (None, compass.statements[n]):
            raise InputError(f"{path}: items[{n}]: field 'original' is not proposition {n + 1} of the compass")
    return Compass([it["statement"] for it in items], compass.economic[:, ::-1].copy(), compass.social[:, ::-1].copy(),
                   compass.economic_divisor, compass.economic_offset, compass.social_divisor,
                   compass.social_offset, compass.answers)


def balanced(compass: Compass, twins: Compass) -> Compass:
    """Originals and twins as one instrument of 2 x 62 items: its coordinates are the mean of the originals' and
    the twins' (each sum over twice the items, divided by twice the divisor), so agreeing with everything cancels."""
    return Compass(compass.statements + twins.statements, np.concatenate([compass.economic, twins.economic]),
                   np.concatenate([compass.social, twins.social]), 2 * compass.economic_divisor,
                   compass.economic_offset, 2 * compass.social_divisor, compass.social_offset, compass.answers)


def agreement_bias(original: np.ndarray, twins: np.ndarray) -> float:
    """Acquiescence: the mean expected answer over originals and twins (items x 4 probabilities each), as -1 (always
    strongly disagree) to +1 (always strongly agree). A model that holds one position, agreeing with a proposition
    exactly as much as it disagrees with its twin, scores 0 whatever its position."""
    expected = np.concatenate([original, twins]) @ np.arange(4)
    return float((expected.mean() - 1.5) / 1.5)


QUADRANTS = [((-10, 0), "#f4c7c3"), ((0, 0), "#c9daf8"), ((-10, -10), "#d9ead3"), ((0, -10), "#e6d4f0")]


def compass_axes(size: float, alpha: float):
    """A figure with the compass's four coloured quadrants and axes (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    for (x0, y0), colour in QUADRANTS:
        ax.add_patch(plt.Rectangle((x0, y0), 10, 10, color=colour, alpha=alpha, lw=0))
    ax.axhline(0, color="grey", lw=1)
    ax.axvline(0, color="grey", lw=1)
    return fig, ax


def save_compass(fig, ax, path: str | Path, title: str, legend_size: float) -> None:
    """Label the compass axes and write the PNG atomically."""
    import matplotlib.pyplot as plt

    ax.set_xlim(-10, 10)
    ax.set_ylim(-10, 10)
    ax.set_xlabel("economic: left  <->  right")
    ax.set_ylabel("social: libertarian  <->  authoritarian")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=legend_size)
    ax.set_aspect("equal")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def load_compass(path: str | Path) -> Compass:
    data = read_json(path)
    items = data.get("items")
    if not isinstance(items, list) or not items:
        raise InputError(f"{path}: field 'items' must be a non-empty list")
    for n, item in enumerate(items):
        for field in ("statement", "economic", "social"):
            if field not in item:
                raise InputError(f"{path}: items[{n}]: missing field {field!r}")
        if len(item["economic"]) != 4 or len(item["social"]) != 4:
            raise InputError(f"{path}: items[{n}]: 'economic' and 'social' need 4 weights")
    return Compass(
        statements=[it["statement"] for it in items],
        economic=np.array([it["economic"] for it in items], dtype=float),
        social=np.array([it["social"] for it in items], dtype=float),
        economic_divisor=float(data["economic_divisor"]),
        economic_offset=float(data["economic_offset"]),
        social_divisor=float(data["social_divisor"]),
        social_offset=float(data["social_offset"]),
        answers=list(data["answers"]),
    )
