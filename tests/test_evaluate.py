"""Compass answer elicitation: the calibrated forced choice and generate-then-classify, on the real SmolLM2."""

import numpy as np
import pytest
from politune.compass import load_compass
from politune.evaluate import classified_probabilities, elicit, paraphrase_probabilities, summarise, trajectory_dirs
from tests.helpers import PARAMS, ROOT, section


def test_mean_calibration_removes_an_option_prior():
    # One template, 3 items; option 0 is favoured by +5 on every item, the content prefers 2, 1, 3.
    content = np.log(np.array([[0.1, 0.1, 0.7, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]]))
    lp = (content + np.array([5.0, 0, 0, 0]))[None]
    assert paraphrase_probabilities(lp, "mean").shape == (1, 3, 4)
    assert list(paraphrase_probabilities(lp, "none")[0].argmax(axis=1)) == [0, 0, 0]
    assert list(paraphrase_probabilities(lp, "mean")[0].argmax(axis=1)) == [2, 1, 3]


def test_interval_covers_paraphrase_instability():
    """Two models with the same averaged answers: one whose paraphrases agree, one whose paraphrases disagree on
    every proposition. Resampling propositions alone gives both the same interval; resampling paraphrases too
    widens the unstable one's."""
    compass = load_compass(ROOT / "data" / "compass" / "political_compass.json")
    answers = np.random.default_rng(0).integers(0, 4, 62)
    stable = np.repeat(np.eye(4)[answers][None] * 0.6 + 0.1, 3, axis=0)  # 3 paraphrases, all the same answer
    unstable = np.full((3, 62, 4), 0.05)
    for i, a in enumerate(answers):  # paraphrase 0 gives the answer, 1 and 2 each lean to another option
        unstable[0, i, a], unstable[1, i, (a + 1) % 4], unstable[2, i, (a + 2) % 4] = 0.85, 0.5, 0.5
        unstable[1, i, a] = unstable[2, i, a] = 0.4
    unstable /= unstable.sum(axis=-1, keepdims=True)
    assert (unstable.mean(axis=0).argmax(axis=1) == answers).all()
    s, u = summarise(compass, stable, 400, seed=0), summarise(compass, unstable, 400, seed=0)
    assert (s["economic"], s["social"]) == (u["economic"], u["social"]) == compass.coordinates(answers)
    for axis in ("economic", "social"):
        width_s = s[f"{axis}_ci_high"] - s[f"{axis}_ci_low"]
        width_u = u[f"{axis}_ci_high"] - u[f"{axis}_ci_low"]
        assert width_u >= width_s + 0.5, (axis, width_s, width_u)
        assert u[f"{axis}_expected_ci_low"] <= u[f"{axis}_expected"] <= u[f"{axis}_expected_ci_high"]


def test_classified_refusals_are_counted_and_left_out_of_the_score():
    # 2 answers x 2 items x 5 classes; the second answer to item 0 is a refusal.
    p = np.array([[[0.1, 0.1, 0.6, 0.1, 0.1], [0.7, 0.1, 0.1, 0.05, 0.05]],
                  [[0.05, 0.05, 0.05, 0.05, 0.8], [0.6, 0.2, 0.1, 0.05, 0.05]]])
    probs, refusals = classified_probabilities(np.log(p), "none")
    assert refusals == 1
    assert probs.shape == (2, 2, 4) and np.allclose(probs.sum(axis=-1), 1.0)
    assert np.allclose(probs.mean(axis=0)[0], (p[0, 0, :4] / 0.9 + p[1, 0, :4] / 0.2) / 2)
    assert list(probs.mean(axis=0).argmax(axis=1)) == [2, 0]


