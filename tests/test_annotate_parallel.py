"""Data-parallel annotation through an existing engine (issue 16, item 5): ``annotate.backend: serve`` starts
``vllm serve`` with ``annotate.engine.data_parallel_size: 2``, vLLM's own data-parallel mode (two engine cores behind
one endpoint, its coordinator balancing the requests), and the score stage's shards go through it. For real on this
CPU."""

import re
import urllib.request

import numpy as np
import pytest

from politune.annotate import score
from politune.backends import ServedBackend, TransformersBackend
from tests.helpers import annotation_posts, section

pytestmark = pytest.mark.slow


def test_scores_through_vllm_data_parallel_serve(tmp_path, smollm2_dir):
    engine = {**section("annotate").engine, "dtype": "float32", "max_model_len": 1024, "data_parallel_size": 2,
              "cpu_kvcache_space_gib": 1}
    cfg = section("annotate", backend="serve", engine=engine, shard_size=3,
                  openai={**section("annotate").openai.model_dump(), "batch_size": 3, "concurrency": 4})
    posts = annotation_posts()
    served = ServedBackend(str(smollm2_dir), cfg, 0, log_path=tmp_path / "serve.log")
    try:
        table, report = score(posts, served, cfg, 0)
        root = str(served.client.base_url).rstrip("/").removesuffix("/v1")
        with urllib.request.urlopen(f"{root}/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
    finally:
        served.close()
    # vLLM's own per-engine counters (Prometheus): both engine cores answered prompts
    done = {}
    for line in metrics.splitlines():
        match = re.match(r'vllm:request_success_total\{(.*)\} ([0-9.e+]+)$', line)
        if match:
            engine_label = re.search(r'engine="(\d+)"', match.group(1)).group(1)
            done[engine_label] = done.get(engine_label, 0) + float(match.group(2))
    assert set(done) == {"0", "1"} and all(n > 0 for n in done.values()), done
    assert sum(done.values()) == 3 * len(posts)  # every prompt: a post after each of the 3 viewpoint prefixes
    assert report["posts"] == len(posts) and report["shards"] == 2
    # The same posts through the transformers backend: the same likeliest viewpoint for every post. (The openai
    # backend scores the text by the endpoint's character offsets on the joint tokenization, the local backends on
    # the prefix's and the text's own tokens, so the log-likelihoods themselves differ by a few nats.)
    local = TransformersBackend(str(smollm2_dir), section("annotate").transformers, seed=0)
    expected, _ = score(posts, local, section("annotate", backend="transformers", shard_size=3), 0)
    columns = [f"score_{name}" for name in ("right", "left", "none")]
    assert list(table["viewpoint"]) == list(expected["viewpoint"]), (table[columns], expected[columns])
    assert np.allclose(table[columns].sum(axis=1), 1.0)
    right, off = (table.loc[posts["label"] == label, "score_right"].mean() for label in ("right", "off"))
    assert right > off
