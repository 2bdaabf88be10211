"""Shared by ``sft`` and ``dpo``: strict config parsing, model loading, curves and metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from politune.common import ParamsError, fingerprint, resolve_bf16, run_folder, stage_parser, write_json

log = logging.getLogger("politune.training")
CHECKPOINT_DEFAULTS = {"report_to": "none", "save_strategy": "steps", "save_steps": 10, "save_total_limit": 1}


def save_adapter(model, directory: str | Path, **kwargs) -> None:
    """``model.save_pretrained`` for a PEFT adapter, with ``target_modules`` sorted in ``adapter_config.json``: PEFT
    writes them in the order of a Python set, which differs between processes, so the same run would give another
    file (and another DVC hash) each time."""
    model.save_pretrained(directory, **kwargs)
    config = Path(directory) / "adapter_config.json"
    if config.exists():
        values = json.loads(config.read_text())
        if isinstance(values.get("target_modules"), list):
            values["target_modules"] = sorted(values["target_modules"])
            config.write_text(json.dumps(values, indent=2, sort_keys=True))


def is_main_process() -> bool:
    """True in a plain run, and in rank 0 of an ``accelerate launch``/``torchrun`` (which set ``RANK``)."""
    return int(os.environ.get("RANK", "0")) == 0


def prepare_checkpoints(directory: str | Path, run_id: str) -> bool:
    """Keep ``directory``'s checkpoints only if they belong to this exact run; return whether to resume.

    A stage killed mid-training resumes on the next ``dvc repro`` from its last checkpoint; after any change to its
    params or inputs the old checkpoints are discarded (no silent resume from a stale run). Under several processes
    only the main one changes the folder; the others reach the same decision from the stamp without touching it.
    """
    directory = Path(directory)
    if not is_main_process():
        return run_folder(directory, run_id, change=False) and any(directory.glob("checkpoint-*"))
    run_folder(directory, run_id)
    checkpoints = sorted(directory.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if checkpoints:
        log.info("resuming from %s", checkpoints[-1])
    return bool(checkpoints)


def strict_config(cls, section: str, values: dict[str, Any], defaults: dict[str, Any] | None = None, **fixed):
    """Build ``cls`` (SFTConfig, DPOConfig, LoraConfig) from a params section; unknown keys fail at once.

    ``fixed`` keys belong to the pipeline (paths, seed) and may not appear in params; ``defaults`` may be overridden.
    ``bf16: auto`` (the one value that is not the TRL field's own) is bf16 autocast where bf16 is native.
    """
    values = {**(defaults or {}), **(values or {})}
    if values.get("bf16") == "auto":
        values["bf16"] = resolve_bf16("auto")
        log.info("%s.bf16: auto -> %s", section, values["bf16"])
    unresolved = sorted(k for k, v in values.items() if v == "auto")
    if unresolved:  # an `auto` its stage resolves (dpo.precompute_ref_log_probs) must not reach TRL as a string
        raise ParamsError(f"{section}: {', '.join(unresolved)}: auto is not resolved here")
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


@contextlib.contextmanager
def labelled_positions_only(args, enabled: bool = True) -> Iterator[bool]:
    """Run TRL's fused LM head on the labelled positions only, on CPU as on GPUs; yields whether it does.

    TRL's SFT and DPO trainers compute per-token log-probabilities with a fused LM head
    (``trl.trainer.utils.add_fused_lm_head``): the vocabulary projection and its softmax in tiles, in fp32. On Triton
    devices it projects only the positions that have a label (the completions); elsewhere every position, prompt and
    padding included, so that a compiler (Neuron, ``torch.compile``) sees fixed tile shapes. Eager CPU training
    compiles nothing, and there the head over every position was nearly half of a DPO step on the default run
    (profiled: 1.8 of 4.0 s). The unlabelled positions' values are discarded either way (zeroed), so the losses and
    gradients are the same (``tests/test_training.py``). Left as TRL has it under ``torch_compile`` and off CPU.

    TRL makes the choice with ``trl.trainer.utils._use_triton(device)`` at each call; that one name is switched here
    for the block and restored after it. A TRL without it keeps its own behaviour (with a warning), and the test above
    fails, so an upgrade that moves it is noticed.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if not enabled or getattr(args, "torch_compile", False):
        yield False
        return
    if original is None or not hasattr(trl_utils, "add_fused_lm_head"):
        log.warning("this TRL has no trl.trainer.utils._use_triton: its fused LM head scores every position on CPU")
        yield False
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield True
    finally:
        trl_utils._use_triton = original


def fit(trainer, resume: bool, evaluate: bool, compact_head: bool = True) -> dict[str, float]:
    """``trainer.train`` (from the last checkpoint when ``resume``), then ``trainer.evaluate`` on its eval split when
    ``evaluate``; both with TRL's fused LM head on the labelled positions only (``compact_head``: off only to time
    TRL's default). Returns the evaluation's metrics (empty without one)."""
    with labelled_positions_only(trainer.args, compact_head):
        trainer.train(resume_from_checkpoint=True if resume else None)
        return trainer.evaluate() if evaluate else {}


def load_target(model_dir: str | Path):
    import torch
    from transformers import AutoModelForCausalLM

    from politune.inference import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
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


def training_parser(description: str, adapter: bool = False):
    """The CLI shared by ``sft`` and ``dpo`` (every path comes from dvc.yaml)."""
    parser = stage_parser(description)
    parser.add_argument("--model", required=True, help="target model directory")
    if adapter:
        parser.add_argument("--adapter", required=True, help="SFT adapter directory to continue")
    parser.add_argument("--data", required=True, help="dataset directory (Parquet splits)")
    parser.add_argument("--out", required=True, help="adapter output directory")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--curve", required=True, help="per-step training log (DVC plot)")
    parser.add_argument("--checkpoints", required=True, help="checkpoint folder kept across an interruption")
    return parser


def log_training(mlflow, trainer, metrics: dict[str, Any], adapter_dir: str | Path, step_keys: tuple[str, ...]):
    """Mirror the per-step curve, the final metrics and the adapter to MLflow."""
    from politune.tracking import log_artifacts, log_metrics

    for rec in trainer.state.log_history:
        if "loss" in rec:
            log_metrics(mlflow, {k.replace("/", "_"): v for k, v in rec.items() if k in step_keys}, step=rec["step"])
    log_metrics(mlflow, metrics)
    log_artifacts(mlflow, adapter_dir, "adapter")


def run_training(stage: str, params, params_file: str, paths, inputs: tuple, train, step_keys: tuple[str, ...]) -> None:
    """The body shared by the ``sft`` and ``dpo`` stages: resume only from this exact run's checkpoints (params and
    ``inputs`` fingerprinted), ``train(resume)`` -> (trainer, extra metrics), the reports and the MLflow mirror
    written by the main process only, then the checkpoints dropped (finished: nothing to resume)."""
    import contextlib

    from politune.tracking import stage_run

    resume = prepare_checkpoints(paths.checkpoints, fingerprint(params, *inputs))
    main_process = is_main_process()
    with stage_run(stage, params, params_file) if main_process else contextlib.nullcontext() as mlflow:
        trainer, extra = train(resume)
        if main_process:  # under `accelerate launch`, one process writes the outputs
            metrics = write_training_reports(trainer, paths.metrics, paths.curve, extra)
            log_training(mlflow, trainer, metrics, paths.out, step_keys)
    if main_process:
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
