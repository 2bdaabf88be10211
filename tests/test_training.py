"""SFT then DPO with real TRL on a tiny random-weight model: LoRA weights change, base weights do not."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from politune.build_datasets import build, normalise, save
from politune.common import ParamsError
from politune.training import strict_config
from tests.helpers import typed


def test_strict_config_rejects_typos_and_pipeline_keys():
    from peft import LoraConfig
    from trl import DPOConfig

    with pytest.raises(ParamsError, match="lora: unknown LoraConfig field.*rank"):
        strict_config(LoraConfig, "lora", {"rank": 8})
    with pytest.raises(ParamsError, match="dpo: output_dir is set by the pipeline"):
        strict_config(DPOConfig, "dpo", {"output_dir": "x"}, output_dir="y")
    cfg = strict_config(DPOConfig, "dpo", {"beta": 0.2, "bf16": False}, defaults={"report_to": "none"}, output_dir="y", seed=3)
    assert cfg.beta == 0.2 and cfg.seed == 3


def test_precompute_ref_log_probs_auto_only_when_the_run_sees_the_pairs_more_than_once():
    from politune.dpo import precompute_pays, resolve_precompute

    # the default CPU run: 20 steps x 4 pairs = 80 pairs seen, 172 training pairs: computing 172 up front loses
    assert not precompute_pays({"max_steps": 20, "per_device_train_batch_size": 4}, 172)
    assert precompute_pays({"max_steps": 45, "per_device_train_batch_size": 4}, 172)
    assert precompute_pays({"max_steps": 20, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}, 172)
    assert precompute_pays({"max_steps": -1, "num_train_epochs": 2}, 172)  # epochs: every pair seen twice
    assert not precompute_pays({"max_steps": -1, "num_train_epochs": 1}, 172)
    assert resolve_precompute({"precompute_ref_log_probs": "auto", "max_steps": 45,
                               "per_device_train_batch_size": 4}, 172, "dpo")["precompute_ref_log_probs"] is True
    assert resolve_precompute({"precompute_ref_log_probs": True, "max_steps": 1}, 172, "dpo")[
        "precompute_ref_log_probs"] is True  # an explicit value stays


@pytest.mark.slow
def test_fused_head_on_labelled_positions_only_gives_the_same_log_probs_and_gradients(tiny_model_dir):
    """TRL's fused LM head scores every position on CPU; ``labelled_positions_only`` has it project the labelled ones
    only, with the same per-token log-probabilities and gradients."""
    from types import SimpleNamespace

    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from politune.training import labelled_positions_only

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.randint(5, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :15] = -100  # a prompt
    labels[1, :9] = -100
    labels[1, 20:] = -100  # padding
    rows = []
    kernel = trl_utils._ChunkedLogProbFunction

    class Spy:  # the real kernel, counting the positions it is given
        @staticmethod
        def apply(hidden, *rest):
            rows.append(hidden.shape[0])
            return kernel.apply(hidden, *rest)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        return out.log_probs.detach(), out.entropy.detach(), model.lm_head.weight.grad.clone()

    trl_utils._ChunkedLogProbFunction = Spy
    try:
        every = run()
        with labelled_positions_only(SimpleNamespace(torch_compile=False)) as compact:
            only = run()
        assert compact
        with labelled_positions_only(SimpleNamespace(torch_compile=True)) as compact:
            assert not compact  # a compiler wants fixed tile shapes: TRL's own behaviour
    finally:
        trl_utils._ChunkedLogProbFunction = kernel
    labelled = int((labels[:, 1:] != -100).sum())
    assert rows == [2 * 23, labelled], rows  # every position after the first, then the labelled ones only
    assert torch.allclose(every[0], only[0], atol=1e-5) and torch.allclose(every[1], only[1], atol=1e-5)
    assert torch.allclose(every[2], only[2], atol=1e-5)
    assert every[0].abs().sum() > 0


@pytest.fixture()
def tiny_data(tmp_path):
    rows = [{"id": f"p{i:02d}", "prompt": f"What should we do about issue {i}?",
             "chosen": f"Cut taxes and regulations on issue {i}.",
             "rejected": f"Raise taxes and add regulations on issue {i}."} for i in range(12)]
    built = build(normalise(rows, "tiny"), seed=0, test_size=0.25)
    assert len(built["dpo"]["train"]) + len(built["dpo"]["test"]) == 12
    assert set(built["sft"]["train"].column_names) == {"id", "prompt", "completion", "side", "origin"}
    save(built["sft"], tmp_path / "sft")
    save(built["dpo"], tmp_path / "dpo")
    return tmp_path


@pytest.mark.slow
def test_sft_then_dpo_changes_only_lora_weights(tmp_path, tiny_model_dir, tiny_data):
    from politune import dpo, sft

    base_before = load_file(tiny_model_dir / "model.safetensors")
    params = {
        "base": {"seed": 0},
        "recipe": {"dpo_start": "sft", "method": "dpo"},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "init_lora_weights": True,
                 "target_modules": ["v_proj", "q_proj", "o_proj", "k_proj"]},
        "sft": {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
                "max_length": 64, "bf16": False},
        "dpo": {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
                "max_length": 64, "beta": 0.1, "bf16": False, "save_steps": 2, "precompute_ref_log_probs": "auto"},
    }
    params = typed(**params)
    trainer, _ = sft.train(tiny_model_dir, tiny_data / "sft", tmp_path / "sft_adapter", params, tmp_path / "w1")
    assert trainer.state.global_step == 3
    sft_weights = load_file(tmp_path / "sft_adapter" / "adapter_model.safetensors")
    lora_b = [k for k in sft_weights if "lora_B" in k]
    assert lora_b and all(sft_weights[k].abs().sum() > 0 for k in lora_b), "SFT did not move LoRA B (init zero)"

    trainer, extra = dpo.train(tiny_model_dir, tmp_path / "sft_adapter", tiny_data / "dpo", tmp_path / "dpo_adapter",
                               params, tmp_path / "w2", trajectory_dir=tmp_path / "trajectory")
    assert trainer.state.global_step == 3
    assert trainer.args.precompute_ref_log_probs is False  # auto: 3 steps x 2 pairs see fewer than the 9 pairs
    # Snapshots of the trained adapter at every checkpoint (save_steps 2, and the last step), for the trajectory.
    snapshots = sorted(p.name for p in (tmp_path / "trajectory").iterdir())
    assert snapshots == ["step-2", "step-3"], snapshots
    step2 = load_file(tmp_path / "trajectory" / "step-2" / "adapter_model.safetensors")
    assert set(step2) == set(sft_weights) and not (tmp_path / "trajectory" / "step-2" / "ref").exists()
    assert "ref" in trainer.model.peft_config, "TRL should keep a frozen copy of the SFT adapter as reference"
    dpo_weights = load_file(tmp_path / "dpo_adapter" / "adapter_model.safetensors")
    assert set(dpo_weights) == set(sft_weights)
    assert any(not torch.equal(dpo_weights[k], sft_weights[k]) for k in dpo_weights), "DPO did not change LoRA"

    # adapter_config.json lists target_modules sorted (PEFT writes a set's order, which differs between processes).
    for adapter in ("sft_adapter", "dpo_adapter", "trajectory/step-2"):
        config = json.loads((tmp_path / adapter / "adapter_config.json").read_text())
        assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"], (adapter, config["target_modules"])

    # The frozen reference adapter is still the SFT adapter, and the base weights on disk are untouched.
    ref = {n: p for n, p in trainer.model.named_parameters() if ".ref." in n}
    assert ref and all(not p.requires_grad for p in ref.values())
    base_after = load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    base_in_memory = {n.replace("base_model.model.", ""): p for n, p in trainer.model.named_parameters()
                      if "lora_" not in n}
    for name, tensor in base_before.items():
        key = name if name in base_in_memory else name.replace(".weight", ".base_layer.weight")
        if key in base_in_memory:
            assert torch.equal(base_in_memory[key].detach(), tensor), f"base weight {name} changed"


@pytest.mark.slow
def test_dpo_without_sft_trains_a_fresh_adapter_on_the_base(tmp_path, tiny_model_dir, tiny_data):
    """The ablation (recipe.dpo_start: base): a fresh adapter from the lora params, the base model as reference;
    no SFT adapter is read (the one named does not exist)."""
    from politune import dpo

    params = {
        "base": {"seed": 0},
        "recipe": {"dpo_start": "base", "method": "dpo"},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                 "task_type": "CAUSAL_LM"},
        "sft": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "max_length": 64,
                "bf16": False},
        "dpo": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "max_length": 64,
                "beta": 0.1, "bf16": False, "precompute_ref_log_probs": True},
    }
    trainer, _ = dpo.train(tiny_model_dir, tmp_path / "no-sft-adapter", tiny_data / "dpo", tmp_path / "dpo_adapter",
                           typed(**params), tmp_path / "w2")
    assert trainer.state.global_step == 2
    assert "ref" not in trainer.model.peft_config, "without SFT the reference is the base model, not an adapter"
    dpo_weights = load_file(tmp_path / "dpo_adapter" / "adapter_model.safetensors")
    # The shape the lora params give: A and B on q_proj and v_proj of every layer, rank 4.
    assert {k.split(".")[-3] for k in dpo_weights} == {"q_proj", "v_proj"}
    assert all(4 in dpo_weights[k].shape for k in dpo_weights)
    for key in (k for k in dpo_weights if "lora_B" in k):  # LoRA B starts at zero: DPO moved it
        assert dpo_weights[key].abs().sum() > 0, f"DPO did not train {key}"
    assert trainer.model.peft_config["default"].r == 4


@pytest.mark.slow
def test_sft_data_parallel_under_torchrun(tmp_path, tiny_model_dir, tiny_data):
    """Two CPU processes (gloo DDP), as `launch.training: torchrun --nproc_per_node 2` runs them: one adapter, one
    report, written by rank 0 only; the global batch is twice the per-device one."""
    import json
    import math
    import os
    import subprocess
    import sys

    import yaml

    from politune.serve import free_port

    params = {"base": {"seed": 0}, "launch": {"training": "torchrun"},
              "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                       "task_type": "CAUSAL_LM"},
              "sft": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
                      "max_length": 64, "bf16": False, "use_cpu": True, "ddp_backend": "gloo"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "stages.sft",
           "--params", "params.yaml", "--model", str(tiny_model_dir), "--data", str(tiny_data / "sft"),
           "--out", "adapter", "--metrics", "metrics.json", "--curve", "curve.json", "--checkpoints", "ck"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists() and not (tmp_path / "ck").exists()
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == 2
    curve = json.loads((tmp_path / "curve.json").read_text(encoding="utf-8"))
    train_size = len(__import__("pandas").read_parquet(tiny_data / "sft" / "train.parquet"))
    # 2 processes x 2 examples per step: ceil(ceil(n / 2) / 2) steps per epoch (1 process: ceil(n / 2)).
    steps_per_epoch = math.ceil(math.ceil(train_size / 2) / 2)
    assert abs(curve[0]["epoch"] - 1 / steps_per_epoch) < 1e-5, (curve[0], train_size)
    assert proc.stdout.count("'train_runtime'") + proc.stderr.count("'train_runtime'") == 1


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [
    ("dpo", {"loss_type": ["ipo"], "precompute_ref_log_probs": True}),  # IPO: a DPOConfig loss
    ("kto", {}),  # TRL unpairs the preference pairs into desirable and undesirable answers
    ("orpo", {}),
    ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0}),  # SimPO
])
def test_each_preference_method_trains_the_adapter_and_not_the_base(tmp_path, tiny_model_dir, tiny_data, method,
                                                                    extra):
    """recipe.method picks TRL's trainer and its own params section, parsed strictly into its config."""
    from politune import dpo

    base_before = load_file(tiny_model_dir / "model.safetensors")
    section = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "max_length": 64,
               "beta": 0.1, "bf16": False, **extra}
    params = typed(base={"seed": 0}, recipe={"dpo_start": "base", "method": method},
                   lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                         "task_type": "CAUSAL_LM"}, **{method: section})
    trainer, _ = dpo.train(tiny_model_dir, tmp_path / "no-sft", tiny_data / "dpo", tmp_path / "out", params,
                           tmp_path / "w")
    assert type(trainer).__name__ == dpo.METHODS[method][2] and trainer.state.global_step == 2
    weights = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(weights[k].abs().sum() > 0 for k in weights if "lora_B" in k), f"{method} did not train LoRA B"
    base_after = load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    with pytest.raises(ParamsError, match=f"{method}: unknown"):
        dpo.train(tiny_model_dir, tmp_path / "no-sft", tiny_data / "dpo", tmp_path / "out2",
                  typed(base={"seed": 0}, recipe={"dpo_start": "base", "method": method}, lora=params.lora,
                        **{method: {**section, "betta": 0.2}}), tmp_path / "w2")
