"""Stage ``build_datasets``: SFT (instruction -> chosen) and DPO (prompt, chosen, rejected) datasets.

Both are in TRL's conversational format and are written as Parquet splits (``train.parquet``, ``test.parquet``),
loadable with ``datasets.load_dataset("parquet", data_dir=...)``. Parquet keeps them byte-identical across reruns.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stages.common import InputError, ParamsError, atomic_path, load_params, run_main, stage_parser, write_json

SECTIONS = ("base", "datasets")
log = logging.getLogger("politune.build_datasets")


def build(table, seed: int, test_size: float):
    """Return ``{"sft": DatasetDict, "dpo": DatasetDict}`` from the kept rows of the annotated table."""
    from datasets import Dataset

    kept = table[table["status"] == "kept"].sort_values("id").reset_index(drop=True)
    pairs = Dataset.from_dict({
        "id": kept["id"].tolist(),
        "prompt": [[{"role": "user", "content": q}] for q in kept["instruction"]],
        "chosen": [[{"role": "assistant", "content": a}] for a in kept["chosen"]],
        "rejected": [[{"role": "assistant", "content": a}] for a in kept["rejected"]],
    })
    split = pairs.train_test_split(test_size=test_size, seed=seed)
    sft = split.map(lambda row: {"completion": row["chosen"]}, remove_columns=["chosen", "rejected"])
    return {"sft": sft, "dpo": split}


def save(dataset_dict, out_dir: str | Path) -> None:
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, split in dataset_dict.items():
            split.to_parquet(str(tmp / f"{name}.parquet"))


def main(argv=None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--annotated", required=True)
    parser.add_argument("--sft-out", required=True)
    parser.add_argument("--dpo-out", required=True)
    parser.add_argument("--report", required=True)
    args = parser.parse_args(argv)
    params = load_params(args.params, SECTIONS)
    cfg, seed = params["datasets"], params["base"]["seed"]
    if not 0.0 < float(cfg["test_size"]) < 1.0:
        raise ParamsError(f"datasets.test_size must be in (0, 1), got {cfg['test_size']!r}")
    import pandas as pd

    from stages.tracking import log_metrics, stage_run

    table = pd.read_parquet(args.annotated)
    kept = int((table["status"] == "kept").sum())
    if kept < int(cfg["min_pairs"]):
        raise InputError(
            f"{args.annotated}: only {kept} kept triplets, fewer than datasets.min_pairs={cfg['min_pairs']}; "
            "lower annotate.threshold, add posts to data/raw, or lower datasets.min_pairs")
    with stage_run("build_datasets", params) as mlflow:
        built = build(table, seed, float(cfg["test_size"]))
        save(built["sft"], args.sft_out)
        save(built["dpo"], args.dpo_out)
        report = {"pairs": kept, "train": len(built["dpo"]["train"]), "test": len(built["dpo"]["test"])}
        write_json(args.report, report)
        log_metrics(mlflow, report)


if __name__ == "__main__":
    run_main(main)
