"""The ``evaluate`` stage's time, by part, on the default pipeline's models: its own command from ``dvc.yaml`` with
``params.yaml``, its outputs moved under ``--work`` (the pipeline's are not touched), MLflow off.

    python -m bench.evaluate --out bench-out/evaluate.json

Runs the stage ``--repeats`` times (3), one after another, as this machine's speed drifts by 10-15% over tens of
minutes (docs/benchmarks.md), and reports each figure's median over the runs and each run's own: the stage's wall
time, the seconds of each part as the stage measures them (``load``: the model and its adapters; ``compass``: every
model's forced-choice answers, the reversed twins and the DPO trajectory included; ``side_preference``: the
held-out pairs), and whether the answers and metrics are byte-identical to the pipeline's own
(``reports/compass_answers.csv``, ``reports/metrics.json``), which they must be on the machine that produced them.
Needs the default pipeline's outputs (``make repro``).

It also gives the compass part's floor on this machine: the matrix products the forced choice cannot avoid (every
prompt's tokens after the prefix its template's prompts share, through every weight matrix of the model and its
adapter, and one vocabulary projection per prompt; attention and everything else left out), counted for the models
the stage evaluates, divided by the rate this machine reaches on a matrix of the model's shape: ``torch.mm`` in fp32
and in bf16, and the oneDNN fp32 linear layer the stage uses (``fp32_onednn``). The fp32 floors are what an
implementation with the same fp32 answers needs at least, through each library.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from demo.sweep import stage_commands
from politune.common import read_yaml


def gemm_gflops(dtype, rows: int, inner: int, outer: int, seconds: float = 2.0, onednn: bool = False) -> float:
    """GFLOP/s of ``torch.mm`` on this machine (torch's own threads) for a (rows x inner) @ (inner x outer) product;
    with ``onednn``, of the oneDNN linear layer the stage runs its fp32 models with (``inference.onednn_linears``)."""
    import torch

    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, outer, dtype=dtype)
    if onednn:
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous())

        def product():
            return torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    else:
        def product():
            return a @ b
    for _ in range(3):
        product()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        product()
        done += 1
    return 2 * rows * inner * outer * done / (time.perf_counter() - t0) / 1e9


def compass_floor(params_file: str, model_dir: str = "models/target", adapter: str = "models/dpo",
                  trajectory: str = "models/dpo_trajectory") -> dict:
    """The compass part's matrix-product work for the stage's models and prompts, and its floor in seconds at this
    machine's fp32 and bf16 ``torch.mm`` rates."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from politune.common import load_params
    from politune.compass import load_compass, load_twins
    from politune.evaluate import forced_choice_prompts, trajectory_dirs, trajectory_snapshots
    from politune.inference import chat_texts, load_tokenizer, onednn_available, shared_prefix_length, token_ids

    cfg = load_params(params_file, ["evaluate"]).evaluate
    compass = load_compass("data/compass/political_compass.json")
    statements = [compass.statements]
    if cfg.balanced:
        statements.append(load_twins("data/compass/reversed.json", compass).statements)
    tokenizer = load_tokenizer(model_dir)

    def unshared_tokens(items):  # as the stage runs them: template by template, after the prefix they share
        tokens = prompts = 0
        for template in cfg.templates:
            ids = token_ids(tokenizer, chat_texts(tokenizer, forced_choice_prompts(template, items)))
            tokens, prompts = tokens + sum(map(len, ids)) - len(ids) * shared_prefix_length(ids), prompts + len(ids)
        return tokens, prompts

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    head = model.get_output_embeddings()
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") as f:
        weights += sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    # the stage's own rule: the snapshot that is the final adapter is not asked again
    snapshots = trajectory_snapshots(adapter, trajectory_dirs(trajectory))[0] if cfg.trajectory else {}
    originals = unshared_tokens(statements[0])
    everything = [unshared_tokens(items) for items in statements]
    tokens = 3 * sum(t for t, _ in everything) + len(snapshots) * originals[0]
    prompts = 3 * sum(n for _, n in everything) + len(snapshots) * originals[1]
    flop = 2 * weights * tokens + 2 * head.weight.numel() * prompts
    hidden = model.config.hidden_size
    rates = {name: gemm_gflops(dtype, 1024, hidden, 4 * hidden) for name, dtype in
             (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    if onednn_available():  # the rate the stage's fp32 linear layers run at
        rates["fp32_onednn"] = gemm_gflops(torch.float32, 1024, hidden, 4 * hidden, onednn=True)
    return {"compass_models": 3 + len(snapshots), "compass_prompts": prompts, "compass_tokens": tokens,
            "compass_tflop": round(flop / 1e12, 2),
            **{f"gemm_gflops_{k}": round(v, 1) for k, v in rates.items()},
            **{f"compass_floor_seconds_{k}": round(flop / (v * 1e9), 1) for k, v in rates.items()}}


def run_stage(cmd: list[str], work: Path) -> dict:
    """One run of the stage: its wall time, its parts' seconds as it logs them, and whether its answers and metrics
    are byte-identical to the pipeline's."""
    env = dict(os.environ, POLITUNE_MLFLOW="off")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"evaluate failed:\n{proc.stderr[-4000:]}")
    found = re.search(r"seconds: (\{.*\})", proc.stderr + proc.stdout)
    if not found:
        raise SystemExit("evaluate did not log its parts' seconds")
    parts = ast.literal_eval(found.group(1))
    same = {name: (work / "reports" / name).read_bytes() == Path("reports", name).read_bytes()
            for name in ("compass_answers.csv", "metrics.json")}
    return {"seconds": round(wall, 1), **{f"{part}_seconds": v for part, v in parts.items()}, "same_as_pipeline": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--work", default="bench-out/evaluate-work")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of the stage, one after another; each time is the median over them")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy2(args.params, work / "params.yaml")
    [cmd] = stage_commands(Path("dvc.yaml"), read_yaml(args.params), work, names=("evaluate",))
    print("$", " ".join(cmd), flush=True)
    runs = []
    for _ in range(args.repeats):
        runs.append(run_stage(cmd, work))
        print(json.dumps(runs[-1]), flush=True)
    times = [k for k in runs[0] if k.endswith("seconds")]
    same = {name: all(r["same_as_pipeline"][name] for r in runs) for name in runs[0]["same_as_pipeline"]}
    result = {**{k: statistics.median(r[k] for r in runs) for k in times}, "same_as_pipeline": same,
              "runs": [{k: r[k] for k in times} for r in runs], **compass_floor(args.params)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
