"""Data-parallel annotation through an existing engine (issue 16, item 5): ``annotate.backend: serve`` starts
``vllm serve`` with ``annotate.engine.data_parallel_size: 2``, vLLM's own data-parallel mode (two engine cores behind
one endpoint, its coordinator balancing the requests), and the score stage's shards go through it. For real on this
CPU."""

import numpy as np
import pytest

from politune.annotate import score
from politune.backends import ServedBackend, TransformersBackend
from tests.conftest import annotation_posts, section

pytestmark = pytest.mark.slow


def test_scores_through_vllm_data_parallel_serve(tmp_path, smollm2_dir):
    engine = {**section("annotate").engine, "dtype": "float32", "max_model_len": 1024, "data_parallel_size": 2,
              "cpu_kvcache_space_gib": 1}
    cfg = section("annotate", backend="serve", engine=engine, shard_size=3,
                  openai={**section("annotate").openai.model_dump(), "batch_size": 3, "concurrency": 4})
    posts = annotation_posts()
    log = tmp_path / "serve.log"
    table, report = score(posts, lambda: ServedBackend(str(smollm2_dir), cfg, 0, log_path=log), cfg, 0)
    served = log.read_text(errors="replace")
    assert "EngineCore_DP0" in served and "EngineCore_DP1" in served, "two data-parallel engine cores"
    assert served.count("POST /v1/completions") == 6  # 2 shards x 9 prompts in batches of 3, every one answered
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
