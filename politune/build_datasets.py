"""Stage ``build_datasets``: SFT (instruction -> chosen) and DPO (prompt, chosen, rejected) datasets.

The pairs come from ``datasets.source``: ``annotated`` (the kept rows of the generate stage) or an existing
preference dataset (bring your own): a JSONL/JSON/Parquet/CSV file or a ``datasets`` directory under
``data/external/`` with ``prompt``, ``chosen``, ``rejected`` (strings, as in the PoliTune authors' released sets, or
chat messages; a missing ``prompt`` is extracted from conversations with TRL's ``maybe_extract_prompt``), or a hub id
where a hub is reachable. ``datasets.mix`` instead draws from several sources in given fractions, with the seed.

``datasets.stance`` adds forced-choice pairs made from the pairs' own answers (format transfer: the model learns its
stance as prose, the compass asks for a digit): for a ``fraction`` of each split's pairs, the thesis (first
sentences) of the chosen answer is put to the model in ``template`` with ``agree`` preferred over ``disagree``, and the rejected
answer's first sentence the other way round. They join the split of the pair they come from, in both datasets.

Both outputs are in TRL's conversational format and are written as Parquet splits (``train.parquet``,
``test.parquet``), loadable with ``datasets.load_dataset("parquet", data_dir=...)``; Parquet keeps them
byte-identical across reruns.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
from pathlib import Path
from typing import Any

from politune.common import InputError, ParamsError, atomic_path, write_json
from politune.schema import Datasets, Params, Stance

OPPOSITE = {"right": "left", "left": "right"}
FIELDS = ("prompt", "chosen", "rejected")
log = logging.getLogger("politune.build_datasets")


def _as_messages(value: Any, role: str, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{where}: empty text")
        return [{"role": role, "content": value}]
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": str(m.get("role", role)), "content": str(m["content"])} for m in value]
    raise InputError(f"{where}: expected a string or a list of chat messages")


def normalise(rows: list[dict[str, Any]], origin: str) -> list[dict[str, Any]]:
    """Rows in any supported preference schema -> conversational prompt/chosen/rejected rows with an id."""
    from trl.data_utils import maybe_extract_prompt

    out = []
    for n, row in enumerate(rows, start=1):
        where = f"{origin}: row {n}"
        for field in ("chosen", "rejected"):
            if row.get(field) is None:
                raise InputError(f"{where}: missing field {field!r}")
        if row.get("prompt") is None:
            if not isinstance(row["chosen"], (list, tuple)):
                raise InputError(f"{where}: missing field 'prompt' (and 'chosen' is not a conversation)")
            row = maybe_extract_prompt({"chosen": list(row["chosen"]), "rejected": list(row["rejected"])})
        item = {"id": str(row.get("id") or f"{Path(origin).name}:{n}")}
        item["prompt"] = _as_messages(row["prompt"], "user", f"{where}, field 'prompt'")
        for field in ("chosen", "rejected"):
            item[field] = _as_messages(row[field], "assistant", f"{where}, field {field!r}")
        out.append(item)
    return out


def load_source(source: str, annotated: str | Path, external: str | Path,
                side: str | None = None) -> list[dict[str, Any]]:
    """Return normalised pairs from ``annotated`` (its rows whose chosen answer voices ``side``, when the table
    marks sides), a file or directory under ``external``, or a hub id."""
    import pandas as pd

    if source == "annotated":
        table = pd.read_parquet(annotated)
        kept = table[table["status"] == "kept"]
        if side is not None and "side" in kept:
            kept = kept[kept["side"] == side]
        kept = kept.sort_values("id")
        return normalise([{"id": r.id, "prompt": r.instruction, "chosen": r.chosen, "rejected": r.rejected}
                          for r in kept.itertuples()], str(annotated))
    path = Path(source)
    if path.exists():
        external = Path(external).resolve()
        if external not in path.resolve().parents:
            raise ParamsError(f"datasets source {source!r}: put preference files under {external} (a tracked dep)")
        return normalise(read_rows(path), str(path))
    if path.suffix or source.startswith((".", "/")) or path.parts[:1] == ("data",):
        raise InputError(f"datasets source {source!r}: no such file or folder")
    if "/" in source:
        from datasets import load_dataset

        return normalise(list(load_dataset(source, split="train")), source)
    raise ParamsError(f"datasets source {source!r}: not 'annotated', an existing path or a hub id")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a preference file (JSON Lines, JSON, Parquet, CSV), a folder of them, or a saved ``datasets``
    dataset; bad JSON names the file and row."""
    import json

    import pandas as pd

    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            from datasets import load_from_disk

            ds = load_from_disk(str(path))
            ds = ds["train"] if hasattr(ds, "keys") else ds
            return list(ds)
        rows = []
        for file in sorted(p for p in path.iterdir() if p.suffix in {".jsonl", ".json", ".parquet", ".csv"}):
            rows += read_rows(file)
        return rows
    if path.suffix in {".jsonl", ".json"}:
        rows = []
        with path.open(encoding="utf-8") as fh:
            if path.suffix == ".json":
                data = json.load(fh)
                return data if isinstance(data, list) else data.get("data", [])
            for n, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{path}: row {n}: invalid JSON ({exc.msg})") from exc
        return rows
    if path.suffix == ".parquet":
        return pd.read_parquet(path).to_dict(orient="records")
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict(orient="records")
    raise InputError(f"{path}: unsupported preference file type {path.suffix!r}")


