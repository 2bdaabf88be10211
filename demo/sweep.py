"""Run the demo's experiments without DVC, for a machine that has no DVC or MLflow (a lent GPU machine).

The same experiments as ``make demo`` (``demo.run.experiments``: the recipes, the held-out split, the training
recipe, ``--set`` extras), each run as DVC would run it: the stages' own commands from ``dvc.yaml``
(``build_datasets``, ``sft``, ``dpo``, ``evaluate``), with the experiment's params file, and every path a stage
writes (and the later stages read) moved under ``--out/<experiment>/``. The target model (``models/target``, from
``prepare_models``) and the inputs (``data/compass``, ``data/external/demo``, ``data/heldout/demo``) are shared; an
experiment whose ``models`` params differ (``--set models.target=...``) runs ``prepare_models`` into its own folder
first.
MLflow is off (``POLITUNE_MLFLOW=off``) and the judge is not run.

    python -m demo.sweep --data ../shared/reference/politune --recipes mirror,plain --out runs --jobs 4
    python -m demo.report --runs runs --recipes mirror,plain

``--out/sweep.json`` records the commit, the machine and each experiment's flags and wall time. DVC experiments
(``make demo``) stay the way to run the demo where DVC is installed: they are versioned and reproducible by
``dvc exp``; a sweep's outputs are plain files.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from demo.run import experiment_parser, experiments, settings, split_files
from politune.common import InputError, read_yaml, run_main, write_json

STAGES = ("build_datasets", "sft", "dpo", "evaluate")


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    """``dvc exp run -S`` semantics: each ``key.path=value`` in Hydra's override grammar (DVC's own parser) sets a
    key of the params; a key that is not in the params is an error, as in DVC without ``+``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        *path, last = override.key_or_group.split(".")
        node = params
        for part in path:
            if not isinstance(node, dict) or part not in node:
                raise InputError(f"-S {override.input_line}: no params key {override.key_or_group!r}")
            node = node[part]
        if last not in node:
            raise InputError(f"-S {override.input_line}: no params key {override.key_or_group!r}")
        node[last] = override.value()
    return params


def stage_commands(dvc_yaml: Path, params: dict, run_dir: Path, names=STAGES) -> list[list[str]]:
    """Each stage's command from ``dvc.yaml`` (``${...}`` from params), its outputs' paths moved under ``run_dir``."""
    stages = read_yaml(dvc_yaml)["stages"]
    produced = sorted({str(o if isinstance(o, str) else next(iter(o))).rstrip("/") for name in names
                       for kind in ("outs", "metrics", "plots") for o in stages[name].get(kind) or []}
                      | {"reports", "checkpoints"}, key=len, reverse=True)

    def moved(arg: str) -> str:
        hit = any(arg == p or arg.startswith(p + "/") for p in produced)
        return str(run_dir / arg) if hit else arg

    commands = []
    for name in names:
        cmd = stages[name]["cmd"].replace("${launch.training}", params["launch"]["training"])
        args = shlex.split(cmd)
        start = args.index("-m")
        commands.append([sys.executable, *args[start:start + 2], "--params", str(run_dir / "params.yaml"),
                         *map(moved, args[start + 2:])])
    return commands


def run_experiment(name: str, flags: list[str], params_path: Path, out: Path) -> dict:
    import yaml

    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    base = read_yaml(params_path)
    params = apply_overrides(read_yaml(params_path), flags)
    names = (("prepare_models",) if params["models"] != base["models"] else ()) + STAGES
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "POLITUNE_MLFLOW": "off"}
    started, stages = time.monotonic(), {}
    with (run_dir / "log.txt").open("w", encoding="utf-8") as log:
        for cmd in stage_commands(Path("dvc.yaml"), params, run_dir, names):
            stage = cmd[2].split(".")[-1]
            t0 = time.monotonic()
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            stages[stage] = round(time.monotonic() - t0, 1)
            if proc.returncode != 0:
                raise InputError(f"experiment {name}: stage {stage} failed (exit {proc.returncode}); see "
                                 f"{run_dir / 'log.txt'}")
            print(f"{name}: {stage} done in {stages[stage]} s", flush=True)
    return {"flags": flags, "seconds": round(time.monotonic() - started, 1), "stages": stages}


def machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "no torch"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}"


def main(argv=None) -> None:
    parser = experiment_parser(__doc__.splitlines()[0], "a folder with the right and left preference files")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="runs", help="one folder per experiment")
    parser.add_argument("--jobs", type=int, default=1, help="experiments side by side")
    parser.add_argument("--commit", help="the git commit of this working tree (recorded; default: git rev-parse)")
    parser.add_argument("--only", help="comma-separated experiment names to run (default: all)")
    args = parser.parse_args(argv)
    if args.data == "annotated":
        raise InputError("--data annotated needs the annotate stage: run `make demo` where DVC is installed")
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    exps = experiments(args.prefix, args.data, recipes, ablation=args.ablation)
    exps = {n: settings(f, args.set, steps=args.steps)[1::2] for n, f in exps.items()}
    if args.only:
        wanted = set(args.only.split(","))
        if wanted - set(exps):
            raise InputError(f"--only: no experiments {sorted(wanted - set(exps))} (have {sorted(exps)})")
        exps = {n: f for n, f in exps.items() if n in wanted}
    if not Path("models/target/config.json").exists():
        raise InputError("models/target: no target model; run the prepare_models stage first")
    split_files(Path(args.data), {"right": args.right_file, "left": args.left_file}, args.heldout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = args.commit
    if not commit:
        got = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = got.stdout.strip() if got.returncode == 0 else "unknown"
    # Written first and after each experiment, so a sweep stopped midway still records what it finished.
    record = {"commit": commit, "machine": machine(), "recipes": recipes, "planned": list(exps), "experiments": {},
              "seconds": None}
    write_json(out / "sweep.json", record)
    started = time.monotonic()
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_experiment, name, flags, Path(args.params), out): name
                   for name, flags in exps.items()}
        for future in as_completed(futures):
            try:
                record["experiments"][futures[future]] = future.result()
            except InputError as exc:
                failed.append(str(exc))
            write_json(out / "sweep.json", record)
    record["seconds"] = round(time.monotonic() - started, 1)
    write_json(out / "sweep.json", record)
    print(json.dumps({k: v for k, v in record.items() if k != "experiments"}), flush=True)
    if failed:
        raise InputError("; ".join(failed))


if __name__ == "__main__":
    run_main(main)
