"""The transformers annotation backend, for real on SmolLM2 (no engine: plain `generate` in batches)."""

import pytest

from politune.annotate import annotate
from tests.helpers import annotation_posts, check_annotation, section

pytestmark = pytest.mark.slow


def test_transformers_backend(smollm2_dir):
    from politune.backends import TransformersBackend

    cfg = section("annotate", backend="transformers", threshold=0.0, max_new_tokens=160, max_retries=1)
    backend = TransformersBackend(str(smollm2_dir), cfg.transformers, seed=0)
    table, report = annotate(annotation_posts(), backend, "right", cfg, seed=0)
    check_annotation(table, report, cfg)