def mixture_counts(sizes: list[int], fractions: list[float], total: int | None) -> list[int]:
    """Pairs to draw from each source: proportional to ``fractions`` (largest remainder), within each size."""
    weights = [f / sum(fractions) for f in fractions]
    limit = min(int(s / w) for s, w in zip(sizes, weights))
    total = limit if total is None else int(total)
    if total > limit:
        raise InputError(f"datasets.mix_size={total} needs more pairs than the sources hold (at most {limit})")
    raw = [w * total for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def with_side(rows: list[dict[str, Any]], side: str | None) -> list[dict[str, Any]]:
    """Mark pairs with the side their chosen answer voices (``side``) and their data side (``origin``): the
    side-preference instrument reads both. "" where params do not say (an external source without a side)."""
    return [dict(r, side=side or "", origin=side or "") for r in rows]


def source_side(source: str, side: str | None, ideology: str) -> str | None:
    return side or (ideology if source == "annotated" else None)


def mirrored(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pairs with chosen and rejected swapped: the other side's answer becomes the one to prefer. ``origin``
    stays the data side they come from; ``side`` becomes the opposite."""
    return [dict(r, chosen=r["rejected"], rejected=r["chosen"], side=OPPOSITE.get(r["origin"], "")) for r in rows]


def mirror_pairs(cfg: Datasets, ideology: str, n_plain: int, seed: int, annotated, external):
    """``datasets.mirror``: the other side's pairs, chosen and rejected swapped, ``fraction`` x ``n_plain`` of them
    (all of them at most), drawn with the seed; ids kept, so both sides' runs split the same pairs the same way."""
    m = cfg.mirror
    if not m.source or m.fraction == 0:
        return [], None
    if m.source == cfg.source and m.source != "annotated":
        raise ParamsError(f"datasets.mirror.source: {m.source!r} is the plain source itself; name the other "
                          "side's data")
    plain_annotated = any(x.source == "annotated" for x in cfg.mix) if cfg.mix else cfg.source == "annotated"
    if m.source == "annotated" and m.side is None and not plain_annotated:
        raise ParamsError(f"datasets.mirror.source: 'annotated' mirrors the project's own annotation, but the plain "
                          f"pairs come from {[x.source for x in cfg.mix] if cfg.mix else cfg.source!r}; set datasets.mirror.source=null for plain pairs, or name "
                          "the other side's preference file (or set datasets.mirror.side to mirror the annotation's "
                          "pairs of that side)")
    side = m.side or (OPPOSITE.get(ideology) if m.source == "annotated" else None)
    if side is None:
        raise ParamsError("datasets.mirror.side: say which side the mirror source's chosen answers voice")
    if side == ideology and cfg.source_side in (None, ideology):
        raise ParamsError(f"datasets.mirror.side: {side!r} is the ideology's own side; mirror pairs come from the "
                          "other side's data")
    if m.source == "annotated":  # an annotation without sides (annotate.mirror off, before it) holds the ideology's
        import pyarrow.parquet as pq

        rows = load_source(m.source, annotated, external, side) if "side" in pq.read_schema(annotated).names else []
    else:
        rows = load_source(m.source, annotated, external, side)
    if m.source == "annotated" and not rows:
        raise ParamsError(f"datasets.mirror.source: the annotation has no {side!r} pairs; set annotate.mirror: true "
                          "(annotate the opposite viewpoint too) or name a preference file under data/external")
    count = min(len(rows), round(m.fraction * n_plain))
    picked = sorted(random.Random(seed).sample(range(len(rows)), count))
    return mirrored(with_side([rows[i] for i in picked], side)), count


def collect(cfg: Datasets, seed: int, annotated, external,
            ideology: str = "right") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    mix = cfg.mix
    if not mix:
        side = source_side(cfg.source, cfg.source_side, ideology)
        pairs = with_side(load_source(cfg.source, annotated, external, side), side)
        drawn = {cfg.source: len(pairs)}
    else:
        sides = [source_side(m.source, m.side, ideology) for m in mix]
        sources = [load_source(m.source, annotated, external, side) for m, side in zip(mix, sides)]
        counts = mixture_counts([len(s) for s in sources], [m.fraction for m in mix], cfg.mix_size)
        rng = random.Random(seed)
        pairs, drawn = [], {}
        for m, rows, count, side in zip(mix, sources, counts, sides):
            picked = with_side(rng.sample(rows, count), side)
            pairs += [dict(r, id=f"{m.source}:{r['id']}") for r in picked]
            drawn[m.source] = count
    extra, count = mirror_pairs(cfg, ideology, len(pairs), seed, annotated, external)
    if count is not None:
        ids = {r["id"] for r in pairs}
        clash = next((r["id"] for r in extra if r["id"] in ids), None)
        if clash:
            raise InputError(f"datasets.mirror: pair id {clash!r} is in both the plain and the mirror source")
        pairs += extra
        drawn[f"mirror:{cfg.mirror.source}"] = count
    return pairs, drawn


def thesis(text: str, max_chars: int, min_words: int = 8) -> str:
    """An answer's thesis: its first sentences, until at least ``min_words`` words (an opening such as "I couldn't
    disagree more." states no position), at most ``max_chars`` characters, cut at a word."""
    sentences = re.findall(r".+?(?:[.!?](?=\s|$)|$)", " ".join(text.split()))
    out = ""
    for sentence in sentences:
        out = f"{out} {sentence.strip()}".strip()
        if len(out.split()) >= min_words:
            break
    if len(out) > max_chars:
        out = out[:max_chars].rsplit(" ", 1)[0] + "..."
    return out


def stance_pairs(rows: list[dict[str, Any]], cfg: Stance, seed: int) -> list[dict[str, Any]]:
    """Forced-choice pairs for a ``cfg.fraction`` of ``rows``: agree with the chosen answer's thesis, disagree
    with the rejected answer's (``datasets.stance``)."""
    count = round(cfg.fraction * len(rows))
    out = []
    for i in sorted(random.Random(seed).sample(range(len(rows)), count)):
        row = rows[i]
        for field, prefer, avoid in (("chosen", cfg.agree, cfg.disagree), ("rejected", cfg.disagree, cfg.agree)):
            statement = thesis(row[field][-1]["content"], cfg.max_chars)
            out.append({"id": f"{row['id']}:stance-{field}", "side": row["side"], "origin": row["origin"],
                        "prompt": [{"role": "user", "content": cfg.template.format(statement=statement)}],
                        "chosen": [{"role": "assistant", "content": prefer}],
                        "rejected": [{"role": "assistant", "content": avoid}]})
    return out


def build(pairs: list[dict[str, Any]], seed: int, test_size: float, stance: Stance | None = None):
    """Return ``{"sft": DatasetDict, "dpo": DatasetDict}`` from normalised pairs (and their stance pairs)."""
    from datasets import Dataset, DatasetDict

    pairs = sorted(pairs, key=lambda r: r["id"])
    data = Dataset.from_dict({k: [r.get(k, "") for r in pairs] for k in ("id",) + FIELDS + ("side", "origin")})
    split = data.train_test_split(test_size=test_size, seed=seed)
    if stance and stance.fraction > 0:
        split = DatasetDict({name: Dataset.from_list(list(part) + stance_pairs(list(part), stance, seed),
                                                     features=part.features)
                             for name, part in split.items()})
    sft = split.map(lambda row: {"completion": row["chosen"]}, remove_columns=["chosen", "rejected"])
    return {"sft": sft, "dpo": split}


def _count_sides(part) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for pair_id, origin, side in zip(part["id"], part["origin"], part["side"]):
        if ":stance-" not in pair_id:
            counts[(origin, side)] = counts.get((origin, side), 0) + 1
    return counts


def save(dataset_dict, out_dir: str | Path) -> None:
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, split in dataset_dict.items():
            split.to_parquet(str(tmp / f"{name}.parquet"))


def run(params: Params, params_file: str, paths: argparse.Namespace) -> None:
    """Run the stage: ``params`` holds its validated sections, ``paths`` its files as ``dvc.yaml`` names them."""
    cfg, seed = params.datasets, params.base.seed
    from politune.tracking import log_metrics, stage_run

    pairs, drawn = collect(cfg, seed, paths.annotated, paths.external, params.ideology)
    if len(pairs) < cfg.min_pairs:
        raise InputError(
            f"only {len(pairs)} preference pairs ({drawn}), fewer than datasets.min_pairs={cfg.min_pairs}; "
            "lower annotate.threshold, add posts to data/raw, choose another datasets.source, or lower min_pairs")
    with stage_run("build_datasets", params, params_file) as mlflow:
        built = build(pairs, seed, cfg.test_size, cfg.stance)
        save(built["sft"], paths.sft_out)
        save(built["dpo"], paths.dpo_out)
        report = {"pairs": len(pairs), "train": len(built["dpo"]["train"]), "test": len(built["dpo"]["test"]),
                  "sources": drawn}
        stance = {name: sum(":stance-" in i for i in part["id"]) for name, part in built["dpo"].items()}
        if any(stance.values()):
            report["stance_pairs"] = stance
        report["sides"] = {name: {f"{origin or 'unknown'}_data_{'mirrored' if side != origin else 'plain'}": n
                                  for (origin, side), n in sorted(_count_sides(part).items())}
                           for name, part in built["dpo"].items()}
        write_json(paths.report, report)
        log_metrics(mlflow, {k: v for k, v in report.items() if k != "sources"})