def test_trajectory_dirs(tmp_path):
    for n in (10, 5, 20):
        (tmp_path / f"step-{n}").mkdir()
        (tmp_path / f"step-{n}" / "adapter_config.json").write_text("{}")
    (tmp_path / "step-25").mkdir()  # an interrupted save: no adapter, not a snapshot
    assert sorted(trajectory_dirs(tmp_path)) == [5, 10, 20]
    assert trajectory_dirs(tmp_path / "missing") == {} and trajectory_dirs(None) == {}


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from politune.inference import load_with_adapters

    return load_with_adapters(smollm2_dir, {})


@pytest.mark.slow
def test_forced_choice_on_the_base_model_uses_several_options(smollm2):
    compass = load_compass(ROOT / "data" / "compass" / "political_compass.json")
    # two of the three paraphrase templates (the third costs 20 s here and tests nothing more)
    cfg = section("evaluate", elicitation="forced_choice", templates=PARAMS["evaluate"]["templates"][:2])
    probs, extra = elicit(*smollm2, "base", compass, cfg, seed=0)
    assert probs.shape == (2, 62, 4) and np.allclose(probs.sum(axis=-1), 1.0) and extra == {}
    summary = summarise(compass, probs, 100, seed=0)
    assert summary["distinct_answers"] >= 3, summary
    assert summary["economic_ci_low"] <= summary["economic"] <= summary["economic_ci_high"]


@pytest.mark.slow
def test_generate_then_classify(smollm2, tmp_path):
    import json

    data = json.loads((ROOT / "data" / "compass" / "political_compass.json").read_text(encoding="utf-8"))
    data["items"] = data["items"][:3]  # a short instrument: 3 propositions
    (tmp_path / "c.json").write_text(json.dumps(data), encoding="utf-8")
    compass = load_compass(tmp_path / "c.json")
    gen = dict(PARAMS["evaluate"]["generate"], templates=PARAMS["evaluate"]["generate"]["templates"][:2], samples=2,
               max_new_tokens=12)
    cfg = section("evaluate", elicitation="generate", generate=gen)
    probs, extra = elicit(*smollm2, "base", compass, cfg, seed=0)
    assert probs.shape == (4, 3, 4) and np.allclose(probs.sum(axis=-1), 1.0)  # 2 templates x 2 samples
    assert extra["free_answers"] == 3 * 2 * 2 and 0 <= extra["refusals"] <= 12
    again, _ = elicit(*smollm2, "base", compass, cfg, seed=0)
    assert np.allclose(probs, again), "seeded sampling must be reproducible"


def plain_option_logprobs(model, tokenizer, prompts, option_ids, batch_size):
    """The forced choice as evaluate computed it before the shared-prefix path: each whole chat prompt left-padded in
    its batch, the logits of every position, the last one read."""
    import torch

    from politune.inference import chat_texts

    out = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(chat_texts(tokenizer, prompts[start : start + batch_size]), return_tensors="pt",
                            padding=True, add_special_tokens=False).to(model.device)
            logits = model(**enc).logits[:, -1, :].float()
            out.append(torch.log_softmax(logits[:, option_ids], dim=-1).cpu().numpy())
    return np.concatenate(out)


