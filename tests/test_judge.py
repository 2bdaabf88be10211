"""The judge, for real: a `vllm serve` on loopback behind the openai client, the stage's own server (a dead endpoint:
tests/test_failures.py)."""

import urllib.request

import pytest

from politune import judge as judge_stage
from politune.serve import engine_args, engine_options
from tests.helpers import PARAMS, section
PAIRS = [("What do you think about taxes?", "Taxes are far too high; cut them and shrink the government."),
         ("What do you think about health care?", "Health care is a human right; we need Medicare for All."),
         ("What is your favourite food?", "I like pasta with tomatoes.")]


def test_engine_args_become_server_flags():
    assert engine_args({"max_model_len": 2048, "enforce_eager": True, "enable_chunked_prefill": False,
                        "cpu_kvcache_space_gib": 1, "quantization": None, "tensor_parallel_size": 4}) == [
        "--max-model-len", "2048", "--enforce-eager", "--no-enable-chunked-prefill", "--tensor-parallel-size", "4"]
    assert engine_args({"lora_modules": ["sft=models/sft", "dpo=models/dpo"], "max_lora_rank": 16}) == [
        "--lora-modules", "sft=models/sft", "dpo=models/dpo", "--max-lora-rank", "16"]
    assert engine_args({"structured_outputs_config": {"backend": "guidance"}}) == [
        "--structured-outputs-config", '{"backend": "guidance"}']


def test_one_mapping_of_engine_options_for_both_engines(monkeypatch):
    from politune import common

    engine = {"dtype": "auto", "max_model_len": 2048, "cpu_kvcache_space_gib": 3}
    for native, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(common, "native_bf16", lambda native=native: native)
        env, options = engine_options(engine)
        assert env == {"VLLM_CPU_KVCACHE_SPACE": "3"} and options == {"dtype": dtype, "max_model_len": 2048}
        assert engine_args(engine) == ["--dtype", dtype, "--max-model-len", "2048"]
    assert engine_options({"dtype": "float16"}) == ({"VLLM_CPU_KVCACHE_SPACE": "1"}, {"dtype": "float16"})
    env, options = engine_options({"multiprocessing": False, "seed": 0})
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and options == {"seed": 0}
    assert engine_options({"multiprocessing": True})[0]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    env, options = engine_options({"omp_num_threads": 2, "cpu_omp_threads_bind": "0-1", "cpu_reserved_cpus": 0,
                                   "max_num_seqs": 64})
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                   "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"} and options == {"max_num_seqs": 64}
    assert engine_options({"omp_num_threads": None})[0] == {"VLLM_CPU_KVCACHE_SPACE": "1"}  # null: vLLM's own
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


def test_report_names_the_judge_and_warns_when_it_is_the_annotator():
    local = judge_stage.judge_identity(section("judge"), "models/annotator")
    assert local["model"] == "models/annotator" and "the judge is the annotator" in local["warning"]
    endpoint = dict(PARAMS["judge"]["endpoint"], base_url="https://api.openai.com/v1", model="gpt-4")
    remote = judge_stage.judge_identity(section("judge", endpoint=endpoint), "models/annotator")
    assert remote == {"model": "gpt-4", "endpoint": "https://api.openai.com/v1"}


