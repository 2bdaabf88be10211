"""``make demo``: queue and run the demo's DVC experiments, then write the comparison report.

For each data recipe (``--recipes``, the first is the headline), experiments of the whole pipeline that differ
only in params, named ``<prefix>-<recipe>-<suffix>``:

- ``right``: SFT then DPO towards the right; ``left``: the same towards the left;
- for the headline recipe also ``right-dpo-only``, ``left-dpo-only``: the ablation, DPO without SFT
  (``recipe.dpo_start=base``), same data and steps.

Data recipes (``RECIPES``): ``plain`` trains each side on its own preference data; ``mirror`` adds the other side's
pairs with chosen and rejected swapped (``datasets.mirror``), so the right and left runs see the same pairs and
differ only in which side is preferred; ``-stance`` adds the forced-choice stance pairs (``datasets.stance``).

The base model is evaluated in each (same answers, checked by the report). The CPU training recipe (``TRAINING``
below, every key an ordinary param) is applied to all with ``-S``; add or override keys with ``--set key=value``.

Data: ``--data DIR`` trains on preference files in DIR (``--right-file``, ``--left-file``; by default the PoliTune
authors' released samples beside the project, ``../shared/reference/politune``). The last ``--heldout`` rows of
each file are held out: no experiment trains on them, and every experiment's ``evaluate`` measures the side
preference on them (``evaluate.side_preference.heldout``). The training rows go to ``data/external/demo/`` (a
dependency of ``build_datasets``), the held-out rows to ``data/heldout/demo/`` (a dependency of ``evaluate``); both
are git-ignored, passed into the queued experiments with ``--copy-paths`` and removed when the queue is done, so the
workspace pipeline is unchanged. ``--data annotated`` trains on the project's own annotation of ``data/raw`` for each
ideology; only then do the experiments set ``ideology``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from politune.common import InputError, run_main

# The demo's training recipe: 45 steps of SFT and of DPO (batch 4), LoRA on every projection, a DPO learning rate for
# LoRA, the compass without the trajectory (faster). `make demo` on a CPU shortens it to 20 + 20 steps (--steps 20,
# the Makefile's DEMO_CPU).
TRAINING = [
    "sft.max_steps=45",
    "dpo.max_steps=45",
    "dpo.learning_rate=1e-4",
    "dpo.save_steps=45",
    "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
    "evaluate.trajectory=false",
    # Precomputing the frozen reference's log-probabilities costs a forward pass over the whole training set (400
    # pairs), more than the demo's steps save.
    "dpo.precompute_ref_log_probs=false",
]
RECIPES = ("mirror", "plain", "mirror-stance", "plain-stance")


# With external preference data the annotation is not used, but build_datasets still depends on its output: a
# token annotation (4 posts) keeps that stage cheap in every experiment (vLLM on a CPU without bf16 takes half an
# hour for the whole sample corpus).
UNUSED_ANNOTATION = ["annotate.max_posts=8", "annotate.threshold=0.0", "annotate.max_kept=4", "annotate.mirror=false"]
EXTERNAL = Path("data/external/demo")
HELDOUT = Path("data/heldout/demo")
PIPELINE_HELDOUT = Path("data/heldout/politune")
OTHER = {"right": "left", "left": "right"}


def sh(cmd: list[str], check: bool = True, echo: bool = True) -> str:
    if echo:
        print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise InputError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def experiments(prefix: str, data: str, recipes: list[str], ablation: bool = True) -> dict[str, list[str]]:
    """Experiment name -> its ``-S`` flags (besides the training recipe), for each data recipe; the headline
    (first) recipe also gets the DPO-without-SFT ablation."""
    exps = {}
    for n, recipe in enumerate(recipes):
        if recipe not in RECIPES:
            raise InputError(f"--recipes: unknown recipe {recipe!r} (one of {', '.join(RECIPES)})")
        mirror = recipe.startswith("mirror")
        for side in ("right", "left"):
            if data == "annotated":  # the annotation holds both viewpoints (annotate.mirror)
                flags = [f"ideology={side}", "datasets.source=annotated", "annotate.mirror=true",
                         f"datasets.mirror.source={'annotated' if mirror else 'null'}", "datasets.mirror.side=null"]
            else:
                flags = [f"datasets.source={EXTERNAL / side}.jsonl", f"datasets.source_side={side}",
                         f"datasets.mirror.source={EXTERNAL / OTHER[side]}.jsonl" if mirror
                         else "datasets.mirror.source=null", f"datasets.mirror.side={OTHER[side] if mirror else 'null'}"]
            if mirror:
                flags.append("datasets.mirror.fraction=1.0")
            if data != "annotated":
                flags.append("evaluate.side_preference.heldout=" + heldout_flag())
                flags += UNUSED_ANNOTATION
            if recipe.endswith("-stance"):
                flags.append("datasets.stance.fraction=1.0")
            exps[f"{prefix}-{recipe}-{side}"] = flags
            if ablation and n == 0:
                exps[f"{prefix}-{recipe}-{side}-dpo-only"] = flags + ["recipe.dpo_start=base"]
    return exps


def heldout_flag() -> str:
    """The held-out files as a ``-S`` value (Hydra's override grammar: a list of dicts)."""
    return "[" + ",".join(f"{{path:{HELDOUT / side}.jsonl,side:{side}}}" for side in ("right", "left")) + "]"


def split_files(data: Path, files: dict[str, str], heldout: int) -> dict[str, int]:
    """Copy each side's preference file: its last ``heldout`` rows to ``HELDOUT``, the rest to ``EXTERNAL`` but the
    pipeline's own held-out pairs (``PIPELINE_HELDOUT``, matched by prompt)."""
    counts = {}
    # The pipeline's own held-out pairs (evaluate's default) are never trained on, whatever --heldout is.
    reserved = {json.loads(line).get("prompt") for path in sorted(PIPELINE_HELDOUT.glob("*.jsonl"))
                for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    for path in (EXTERNAL, HELDOUT):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    for side, name in files.items():
        source = data / name
        if not source.is_file():
            raise InputError(f"{source}: no such preference file (--data, --{side}-file; or --data annotated)")
        if source.suffix != ".jsonl":
            raise InputError(f"{source}: the demo splits JSONL preference files (one pair a line)")
        lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        for n, line in enumerate(lines, start=1):
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{source}: row {n}: invalid JSON ({exc.msg})") from exc
        if len(lines) <= heldout:
            raise InputError(f"{source}: {len(lines)} pairs, not more than --heldout {heldout}")
        train = [line for line in lines[:-heldout or None] if json.loads(line).get("prompt") not in reserved]
        (EXTERNAL / f"{side}.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
        (HELDOUT / f"{side}.jsonl").write_text("\n".join(lines[len(lines) - heldout:]) + "\n", encoding="utf-8")
        counts[side] = len(train)
    return counts


def settings(flags: list[str], extra: list[str], recipe: bool = True, steps: int | None = None) -> list[str]:
    """The ``-S`` arguments of one experiment: the CPU training recipe (unless off; ``steps`` replaces its step
    counts) with this CPU's settings, its own flags, extras."""
    training = []
    if recipe:
        training = TRAINING
        if steps:
            training = [kv for kv in training if not kv.startswith(("sft.max_steps=", "dpo.max_steps=",
                                                                   "dpo.save_steps="))]
            training += [f"sft.max_steps={steps}", f"dpo.max_steps={steps}", f"dpo.save_steps={steps}"]
    return [x for kv in training + flags + extra for x in ("-S", kv)]


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


def experiment_parser(description: str, data_help: str) -> argparse.ArgumentParser:
    """The options that choose the demo's experiments and data (``make demo`` and ``demo.sweep``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default="../shared/reference/politune", help=data_help)
    parser.add_argument("--right-file", default="right-sample.jsonl")
    parser.add_argument("--left-file", default="left-sample.jsonl")
    parser.add_argument("--heldout", type=int, default=60, help="rows of each file held out for the side preference")
    parser.add_argument("--recipes", default="mirror",
                        help=f"comma-separated data recipes, the headline first ({', '.join(RECIPES)})")
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                        help="the DPO-without-SFT experiments of the headline recipe (--no-ablation: skip them)")
    parser.add_argument("--steps", type=int, help="SFT and DPO steps (default: the training recipe's 45)")
    parser.add_argument("--prefix", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra params (-S)")
    return parser


def main(argv=None) -> None:
    parser = experiment_parser(__doc__.splitlines()[0],
                               "'annotated', or a folder with the right and left preference files")
    parser.add_argument("--judge", action=argparse.BooleanOptionalAction, default=True,
                        help="run the judge stage (--no-judge: the pipeline up to evaluate only, no judge scores)")
    parser.add_argument("--no-recipe", action="store_true",
                        help="train with params.yaml as it is (e.g. after a paper profile), not the CPU recipe")
    parser.add_argument("--jobs", type=int, default=1, help="queue workers running experiments side by side")
    parser.add_argument("--timeout", type=float, default=3 * 3600)
    parser.add_argument("--report-only", action="store_true", help="only (re)write the report")
    parser.add_argument("--out", default="reports/demo", help="the report's folder (demo/report.py --out)")
    parser.add_argument("--also", action="append", default=[], metavar="DIR",
                        help="another demo report's folder whose recipes join the table (demo/report.py --also)")
    args = parser.parse_args(argv)
    from demo import report

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    baseline = report.baseline_rev("HEAD")  # the experiments' baseline, even if HEAD moves meanwhile
    if not args.report_only:
        exps = experiments(args.prefix, args.data, recipes, ablation=args.ablation)
        copy = []
        if args.data != "annotated":
            split_files(Path(args.data), {"right": args.right_file, "left": args.left_file}, args.heldout)
            copy = ["--copy-paths", str(EXTERNAL), "--copy-paths", str(HELDOUT)]
        try:
            for name, flags in exps.items():
                sh(["dvc", "exp", "remove", name], check=False)  # rerunning the demo replaces its experiments
                sets = settings(flags, args.set, recipe=not args.no_recipe, steps=args.steps)
                targets = [] if args.judge else ["evaluate"]
                sh(["dvc", "exp", "run", "--queue", "-n", name, *copy, *sets, *targets])
            started = time.monotonic()
            # The queue worker is a daemon that inherits stdout: do not capture it, or this call waits for the queue.
            subprocess.run(["dvc", "queue", "start", "-j", str(args.jobs)], check=True, stdout=subprocess.DEVNULL)
            status = wait_for_queue(args.timeout)
            print(f"demo experiments finished in {time.monotonic() - started:.0f} s", flush=True)
            # A new process: this one's dvc.api may still see the experiments it saw before the queue ran.
            found = set(sh(["dvc", "exp", "list", "--rev", baseline, "--name-only"], echo=False).split())
            missing = sorted(set(exps) - found)
            if missing:
                raise InputError(f"demo experiments {missing} failed (see `dvc queue logs <name>`):\n{status}")
        finally:
            shutil.rmtree(EXTERNAL, ignore_errors=True)
            shutil.rmtree(HELDOUT, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "demo.report", "--prefix", args.prefix, "--recipes", ",".join(recipes),
                    "--baseline", baseline, "--out", args.out, *[x for d in args.also for x in ("--also", d)]],
                   check=True)


if __name__ == "__main__":
    run_main(main)
