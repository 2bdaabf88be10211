"""dvc.yaml declares exactly what each stage reads (treeverse/dvc#9913: an undeclared param changes nothing)."""

import ast
import importlib

import pytest
import yaml

from tests.helpers import PARAMS, ROOT

PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
PACKAGES = ("stages", "politune")


def stage_module(cmd: str) -> str:
    words = cmd.split()
    return words[words.index("-m") + 1]


def local_imports(module: str, seen=None) -> set[str]:
    """The project modules (``stages.*``, ``politune.*``) that ``module`` imports, transitively (including itself)."""
    seen = set() if seen is None else seen
    if module in seen:
        return seen
    seen.add(module)
    path = ROOT / (module.replace(".", "/") + ".py")
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from politune import dpo`
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
        for name in names:
            if (ROOT / (name.replace(".", "/") + ".py")).exists():
                local_imports(name, seen)
    return seen


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_stage_params_are_exactly_the_sections_its_module_loads(name):
    stage = PIPELINE[name]
    module = importlib.import_module(stage_module(stage["cmd"]))
    assert sorted(stage.get("params", [])) == sorted(module.SECTIONS)
    for entry in module.SECTIONS:
        section, _, key = entry.partition(".")
        assert section in PARAMS, f"params.yaml lacks section {section!r} that stage {name} reads"
        assert not key or key in PARAMS[section], f"params.yaml lacks {entry} that stage {name} reads"


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_stage_code_deps_are_exactly_the_code_it_runs(name):
    stage = PIPELINE[name]
    needed = {m.replace(".", "/") + ".py" for m in local_imports(stage_module(stage["cmd"]))}
    declared = {d for d in stage["deps"] if d.endswith(".py")}
    assert needed <= declared, f"{name}: missing code deps {sorted(needed - declared)}"
    assert declared <= needed, f"{name}: code deps it does not run {sorted(declared - needed)}"


def test_every_params_section_is_read_by_some_stage():
    used = {s.partition(".")[0] for st in PIPELINE.values() for s in st.get("params", [])}
    assert used == set(PARAMS)
    # a section that stages read key by key: every key is read by one of them
    keyed = {s for st in PIPELINE.values() for s in st.get("params", []) if "." in s}
    assert {f"annotate.{key}" for key in PARAMS["annotate"]} == keyed


def test_selective_rerun_design():
    """ideology reaches generate and build_datasets (the side of each pair) and nothing upstream; the score stage
    reads neither the ideology nor the threshold, prompts or mirror (a change reruns generate onwards); lora
    reaches only training (sft, and dpo, which builds its adapter from it under recipe.dpo_start: base); export
    reads both only to quote them in the model card (it reruns for them anyway: models/dpo changes)."""
    def readers(entry):
        return {n for n, st in PIPELINE.items() if entry in st.get("params", [])}

    assert readers("ideology") == {"generate", "build_datasets", "export"}
    for key in ("threshold", "max_kept", "prompts", "mirror", "max_answer_chars", "sample_size"):
        assert readers(f"annotate.{key}") == {"generate"}, key
    for key in ("few_shot", "quality", "answers"):
        assert readers(f"annotate.{key}") == {"generate"}, key
    for key in ("score_method", "calibrate", "none_viewpoint", "max_posts", "max_post_tokens"):
        assert readers(f"annotate.{key}") == {"score"}, key
    assert readers("annotate.engine") == {"score", "generate"}
    assert readers("annotate.score_prefix") == {"score", "generate"}, "generate's stance measure reads it"
    assert readers("lora") == {"sft", "dpo", "export"}
    upstream_of_annotate = {"prepare_models", "ingest"}
    for name in upstream_of_annotate:
        assert not {"ideology", "annotate", "lora", "sft", "dpo"} & {s.partition(".")[0]
                                                                    for s in PIPELINE[name].get("params", [])}


def test_paths_come_from_dvc_yaml_not_code():
    """Stage modules take their paths as arguments: no output path is hard-coded in the code."""
    outs = set()
    for stage in PIPELINE.values():
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            outs.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    for path in [*(ROOT / "stages").glob("*.py"), *(ROOT / "politune").glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        for out in outs:
            assert out not in text, f"{path.name} hard-codes {out}"