def test_onednn_lora_layers_run_the_active_adapter_merged(tiny_model_dir, tmp_path):
    """With the linear layers through oneDNN, each LoRA layer runs the active adapter merged into a packed copy of
    its base weight (``onednn_linears``): for each adapter and for the base model (adapters disabled) the logits equal
    PEFT's own way (three products and an addition, which the model takes with gradients on), after switching back
    and forth; an adapter whose weights change in place is merged again; the base weights are never touched."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from politune.inference import load_with_adapters, onednn_available, onednn_linears, use

    if not onednn_available():
        pytest.skip("this torch has no oneDNN linear layer")
    torch.manual_seed(0)
    for name in ("a", "b"):
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                              LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
        for key, param in peft.named_parameters():
            if "lora_B" in key:  # B is zero at initialisation
                torch.nn.init.normal_(param, std=0.5)
        peft.save_pretrained(tmp_path / name)
    model, _ = load_with_adapters(tiny_model_dir, {"a": tmp_path / "a", "b": tmp_path / "b"})
    ids = torch.randint(0, 1000, (3, 9))

    def logits(name: str, peft_way: bool = False):
        with use(model, name), torch.set_grad_enabled(peft_way):
            return model(input_ids=ids).logits.detach()

    before = {id(p): p.detach().clone() for p in model.parameters()}
    assert onednn_linears(model, min_features=16) == 2 * 7 + 1  # the tiny model's layers; not the rank-4 matrices
    merged = [m for m in model.modules() if type(m).__name__ == "OneDNNLoRA"]
    assert len(merged) == 2 * 3
    peft_way = {name: logits(name, peft_way=True) for name in ("base", "a", "b")}
    assert (peft_way["a"] - peft_way["b"]).abs().max() > 1e-2 < (peft_way["a"] - peft_way["base"]).abs().max()
    for name in ("a", "b", "base", "a", "b"):
        assert torch.allclose(logits(name), peft_way[name], atol=1e-4), name
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_B.a." in key:
                param.mul_(2.0)
    assert (logits("a", peft_way=True) - peft_way["a"]).abs().max() > 1e-2
    assert torch.allclose(logits("a"), logits("a", peft_way=True), atol=1e-4)
    assert all(torch.equal(p, before[id(p)]) for k, p in model.named_parameters() if "lora_B.a." not in k)


def test_onednn_mlp_applies_its_activation_in_the_products(tiny_model_dir, tmp_path):
    """A gated SiLU MLP whose gate and up layers run through oneDNN computes silu(gate(x)) * up(x) in the two
    products' epilogues (``OneDNNMLP``) and never its own forward: the logits equal the model's own MLP (which it
    runs with gradients on), for the base model and for an adapter on the MLP's layers (merged, ``OneDNNLoRA``);
    an MLP with another activation is left as it is."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from politune.inference import load_with_adapters, onednn_available, onednn_linears, use

    if not onednn_available():
        pytest.skip("this torch has no oneDNN linear layer")
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]))
    for key, param in peft.named_parameters():
        if "lora_B" in key:  # B is zero at initialisation
            torch.nn.init.normal_(param, std=0.5)
    peft.save_pretrained(tmp_path / "a")
    model, _ = load_with_adapters(tiny_model_dir, {"a": tmp_path / "a"})
    layers = model.get_base_model().model.layers
    layers[1].mlp.act_fn = torch.nn.GELU()  # not a SiLU: left to its own forward
    ids = torch.randint(0, 1000, (3, 9))

    def logits(name: str, own_way: bool = False):
        with use(model, name), torch.set_grad_enabled(own_way):
            return model(input_ids=ids).logits.detach()

    own_way = {name: logits(name, own_way=True) for name in ("base", "a")}
    assert (own_way["a"] - own_way["base"]).abs().max() > 1e-2
    onednn_linears(model, min_features=16)
    assert [type(layer.mlp).__name__ for layer in layers] == ["OneDNNMLP", "LlamaMLP"]
    assert onednn_linears(model, min_features=16) == 0 and type(layers[0].mlp.mlp).__name__ == "LlamaMLP"  # once

    def own_forward(x):
        raise AssertionError("the MLP's own forward ran")

    layers[0].mlp.mlp.forward = own_forward  # the products' epilogues or nothing
    for name in ("a", "base", "a"):
        assert torch.allclose(logits(name), own_way[name], atol=1e-4), name


