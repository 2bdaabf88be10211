"""Paper-scale profiles: they parse, and every value maps onto the engine and trainer configs that would use it.

The GPUs and the 70B model are not here; what can be checked is that nothing in the profile would fail at start:
the params schema, LoraConfig/SFTConfig/DPOConfig built strictly, vllm.LLM engine arguments, `vllm serve` flags
parsed by vLLM's own parser, and the accelerate config file named by the launcher.
"""

import dataclasses
import shlex
import shutil

import pytest
import yaml

from politune.common import ParamsError
from politune.profile import apply
from politune.serve import engine_args, engine_options, server_command
from politune.training import strict_config
from tests.helpers import ROOT

PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))


@pytest.fixture(params=[p.name for p in PROFILES])
def profile_params(request, tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return request.param, apply(ROOT / "profiles" / request.param, tmp_path / "params.yaml"), tmp_path


def test_there_are_paper_profiles():
    assert {"paper-llama3-8b.yaml", "paper-mistral-7b.yaml"} <= {p.name for p in PROFILES}


def test_profile_maps_onto_trainer_configs(profile_params):
    from peft import LoraConfig
    from trl import DPOConfig, SFTConfig

    name, params, tmp_path = profile_params
    assert params["models"]["annotator"] == "meta-llama/Meta-Llama-3-70B-Instruct"
    assert params["models"]["target"] in ("meta-llama/Meta-Llama-3-8B-Instruct", "mistralai/Mistral-7B-Instruct-v0.2")
    lora = strict_config(LoraConfig, "lora", params["lora"])
    assert lora.r == 16 and "down_proj" in lora.target_modules
    # bf16 needs a GPU to build a TrainingArguments; the field itself is checked, then built without it here.
    for cls, section in ((SFTConfig, "sft"), (DPOConfig, "dpo")):
        assert params[section]["bf16"] is True and params[section]["use_cpu"] is False
        config = strict_config(cls, section, dict(params[section], bf16=False), output_dir=str(tmp_path), seed=0)
        assert config.gradient_checkpointing and config.per_device_train_batch_size >= 1
    assert strict_config(DPOConfig, "dpo", dict(params["dpo"], bf16=False), output_dir="x").beta == 0.1
    from politune.dpo import METHODS, method_classes

    for method in METHODS:  # every preference method's section is a valid config of its trainer, on the GPU
        assert params[method]["use_cpu"] is False and params[method]["bf16"] is True
        config = strict_config(method_classes(method)[0], method, dict(params[method], bf16=False), output_dir="x")
        assert config.gradient_checkpointing
    # The comments of params.yaml survive the merge.
    assert "# politune params." in (tmp_path / "params.yaml").read_text(encoding="utf-8")


def test_profile_maps_onto_vllm(profile_params):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    _, params, _ = profile_params
    env, engine = engine_options(params["annotate"]["engine"])
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"  # at paper scale, vLLM's own default
    assert set(engine) <= {f.name for f in dataclasses.fields(EngineArgs)}
    assert engine["tensor_parallel_size"] == 4 and engine["distributed_executor_backend"] in ("mp", "ray")
    parser = make_arg_parser(FlexibleArgumentParser())
    # vLLM's own parser checks names, types and choices of the engine options (LLM(**engine) takes the same ones).
    annotate = parser.parse_args(["--model", params["models"]["annotator"], *engine_args(engine)])
    assert (annotate.tensor_parallel_size, annotate.max_model_len) == (4, 8192)
    flags = server_command(params["models"]["annotator"], 8000, params["judge"]["serve"], 0)[3:]
    args = parser.parse_args(flags)
    assert args.tensor_parallel_size == params["judge"]["serve"]["tensor_parallel_size"]
    assert params["judge"]["endpoint"]["model"] == "gpt-4" and "api_key" not in params["judge"]["endpoint"]


def test_profile_launcher_names_a_valid_accelerate_config(profile_params):
    from accelerate.commands.config.config_args import load_config_from_file

    _, params, _ = profile_params
    words = shlex.split(params["launch"]["training"])
    assert words[:2] == ["accelerate", "launch"]
    config = load_config_from_file(str(ROOT / words[words.index("--config_file") + 1]))
    assert config.distributed_type.value == "MULTI_GPU" and config.num_processes == 8


def test_every_shipped_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    names = {p.name: load_config_from_file(str(p)) for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert {"cpu.yaml", "multi_gpu.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"} <= set(names)


def test_a_typo_in_a_profile_fails_before_writing(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_bytes()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"annotate": {"treshold": 0.5}}), encoding="utf-8")
    with pytest.raises(ParamsError, match="annotate.treshold: not a key"):
        apply(tmp_path / "bad.yaml", tmp_path / "params.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"lora": {"r": -4}}), encoding="utf-8")
    with pytest.raises(ParamsError, match="lora.r"):
        apply(tmp_path / "bad.yaml", tmp_path / "params.yaml")
    assert (tmp_path / "params.yaml").read_bytes() == before
