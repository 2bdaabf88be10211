"""Stage ``dpo``: DPO with TRL's ``DPOTrainer``, continuing the SFT LoRA adapter.

The SFT adapter is loaded as a trainable ``PeftModel`` (stacked on the base model, not merged). TRL copies it into a
frozen ``ref`` adapter, so the reference policy is the SFT model and no second model is loaded. The ``dpo`` params
section is parsed strictly into ``trl.DPOConfig``. The trained adapter (base + this adapter = the DPO model) is saved
to ``--out``.
"""

from __future__ import annotations

import logging
import tempfile

from stages.common import atomic_path, load_params, run_main, seed_everything, stage_parser
from stages.training import load_splits, load_target, strict_config, write_training_reports

SECTIONS = ("base", "dpo")
log = logging.getLogger("politune.dpo")


def train(model_dir, adapter_dir, data_dir, out_dir, params, work_dir):
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    seed = params["base"]["seed"]
    config = strict_config(DPOConfig, "dpo", params["dpo"], defaults={"report_to": "none", "save_strategy": "no"},
                           output_dir=str(work_dir), seed=seed)
    seed_everything(seed)
    base, tokenizer = load_target(model_dir)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    splits = load_splits(data_dir)
    trainer = DPOTrainer(model=model, args=config, train_dataset=splits["train"],
                         eval_dataset=splits.get("test"), processing_class=tokenizer)
    trainer.train()
    eval_metrics = trainer.evaluate() if "test" in splits else {}
    with atomic_path(out_dir) as tmp:
        trainer.model.save_pretrained(tmp, selected_adapters=["default"])
    extra = {}
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        if key in eval_metrics:
            extra[key.replace("eval_", "eval_").replace("/", "_")] = round(eval_metrics[key], 6)
    return trainer, extra


def main(argv=None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="target model directory")
    parser.add_argument("--adapter", required=True, help="SFT adapter directory")
    parser.add_argument("--data", required=True, help="DPO dataset directory (Parquet splits)")
    parser.add_argument("--out", required=True, help="adapter output directory")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--curve", required=True, help="per-step training log (DVC plot)")
    args = parser.parse_args(argv)
    params = load_params(args.params, SECTIONS)
    from stages.tracking import log_artifacts, log_metrics, stage_run

    with stage_run("dpo", params) as mlflow, tempfile.TemporaryDirectory(prefix="politune-dpo-") as work:
        trainer, extra = train(args.model, args.adapter, args.data, args.out, params, work)
        metrics = write_training_reports(trainer, args.metrics, args.curve, extra)
        for rec in trainer.state.log_history:
            if "loss" in rec:
                log_metrics(mlflow, {k.replace("/", "_"): v for k, v in rec.items()
                                     if k in ("loss", "rewards/accuracies", "rewards/margins")}, step=rec["step"])
        log_metrics(mlflow, metrics)
        log_artifacts(mlflow, args.out, "adapter")


if __name__ == "__main__":
    run_main(main)
