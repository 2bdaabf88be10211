"""``reports/bench.md`` from ``reports/bench.json``: the benchmark figures as tables, written by code (``make bench``
calls it; ``python -m bench.report`` rewrites it from the JSON alone)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from politune.common import atomic_path, read_json


def _annotation(a: dict[str, Any]) -> list[str]:
    lines = [f"## Annotation throughput (at most {a.get('max_tokens')} new tokens, greedy)", "",
             "| backend | N | seconds | prompts/s | generated tokens/s | engine start s |", "|---|---|---|---|---|---|"]
    for backend, entry in a.get("runs", {}).items():
        for r in entry.get("runs", []):
            lines.append(f"| {backend} | {r['n']} | {r['generate_seconds']} | {r['prompts_per_second']} | "
                         f"{r['generated_tokens_per_second']} | {entry.get('engine_start_seconds')} |")
    speed = {k: v for k, v in a.items() if k.startswith("speedup")}
    lines += ["", *(f"- `{k}`: {v}" for k, v in speed.items()), ""]
    return lines


def _settings(a: dict[str, Any]) -> list[str]:
    lines = [f"## vLLM CPU settings (annotation generation, N={a.get('n')}, at most {a.get('max_tokens')} new tokens)",
             "", "| setting | annotate.engine overrides | generated tokens/s | engine start s |", "|---|---|---|---|"]
    for name, r in a.get("runs", {}).items():
        lines.append(f"| {name} | `{r['engine']}` | {r['generated_tokens_per_second']} | {r['engine_start_seconds']} |")
    # bench.run's ``best``: the fastest of the settings that change how each step is run, not what it computes
    same = [r["generated_tokens_per_second"] for r in a.get("runs", {}).values() if r.get("same_computation")]
    if not same or "best" not in a:
        return lines + [""]
    spread = f"{(max(same) / min(same) - 1) * 100:.0f}%"
    return lines + ["", f"- settings with the same computation (not compiled, the same grammar engine): fastest "
                    f"`{a['best']}`, {spread} over the slowest, one run each", ""]


def _ingest(i: dict[str, Any]) -> list[str]:
    lines = ["## Ingest at corpus scale (`bench.ingest`: generated Politosphere-style gzip JSON lines)", "",
             "| comments | corpus MB (gz) | posts out | seconds | rows/s | peak RSS MB |", "|---|---|---|---|---|---|"]
    for r in i.get("runs", []):
        lines.append(f"| {r['n']:,} | {r['corpus_gz_mb']} | {r['posts_out']:,} | {r['seconds']} | "
                     f"{r['rows_per_second']:,} | {r['peak_rss_mb']} |")
    lines += ["", *(f"- `{k}`: {v}" for k, v in i.items() if k != "runs"), ""]
    return lines


def _dpo(d: dict[str, Any]) -> list[str]:
    lines = [f"## DPO step time (`bench.dpo`; native bf16 on this CPU: {d.get('cpu_bf16')})", "",
             "| configuration | dpo overrides | resolved | s/step | all-in s/step | peak RSS GB | final loss | "
             "eval loss | eval reward acc. |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in d.items():
        if isinstance(r, dict) and "seconds_per_step" in r:
            lines.append(f"| {name} | `{r['config']}` | `{r.get('resolved', '')}` | {r['seconds_per_step']} | "
                         f"{r['seconds_per_step_all_in']} | "
                         f"{r['peak_rss_gb']} | {r['final_loss']} | {r['eval_loss']} | {r['eval_reward_accuracy']} |")
    lines += ["", *(f"- `{k}`: {v}" for k, v in d.items() if k.startswith("speedup")), ""]
    for steps, short in d.get("short_runs", {}).items():
        lines += [f"At {steps} steps: " + ", ".join(
            f"{name} {r['seconds_per_step']} s/step ({r['seconds_per_step_all_in']} all-in)"
            for name, r in short.items() if isinstance(r, dict) and "seconds_per_step" in r) + "; "
            + ", ".join(f"`{k}` {v}" for k, v in short.items() if k.startswith("speedup")), ""]
    return lines


def _evaluate(e: dict[str, Any]) -> list[str]:
    lines = ["## The `evaluate` stage (`bench.evaluate`, default pipeline's models)", ""]
    lines += [f"- `{k}`: {v}" for k, v in e.items()]
    return lines + [""]


def _repro(r: dict[str, Any]) -> list[str]:
    lines = ["## `dvc repro` and `dvc exp run`", ""]
    lines += [f"- `{k}`: {v}" for k, v in r.items()]
    return lines + [""]


# Issue 18's targets for this 2-core machine: (key path in the report, what it measures, bound, "max" or "min").
TARGETS = [
    (("repro", "default_seconds"), "`dvc repro` of the default params from scratch, s", 600, "max"),
    (("evaluate", "compass_seconds"), "`evaluate`, the compass part, s", 60, "max"),
    (("annotation", "speedup_vllm_vs_transformers_best"), "annotation tokens/s, vLLM / best transformers", 5, "min"),
    (("dpo", "speedup_optimised_vs_default"), "DPO optimised / TRL default, per step", 2, "min"),
    (("dpo", "speedup_optimised_vs_default_all_in"), "DPO optimised / TRL default, all-in", 1.5, "min"),
]


def _targets(report: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "", "| figure | measured | target | met |", "|---|---|---|---|"]
    for path, what, bound, kind in TARGETS:
        value = report.get(path[0], {}).get(path[1])
        met = "not measured" if value is None else "yes" if (value <= bound if kind == "max" else value >= bound) \
            else "no"
        lines.append(f"| {what} (`{'.'.join(path)}`) | {value} | {'at most' if kind == 'max' else 'at least'} "
                     f"{bound} | {met} |")
    return lines + [""]


def markdown(report: dict[str, Any]) -> str:
    machine = report.get("machine", {})
    lines = ["# Benchmarks", "", f"Written by `bench/report.py` from `reports/bench.json` (`make bench`). Machine: "
             f"{machine.get('cpus')} CPUs ({machine.get('cpu')}; native bf16: {machine.get('cpu_bf16')}), Python "
             f"{machine.get('python')}.", ""]
    lines += _targets(report)
    for key, fn in (("ingest", _ingest), ("annotation", _annotation), ("vllm_cpu_settings", _settings),
                    ("dpo", _dpo), ("evaluate", _evaluate), ("repro", _repro)):
        if key in report:
            lines += fn(report[key])
    return "\n".join(lines)


def write(json_path: str | Path, md_path: str | Path) -> None:
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown(read_json(json_path)), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="reports/bench.json")
    parser.add_argument("--out", default="reports/bench.md")
    args = parser.parse_args()
    write(args.json, args.out)


if __name__ == "__main__":
    main()
