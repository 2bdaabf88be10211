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


def stale_params(dvc_yaml: Path, skipped: tuple[str, ...], old: dict, new: dict) -> list[str]:
    """The params sections that ``skipped`` stages declare in ``dvc.yaml`` and that differ between the params the
    run was made with (``old``) and the new ones: what makes reusing those stages' outputs stale."""
    stages = read_yaml(dvc_yaml)["stages"]
    sections = {str(p) for name in skipped for p in stages[name].get("params") or []}
    return sorted(k for k in sections if old.get(k) != new.get(k))


def plan(name: str, flags: list[str], params_path: Path, run_dir: Path,
         start: str | None) -> tuple[dict, tuple, tuple]:
    """An experiment's params, its stages (``prepare_models`` first when its ``models`` differ), and those to run:
    from ``start`` on when given, which needs an earlier run in ``run_dir`` whose skipped stages' params are
    unchanged."""
    base = read_yaml(params_path)
    params = apply_overrides(read_yaml(params_path), flags)
    names = (("prepare_models",) if params["models"] != base["models"] else ()) + STAGES
    if not start:
        return params, names, names
    if start not in names:
        raise InputError(f"--from {start}: experiment {name} runs {', '.join(names)}")
    if not (run_dir / "params.yaml").is_file():
        raise InputError(f"--from {start}: {run_dir} holds no earlier run (no params.yaml)")
    skipped = names[:names.index(start)]
    stale = stale_params(Path("dvc.yaml"), skipped, read_yaml(run_dir / "params.yaml"), params)
    if stale:
        raise InputError(f"--from {start}: experiment {name}'s params {', '.join(stale)} changed since its "
                         f"{', '.join(skipped)} ran; rerun it without --from")
    return params, names, names[names.index(start):]


def run_experiment(name: str, flags: list[str], planned: tuple[dict, tuple, tuple], out: Path,
                   start: str | None = None) -> dict:
    """Run one experiment's stages in ``out/<name>`` as ``planned`` (``plan``: its params, its stages, those to
    run); the earlier stages' outputs there are reused."""
    import yaml

    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    params, names, to_run = planned
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "POLITUNE_MLFLOW": "off"}
    started, stages = time.monotonic(), {}
    with (run_dir / "log.txt").open("w", encoding="utf-8") as log:
        for cmd in stage_commands(Path("dvc.yaml"), params, run_dir, names):
            stage = cmd[2].split(".")[-1]
            if stage not in to_run:  # its outputs in run_dir are reused
                continue
            t0 = time.monotonic()
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            stages[stage] = round(time.monotonic() - t0, 1)
            if proc.returncode != 0:
                raise InputError(f"experiment {name}: stage {stage} failed (exit {proc.returncode}); see "
                                 f"{run_dir / 'log.txt'}")
            print(f"{name}: {stage} done in {stages[stage]} s", flush=True)
    return {"flags": flags, "seconds": round(time.monotonic() - started, 1), "stages": stages,
            **({"from": start} if start else {})}


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
    parser.add_argument("--from", dest="start", choices=("prepare_models", *STAGES),
                        help="rerun from this stage on in existing run folders (e.g. evaluate with other evaluate "
                             "params), reusing the earlier stages' outputs; refused when their params changed")
    args = parser.parse_args(argv)
    if args.data == "annotated":
        raise InputError("--data annotated needs the score and generate stages: run `make demo` where DVC is installed")
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
    # every experiment planned first: a stale or missing earlier run (--from) stops the sweep before anything is written
    plans = {name: plan(name, flags, Path(args.params), out / name, args.start) for name, flags in exps.items()}
    commit = args.commit
    if not commit:
        got = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = got.stdout.strip() if got.returncode == 0 else "unknown"
    # Written first and after each experiment, so a sweep stopped midway still records what it finished.
    record = {"commit": commit, "machine": machine(), "recipes": recipes, "planned": list(exps), "experiments": {},
              "seconds": None}
    if args.start and (out / "sweep.json").is_file():  # the run this one continues: its record is kept
        record["previous"] = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    write_json(out / "sweep.json", record)
    started = time.monotonic()
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_experiment, name, flags, plans[name], out, args.start): name
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
