"""Stage ``sft``: supervised fine-tuning of a LoRA adapter on the target model with TRL's ``SFTTrainer``.

The ``sft`` params section is parsed strictly into ``trl.SFTConfig`` and ``lora`` into ``peft.LoraConfig``. The
adapter (not the merged model) is saved to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil

from politune.common import atomic_path, seed_everything
from politune.schema import Params
from politune.training import (
    CHECKPOINT_DEFAULTS,
    fingerprint,
    is_main_process,
    load_splits,
    load_target,
    log_training,
    prepare_checkpoints,
    strict_config,
    write_training_reports,
)

log = logging.getLogger("politune.sft")


def train(model_dir, data_dir, out_dir, params, work_dir, resume=False):
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
    trainer.train(resume_from_checkpoint=True if resume else None)
    eval_metrics = trainer.evaluate() if "test" in splits else {}
    if not trainer.is_world_process_zero():
        return trainer, {}
    with atomic_path(out_dir) as tmp:
        trainer.model.save_pretrained(tmp)
    return trainer, {"eval_loss": round(eval_metrics["eval_loss"], 6)} if eval_metrics else {}


def run(params: Params, params_file: str, paths: argparse.Namespace) -> None:
    """Run the stage: ``params`` holds its validated sections, ``paths`` its files as ``dvc.yaml`` names them."""
    from politune.tracking import stage_run

    resume = prepare_checkpoints(paths.checkpoints, fingerprint(params, paths.model, paths.data))
    main_process = is_main_process()
    with stage_run("sft", params, params_file) if main_process else contextlib.nullcontext() as mlflow:
        trainer, extra = train(paths.model, paths.data, paths.out, params, paths.checkpoints, resume)
        if main_process:  # under `accelerate launch`, one process writes the outputs
            metrics = write_training_reports(trainer, paths.metrics, paths.curve, extra)
            log_training(mlflow, trainer, metrics, paths.out, ("loss",))
    if main_process:
        shutil.rmtree(paths.checkpoints, ignore_errors=True)  # finished: nothing to resume

