"""Stage ``dpo``: preference tuning with TRL (DPO by default), continuing the SFT LoRA adapter.

``recipe.method`` picks TRL's trainer, and its params section (named like the TRL config it is parsed into) holds
its settings: ``dpo`` (``DPOConfig``; IPO and the other DPO losses through ``dpo.loss_type``), ``kto``
(``KTOConfig``: the preference pairs are unpaired by TRL into desirable and undesirable answers), ``orpo``
(``ORPOConfig``) and ``cpo`` (``CPOConfig``; SimPO is ``cpo.loss_type: simpo``), the last two reference-free, from
``trl.experimental``. Whatever the method, the stage's output is the preference-tuned adapter evaluated as "dpo".

With ``recipe.dpo_start: sft`` (the paper's recipe) the SFT adapter is loaded as a trainable ``PeftModel`` (stacked
on the base model, not merged). TRL copies it into a frozen ``ref`` adapter, so the reference policy is the SFT model
and no second model is loaded. With ``recipe.dpo_start: base`` (the ablation "DPO without SFT") DPO trains a fresh
adapter from the ``lora`` params on the base model, and TRL uses the base model (adapter disabled) as the
reference (for KTO the base model in both cases; ORPO and CPO use none). The method's params section is parsed
strictly into its TRL config. The trained adapter (base + this adapter = the DPO model) is saved
to ``--out``; with ``--trajectory``, a snapshot of the adapter at every checkpoint (every ``save_steps`` steps of the method's section)
is saved to ``<trajectory>/step-N`` for the evaluate stage's compass trajectory. Snapshots are kept with the
checkpoints while training, so a resumed run still has the ones before the interruption.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

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

log = logging.getLogger("politune.dpo")


def snapshot_callback(directory: Path):
    """A TrainerCallback that saves the trained adapter (not the frozen ref) at every checkpoint to ``step-N``."""
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and model is not None:
                save_adapter(model, directory / f"step-{state.global_step}", selected_adapters=["default"])

    return Snapshots()


METHODS = {  # recipe.method -> (module, TRL config, TRL trainer); its params section is named after the method
    "dpo": ("trl", "DPOConfig", "DPOTrainer"),
    "kto": ("trl", "KTOConfig", "KTOTrainer"),
    "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
    "cpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer"),
}


def method_classes(method: str):
    """TRL's (config class, trainer class) of ``recipe.method``."""
    import importlib
    import warnings

    module, config, trainer = METHODS[method]
    with warnings.catch_warnings():  # trl.experimental announces itself on import
        warnings.simplefilter("ignore")
        mod = importlib.import_module(module)
    return getattr(mod, config), getattr(mod, trainer)


def precompute_pays(values: dict[str, Any], n_train: int) -> bool:
    """Whether computing the frozen reference's log-probabilities once for every training pair, before training,
    costs less than computing them for each batch as it comes: it does when the run sees the average pair more than
    once (``max_steps`` x batch x accumulation, or the epochs, against the training pairs). A run shorter than one
    epoch would precompute pairs it never uses (measured by ``bench.dpo``)."""
    steps = values.get("max_steps", -1)
    if steps is None or steps <= 0:
        return float(values.get("num_train_epochs", 3.0)) > 1
    per_step = values.get("per_device_train_batch_size", 8) * values.get("gradient_accumulation_steps", 1)
    return steps * per_step > n_train


def resolve_precompute(values: dict[str, Any], n_train: int, section: str) -> dict[str, Any]:
    """``precompute_ref_log_probs: auto`` (not a TRL value) becomes true exactly when ``precompute_pays``."""
    if values.get("precompute_ref_log_probs") == "auto":
        values["precompute_ref_log_probs"] = precompute_pays(values, n_train)
        log.info("%s.precompute_ref_log_probs: auto -> %s (%d training pairs, max_steps %s)", section,
                 values["precompute_ref_log_probs"], n_train, values.get("max_steps"))
    return values


def train(model_dir, adapter_dir, data_dir, out_dir, params: Params, work_dir, resume=False, trajectory_dir=None,
          callbacks=(), compact_head=True):
    """Train the preference-tuned adapter with ``recipe.method`` (``callbacks``: more ``TrainerCallback``s, e.g. the
    benchmark's clock; ``compact_head``: ``training.fit``, off only to time TRL's default)."""
    from peft import LoraConfig, PeftModel

    seed = params.base.seed
    method = params.recipe.method
    config_class, trainer_class = method_classes(method)
    splits = load_splits(data_dir)
    values = resolve_precompute(dict(getattr(params, method)), len(splits["train"]), method)
    config = strict_config(config_class, method, values, defaults=CHECKPOINT_DEFAULTS, output_dir=str(work_dir),
                           seed=seed)
    seed_everything(seed)
    base, tokenizer = load_target(model_dir)
    if params.recipe.dpo_start == "sft":
        model, peft_config = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True), None
    else:  # a fresh adapter from the lora params (what SFT would train); the SFT adapter is not read
        model, peft_config = base, strict_config(LoraConfig, "lora", params.lora)
    trainer = trainer_class(model=model, args=config, train_dataset=splits["train"], peft_config=peft_config,
                         eval_dataset=splits.get("test"), processing_class=tokenizer,
                         callbacks=[*callbacks, *([snapshot_callback(Path(work_dir) / "trajectory")]
                                                  if trajectory_dir else [])] or None)
    eval_metrics = fit(trainer, resume, "test" in splits, compact_head)
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
