"""``make bench``: run every benchmark, print its figures, and write them all to ``reports/bench.json`` (and as tables
to ``reports/bench.md``).

1. annotation throughput (``bench.annotation``): vLLM vs transformers (batch 1 and the batched size), same posts,
   prompts, max tokens, greedy;
2. DPO step time (``bench.dpo``): TRL defaults in fp32 vs the optimised CPU configuration;
3. pipeline overhead: ``dvc repro`` with nothing changed, and ``dvc exp run -S lora.r=...`` (which must run only
   sft, dpo, evaluate and judge) against the sum of those stages' own run times.

Needs the default pipeline's outputs (``make repro`` first). Each part can be skipped (``--skip dpo``) and sized
(``--annotation-n``); the figures of the parts run are merged into the existing ``reports/bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from politune.common import read_json, write_json


def run(cmd: list[str], **kw) -> str:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def annotation(args) -> dict:
    out = Path(args.work) / "annotation.json"
    run([sys.executable, "-m", "bench.annotation", "--n", *map(str, args.annotation_n), "--max-tokens",
         str(args.max_tokens), "--transformers-max-n", str(args.transformers_max_n), "--b1-max-n",
         str(args.b1_max_n), "--out", str(out)] + (["--no-score"] if args.no_score else []))
    raw = read_json(out)

    def at(backend, n):
        return next((r for r in raw.get(backend, {}).get("runs", []) if r["n"] == n), None)

    summary = {"max_tokens": args.max_tokens, "runs": raw}
    for n in args.annotation_n:
        v, t, b1 = at("vllm", n), at("transformers", n), at("transformers-b1", n)
        if v and t:
            summary[f"speedup_vllm_vs_transformers_batched_n{n}"] = round(
                v["generated_tokens_per_second"] / t["generated_tokens_per_second"], 2)
        if v and b1:
            summary[f"speedup_vllm_vs_transformers_b1_n{n}"] = round(
                v["generated_tokens_per_second"] / b1["generated_tokens_per_second"], 2)
    # The headline: vLLM against transformers batch 1 (plain `generate`), at the largest N both ran.
    both = [n for n in args.annotation_n if at("vllm", n) and at("transformers-b1", n)]
    if both:
        summary["speedup_vllm_vs_transformers"] = summary[f"speedup_vllm_vs_transformers_b1_n{both[-1]}"]
        summary["speedup_measured_at_n"] = both[-1]
    return summary


def dpo(args) -> dict:
    out = Path(args.work) / "dpo.json"
    run([sys.executable, "-m", "bench.dpo", "--configs", *args.dpo_configs, "--steps", str(args.dpo_steps),
         "--out", str(out)])
    result = read_json(out)
    return result


def stage_seconds(stages: list[str]) -> dict[str, float]:
    """The stages' own run times from their MLflow runs (the latest finished run of each)."""
    import mlflow

    from politune.tracking import EXPERIMENT, tracking_uri

    client = mlflow.tracking.MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(EXPERIMENT)
    out = {}
    for stage in stages:
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`politune.stage` = '{stage}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            info = runs[0].info
            out[stage] = round((info.end_time - info.start_time) / 1000, 1)
    return out


def repro(args) -> dict:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    t0 = time.perf_counter()
    out = run(["dvc", "repro"], env=env)
    noop = time.perf_counter() - t0
    if "Running stage" in out:
        raise SystemExit("dvc repro ran stages: run `make repro` first so that nothing has changed")
    result = {"noop_seconds": round(noop, 2)}
    if args.exp_rank:
        t0 = time.perf_counter()
        out = run(["dvc", "exp", "run", "-S", f"lora.r={args.exp_rank}"], env=env)
        wall = time.perf_counter() - t0
        ran = sorted(set(re.findall(r"Running stage '([^']+)'", out)))
        own = stage_seconds(ran)
        result.update(exp_run_seconds=round(wall, 1), exp_run_stages=ran, exp_run_stage_seconds=own,
                      exp_run_overhead_seconds=round(wall - sum(own.values()), 1))
        run(["git", "checkout", "--", "params.yaml"], env=env)  # the experiment is saved; the workspace returns
        run(["dvc", "checkout", "-q"], env=env)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/bench.json")
    parser.add_argument("--work", default="bench-out")
    parser.add_argument("--skip", nargs="*", default=[], choices=["annotation", "dpo", "repro"])
    parser.add_argument("--annotation-n", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--transformers-max-n", type=int, default=256, help="largest N for batched transformers")
    parser.add_argument("--b1-max-n", type=int, default=256, help="largest N for transformers batch 1")
    parser.add_argument("--no-score", action="store_true", help="annotation: time generation only")
    parser.add_argument("--dpo-configs", nargs="+", default=["default", "precompute", "bf16", "optimised"])
    parser.add_argument("--dpo-steps", type=int, default=12)
    parser.add_argument("--exp-rank", type=int, default=8, help="lora.r of the `dvc exp run` timed (0: skip)")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    report = read_json(args.out) if Path(args.out).exists() else {}
    report["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    for name, fn in (("annotation", annotation), ("dpo", dpo), ("repro", repro)):
        if name in args.skip:
            continue
        report[name] = fn(args)
        print(name, json.dumps(report[name], indent=1)[:3000], flush=True)
        write_json(args.out, report)
    from bench.report import write

    write(args.out, Path(args.out).with_suffix(".md"))


if __name__ == "__main__":
    main()
