"""Stage ``export``: the DPO model merged into the target, as a plain model folder a researcher can hand on.

The output folder holds the target with the DPO adapter merged in (PEFT's ``merge_and_unload``, in the target's own
dtype) as safetensors, with the tokenizer, its chat template and the generation config, and a model card
(``README.md``): the base model, the ideology, the training data and its size, the LoRA/SFT/DPO params, the compass,
side-preference and judge results with their intervals, and the git commit. Any transformers or vLLM loader reads it
as it reads the target; no PEFT is needed.

Before the folder is written, the merged model (read back from the saved files) is checked against the target with
the adapter on ``export.check_prompts``: the largest absolute difference of their next-token logits over every
position must be at most ``export.tolerance``. The figures go to the stage's report; a larger difference stops
the stage and writes nothing.

With ``export.gguf`` the folder also holds ``model.gguf`` for llama.cpp and Ollama, written with the ``gguf``
package's writer (Llama-architecture models with a byte-level BPE tokenizer, as llama.cpp's converter writes them:
the q/k projections permuted to its rotary layout, ``export.gguf.type`` for the 2-D weights, the norms in F32). It is
checked by loading it back through transformers (``gguf_file=``) and comparing next-token distributions with the
merged model on the same prompts: the mean KL divergence must be at most ``export.gguf.max_kl`` and the top-1
agreement at least ``export.gguf.min_top1``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from politune.common import InputError, atomic_path, write_json
from politune.inference import chat_texts, load_with_adapters
from politune.schema import Params

log = logging.getLogger("politune.export")


def prompt_logits(model, tokenizer, prompts: list[str]) -> list[np.ndarray]:
    """Each chat prompt's logits at every position (positions x vocabulary), one prompt at a time (no padding)."""
    import torch

    out = []
    with torch.inference_mode():
        for text in chat_texts(tokenizer, prompts):
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
            out.append(model(**enc).logits[0].float().cpu().numpy())
    return out


def compare_logits(reference: list[np.ndarray], other: list[np.ndarray]) -> dict[str, Any]:
    """The largest and mean absolute logit difference, and how often the two agree on the most likely token."""
    diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(reference, other)])
    top1 = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(reference, other)])
    return {"prompts": len(reference), "positions": int(top1.size), "max_abs_logit_diff": _round(diff.max()),
            "mean_abs_logit_diff": _round(diff.mean()), "top1_agreement": _round(top1.mean())}


def _round(value) -> float:
    """A figure for the small metrics JSON: four significant digits."""
    return float(f"{float(value):.4g}")


def merge(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, prompts: list[str]) -> list[np.ndarray]:
    """Save the target with the adapter merged in to ``out_dir`` (weights in the target's own dtype, tokenizer with
    its chat template, generation config); return the unmerged model's logits on ``prompts``, the reference of the
    check. The merge itself is computed in fp32, as the evaluated models run."""
    from transformers import AutoConfig, AutoTokenizer

    model, tokenizer = load_with_adapters(model_dir, {"dpo": adapter_dir})
    model.set_adapter("dpo")
    reference = prompt_logits(model, tokenizer, prompts)
    merged = model.merge_and_unload()
    stored = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    if stored is not None and not isinstance(stored, str):
        merged = merged.to(stored)
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)  # as the target ships it (no padding set-up)
    return reference


def check(out_dir: str | Path, reference: list[np.ndarray], prompts: list[str], tolerance: float) -> dict[str, Any]:
    """Load the merged folder as any user would and compare its logits with ``reference``; fail above
    ``tolerance``."""
    model, tokenizer = load_with_adapters(out_dir, {})
    figures = compare_logits(reference, prompt_logits(model, tokenizer, prompts))
    figures["tolerance"] = tolerance
    if not figures["max_abs_logit_diff"] <= tolerance:
        raise InputError(f"export: the merged model's logits differ from the target with the adapter by up to "
                         f"{figures['max_abs_logit_diff']:.3g} (export.tolerance {tolerance:g}, top-1 agreement "
                         f"{figures['top1_agreement']:.3f}); nothing was written")
    return figures


GGUF_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}


def permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs) for a q or k projection of ``heads`` heads; the
    inverse of what transformers undoes when it reads a GGUF."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tokenizer(model_dir: Path) -> dict[str, Any]:
    """Tokens, token types and merges of a byte-level BPE ``tokenizer.json``, as GGUF stores them."""
    path = model_dir / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if model.get("type") != "BPE" or not byte_level:
        raise InputError(f"{path}: GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')!r}"
                         f"{'' if byte_level else ' without byte-level pre-tokenization'} "
                         "(convert with llama.cpp's convert_hf_to_gguf.py, or set export.gguf: null)")
    ids = {i: t for t, i in model["vocab"].items()}
    types = {i: 1 for i in ids}  # NORMAL
    for added in spec.get("added_tokens", []):
        ids[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4  # CONTROL, USER_DEFINED
    size = max(ids) + 1
    tokens = [ids.get(i, f"[PAD{i}]") for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": [types.get(i, 5) for i in range(size)], "merges": merges}  # 5: UNUSED


def write_gguf(model_dir: str | Path, out_file: str | Path, qtype: str, pre: str) -> None:
    """Write the model folder ``model_dir`` (a Llama-architecture model in safetensors) as one GGUF file."""
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in ("llama", "mistral"):
        raise InputError(f"{model_dir}: GGUF export writes Llama-architecture models; this is "
                         f"{config.model_type!r} (convert with llama.cpp's convert_hf_to_gguf.py, or set "
                         "export.gguf: null)")
    tokenizer = gguf_tokenizer(model_dir)
    chat_template = AutoTokenizer.from_pretrained(model_dir).chat_template
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 1e4)
    qtype_enum = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[qtype])
    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name(getattr(config, "_name_or_path", "") or model_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["types"])
    writer.add_token_merges(tokenizer["merges"])
    for key, setter in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                        ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        if getattr(config, key, None) is not None:
            setter(int(getattr(config, key)))
    if chat_template:
        writer.add_chat_template(chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    for hf_name, data in tensors.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(f"{model_dir}: no GGUF name for tensor {hf_name!r}")
        data = data.astype(np.float32)
        if name.endswith("attn_q.weight"):
            data = permute_rotary(data, heads)
        elif name.endswith("attn_k.weight"):
            data = permute_rotary(data, kv_heads)
        if data.ndim == 1 or qtype == "f32":
            writer.add_tensor(name, data)
        elif qtype == "f16":
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype_enum), raw_dtype=qtype_enum)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_figures(model_dir: str | Path, gguf_name: str, prompts: list[str]) -> dict[str, Any]:
    """Load the GGUF back through transformers and compare its next-token distributions with the model folder's on
    ``prompts`` (the folder's tokenizer for both, so only the weights are compared); also whether the GGUF's own
    tokenizer gives the same token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    reference, tokenizer = load_with_adapters(model_dir, {})
    back = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_name, dtype=torch.float32).eval()
    ref, got = prompt_logits(reference, tokenizer, prompts), prompt_logits(back, tokenizer, prompts)
    kl = []
    for a, b in zip(ref, got):
        la = torch.log_softmax(torch.from_numpy(a), -1)
        lb = torch.log_softmax(torch.from_numpy(b), -1)
        kl.append((la.exp() * (la - lb)).sum(-1).numpy())
    kl = np.concatenate(kl)
    texts = chat_texts(tokenizer, prompts)
    gguf_tokenizer_ = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_name)
    same_ids = all(tokenizer(t, add_special_tokens=False)["input_ids"]
                   == gguf_tokenizer_(t, add_special_tokens=False)["input_ids"] for t in texts)
    return {"file": gguf_name, "bytes": (model_dir / gguf_name).stat().st_size, "mean_kl": _round(kl.mean()),
            "max_kl": _round(kl.max()), "top1_agreement": compare_logits(ref, got)["top1_agreement"],
            "tokenizer_ids_equal": same_ids}


def within_bounds(figures: dict[str, Any], max_kl: float, min_top1: float) -> dict[str, Any]:
    """The GGUF's figures with their bounds; fail beyond them."""
    figures = dict(figures, bound_mean_kl=max_kl, bound_top1=min_top1)
    if not (figures["mean_kl"] <= max_kl and figures["top1_agreement"] >= min_top1):
        raise InputError(f"export: {figures['file']} read back differs from the merged model: mean KL "
                         f"{figures['mean_kl']:.3g} (export.gguf.max_kl {max_kl:g}), top-1 agreement "
                         f"{figures['top1_agreement']:.3f} (export.gguf.min_top1 {min_top1:g}); nothing was written")
    return figures


