"""``make bench``: run every benchmark, print its figures, and write them all to ``reports/bench.json`` (and as tables
to ``reports/bench.md``).

0. ingest at corpus scale (``bench.ingest``): rows/s and peak RSS on generated Politosphere-style dumps of 200,000
   and 2 million comments;
1. annotation throughput (``bench.annotation``): vLLM vs transformers (batch 1 and the batched size), same posts,
   prompts, max tokens, greedy;
   then the vLLM CPU settings (``SETTINGS``: KV block size, threads, batch, scheduling, compilation, the
   grammar's mask engine) on generation;
2. DPO step time (``bench.dpo``): TRL defaults in fp32 vs the optimised configuration, at the default run's steps;
3. the ``evaluate`` stage by part (``bench.evaluate``): load, the compass, the side preference;
4. the pipeline: ``dvc repro`` with nothing changed; ``dvc exp run -S evaluate.bootstrap=...`` (which must run only
   evaluate and export) against the sum of those stages' own run times; and ``dvc repro`` of the default params
   from scratch in a fresh clone of HEAD (the environment built: this one's), with each stage's own time.

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
         str(args.b1_max_n), "--out", str(out)] + ([] if args.score else ["--no-score"]))
    raw = read_json(out)

    def at(backend, n):
        return next((r for r in raw.get(backend, {}).get("runs", []) if r["n"] == n), None)

    summary = {"max_tokens": args.max_tokens, "scored": args.score, "runs": raw}
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
    # Against transformers at its best: the fastest transformers run (any batch mode) at the largest N vLLM and
    # batched transformers both ran (batch-1 throughput does not grow with N).
    batched = [n for n in args.annotation_n if at("vllm", n) and at("transformers", n)]
    if batched:
        n = batched[-1]
        best = max(r["generated_tokens_per_second"] for r in raw.get("transformers", {}).get("runs", []) +
                   raw.get("transformers-b1", {}).get("runs", []) if r["n"] <= n)
        summary["speedup_vllm_vs_transformers_best"] = round(at("vllm", n)["generated_tokens_per_second"] / best, 2)
        summary["speedup_best_measured_at_n"] = n
    return summary


# vLLM CPU settings timed on annotation generation (issue 18 item 3): annotate.engine overrides of params.yaml's own
# engine (the thread keys set vLLM's environment: politune.serve.ENV_KEYS). Chunked prefill is not among them: on vLLM
# 0.32's CPU worker it kills the engine on seeded retries (params.yaml, annotate.engine.enable_chunked_prefill).
SETTINGS = {
    "params": {},
    "omp_2_threads": {"omp_num_threads": 2},
    "max_num_seqs_64": {"max_num_seqs": 64},
    "async_scheduling": {"async_scheduling": True},
    # These three change what each step computes, not only how it is run: the greedy outputs differ.
    # 32-token KV blocks: prefix caching reuses one block of the 61 tokens every prompt opens with (vLLM's CPU
    # default, 128, fills none), and the prompts' bf16 keys and values are then computed in other batches.
    "block_size_32": {"block_size": 32},
    "compiled": {"enforce_eager": False},  # torch.compile of the model (its time is in the engine start)
    "grammar_xgrammar": {"structured_outputs_config": {"backend": "xgrammar"}},  # vLLM's default mask engine
}
OTHER_COMPUTATION = ("block_size_32", "compiled", "grammar_xgrammar")


def vllm_cpu_settings(args) -> dict:
    """Generated tokens/s of the vLLM engine under each of ``SETTINGS`` (each in a process of its own), at N=256;
    ``best``: the fastest of those that compute the same thing (not ``OTHER_COMPUTATION``)."""
    runs = {}
    for name, engine in SETTINGS.items():
        out = Path(args.work) / f"settings-{name}.json"
        run([sys.executable, "-m", "bench.annotation", "--backends", "vllm", "--n", str(args.settings_n),
             "--max-tokens", str(args.max_tokens), "--no-score", "--out", str(out), "--engine",
             *(f"{k}={'null' if v is None else v}" for k, v in engine.items())])
        raw = read_json(out)["vllm"]
        runs[name] = {"engine": engine, "engine_start_seconds": raw["engine_start_seconds"],
                      "generated_tokens_per_second": raw["runs"][0]["generated_tokens_per_second"],
                      "same_computation": name not in OTHER_COMPUTATION}
    best = max((k for k in runs if runs[k]["same_computation"]), key=lambda k: runs[k]["generated_tokens_per_second"])
    return {"n": args.settings_n, "max_tokens": args.max_tokens, "runs": runs, "best": best}


def ingest(args) -> dict:
    out = Path(args.work) / "ingest.json"
    run([sys.executable, "-m", "bench.ingest", "--n", *map(str, args.ingest_n), "--out", str(out)])
    return read_json(out)


def dpo(args) -> dict:
    """Every configuration at the default run's steps, then TRL's default and the optimised one at each of
    ``--dpo-short-steps`` (a shorter run, where one-off costs weigh more): ``short_runs``, by steps."""
    out = Path(args.work) / "dpo.json"
    run([sys.executable, "-m", "bench.dpo", "--configs", *args.dpo_configs, "--out", str(out)] +
        (["--steps", str(args.dpo_steps)] if args.dpo_steps else []))
    result = read_json(out)
    for steps in args.dpo_short_steps:
        short = Path(args.work) / f"dpo-{steps}.json"
        run([sys.executable, "-m", "bench.dpo", "--configs", "default", "optimised", "--steps", str(steps),
             "--out", str(short)])
        result.setdefault("short_runs", {})[str(steps)] = read_json(short)
    return result


def evaluate(args) -> dict:
    out = Path(args.work) / "evaluate.json"
    run([sys.executable, "-m", "bench.evaluate", "--out", str(out)])
    return read_json(out)


def stage_seconds(stages: list[str], uri: str | None = None) -> dict[str, float]:
    """The stages' own run times from their MLflow runs (the latest finished run of each); ``uri``: another
    project's tracking store (default: this one's)."""
    import mlflow

    from politune.tracking import EXPERIMENT, tracking_uri

    client = mlflow.tracking.MlflowClient(uri or tracking_uri())
    exp = client.get_experiment_by_name(EXPERIMENT)
    out = {}
    for stage in stages:
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`politune.stage` = '{stage}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            info = runs[0].info
            out[stage] = round((info.end_time - info.start_time) / 1000, 1)
    return out


BENCH_FILES = ("reports/bench.json", "reports/bench.md")


def changed_files(env: dict) -> list[str]:
    """Tracked files that differ from HEAD."""
    return run(["git", "diff", "--name-only", "HEAD"], env=env).split()


def repro(args) -> dict:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    t0 = time.perf_counter()
    out = run(["dvc", "repro"], env=env)
    noop = time.perf_counter() - t0
    if "Running stage" in out:
        raise SystemExit("dvc repro ran stages: run `make repro` first so that nothing has changed")
    before = changed_files(env)
    if args.exp_set and {"params.yaml", "dvc.lock"} & set(before):
        raise SystemExit("commit params.yaml and dvc.lock first: the timed `dvc exp run` restores HEAD's after it")
    result = {"noop_seconds": round(noop, 2)}
    if args.exp_set:
        t0 = time.perf_counter()
        out = run(["dvc", "exp", "run", "-S", args.exp_set], env=env)
        wall = time.perf_counter() - t0
        ran = sorted(set(re.findall(r"Running stage '([^']+)'", out)))
        own = stage_seconds(ran)
        result.update(exp_run_set=args.exp_set, exp_run_seconds=round(wall, 1), exp_run_stages=ran,
                      exp_run_stage_seconds=own, exp_run_overhead_seconds=round(wall - sum(own.values()), 1))
        # The experiment is saved in its ref; the workspace returns to HEAD's params, lock and metrics files (those
        # the experiment changed).
        changed = [f for f in changed_files(env) if f not in BENCH_FILES and f not in before]
        if changed:
            run(["git", "checkout", "HEAD", "--", *changed], env=env)
        run(["dvc", "checkout", "-q"], env=env)
    if args.default_repro:
        result.update(default_repro(env))
    return result


def default_repro(env: dict) -> dict:
    """``dvc repro --force`` of the default params from scratch: a fresh clone of HEAD (committed work only), its own
    DVC cache and MLflow store, this environment's tools; every stage runs."""
    import resource
    import shutil
    import tempfile

    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the clone's stages log to its own store
    head = run(["git", "rev-parse", "HEAD"], env=env).strip()
    work = Path(tempfile.mkdtemp(prefix="politune-repro-"))
    try:
        clone = work / "main"
        run(["git", "clone", "-q", str(Path.cwd()), str(clone)], env=env)
        shared = Path.cwd().parent / "shared"
        if shared.exists():
            (work / "shared").symlink_to(shared)
        t0 = time.perf_counter()
        # --force: every stage runs. The clone holds the committed reports (cache: false), so a stage whose
        # dependencies come out byte-identical to the lock's (evaluate and judge, when generation repeats itself)
        # would otherwise be up to date and the figure would leave them out.
        out = run(["dvc", "repro", "--force"], env=env, cwd=clone)
        wall = time.perf_counter() - t0
        ran = sorted(set(re.findall(r"Running stage '([^']+)'", out)))
        own = stage_seconds(ran, uri=f"sqlite:///{clone / 'mlflow.db'}")
        return {"default_commit": head[:12], "default_seconds": round(wall, 1), "default_stage_seconds": own,
                "default_overhead_seconds": round(wall - sum(own.values()), 1),
                "default_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def machine() -> dict:
    """The machine the figures were measured on."""
    from politune.common import cpu_bf16, cpu_info

    info = cpu_info()  # /proc/cpuinfo, read once
    return {"cpus": os.cpu_count(), "cpu": info.get("model name"), "cpu_bf16": cpu_bf16(info),
            "python": sys.version.split()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/bench.json")
    parser.add_argument("--work", default="bench-out")
    parser.add_argument("--skip", nargs="*", default=[], choices=["annotation", "vllm_cpu_settings", "dpo", "evaluate", "ingest", "repro"])
    parser.add_argument("--annotation-n", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--settings-n", type=int, default=256, help="prompts per vLLM CPU setting timed")
    parser.add_argument("--transformers-max-n", type=int, default=256, help="largest N for batched transformers")
    parser.add_argument("--b1-max-n", type=int, default=64,
                        help="largest N for transformers batch 1 (its tokens/s do not grow with N)")
    parser.add_argument("--score", action="store_true",
                        help="annotation: time scoring as well as generation (the figures compare generation)")
    parser.add_argument("--ingest-n", type=int, nargs="+", default=[200_000, 2_000_000],
                        help="sizes of the generated corpus ingested (bench.ingest)")
    parser.add_argument("--dpo-configs", nargs="+", default=["default", "precompute", "bf16", "no_checkpointing",
                                                                "compact_head", "optimised"])
    parser.add_argument("--dpo-steps", type=int, help="DPO steps (default: the default run's dpo.max_steps)")
    parser.add_argument("--dpo-short-steps", type=int, nargs="*", default=[8],
                        help="shorter runs timed for TRL's default and the optimised configuration")
    parser.add_argument("--exp-set", default="evaluate.bootstrap=999",
                        help="the `dvc exp run -S` timed ('': skip)")
    parser.add_argument("--default-repro", action=argparse.BooleanOptionalAction, default=True,
                        help="time `dvc repro` of the default params in a fresh clone of HEAD")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if "repro" not in args.skip and args.exp_set and {"params.yaml", "dvc.lock"} & set(changed_files(dict(os.environ))):
        raise SystemExit("commit params.yaml and dvc.lock first: the timed `dvc exp run` restores HEAD's after it")
    # Every part run: a report of this run alone; some skipped: the parts run replace theirs in the existing report.
    report = read_json(args.out) if args.skip and Path(args.out).exists() else {}
    report["machine"] = machine()
    for name, fn in (("ingest", ingest), ("annotation", annotation), ("vllm_cpu_settings", vllm_cpu_settings),
                     ("dpo", dpo), ("evaluate", evaluate), ("repro", repro)):
        if name in args.skip:
            continue
        report[name] = fn(args)
        print(name, json.dumps(report[name], indent=1)[:3000], flush=True)
        write_json(args.out, report)
    from bench.report import write

    write(args.out, Path(args.out).with_suffix(".md"))


if __name__ == "__main__":
    main()
