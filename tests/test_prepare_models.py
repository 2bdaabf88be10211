"""prepare_models: a target without a chat template (a pretrained model) gets one from params, or stops the stage."""

import shutil

import pytest

from politune.common import ParamsError
from politune.prepare_models import materialise, read_chat_template
from tests.helpers import ROOT

GEMMA = ROOT / "configs" / "chat_templates" / "gemma.jinja"


@pytest.fixture
def pretrained_dir(tiny_model_dir, tmp_path):
    """The tiny model with its tokenizer's chat template removed, as a pretrained checkpoint ships."""
    from transformers import AutoTokenizer

    out = tmp_path / "pretrained"
    shutil.copytree(tiny_model_dir, out)
    for name in ("chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(out)
    assert not AutoTokenizer.from_pretrained(out).chat_template
    return out


def test_a_target_without_chat_template_stops_the_stage_with_the_fix(pretrained_dir, tmp_path):
    with pytest.raises(ParamsError, match="models.target .*no chat template.*models.target_chat_template"):
        materialise(str(pretrained_dir), tmp_path / "out", role="target")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ParamsError, match="models.annotator .*instruction-tuned"):
        materialise(str(pretrained_dir), tmp_path / "out", role="annotator")


def test_the_params_template_is_saved_with_the_target(pretrained_dir, tmp_path):
    from transformers import AutoTokenizer

    materialise(str(pretrained_dir), tmp_path / "out", read_chat_template(GEMMA), role="target")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Taxes?"},
                                          {"role": "assistant", "content": "Lower them."}], tokenize=False)
    # <bos> written by the template (politune tokenises chat text without special tokens); the system message opens
    # the first user turn (Gemma has no system role); the assistant is "model".
    assert text == (f"{tokenizer.bos_token}<start_of_turn>user\nBe brief.\n\nTaxes?<end_of_turn>\n"
                    "<start_of_turn>model\nLower them.<end_of_turn>\n")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Taxes?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<start_of_turn>user\nTaxes?<end_of_turn>\n<start_of_turn>model\n")


def test_an_unreadable_template_names_the_file(tmp_path):
    with pytest.raises(ParamsError, match="models.target_chat_template: cannot read .*missing.jinja"):
        read_chat_template(tmp_path / "missing.jinja")
    (tmp_path / "plain.txt").write_text("Hello {{ name }}", encoding="utf-8")
    with pytest.raises(ParamsError, match="not a chat template"):
        read_chat_template(tmp_path / "plain.txt")


def test_materialising_a_model_twice_writes_the_same_bytes(tiny_model_dir, tmp_path):
    """Why the stage copies the annotator's directory when the target is the same model: materialising it again
    would write exactly these bytes."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert materialise(str(tiny_model_dir), first) == materialise(str(tiny_model_dir), second, role="target")
    names = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert names and names == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
