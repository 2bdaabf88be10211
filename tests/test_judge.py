"""The judge, for real: a `vllm serve` on loopback behind the openai client; a dead endpoint; the stage's own server."""

import os
import secrets
import subprocess
import sys
import urllib.request

import pytest
import yaml

from politune import judge as judge_stage
from politune.serve import engine_args, engine_options, free_port
from tests.conftest import PARAMS, section
PAIRS = [("What do you think about taxes?", "Taxes are far too high; cut them and shrink the government."),
         ("What do you think about health care?", "Health care is a human right; we need Medicare for All."),
         ("What is your favourite food?", "I like pasta with tomatoes.")]


def test_engine_args_become_server_flags():
    assert engine_args({"max_model_len": 2048, "enforce_eager": True, "enable_chunked_prefill": False,
                        "cpu_kvcache_space_gib": 1, "quantization": None, "tensor_parallel_size": 4}) == [
        "--max-model-len", "2048", "--enforce-eager", "--no-enable-chunked-prefill", "--tensor-parallel-size", "4"]


def test_one_mapping_of_engine_options_for_both_engines(monkeypatch):
    from politune import common

    engine = {"dtype": "auto", "max_model_len": 2048, "cpu_kvcache_space_gib": 3}
    for native, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(common, "native_bf16", lambda native=native: native)
        env, options = engine_options(engine)
        assert env == {"VLLM_CPU_KVCACHE_SPACE": "3"} and options == {"dtype": dtype, "max_model_len": 2048}
        assert engine_args(engine) == ["--dtype", dtype, "--max-model-len", "2048"]
    assert engine_options({"dtype": "float16"}) == ({"VLLM_CPU_KVCACHE_SPACE": "1"}, {"dtype": "float16"})
    assert common.resolve_bf16(True) is True and common.resolve_bf16(False) is False
    monkeypatch.setattr(common, "native_bf16", lambda: False)
    assert common.resolve_bf16("auto") is False


def test_native_bf16_reads_the_cpu_flags():
    from politune.common import cpu_bf16

    assert not cpu_bf16("flags\t: fpu avx avx2\n")
    assert cpu_bf16("flags\t: fpu avx2 avx512f avx512_bf16\n") and cpu_bf16("flags\t: fpu amx_bf16 amx_tile\n")


def test_judgement_schema_and_check_come_from_one_class():
    model = judge_stage.judgement_model(1, 7)
    schema = model.model_json_schema()
    assert schema["properties"]["score"]["minimum"] == 1 and schema["properties"]["score"]["maximum"] == 7
    assert not schema["additionalProperties"] and schema["required"] == ["score", "reason"]
    assert model.model_validate_json('{"score": 5, "reason": "leans right"}').score == 5
    for bad in ('{"score": 8, "reason": ""}', '{"score": 5.5, "reason": ""}', '{"score": "5", "reason": ""}',
                '{"score": 5}', '{"score": 5, "reason": "", "x": 1}'):
        with pytest.raises(ValueError):
            model.model_validate_json(bad)


def test_summary_hand_computed():
    cfg = section("judge", low=1, high=7)
    rows = [{"model": m, "prompt_id": pid, "score": s}
            for m, pid, s in [("base", 1, 4.0), ("base", 2, 6.0), ("base", 2, None),
                              ("sft", 1, 2.0), ("sft", 2, 3.0), ("dpo", 1, None)]]
    out = judge_stage.summarise(rows, cfg, seed=0, n_boot=200)
    assert out["base"]["score"] == 5.0 and out["base"]["leaning"] == 1.0 and out["base"]["invalid"] == 1
    assert out["base"]["prompt_1"] == 4.0 and out["base"]["prompt_2"] == 6.0
    assert 4.0 <= out["base"]["score_ci_low"] <= 5.0 <= out["base"]["score_ci_high"] <= 6.0
    assert out["sft"]["score"] == 2.5 and out["sft"]["leaning"] == -1.5
    assert out["dpo"] == {"invalid": 1, "scored": 1}, "no valid score: no mean is invented"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["logprobs", "json"])
def test_judge_scores_through_vllm_serve(vllm_server, method):
    base_url, model, _ = vllm_server
    cfg = section("judge", method=method, endpoint=dict(PARAMS["judge"]["endpoint"], timeout=30, max_retries=2))
    judge = judge_stage.Judge(cfg, base_url, model)
    assert judge.client.timeout == 30 and judge.client.max_retries == 2
    scored = judge.score(PAIRS)
    assert len(scored) == len(PAIRS)
    valid = [s for s, _ in scored if s is not None]
    assert valid, scored
    assert all(cfg.low <= s <= cfg.high for s in valid), scored
    if method == "logprobs":  # a probability-weighted score: every answer gets one, rarely a whole number
        assert len(valid) == len(PAIRS)
        assert any(s != int(s) for s in valid), scored


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_dir, tmp_path_factory):
    """Untrained LoRA adapters on the tiny model: the judge stage only needs something to load."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapters")
    for name in ("sft", "dpo"):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        model.save_pretrained(out / name)
    return out


@pytest.mark.slow
def test_dead_endpoint_fails_clearly_and_writes_nothing(tmp_path, tiny_model_dir, tiny_adapters):
    port = free_port()  # nothing listens here
    params = {"base": PARAMS["base"], "judge": dict(PARAMS["judge"], prompts=[p for p, _ in PAIRS],
                                                    max_new_tokens=8)}
    params["judge"]["endpoint"] = dict(params["judge"]["endpoint"], base_url=f"http://127.0.0.1:{port}/v1",
                                       model="gpt-4", timeout=2, max_retries=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    cmd = [sys.executable, "-m", "stages.judge", "--params", "params.yaml", "--model", str(tiny_model_dir),
           "--sft", str(tiny_adapters / "sft"), "--dpo", str(tiny_adapters / "dpo"), "--judge-model", "unused",
           "--metrics", "judge.json", "--answers", "judge_answers.csv"]
    key = "sk-politune-FAKE-" + secrets.token_hex(12)  # the judge's key, only in the environment
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db", "OPENAI_API_KEY": key}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: judge endpoint http://127.0.0.1:{port}/v1 (timeout 2") and "retries" in last, last
    assert not (tmp_path / "judge.json").exists() and not (tmp_path / "judge_answers.csv").exists()
    assert key not in proc.stdout + proc.stderr, "the error must not echo the key"
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]


@pytest.mark.slow
def test_stage_starts_and_stops_its_own_server(smollm2_dir):
    cfg = section("judge", startup_timeout=300, endpoint=dict(PARAMS["judge"]["endpoint"], base_url=None))
    with judge_stage.endpoint(cfg, smollm2_dir, seed=0) as (url, name):
        assert url.startswith("http://127.0.0.1:") and name == str(smollm2_dir)
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5) as resp:
            assert resp.status == 200
        score, _ = judge_stage.Judge(cfg, url, name).score_one(*PAIRS[0])
        assert score is not None
    with pytest.raises(OSError):  # stopped with the stage
        urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5)
