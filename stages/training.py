"""Shared by ``sft`` and ``dpo``: strict config parsing, model loading, curves and metrics."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from stages.common import ParamsError, write_json


def strict_config(cls, section: str, values: dict[str, Any], defaults: dict[str, Any] | None = None, **fixed):
    """Build ``cls`` (SFTConfig, DPOConfig, LoraConfig) from a params section; unknown keys fail at once.

    ``fixed`` keys belong to the pipeline (paths, seed) and may not appear in params; ``defaults`` may be overridden.
    """
    values = {**(defaults or {}), **(values or {})}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ParamsError(f"{section}: unknown {cls.__name__} field(s): {', '.join(unknown)}")
    clash = sorted(set(values) & set(fixed))
    if clash:
        raise ParamsError(f"{section}: {', '.join(clash)} is set by the pipeline, remove it from params")
    try:
        return cls(**values, **fixed)
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"{section}: {exc}") from exc


def load_target(model_dir: str | Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, tokenizer


def load_splits(data_dir: str | Path):
    from datasets import load_dataset

    data_dir = Path(data_dir)
    files = {p.stem: str(p) for p in sorted(data_dir.glob("*.parquet"))}
    return load_dataset("parquet", data_files=files)


def curves(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-step training records (DVC plot data) from ``trainer.state.log_history``."""
    rows = []
    for rec in log_history:
        if "loss" in rec and "step" in rec:
            rows.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return rows


def write_training_reports(trainer, metrics_path: str | Path, curve_path: str | Path, extra: dict[str, Any]):
    history = trainer.state.log_history
    final = next((r for r in reversed(history) if "train_loss" in r), {})
    metrics = {"train_loss": round(final.get("train_loss", float("nan")), 6),
               "steps": trainer.state.global_step,
               "train_seconds": round(final.get("train_runtime", 0.0), 2)}
    metrics.update(extra)
    write_json(metrics_path, metrics)
    write_json(curve_path, curves(history))
    return metrics