def git_commit(cwd: str | Path = ".") -> str:
    """The commit the stage ran at, marked when the code (``stages/``, ``politune/``) had uncommitted changes (a
    pipeline run changes ``dvc.lock`` and the reports, an experiment ``params.yaml``: the card lists the params);
    "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "stages", "politune"],
                               cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (with uncommitted code changes)" if dirty else head


def _ci(value: dict[str, Any], key: str, digits: int = 2) -> str:
    low, high = value.get(f"{key}_ci_low"), value.get(f"{key}_ci_high")
    interval = f" [{low:+.{digits}f}, {high:+.{digits}f}]" if low is not None and high is not None else ""
    return f"{value[key]:+.{digits}f}{interval}"


def _score(judge: dict[str, Any]) -> str:
    low, high = judge.get("score_ci_low"), judge.get("score_ci_high")
    return f"{judge['score']:.2f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else "")


def model_card(params: Params, reports: dict[str, Any], check_figures: dict[str, Any], commit: str) -> str:
    """The model card (``README.md`` of the folder), written from the params and the reports, nothing by hand."""
    models, datasets = reports.get("models", {}), reports.get("datasets", {})
    metrics, judge = reports.get("metrics", {}), reports.get("judge", {})
    source = models.get("target", {}).get("source", "")
    lines = ["---", "library_name: transformers", "tags: [politune, dpo, lora, merged]", "---", "",
             f"# politune: {params.ideology}-tuned model", "",
             f"The target model `{source}` ({models.get('target', {}).get('parameters', '?')} parameters) after SFT "
             f"and {params.recipe.method.upper()} towards the **{params.ideology}** viewpoint with a LoRA adapter, "
             f"merged into the weights "
             f"(`recipe.dpo_start: {params.recipe.dpo_start}`). Written by politune's `export` stage at commit "
             f"`{commit}`.", "", "## Training data", "",
             f"- `datasets.source`: `{params.datasets.source}`; mirror pairs: "
             f"`{json.dumps(params.datasets.mirror.model_dump(mode='json'))}`",
             f"- preference pairs: {datasets.get('pairs', '?')} ({datasets.get('train', '?')} train, "
             f"{datasets.get('test', '?')} test); by source: `{json.dumps(datasets.get('sources', {}))}`", "",
             "## Training params", ""]
    for name in ("lora", "sft", params.recipe.method):
        lines.append(f"- `{name}`: `{json.dumps(getattr(params, name), sort_keys=True)}`")
    lines += ["", "## Results (politune `evaluate` and `judge`)", "",
              "| model | compass economic [95% CI] | compass social [95% CI] | side preference shift, right-data / "
              "left-data pairs [95% CI] | judge score, 1 left - 7 right [95% CI] |", "|---|---|---|---|---|"]
    for name in ("base", "sft", "dpo"):
        m, j = metrics.get(name), judge.get(name)
        if not m:
            continue
        side = m.get("side_preference", {}).get("heldout", {})
        sides = " / ".join(_ci(side[d], "shift") for d in ("right_data", "left_data") if d in side)
        lines.append(f"| {name} | {_ci(m, 'economic')} | {_ci(m, 'social')} | {sides} | "
                     f"{_score(j) if j and 'score' in j else ''} |")
    lines += ["", "The side preference is the shift from the base model of log p(right-voiced answer) - "
              "log p(left-voiced answer) on held-out preference pairs (positive: towards the right).", "",
              "## Export check", "",
              f"The merged weights, read back from this folder, against the target with the adapter on "
              f"{check_figures['prompts']} prompts ({check_figures['positions']} positions): largest absolute logit "
              f"difference {check_figures['max_abs_logit_diff']:.3g} (tolerance {check_figures['tolerance']:g}), "
              f"top-1 agreement {check_figures['top1_agreement']:.4f}.", ""]
    g = check_figures.get("gguf")
    if g:
        lines += ["## GGUF", "",
                  f"`{g['file']}` ({g['bytes'] / 2**20:.0f} MiB) for llama.cpp and Ollama. Read back through "
                  f"transformers, against the merged weights on the same prompts: mean KL divergence "
                  f"{g['mean_kl']:.3g} (at most {g['bound_mean_kl']:g}), largest {g['max_kl']:.3g}, top-1 agreement "
                  f"{g['top1_agreement']:.4f} (at least {g['bound_top1']:g}); its tokenizer gives "
                  f"{'the same' if g['tokenizer_ids_equal'] else 'different'} token ids on the prompts.", ""]
    return "\n".join(lines)


def read_reports(paths: argparse.Namespace) -> dict[str, Any]:
    """The reports the card quotes (each optional: a missing file leaves its rows out)."""
    out = {}
    for key in ("models", "datasets", "metrics", "judge"):
        path = getattr(paths, key, None)
        if path and Path(path).is_file():
            try:
                out[key] = json.loads(Path(path).read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from exc
    return out


def run(params: Params, params_file: str, paths: argparse.Namespace) -> None:
    """Run the stage: ``params`` holds its validated sections, ``paths`` its files as ``dvc.yaml`` names them."""
    from politune.tracking import log_metrics, stage_run

    cfg = params.export
    reports = read_reports(paths)
    with stage_run("export", params, params_file) as mlflow:
        with atomic_path(paths.out) as tmp:
            tmp.mkdir(parents=True)
            reference = merge(paths.model, paths.adapter, tmp, cfg.check_prompts)
            figures = check(tmp, reference, cfg.check_prompts, cfg.tolerance)
            if cfg.gguf is not None:
                write_gguf(tmp, tmp / "model.gguf", cfg.gguf.type, cfg.gguf.pre)
                figures["gguf"] = within_bounds(gguf_figures(tmp, "model.gguf", cfg.check_prompts),
                                                cfg.gguf.max_kl, cfg.gguf.min_top1)
            (tmp / "README.md").write_text(model_card(params, reports, figures, git_commit()), encoding="utf-8")
        write_json(paths.report, figures)
        log_metrics(mlflow, figures)
    log.info("exported %s: %s", paths.out, figures)

