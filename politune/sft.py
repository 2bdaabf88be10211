"""Stage ``sft``: supervised fine-tuning of a LoRA adapter on the target model with TRL's ``SFTTrainer``.

The ``sft`` params section is parsed strictly into ``trl.SFTConfig`` and ``lora`` into ``peft.LoraConfig``. The
adapter (not the merged model) is saved to ``--out``.
"""

from __future__ import annotations

import argparse
import logging

from politune.common import atomic_path, seed_everything
from politune.schema import Params
from politune.training import (
    CHECKPOINT_DEFAULTS,
    fit,
    load_splits,
    load_target,
    run_training,
    save_adapter,
    strict_config,
)

log = logging.getLogger("politune.sft")


def train(model_dir, data_dir, out_dir, params, work_dir, resume=False, compact_head=True):
    """Train the SFT adapter (``compact_head``: ``training.fit``; off only to time TRL's default)."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    seed = params.base.seed
    lora = strict_config(LoraConfig, "lora", params.lora)
    config = strict_config(SFTConfig, "sft", params.sft, defaults=CHECKPOINT_DEFAULTS,
                           output_dir=str(work_dir), seed=seed)
    seed_everything(seed)
    model, tokenizer = load_target(model_dir)
    splits = load_splits(data_dir)
    trainer = SFTTrainer(model=model, args=config, train_dataset=splits["train"],
                         eval_dataset=splits.get("test"), processing_class=tokenizer, peft_config=lora)
    eval_metrics = fit(trainer, resume, "test" in splits, compact_head)
    if not trainer.is_world_process_zero():
        return trainer, {}
    with atomic_path(out_dir) as tmp:
        save_adapter(trainer.model, tmp)
    return trainer, {"eval_loss": round(eval_metrics["eval_loss"], 6)} if eval_metrics else {}


def run(params: Params, params_file: str, paths: argparse.Namespace) -> None:
    """Run the stage: ``params`` holds its validated sections, ``paths`` its files as ``dvc.yaml`` names them."""
    run_training("sft", params, params_file, paths, (paths.model, paths.data),
                 lambda resume: train(paths.model, paths.data, paths.out, params, paths.checkpoints, resume), ("loss",))
