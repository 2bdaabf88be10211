"""Stage ``dpo``: DPO with TRL's ``DPOTrainer``, continuing the SFT LoRA adapter.

With ``recipe.dpo_start: sft`` (the paper's recipe) the SFT adapter is loaded as a trainable ``PeftModel`` (stacked
on the base model, not merged). TRL copies it into a frozen ``ref`` adapter, so the reference policy is the SFT model
and no second model is loaded. With ``recipe.dpo_start: base`` (the ablation "DPO without SFT") DPO trains a fresh
adapter from the ``lora`` params on the base model, and TRL uses the base model (adapter disabled) as the
reference. The ``dpo`` params
section is parsed strictly into ``trl.DPOConfig``. The trained adapter (base + this adapter = the DPO model) is saved
to ``--out``; with ``--trajectory``, a snapshot of the adapter at every checkpoint (every ``dpo.save_steps`` steps)
is saved to ``<trajectory>/step-N`` for the evaluate stage's compass trajectory. Snapshots are kept with the
checkpoints while training, so a resumed run still has the ones before the interruption.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from politune.common import atomic_path, seed_everything
from politune.schema import Params
from politune.training import CHECKPOINT_DEFAULTS, load_splits, load_target, run_training, save_adapter, strict_config

log = logging.getLogger("politune.dpo")


def snapshot_callback(directory: Path):
    """A TrainerCallback that saves the trained adapter (not the frozen ref) at every checkpoint to ``step-N``."""
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and model is not None:
                save_adapter(model, directory / f"step-{state.global_step}", selected_adapters=["default"])

    return Snapshots()


def train(model_dir, adapter_dir, data_dir, out_dir, params: Params, work_dir, resume=False, trajectory_dir=None,
          callbacks=()):
    """Train the DPO adapter (``callbacks``: more ``TrainerCallback``s, e.g. the benchmark's clock)."""
    from peft import LoraConfig, PeftModel
    from trl import DPOConfig, DPOTrainer

    seed = params.base.seed
    config = strict_config(DPOConfig, "dpo", params.dpo, defaults=CHECKPOINT_DEFAULTS,
                           output_dir=str(work_dir), seed=seed)
    seed_everything(seed)
    base, tokenizer = load_target(model_dir)
    if params.recipe.dpo_start == "sft":
        model, peft_config = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True), None
    else:  # a fresh adapter from the lora params (what SFT would train); the SFT adapter is not read
        model, peft_config = base, strict_config(LoraConfig, "lora", params.lora)
    splits = load_splits(data_dir)
    trainer = DPOTrainer(model=model, args=config, train_dataset=splits["train"], peft_config=peft_config,
                         eval_dataset=splits.get("test"), processing_class=tokenizer,
                         callbacks=[*callbacks, *([snapshot_callback(Path(work_dir) / "trajectory")]
                                                  if trajectory_dir else [])] or None)
    trainer.train(resume_from_checkpoint=True if resume else None)
    eval_metrics = trainer.evaluate() if "test" in splits else {}
    if not trainer.is_world_process_zero():
        return trainer, {}
    with atomic_path(out_dir) as tmp:
        save_adapter(trainer.model, tmp, selected_adapters=["default"])
    if trajectory_dir:
        snapshots = Path(work_dir) / "trajectory"
        with atomic_path(trajectory_dir) as tmp:
            shutil.copytree(snapshots, tmp) if snapshots.is_dir() else tmp.mkdir()
    extra = {}
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        if key in eval_metrics:
            extra[key.replace("/", "_")] = round(eval_metrics[key], 6)
    return trainer, extra


def run(params: Params, params_file: str, paths: argparse.Namespace) -> None:
    """Run the stage: ``params`` holds its validated sections, ``paths`` its files as ``dvc.yaml`` names them."""
    run_training("dpo", params, params_file, paths, (paths.model, paths.adapter, paths.data),
                 lambda resume: train(paths.model, paths.adapter, paths.data, paths.out, params, paths.checkpoints,
                                      resume, paths.trajectory),
                 ("loss", "rewards/accuracies", "rewards/margins"))
