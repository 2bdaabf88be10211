"""Stage ``export``: the DPO adapter merged into the target, checked against target + adapter, with a model card."""

import hashlib
import json

import pytest
import yaml

from politune.common import InputError
from tests.helpers import PARAMS, typed

PROMPTS = ["Should taxes on the rich be raised?", "What do you think about vaccines?"]


def trained_adapter(model_dir, out, seed):
    """A LoRA adapter with non-zero weights (as after training), on q_proj and v_proj only."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                      init_lora_weights=False))
    model.save_pretrained(out)
    return out


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-adapters")
    return {name: trained_adapter(tiny_model_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2))}


def test_export_stage_merges_checks_and_writes_a_card(tmp_path, tiny_model_dir, adapters, monkeypatch):
    from transformers import AutoModelForCausalLM

    from stages import export as stage

    params = {s: PARAMS[s] for s in stage.SECTIONS}
    params["export"] = {"check_prompts": PROMPTS, "tolerance": 1e-3, "gguf": None}  # GGUF: the test below
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    reports = {"models.json": {"target": {"source": "pkg:tiny", "parameters": 123}},
               "datasets.json": {"pairs": 10, "train": 8, "test": 2, "sources": {"annotated": 10}},
               "metrics.json": {"base": {"economic": 0.5, "economic_ci_low": -1.0, "economic_ci_high": 2.0,
                                         "social": 0.0, "social_ci_low": -1.0, "social_ci_high": 1.0},
                                "dpo": {"economic": 1.5, "economic_ci_low": 0.25, "economic_ci_high": 3.0,
                                        "social": 0.0, "social_ci_low": -1.0, "social_ci_high": 1.0,
                                        "side_preference": {"heldout": {"right_data": {
                                            "shift": 6.0, "shift_ci_low": 4.0, "shift_ci_high": 8.0}}}}},
               "judge.json": {"dpo": {"score": 4.5, "score_ci_low": 4.0, "score_ci_high": 5.0}}}
    for name, value in reports.items():
        (tmp_path / name).write_text(json.dumps(value), encoding="utf-8")
    target_before = digest(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLITUNE_MLFLOW", "off")
    stage.main(["--model", str(tiny_model_dir), "--adapter", str(adapters["a"]), "--out", "export",
                "--report", "export.json", "--models", "models.json", "--datasets", "datasets.json",
                "--metrics", "metrics.json", "--judge", "judge.json"])

    out = tmp_path / "export"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= set(digest(out))
    assert not list(out.glob("adapter_*")), "a plain model folder, not an adapter"
    figures = json.loads((tmp_path / "export.json").read_text())
    assert 0 <= figures["max_abs_logit_diff"] <= 1e-3 and figures["top1_agreement"] == 1.0
    assert figures["prompts"] == 2 and figures["positions"] > 20
    assert "gguf" not in figures and not (out / "model.gguf").exists()

    # the adapter's modules changed, the others and the target on disk did not
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    changed = {k for k in base if not (base[k] == merged[k]).all()}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), sorted(changed)
    assert digest(tiny_model_dir) == target_before

    card = (out / "README.md").read_text()
    assert f"# politune: {PARAMS['ideology']}-tuned model" in card and "`pkg:tiny` (123 parameters)" in card
    assert "preference pairs: 10 (8 train, 2 test)" in card
    assert "| dpo | +1.50 [+0.25, +3.00] | +0.00 [-1.00, +1.00] | +6.00 [+4.00, +8.00] | 4.50 [4.00, 5.00] |" \
        in card
    assert f"largest absolute logit difference {figures['max_abs_logit_diff']:.3g}" in card
    assert "## GGUF" not in card and "at commit `" in card and f"`lora`: `{json.dumps(PARAMS['lora'], sort_keys=True)}`" in card


def test_export_check_refuses_weights_that_are_not_the_adapters(tmp_path, tiny_model_dir, adapters):
    """The check compares with the model it should equal: another adapter's merge fails it, by name."""
    from politune import export

    reference = export.merge(tiny_model_dir, adapters["a"], tmp_path / "a", PROMPTS)
    export.merge(tiny_model_dir, adapters["b"], tmp_path / "b", PROMPTS)
    assert export.check(tmp_path / "a", reference, PROMPTS, 1e-3)["max_abs_logit_diff"] <= 1e-3
    with pytest.raises(InputError, match=r"export: the merged model's logits differ .* by up to .*nothing was written"):
        export.check(tmp_path / "b", reference, PROMPTS, 1e-3)


@pytest.mark.slow  # about 24 s: `make test-fast` stays under 3 minutes
def test_gguf_quantised_reads_back_within_its_bounds(tmp_path, tiny_model_dir, adapters):
    """q8_0: the quantised file loads back through transformers and differs a little (KL > 0) from the weights; the
    bounds refuse it when set below what it reaches."""
    from politune import export

    export.merge(tiny_model_dir, adapters["a"], tmp_path, PROMPTS)
    export.write_gguf(tmp_path, tmp_path / "model.gguf", "q8_0", "smollm")
    figures = export.gguf_figures(tmp_path, "model.gguf", PROMPTS)
    assert 0 < figures["mean_kl"] < 1e-2 and figures["bytes"] < (tmp_path / "model.safetensors").stat().st_size
    assert figures["tokenizer_ids_equal"]
    assert export.within_bounds(figures, 1e-2, 0.5)["bound_mean_kl"] == 1e-2
    with pytest.raises(InputError, match="model.gguf read back differs from the merged model: mean KL"):
        export.within_bounds(figures, figures["mean_kl"] / 2, 0.5)
    card = export.model_card(typed(**{s: PARAMS[s] for s in ("ideology", "datasets", "recipe", "lora", "sft", "dpo")}),
                             {}, {"prompts": 2, "positions": 30, "max_abs_logit_diff": 1e-5, "top1_agreement": 1.0,
                                  "tolerance": 1e-3, "gguf": export.within_bounds(figures, 1e-2, 0.5)}, "abc")
    assert "## GGUF" in card and "its tokenizer gives the same token ids on the prompts" in card
