"""Right run against left run on the same pairs: did the two runs steer the model apart?

    dvc exp run -n left -S ideology=left          # beside the workspace's right run (make repro)
    python -m politune.compare --right HEAD --left left

Reads each revision's per-pair table of evaluate (its ``--side-table`` in ``dvc.yaml``, in git) through ``dvc.api``
(a revision is a commit, a branch, a tag or a DVC experiment's name; ``workspace`` reads the file on disk). Per group
of pairs (``heldout``: the pairs no training used, the answer to "did the run steer the model"; ``test_split``) and
per data side, on the pairs both runs measured: the mean over pairs of the right run's d minus the left run's d for
``--model`` (d = log p(right-voiced answer) - log p(left-voiced answer); the base model is the same in both runs,
so this is also the difference of their shifts from base), with a paired 95% bootstrap interval over pairs
(``scipy.stats.bootstrap``). Positive: the right-tuned model prefers the right-voiced answers more than the
left-tuned one does.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from politune.common import InputError, run_main



def side_table(repo: str = ".") -> str:
    """The path of evaluate's per-pair side-preference table, as ``dvc.yaml`` names it (``--side-table``)."""
    from politune.common import read_yaml

    words = read_yaml(Path(repo) / "dvc.yaml")["stages"]["evaluate"]["cmd"].split()
    return words[words.index("--side-table") + 1]


def read_table(rev: str, repo: str = ".", path: str | None = None):
    """The per-pair table at ``rev`` (``workspace``: the file on disk) as a DataFrame."""
    import pandas as pd

    path = path or side_table(repo)
    if rev == "workspace":
        file = Path(repo) / path
        if not file.is_file():
            raise InputError(f"{file}: no such file (run `dvc repro` first)")
        text = file.read_text(encoding="utf-8")
    else:
        import dvc.api

        try:
            text = dvc.api.read(path, repo=repo, rev=rev)
        except Exception as exc:  # dvc's errors for a missing revision or file differ between versions
            raise InputError(f"{path} at revision {rev!r}: {exc}") from exc
    table = pd.read_csv(io.StringIO(text))
    if "group" not in table:  # tables written before the groups: every pair counted as held out
        table["group"] = "heldout"
    return table


def difference(right, left, model: str, n_boot: int = 2000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per group and data side: the paired difference of ``model``'s d, right run minus left run."""
    from scipy.stats import bootstrap

    column = f"{model}_d"
    for name, table in (("right", right), ("left", left)):
        if column not in table:
            raise InputError(f"the {name} run's side-preference table has no column {column!r} (models: "
                             f"{', '.join(c[:-2] for c in table.columns if c.endswith('_d'))})")
    joined = right.merge(left, on=["pair", "group", "data_side"], suffixes=("_right", "_left"))
    out: dict[str, dict[str, Any]] = {}
    for (group, side), rows in joined.groupby(["group", "data_side"], sort=False):
        diff = (rows[f"{column}_right"] - rows[f"{column}_left"]).to_numpy(dtype=float)
        if len(diff) > 1 and np.ptp(diff) > 0:
            ci = bootstrap((diff,), np.mean, n_resamples=n_boot, method="percentile",
                           rng=np.random.default_rng(seed)).confidence_interval
            lo, hi = float(ci.low), float(ci.high)
        else:
            lo = hi = float(diff.mean())
        out.setdefault(group, {})[f"{side}_data"] = {
            "pairs": int(len(diff)), "difference": round(float(diff.mean()), 3), "ci_low": round(lo, 3),
            "ci_high": round(hi, 3), "more_right": round(float((diff > 0).mean()), 4)}
    return out


def markdown(result: dict[str, dict[str, Any]], model: str, right: str, left: str) -> str:
    lines = [f"Side preference of `{model}`, right run (`{right}`) minus left run (`{left}`): mean over pairs of the "
             "difference of d [paired 95% bootstrap interval] (share of pairs where the right run prefers the "
             "right-voiced answer more).", "", "| pairs | right-data pairs | left-data pairs |", "|---|---|---|"]
    for group, sides in result.items():
        cells = [f"{v['difference']:+.2f} [{v['ci_low']:+.2f}, {v['ci_high']:+.2f}] ({100 * v['more_right']:.0f}%, "
                 f"n={v['pairs']})" if v else "" for v in (sides.get("right_data"), sides.get("left_data"))]
        lines.append(f"| {group.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Right run minus left run on the same side-preference pairs.")
    parser.add_argument("--right", required=True, help="revision of the right run (commit, branch, experiment, "
                                                       "or 'workspace')")
    parser.add_argument("--left", required=True, help="revision of the left run")
    parser.add_argument("--model", default="dpo", help="the model compared (base, sft, dpo, a trajectory step)")
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = difference(read_table(args.right), read_table(args.left), args.model, args.bootstrap, args.seed)
    sys.stdout.write(markdown(result, args.model, args.right, args.left))
    if args.out:
        Path(args.out).write_text(json.dumps({"right": args.right, "left": args.left, "model": args.model,
                                              "side_preference": result}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    run_main(main)
