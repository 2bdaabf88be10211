"""Stage ``sft``: supervised fine-tuning of a LoRA adapter on the target model with TRL's ``SFTTrainer``.

The ``sft`` params section is parsed strictly into ``trl.SFTConfig`` and ``lora`` into ``peft.LoraConfig``. The
adapter (not the merged model) is saved to ``--out``.
"""

from __future__ import annotations

import logging
import tempfile

from stages.common import atomic_path, load_params, run_main, seed_everything, stage_parser
from stages.training import load_splits, load_target, strict_config, write_training_reports

SECTIONS = ("base", "lora", "sft")
log = logging.getLogger("politune.sft")


def train(model_dir, data_dir, out_dir, params, work_dir):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    seed = params["base"]["seed"]
    lora = strict_config(LoraConfig, "lora", params["lora"])
    config = strict_config(SFTConfig, "sft", params["sft"], defaults={"report_to": "none", "save_strategy": "no"},
                           output_dir=str(work_dir), seed=seed)
    seed_everything(seed)
    model, tokenizer = load_target(model_dir)
    splits = load_splits(data_dir)
    trainer = SFTTrainer(model=model, args=config, train_dataset=splits["train"],
                         eval_dataset=splits.get("test"), processing_class=tokenizer, peft_config=lora)
    trainer.train()
    eval_metrics = trainer.evaluate() if "test" in splits else {}
    with atomic_path(out_dir) as tmp:
        trainer.model.save_pretrained(tmp)
    return trainer, {"eval_loss": round(eval_metrics["eval_loss"], 6)} if eval_metrics else {}


def main(argv=None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="target model directory")
    parser.add_argument("--data", required=True, help="SFT dataset directory (Parquet splits)")
    parser.add_argument("--out", required=True, help="adapter output directory")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--curve", required=True, help="per-step training log (DVC plot)")
    args = parser.parse_args(argv)
    params = load_params(args.params, SECTIONS)
    from stages.tracking import log_artifacts, log_metrics, stage_run

    with stage_run("sft", params) as mlflow, tempfile.TemporaryDirectory(prefix="politune-sft-") as work:
        trainer, extra = train(args.model, args.data, args.out, params, work)
        metrics = write_training_reports(trainer, args.metrics, args.curve, extra)
        for rec in trainer.state.log_history:
            if "loss" in rec:
                log_metrics(mlflow, {"loss": rec["loss"]}, step=rec["step"])
        log_metrics(mlflow, metrics)
        log_artifacts(mlflow, args.out, "adapter")


if __name__ == "__main__":
    run_main(main)
