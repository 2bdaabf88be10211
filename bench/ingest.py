"""Ingest at corpus scale: rows/s and peak memory of the ``ingest`` stage on a generated Politosphere-style dump.

The corpus (``generate``) is bz2-free for speed: gzip-compressed JSON lines named like the Politosphere's monthly files
(``comments_2019-MM.jsonl.gz``), short comments with Pushshift's fields (``body``, ``subreddit``, ``created_utc``,
``author``, ``id``, ``language``), about 1% exact repeats, ``[deleted]`` bodies and AutoModerator comments, so that
dedup, placeholders and the author filter all work. It is written to a temporary folder and removed, never committed.

Each size runs the stage's own command (``python -m stages.ingest``, MLflow off) under ``/usr/bin/time``; peak RSS
that does not grow with the corpus is the point (the digests of texts and ids seen are the only part that does).
Run from the repository root: ``python -m bench.ingest --n 200000 2000000 --out bench-out/ingest.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

WORDS = ("tax taxes cut raise wage health care border wall immigration vote party senate congress bill law court "
         "gun rights climate energy oil jobs union market trade tariff budget debt school police city state nation "
         "freedom justice family church war peace vaccine mandate inflation price rent housing").split()
SUBREDDITS = ("politics", "Conservative", "progressive", "Libertarian", "democrats", "Republican", "news",
              "worldnews", "PoliticalDiscussion", "socialism")
FILES = 4


def generate(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` comments in ``FILES`` monthly gzip JSON-lines files under ``folder``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-n // FILES)
    written = 0
    for month in range(1, FILES + 1):
        with gzip.open(folder / f"comments_2019-{month:02d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as fh:
            for _ in range(min(per_file, n - written)):
                roll = rng.random()
                if roll < 0.01 and written:
                    body = f"I agree with the {WORDS[written % 20]} bill"  # a repeat
                elif roll < 0.02:
                    body = "[deleted]"
                else:
                    body = " ".join(rng.choices(WORDS, k=rng.randint(8, 24))) + f" {written}"
                author = "AutoModerator" if roll > 0.995 else f"user{rng.randrange(50_000)}"
                fh.write(json.dumps({"id": f"c{written:08x}", "body": body, "author": author,
                                     "subreddit": SUBREDDITS[rng.randrange(len(SUBREDDITS))],
                                     "created_utc": 1546300800 + written, "language": "en"}) + "\n")
                written += 1


def measure(raw: Path, work: Path, params: dict) -> dict:
    """Run the stage on ``raw``; its wall time, peak RSS and report."""
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump({"ingest": params}), encoding="utf-8")
    out, report = work / "posts.parquet", work / "ingest.json"
    cmd = ["/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "stages.ingest", "--params", str(params_file),
           "--raw", str(raw), "--out", str(out), "--report", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, POLITUNE_MLFLOW="off"),
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed:\n{proc.stderr[-3000:]}")
    rss_kb, wall = proc.stderr.strip().splitlines()[-1].split()
    rep = json.loads(report.read_text(encoding="utf-8"))
    result = {"rows": rep["rows_read"], "posts_out": rep["posts_out"], "seconds": float(wall),
              "rows_per_second": round(rep["rows_read"] / float(wall)), "peak_rss_mb": round(int(rss_kb) / 1024),
              "parquet_mb": round(out.stat().st_size / 2**20, 1), "skipped": rep["skipped"],
              "filtered_author": rep["filtered"]["author"]}
    out.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text(encoding="utf-8"))["ingest"]
    results = {"runs": []}
    for n in args.n:
        work = Path(tempfile.mkdtemp(prefix="politune-ingest-bench-"))
        try:
            t0 = time.perf_counter()
            generate(work / "raw", n)
            corpus_mb = sum(p.stat().st_size for p in (work / "raw").iterdir()) / 2**20
            run = {"n": n, "corpus_gz_mb": round(corpus_mb, 1), "generate_seconds": round(time.perf_counter() - t0, 1),
                   **measure(work / "raw", work, params)}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(run, flush=True)
        results["runs"].append(run)
    if len(results["runs"]) > 1:
        small, large = results["runs"][0], results["runs"][-1]
        results["rss_growth_mb"] = large["peak_rss_mb"] - small["peak_rss_mb"]
        results["rss_growth_bytes_per_row"] = round((large["peak_rss_mb"] - small["peak_rss_mb"]) * 2**20 /
                                                    (large["rows"] - small["rows"]), 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
