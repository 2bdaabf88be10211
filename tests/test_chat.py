"""Serving the tuned models: ``vllm serve`` with the adapters as LoRA modules answers as local PEFT generation does."""

import io

import pytest

from politune.common import InputError
from tests.conftest import PARAMS, typed

PROMPT = "Should taxes on the rich be raised?"


def params(**lora):
    return typed(base=PARAMS["base"], lora=dict(PARAMS["lora"], **lora), judge=PARAMS["judge"])


def strong_adapter(model_dir, out):
    """A LoRA adapter on SmolLM2 that changes its greedy answer (random weights, as after a long training run)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.mul_(0.3)
    model.save_pretrained(out)
    return out


def test_server_options_serve_every_adapter_at_a_rank_vllm_accepts(tmp_path):
    from politune import chat
    from politune.serve import engine_args

    for name, r in (("a", 4), ("b", 24)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(f'{{"r": {r}}}')
    adapters = chat.parse_adapters([f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"])
    args = engine_args(chat.server_options(params(r=16), adapters))
    assert args[args.index("--lora-modules") + 1:][:2] == [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]
    assert args[args.index("--max-lora-rank") + 1] == "32", "rank 24 rounds up to vLLM's 32"
    assert "--enable-lora" in args and args[args.index("--served-model-name") + 1] == "base"
    assert chat.lora_rank(params(r=4), {"a": str(tmp_path / "a")}) == 8
    with pytest.raises(InputError, match="vLLM serves ranks up to 512"):
        chat.lora_rank(params(r=1024), {})
    with pytest.raises(InputError, match="expected NAME=PATH"):
        chat.parse_adapters(["models/dpo"])
    with pytest.raises(InputError, match="holds no adapter_config.json"):
        chat.parse_adapters([f"dpo={tmp_path}"])


@pytest.mark.slow
def test_served_adapter_answers_as_local_peft(tmp_path, smollm2_dir):
    """The adapter served as a LoRA module by vLLM's CPU build gives the greedy answer local PEFT generation gives
    (and not the base model's); the base model is served beside it under its own name."""
    from openai import OpenAI

    from politune import chat, serve
    from politune.inference import generate, load_with_adapters, use

    adapter = strong_adapter(smollm2_dir, tmp_path / "strong")
    model, tokenizer = load_with_adapters(smollm2_dir, {"strong": adapter})
    local = {}
    for name in ("base", "strong"):
        with use(model, name):
            local[name] = generate(model, tokenizer, [PROMPT], 24, 0.0, 0, 1)[0]
    assert local["strong"] != local["base"], "the adapter must change the answer for this test to mean anything"
    cfg = params()
    with serve.serving(smollm2_dir, chat.server_options(cfg, {"strong": str(adapter)}), 0, 300) as url:
        client = OpenAI(base_url=url, api_key="EMPTY")
        served = {name: chat.answer(client, name, PROMPT, 24).strip() for name in ("base", "strong")}
        out = io.StringIO()
        chat.side_by_side(client, ["base", "strong"], [PROMPT], 24, out=out)
    assert served == local
    assert f"> {PROMPT}" in out.getvalue() and f"[strong]\n{local['strong']}" in out.getvalue()