def test_krippendorff_alpha_reproduces_the_published_example():
    """Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 observers, 12 units, missing values;
    alpha with the interval metric is 0.849."""
    n = None
    observers = [[1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
                 [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]]
    units = [[v for v in unit if v is not None] for unit in zip(*observers)]
    assert round(judge_stage.krippendorff_alpha_interval(units), 3) == 0.849
    assert judge_stage.krippendorff_alpha_interval([[1, 1], [5, 5], [3, 3]]) == 1.0
    assert judge_stage.krippendorff_alpha_interval([[1], [2]]) is None  # nothing pairable


def test_panel_summary_hand_computed(tmp_path):
    panel = [{"name": "second", "base_url": "http://127.0.0.1:1/v1", "model": "m2"}]
    cfg = section("judge", panel=panel)
    first = {"base": [4.0, 6.0, 5.0], "sft": [2.0, 3.0, 4.0], "dpo": [6.0, 7.0, None]}
    second = {"base": [5.0, 6.0, 4.0], "sft": [1.0, 3.0, 2.0], "dpo": [7.0, 6.0, 5.0]}
    rows = [{"model": m, "prompt_id": i + 1, "sample": 0, "prompt": "q", "answer": "a", "judge_reply": "",
             "score": first[m][i], "score_second": second[m][i]} for m in first for i in range(3)]
    out = judge_stage.panel_summary(rows, cfg, seed=0)
    assert out["judges"] == {"second": "m2"}
    assert out["second"]["base"]["score"] == 5.0 and out["second"]["sft"]["score"] == 2.0
    # the panel's score of an answer is the mean of the judges that scored it (dpo's third answer: the second only)
    assert [r["score_panel"] for r in rows if r["model"] == "dpo"] == [6.5, 6.5, 5.0]
    assert out["mean"]["dpo"]["score"] == pytest.approx(6.0) and out["mean"]["base"]["score"] == 5.0
    both = [(f, s) for m in first for f, s in zip(first[m], second[m]) if f is not None]
    from scipy.stats import spearmanr
    assert out["agreement"]["spearman"] == {"judge_vs_second": round(float(spearmanr(*zip(*both)).statistic), 4)}
    # by hand: 8 pairable answers (dpo's third has one score), D_o = 18/16, D_e = 1662/(16 * 15), 1 - D_o/D_e
    assert out["agreement"]["krippendorff_alpha_interval"] == 0.8375 and out["agreement"]["answers"] == 9
    judge_stage.write_table(tmp_path / "answers.csv", rows, ["second"])
    header = (tmp_path / "answers.csv").read_text().splitlines()[0]
    assert header == "model,prompt_id,sample,score,score_second,score_panel,prompt,answer,judge_reply"
    with pytest.raises(ValueError, match="panel names must be unique"):
        section("judge", panel=panel * 2)
    with pytest.raises(ValueError, match="panel names must be unique and not 'judge'"):
        section("judge", panel=[dict(panel[0], name="judge")])


@pytest.mark.slow
def test_panel_judges_score_every_answer_through_their_endpoints(vllm_server):
    """A panel of two judges behind endpoints (here the session's server under both names): every answer gets a
    score from each, and two copies of one judge agree (alpha 1 up to the server's batching noise)."""
    base_url, model = vllm_server
    cfg = section("judge", panel=[{"name": "again", "base_url": base_url, "model": model,
                                   "api_key_env": "POLITUNE_NO_KEY"}])
    rows = [{"model": m, "prompt_id": i + 1, "sample": 0, "prompt": p, "answer": a}
            for m in ("base", "sft", "dpo") for i, (p, a) in enumerate(PAIRS)]
    summary = judge_stage.score_rows(rows, cfg, base_url, model, seed=0)
    assert all(r["score"] is not None and r["score_again"] == pytest.approx(r["score"], abs=0.05) for r in rows), rows
    panel = summary["panel"]
    assert panel["judges"] == {"again": model} and panel["again"]["base"]["scored"] == len(PAIRS)
    assert panel["agreement"]["krippendorff_alpha_interval"] == pytest.approx(1.0, abs=0.01)
    assert set(panel["agreement"]["spearman"]) == {"judge_vs_again"}
    assert summary["base"]["score"] == pytest.approx(panel["mean"]["base"]["score"], abs=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["logprobs", "json"])
def test_judge_scores_through_vllm_serve(vllm_server, method):
    base_url, model = vllm_server
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


@pytest.mark.slow
def test_stage_starts_its_own_server(vllm_server, smollm2_dir):
    """The session's server is the one ``judge.endpoint`` starts when no base_url is set (tests/conftest.py); that
    it stops with the stage is checked when the session closes its context."""
    url, name = vllm_server
    assert url.startswith("http://127.0.0.1:") and name == str(smollm2_dir)
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5) as resp:
        assert resp.status == 200
    cfg = section("judge", endpoint=dict(PARAMS["judge"]["endpoint"], base_url=None))
    score, _ = judge_stage.Judge(cfg, url, name).score_one(*PAIRS[0])
    assert cfg.low <= score <= cfg.high, score  # an expected score on the rubric's scale
