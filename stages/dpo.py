"""Stage ``dpo``: DPO with TRL's ``DPOTrainer``, continuing the SFT LoRA adapter.

The SFT adapter is loaded as a trainable ``PeftModel`` (stacked on the base model, not merged). TRL copies it into a
frozen ``ref`` adapter, so the reference policy is the SFT model and no second model is loaded. The ``dpo`` params
section is parsed strictly into ``trl.DPOConfig``. The trained adapter (base + this adapter = the DPO model) is saved
to ``--out``.
"""

from __future__ import annotations

import logging
import shutil

from stages.common import atomic_path, load_params, run_main, seed_everything
from stages.training import (CHECKPOINT_DEFAULTS, fingerprint, load_splits, load_target, log_training,
                             prepare_checkpoints, strict_config, training_parser, write_training_reports)

SECTIONS = ("base", "dpo")
log = logging.getLogger("politune.dpo")


def train(model_dir, adapter_dir, data_dir, out_dir, params, work_dir, resume=False):
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    seed = params["base"]["seed"]
    config = strict_config(DPOConfig, "dpo", params["dpo"], defaults=CHECKPOINT_DEFAULTS,
                           output_dir=str(work_dir), seed=seed)
    seed_everything(seed)
    base, tokenizer = load_target(model_dir)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    splits = load_splits(data_dir)
    trainer = DPOTrainer(model=model, args=config, train_dataset=splits["train"],
                         eval_dataset=splits.get("test"), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=True if resume else None)
    eval_metrics = trainer.evaluate() if "test" in splits else {}
    with atomic_path(out_dir) as tmp:
        trainer.model.save_pretrained(tmp, selected_adapters=["default"])
    extra = {}
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        if key in eval_metrics:
            extra[key.replace("/", "_")] = round(eval_metrics[key], 6)
    return trainer, extra


def main(argv=None) -> None:
    args = training_parser(__doc__.splitlines()[0], adapter=True).parse_args(argv)
    params = load_params(args.params, SECTIONS)
    from stages.tracking import stage_run

    resume = prepare_checkpoints(args.checkpoints, fingerprint(params, args.model, args.adapter, args.data))
    with stage_run("dpo", params) as mlflow:
        trainer, extra = train(args.model, args.adapter, args.data, args.out, params, args.checkpoints, resume)
        metrics = write_training_reports(trainer, args.metrics, args.curve, extra)
        log_training(mlflow, trainer, metrics, args.out, ("loss", "rewards/accuracies", "rewards/margins"))
    shutil.rmtree(args.checkpoints, ignore_errors=True)  # finished: nothing to resume


if __name__ == "__main__":
    run_main(main)
