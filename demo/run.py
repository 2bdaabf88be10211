"""``make demo``: queue and run the demo's DVC experiments, then write the comparison report.

Four experiments of the whole pipeline, differing only in params:

- ``demo-right``: SFT then DPO on the right-leaning preference data;
- ``demo-left``: SFT then DPO on the left-leaning data;
- ``demo-right-dpo-only``, ``demo-left-dpo-only``: the ablation, DPO without SFT (``recipe.dpo_start=base``),
  same data and steps.

The base model is evaluated in each (same answers, checked by the report). The recipe (``RECIPE`` below, every key
an ordinary param) is applied to all four with ``-S``; add or override keys with ``--set key=value``.

Data: ``--data annotated`` trains on the project's own annotation of ``data/raw`` for each ideology; ``--data DIR``
trains on preference files in DIR (``--right-file``, ``--left-file``; by default the PoliTune authors' released
samples beside the project, ``../shared/reference/politune``). The files are copied to ``data/external/demo/``
(git-ignored, a dependency of ``build_datasets``) and passed into the queued experiments with ``--copy-paths``;
the copy is removed when the queue is done, so the workspace pipeline is unchanged. Only with ``--data annotated``
do the experiments set ``ideology`` (only ``annotate`` reads it): with external data the annotation is not used,
and leaving ``ideology`` alone spares each side a rerun of ``annotate`` (about 4.5 min here).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

from stages.common import InputError, run_main

# The CPU demo recipe: one epoch of SFT and of DPO over the 180 training pairs of 200 (batch 4), LoRA on every
# projection, a DPO learning rate for LoRA, the compass without the trajectory (faster).
RECIPE = [
    "sft.max_steps=45",
    "dpo.max_steps=45",
    "dpo.learning_rate=1e-4",
    "dpo.save_steps=45",
    "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
    "evaluate.trajectory=false",
]
EXTERNAL = Path("data/external/demo")


def sh(cmd: list[str], check: bool = True, echo: bool = True) -> str:
    if echo:
        print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise InputError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def experiments(prefix: str, data: str, right_file: str, left_file: str) -> dict[str, list[str]]:
    sources = {"right": "annotated", "left": "annotated"} if data == "annotated" else {
        "right": str(EXTERNAL / right_file), "left": str(EXTERNAL / left_file)}
    exps = {}
    for side in ("right", "left"):
        common = ([f"ideology={side}"] if data == "annotated" else []) + [f"datasets.source={sources[side]}"]
        exps[f"{prefix}-{side}"] = common
        exps[f"{prefix}-{side}-dpo-only"] = common + ["recipe.dpo_start=base"]
    return exps


def settings(flags: list[str], extra: list[str], recipe: bool = True) -> list[str]:
    """The ``-S`` arguments of one experiment: the CPU recipe (unless ``recipe`` is off), its own flags, extras."""
    return [x for kv in (RECIPE if recipe else []) + flags + extra for x in ("-S", kv)]


def wait_for_queue(timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        status = sh(["dvc", "queue", "status"], echo=False)
        if status != last:
            print(status, flush=True)
            last = status
        if "Queued" not in status and "Running" not in status:
            return status
        if time.monotonic() > deadline:
            raise InputError(f"the demo queue did not finish in {timeout:.0f} s:\n{status}")
        time.sleep(10)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/reference/politune",
                        help="'annotated', or a folder with the right and left preference files")
    parser.add_argument("--right-file", default="right-sample.jsonl")
    parser.add_argument("--left-file", default="left-sample.jsonl")
    parser.add_argument("--prefix", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra params (-S)")
    parser.add_argument("--no-recipe", action="store_true",
                        help="train with params.yaml as it is (e.g. after a paper profile), not the CPU recipe")
    parser.add_argument("--timeout", type=float, default=3 * 3600)
    parser.add_argument("--report-only", action="store_true", help="only (re)write the report")
    args = parser.parse_args(argv)
    from demo import report

    baseline = report.git("rev-parse", "HEAD").strip()  # the experiments' baseline, even if HEAD moves meanwhile
    if not args.report_only:
        exps = experiments(args.prefix, args.data, args.right_file, args.left_file)
        copy = []
        if args.data != "annotated":
            for name in (args.right_file, args.left_file):
                if not (Path(args.data) / name).is_file():
                    raise InputError(f"{Path(args.data) / name}: no such preference file (--data, --right-file, "
                                     "--left-file; or --data annotated)")
            shutil.rmtree(EXTERNAL, ignore_errors=True)
            EXTERNAL.mkdir(parents=True)
            for name in (args.right_file, args.left_file):
                shutil.copy2(Path(args.data) / name, EXTERNAL / name)
            copy = ["--copy-paths", str(EXTERNAL)]
        try:
            for name, flags in exps.items():
                sh(["dvc", "exp", "remove", name], check=False)  # rerunning the demo replaces its experiments
                sets = settings(flags, args.set, recipe=not args.no_recipe)
                sh(["dvc", "exp", "run", "--queue", "-n", name, *copy, *sets])
            started = time.monotonic()
            # The queue worker is a daemon that inherits stdout: do not capture it, or this call waits for the queue.
            subprocess.run(["dvc", "queue", "start", "-j", "1"], check=True, stdout=subprocess.DEVNULL)
            status = wait_for_queue(args.timeout)
            print(f"demo experiments finished in {time.monotonic() - started:.0f} s", flush=True)
            missing = sorted(set(exps) - {f"{args.prefix}-{s}" for s in report.experiment_revs(args.prefix,
                                                                                             baseline=baseline)})
            if missing:
                raise InputError(f"demo experiments {missing} failed (see `dvc queue logs <name>`):\n{status}")
        finally:
            shutil.rmtree(EXTERNAL, ignore_errors=True)
    report.main(["--prefix", args.prefix, "--baseline", baseline])


if __name__ == "__main__":
    run_main(main)
