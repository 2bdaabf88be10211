"""DPO step time, measured by the ``dpo`` stage's own training code (``politune.dpo.train``) on the pipeline's data.

Each configuration runs in a process of its own (so peak memory is its own) for the same steps on the same data
and seed, and reports seconds per optimiser step (steady state, the first step excluded, plus any one-off
precomputation spread over the steps), peak RSS, the final training loss and the loss on the test split.

    python -m bench.dpo --configs default optimised --steps 12 --out bench-out/dpo.json

The params are ``params.yaml``'s (``base``, ``recipe``, ``lora``, ``dpo``: batch, length, learning rate, beta), with
``max_steps`` and no checkpoints; each configuration (``CONFIGS``) overrides only the ``dpo`` keys it names:
``default`` is TRL's defaults on CPU (fp32, no precomputation, gradient checkpointing, the fused LM head over every
position), ``optimised`` is ``params.yaml``'s own ``dpo`` section as the stage resolves it on this machine (``bf16:
auto``: bf16 autocast where the CPU has AVX512-BF16 or AMX; ``precompute_ref_log_probs: auto``: the frozen
reference's log-probabilities computed once only when the run sees the average pair more than once;
``gradient_checkpointing: false``) with the LM head over the labelled positions only
(``politune.training.labelled_positions_only``); the others change one thing from the default each, and
``bf16_precompute`` two.
``--steps`` defaults to the default run's ``dpo.max_steps``, so the all-in figure is the default run's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

# TRL's defaults on CPU, and one change from them at a time; "compact_head" is not a DPOConfig field but the
# stages' ``politune.training.labelled_positions_only`` (on unless a configuration turns it off).
TRL_DEFAULT = {"bf16": False, "precompute_ref_log_probs": False, "gradient_checkpointing": True, "compact_head": False}
CONFIGS = {
    "default": TRL_DEFAULT,
    "precompute": {**TRL_DEFAULT, "precompute_ref_log_probs": True},
    "bf16": {**TRL_DEFAULT, "use_cpu": True, "bf16": True},
    "no_checkpointing": {**TRL_DEFAULT, "gradient_checkpointing": False},
    "compact_head": {**TRL_DEFAULT, "compact_head": True},
    "bf16_precompute": {**TRL_DEFAULT, "use_cpu": True, "bf16": True, "precompute_ref_log_probs": True},
    "optimised": {},  # params.yaml's dpo section as it is (bf16: auto, precompute_ref_log_probs: auto, ...)
}
SECTIONS = ("base", "launch", "recipe", "lora", "dpo")


def run_one(name: str, args) -> dict:
    """Train ``args.steps`` DPO steps under configuration ``name`` with the stage's code; runs in its own process."""
    from transformers import TrainerCallback

    from politune import dpo
    from politune.common import load_params

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter())

    params = load_params(args.params, SECTIONS)
    config = dict(CONFIGS[name])
    compact = config.pop("compact_head", True)
    params.dpo = {**params.dpo, **config, "max_steps": args.steps, "save_strategy": "no", "logging_steps": 1}
    clock = Clock()
    work = Path(args.work) / name
    t0 = time.perf_counter()
    trainer, extra = dpo.train(args.model, args.adapter, args.data, work / "adapter", params, work / "run",
                               callbacks=[clock], compact_head=compact)
    total = time.perf_counter() - t0
    steady = (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    used = {k: getattr(trainer.args, k) for k in ("bf16", "precompute_ref_log_probs", "gradient_checkpointing")}
    used["compact_head"] = compact
    return {"config": CONFIGS[name], "resolved": used, "steps": trainer.state.global_step,
            "seconds_per_step": round(steady, 3), "seconds_per_step_all_in": round(total / args.steps, 3),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "final_loss": round(float(sum(losses[-3:]) / len(losses[-3:])), 4),
            # the stage's own evaluation on the test split, after training (dpo.train's metrics)
            "eval_loss": round(float(extra["eval_loss"]), 4),
            "eval_reward_accuracy": round(float(extra.get("eval_rewards_accuracies", float("nan"))), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/target")
    parser.add_argument("--adapter", default="models/sft")
    parser.add_argument("--data", default="data/datasets/dpo")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--configs", nargs="+", default=["default", "optimised"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, help="optimiser steps (default: params.yaml's dpo.max_steps)")
    parser.add_argument("--work", default="bench-out/dpo-work")
    parser.add_argument("--out", required=True)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    args = parser.parse_args()
    if args.steps is None:
        from politune.common import read_yaml

        args.steps = int(read_yaml(args.params)["dpo"]["max_steps"])
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return
    from politune.common import cpu_bf16

    results = {"cpu_bf16": cpu_bf16()}
    for name in args.configs:
        if CONFIGS[name].get("bf16") and not results["cpu_bf16"]:
            print(f"{name}: skipped, this CPU has no bf16 instructions", flush=True)
            continue
        cmd = [sys.executable, "-m", "bench.dpo", "--one", name] + [a for k in ("model", "adapter", "data", "params", "work")
                                                                     for a in (f"--{k}", getattr(args, k))]
        cmd += ["--steps", str(args.steps), "--out", args.out]
        # A datasets cache of its own: TRL caches precomputed reference log-probabilities there, keyed by the data
        # and the weights, so a configuration would otherwise reuse an earlier run's and time no precomputation.
        cache = Path(args.work) / name / "hf-datasets"
        shutil.rmtree(cache, ignore_errors=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_DATASETS_CACHE=str(cache)))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT "):])
        print(name, results[name], flush=True)
    if "default" in results and "optimised" in results:
        d, o = results["default"], results["optimised"]
        results["speedup_optimised_vs_default"] = round(d["seconds_per_step"] / o["seconds_per_step"], 2)
        results["speedup_optimised_vs_default_all_in"] = round(
            d["seconds_per_step_all_in"] / o["seconds_per_step_all_in"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