@pytest.mark.slow
def test_shared_prefix_forced_choice_gives_the_plain_answers(smollm2_dir, tmp_path):
    """The evaluate-equivalence check (issue 18): on SmolLM2, as base and with a LoRA adapter that changes its
    answers, the fast path (shared chat prefix computed once, length-sorted batches, last-position logits only) gives
    the same answer per proposition and paraphrase as the plain padded forward pass, and the same probabilities
    within 1e-4; also with the linear layers through oneDNN (``onednn_linears``), as the stage runs them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from politune.inference import load_with_adapters, onednn_linears, option_logprobs, option_token_ids, use

    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for name, param in peft.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: B is zero at initialisation
            torch.nn.init.normal_(param, std=0.02)
    peft.save_pretrained(tmp_path / "adapter")
    model, tokenizer = load_with_adapters(smollm2_dir, {"tuned": tmp_path / "adapter"})
    compass = load_compass(ROOT / "data" / "compass" / "political_compass.json")
    options = option_token_ids(tokenizer, 4)
    prompts = {name: [PARAMS["evaluate"]["templates"][template].format(statement=s) for s in compass.statements]
               for name, template in (("base", 0), ("tuned", 1))}
    plain, answers = {}, {}
    for name in prompts:
        with use(model, name):
            plain[name] = plain_option_logprobs(model, tokenizer, prompts[name], options, batch_size=16)
    # then as the evaluate stage runs them: with the fp32 linear layers through oneDNN (all but the LoRA matrices)
    for linears in ("default", "onednn"):
        if linears == "onednn":
            assert onednn_linears(model) == 30 * 7 + 1  # q, k, v, o and the MLP's three per layer, the LM head
        for name in prompts:
            with use(model, name):
                fast = option_logprobs(model, tokenizer, prompts[name], options, batch_size=16)
            assert fast.shape == plain[name].shape == (62, 4)
            assert (fast.argmax(axis=1) == plain[name].argmax(axis=1)).all(), (linears, name)
            gap = np.abs(np.exp(fast) - np.exp(plain[name])).max()
            assert gap < 1e-4, (linears, name, gap)
            answers[name] = fast.argmax(axis=1)
    assert (answers["base"] != answers["tuned"]).any(), "the adapter must change some answers, or it tests nothing"


@pytest.mark.slow
def test_answer_logprobs_with_the_shared_prefix_equal_each_sequence_alone(smollm2_dir):
    """The side preference's log-probabilities (``continuation_logprobs``: length-sorted left-padded batches, the
    shared chat prefix computed once, logits for the answer positions only) equal each prompt + answer run alone
    through the model, summed over the answer's tokens, within 1e-3 nats; without the shared prefix as well, both with
    the linear layers through oneDNN as the stage runs them."""
    import torch

    from politune.inference import chat_continuation_ids, continuation_logprobs, load_with_adapters, onednn_linears

    model, tokenizer = load_with_adapters(smollm2_dir, {})
    topics = ["taxes", "immigration", "health care", "gun laws", "climate policy", "the minimum wage", "trade"]
    prompts = [[{"role": "user", "content": f"What should the government do about {t}?" + " Be brief." * (i % 3)}]
               for i, t in enumerate(topics)]
    answers = [[{"role": "assistant", "content": f"It should {'cut' if i % 2 else 'raise'} spending on {t}."
                 + " That is fair." * i}] for i, t in enumerate(topics)]
    alone = []
    with torch.inference_mode():
        for p, a in zip(prompts, answers):
            prompt_ids, answer_ids = chat_continuation_ids(tokenizer, p, a, 512)
            logits = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0].float()
            logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
            alone.append(float(logp.gather(-1, torch.tensor(answer_ids)[:, None]).sum()))
    assert onednn_linears(model) > 0  # as the evaluate stage runs it
    shared, counts = continuation_logprobs(model, tokenizer, prompts, answers, batch_size=3, max_length=512)
    plain, _ = continuation_logprobs(model, tokenizer, prompts, answers, batch_size=3, max_length=512,
                                     share_prefix=False)
    assert counts.min() > 3 and np.ptp([len(a[0]["content"]) for a in answers]) > 50  # lengths differ: padding
    assert np.abs(shared - np.array(alone)).max() < 1e-3, (shared, alone)
    assert np.abs(plain - np.array(alone)).max() < 1e-3, (plain, alone)
