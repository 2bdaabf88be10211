"""Annotation throughput: the same posts through the vLLM and transformers backends, same prompts, greedy.

Prints, per backend and N: scoring time, generation time, prompts/s and generated tokens/s, and writes JSON.
Run from the repository root: ``python -m bench.annotation --model models/annotator --n 32 --out bench-out/a.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import pandas as pd
import yaml

from politune.annotate import build_chat, triplet_model
from politune.common import load_params


def measure(backend, texts, cfg, max_tokens, score=True):
    prefixes = [cfg.score_prefix.format(viewpoint=v) for v in cfg.viewpoints.values()]
    t0 = time.perf_counter()
    if score:
        backend.loglikelihoods(prefixes, texts, cfg.max_post_tokens)
    t_score = time.perf_counter() - t0
    chats = [build_chat(cfg, "right", t) for t in texts]
    before = backend.tokens_generated
    t0 = time.perf_counter()
    backend.generate_json(chats, triplet_model(cfg.max_answer_chars).model_json_schema(), max_tokens, 0.0, 0)
    t_gen = time.perf_counter() - t0
    tokens = backend.tokens_generated - before
    return {"n": len(texts), "score_seconds": round(t_score, 2) if score else None, "generate_seconds": round(t_gen, 2),
            "prompts_per_second": round(len(texts) / t_gen, 3), "generated_tokens": tokens,
            "generated_tokens_per_second": round(tokens / t_gen, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/annotator")
    parser.add_argument("--posts", default="data/posts.parquet")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--n", type=int, nargs="+", default=[64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--backends", nargs="+", default=["vllm", "transformers", "transformers-b1"])
    parser.add_argument("--transformers-batch", type=int, default=16)
    parser.add_argument("--transformers-max-n", type=int, default=64, help="cap N for the batched transformers runs")
    parser.add_argument("--b1-max-n", type=int, default=64, help="cap N for the transformers batch-1 runs")
    parser.add_argument("--no-score", action="store_true", help="time generation only")
    parser.add_argument("--engine", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override annotate.engine keys for the vLLM run (e.g. max_num_seqs=64)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cfg = load_params(args.params, ["annotate"]).annotate
    engine = dict(cfg.engine, **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.engine)})
    posts = pd.read_parquet(args.posts)["text"].tolist()
    texts_for = lambda n: (posts * (n // len(posts) + 1))[:n]  # noqa: E731
    results = {}
    from politune.backends import TransformersBackend, VLLMBackend

    for name in args.backends:
        if name == "vllm":
            t0 = time.perf_counter()
            backend = VLLMBackend(args.model, engine, seed=0)
            start = time.perf_counter() - t0
        else:
            batch = 1 if name.endswith("b1") else args.transformers_batch
            backend = TransformersBackend(args.model, cfg.transformers.model_copy(update={"batch_size": batch}), seed=0)
            start = 0.0
        runs = []
        for n in args.n:
            cap = {"vllm": None, "transformers-b1": args.b1_max_n}.get(name, args.transformers_max_n)
            if cap is not None and n > cap:
                continue
            runs.append(measure(backend, texts_for(n), cfg, args.max_tokens, score=not args.no_score))
            print(name, runs[-1], flush=True)
        results[name] = {"engine_start_seconds": round(start, 1), "runs": runs}
        if name == "vllm":
            results[name]["engine"] = engine
        del backend
        gc.collect()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
