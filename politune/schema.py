"""Typed schema of params.yaml, checked before a stage does any work.

Each section a stage loads is validated here; a bad value gives one message naming the key (``annotate.threshold:
...``). The TRL/PEFT-facing sections (``lora``, ``sft``, ``dpo``) are checked a second time, field by field, when
they are parsed into ``LoraConfig``/``SFTConfig``/``DPOConfig`` (``politune/training.py``).
"""

from __future__ import annotations

from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Base(_Strict):
    seed: int = Field(ge=0)


class Models(_Strict):
    annotator: str = Field(min_length=1)
    target: str = Field(min_length=1)
    target_chat_template: str | None = None  # a Jinja file for a target without a chat template (a pretrained model)


FIELDS = ("text", "id", "created", "author", "subreddit", "language", "drop_if_true")
# Where the paper's corpora keep their fields. truth_social: the Truth Social dataset's truths.tsv (Gerard et al. 2023:
# id, timestamp, is_retruth, is_reply, author, text, ...); a retruth repeats another user's post and is dropped.
# politosphere: the Reddit Politosphere's comments_YYYY-MM.bz2 (Hofmann et al. 2022: Pushshift comments with body,
# subreddit, created_utc, author, language).
PRESETS: dict[str, dict[str, list[str]]] = {
    "truth_social": {"text": ["text"], "id": ["id"], "created": ["timestamp"], "author": ["author"],
                     "drop_if_true": ["is_retruth"]},
    "politosphere": {"text": ["body"], "id": ["id"], "created": ["created_utc"], "author": ["author"],
                     "subreddit": ["subreddit"], "language": ["language"]},
}


class Source(_Strict):
    """The files under ``data/raw`` that match ``match`` (a glob on their path there; the first entry that matches
    wins): where their fields are (a ``preset``, then any field list given here: the first field a row has wins),
    and an optional seeded random ``sample`` of that many posts from them."""

    match: str = Field(min_length=1)
    preset: Literal["truth_social", "politosphere"] | None = None
    text: list[str] | None = None
    id: list[str] | None = None
    created: list[str] | None = None
    author: list[str] | None = None
    subreddit: list[str] | None = None
    language: list[str] | None = None
    drop_if_true: list[str] | None = None  # rows where one of these fields is true are dropped (is_retruth)
    sample: int | None = Field(default=None, ge=1)


class Filters(_Strict):
    """Which posts a study keeps (``ingest.filters``); every list empty and every bound null keeps all of them."""

    subreddits: list[str]  # keep only these (case-insensitive); empty: every subreddit
    exclude_subreddits: list[str]
    languages: list[str]  # keep a post whose language is one of these (a post with none is kept)
    date_from: date | None  # inclusive, on the post's time in UTC
    date_to: date | None  # inclusive
    exclude_authors: list[str]
    min_chars: int = Field(ge=0)  # after cleaning

    @model_validator(mode="after")
    def _dates(self) -> Filters:
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError(f"date_from {self.date_from} is after date_to {self.date_to}")
        return self


class Ingest(_Strict):
    text_fields: list[str] = Field(min_length=1)
    placeholders: list[str]
    on_bad_row: Literal["skip", "fail"]
    max_chars: int = Field(ge=1)
    sources: list[Source]
    filters: Filters
    sample_seed: int = Field(ge=0)
    chunk_rows: int = Field(ge=1)  # posts held in memory before they are written


class Client(_Strict):
    """An OpenAI-compatible endpoint's client settings (``politune.endpoint``)."""

    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = Field(gt=0)
    max_retries: int = Field(ge=0)
    concurrency: int = Field(ge=1)


class OpenAI(Client):
    base_url: str
    batch_size: int = Field(ge=1)


class Transformers(_Strict):
    batch_size: int = Field(ge=1)
    dtype: Literal["float32", "bfloat16", "float16"]


class Prompts(_Strict):
    opposite: str
    system: str  # {viewpoint}, {opposite}: the system prompt of every chat in this side's voice
    generate: str  # answers joint: the whole triplet from the post ({post}, {viewpoint}, {opposite})
    instruction: str  # answers separate: the instruction from the post ({post})
    answer: str  # answers separate: one answer in this side's voice ({instruction}, {viewpoint})


class Annotator(_Strict):
    """The annotator's engine, shared by the ``score`` and ``generate`` stages (``annotate.backend`` etc.)."""

    backend: Literal["vllm", "serve", "openai", "transformers"]
    engine: dict[str, Any]  # passed to vllm.LLM as it is (backend serve: to `vllm serve` as flags)
    openai: OpenAI
    transformers: Transformers
    viewpoints: dict[str, str] = Field(min_length=1)
    max_new_tokens: int = Field(ge=1)  # a JSON reply's token budget (ratings and triplets)
    max_retries: int = Field(ge=0)
    retry_temperature: float = Field(ge=0.0)
    shard_size: int = Field(ge=1)  # posts per shard: each finished shard is kept until the stage ends (resume)
    # The likelihood classifier's prefix ({viewpoint}): score reads posts after it, generate reads answers (stance)
    score_prefix: str


class Score(Annotator):
    """The ``annotate`` keys the ``score`` stage reads (dvc.yaml lists them one by one): every post's score for
    every viewpoint, which depends on neither the ideology nor the threshold."""

    score_method: Literal["likelihood", "json"]
    score_system: str  # json ratings: the system prompt ({viewpoint})
    score_prompt: str  # json ratings: the user prompt ({post}, {viewpoint}, {low}, {high})
    none_viewpoint: str
    calibrate: bool
    max_posts: int | None = Field(default=None, ge=1)
    max_post_tokens: int = Field(ge=1)


class FewShot(_Strict):
    path: str | None = None  # example triplets (JSONL: id, side, post, instruction, chosen, rejected); null: none
    shots: int = Field(ge=0)  # examples per chat, the first of the ideology's side in the file; 0: zero-shot


class TripletQuality(_Strict):
    ngram: int = Field(ge=1)  # word n-grams for the copy and duplicate measures
    # A field sharing this share of its n-grams with the post, a viewpoint description, the prompt's instructions or
    # a few-shot example is a copy; with reject_copies the triplet is then invalid (retried, then dropped).
    copy_threshold: float = Field(gt=0.0, le=1.0)
    reject_copies: bool
    duplicate_threshold: float = Field(gt=0.0, le=1.0)  # n-gram Jaccard at which two answers are near-duplicates
    stance: bool  # score each valid triplet's two answers with the likelihood classifier (stance accuracy)
    stance_filter: bool  # drop a triplet whose chosen answer the classifier reads as less the side's (needs stance)
    bootstrap: int = Field(ge=1)

    @model_validator(mode="after")
    def _filter_needs_stance(self):
        if self.stance_filter and not self.stance:
            raise ValueError("stance_filter needs stance: true (the filter reads the stance measure)")
        return self


class Example(_Strict):
    """One few-shot example triplet (a row of ``annotate.few_shot.path``)."""

    id: str = Field(min_length=1)
    side: str = Field(min_length=1)
    post: str = Field(min_length=1)
    instruction: str = Field(min_length=1)
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)
    source: str | None = None


class Triplets(Annotator):
    """The ``annotate`` keys the ``generate`` stage reads: which posts are kept and the triplets written for them."""

    threshold: float = Field(ge=0.0, le=1.0)
    max_kept: int | None = Field(default=None, ge=1)
    prompts: dict[str, Prompts]
    max_answer_chars: int = Field(ge=8)
    sample_size: int = Field(ge=0)
    mirror: bool  # also annotate the opposite viewpoint (for datasets.mirror.source: annotated)
    answers: Literal["joint", "separate"]  # one reply writes the triplet, or one reply per field and voice
    few_shot: FewShot
    quality: TripletQuality

    @model_validator(mode="after")
    def _prompts_per_viewpoint(self):
        for name, prompts in self.prompts.items():
            if name not in self.viewpoints:
                raise ValueError(f"prompts.{name}: no viewpoint {name!r} in annotate.viewpoints")
            if prompts.opposite not in self.viewpoints:
                raise ValueError(f"prompts.{name}.opposite: {prompts.opposite!r} is not a viewpoint")
            if self.answers == "separate" and prompts.opposite not in self.prompts:
                raise ValueError(f"prompts.{name}.opposite: answers separate writes the rejected answer with the "
                                 f"opposite's prompts, and prompts has no {prompts.opposite!r}")
        return self


class Annotate(Score, Triplets):
    """The whole ``annotate`` section (params.yaml's check, and a library caller that scores and generates)."""


# Sections that stages load key by key (dvc.yaml's `annotate.threshold` entries): the model of each stage's keys.
SECTION_PARTS: dict[str, tuple[type[BaseModel], ...]] = {"annotate": (Score, Triplets)}


Side = Literal["right", "left"]


class MixItem(_Strict):
    source: str
    fraction: float = Field(gt=0.0)
    side: Side | None = None  # the side its chosen answers voice; null: ideology for annotated, else unknown


class Mirror(_Strict):
    source: str | None = None  # null: off; annotated (the opposite's annotated pairs) or a preference file
    side: Side | None = None  # the side the source's chosen answers voice; null: the opposite for annotated
    fraction: float = Field(ge=0.0)  # mirrored pairs per plain pair (capped at what the source holds)


class Stance(_Strict):
    fraction: float = Field(ge=0.0, le=1.0)  # 0: off
    template: str
    agree: str = Field(min_length=1)
    disagree: str = Field(min_length=1)
    max_chars: int = Field(ge=8)

    @model_validator(mode="after")
    def _template_holds_the_statement(self):
        _require([self.template], "{statement}")
        return self


class Datasets(_Strict):
    source: str
    source_side: Side | None = None  # the side the source's chosen answers voice; null: ideology for annotated
    mirror: Mirror
    mix: list[MixItem] = []
    mix_size: int | None = Field(default=None, ge=1)
    test_size: float = Field(gt=0.0, lt=1.0)
    min_pairs: int = Field(ge=1)
    stance: Stance


class Launch(_Strict):
    training: str = Field(min_length=1)


class Recipe(_Strict):
    dpo_start: Literal["sft", "base"]  # sft: DPO continues the SFT adapter; base: a fresh adapter (the ablation)
    method: Literal["dpo", "kto", "orpo", "cpo"]  # the TRL trainer; its settings: the params section of that name


class Lora(BaseModel):
    model_config = ConfigDict(extra="allow")  # every other LoraConfig field is checked by LoraConfig itself
    r: int = Field(gt=0)
    lora_alpha: float = Field(gt=0)
    lora_dropout: float = Field(ge=0.0, lt=1.0)


class Generate(_Strict):
    templates: list[str] = Field(min_length=1)
    samples: int = Field(ge=1)
    temperature: float = Field(ge=0.0)
    max_new_tokens: int = Field(ge=1)
    classify: str

    @model_validator(mode="after")
    def _placeholders(self):
        _require(self.templates, "{statement}")
        if "{statement}" not in self.classify or "{answer}" not in self.classify:
            raise ValueError("classify must contain {statement} and {answer}")
        return self


def _require(templates: list[str], placeholder: str) -> None:
    for n, template in enumerate(templates):
        if placeholder not in template:
            raise ValueError(f"templates[{n}] must contain {placeholder}")


class Heldout(_Strict):
    path: str = Field(min_length=1)
    side: Side  # the side the file's chosen answers voice


class SidePreference(_Strict):
    heldout: list[Heldout] = []
    max_pairs: int | None = Field(default=None, ge=1)
    max_length: int = Field(ge=8)
    bootstrap: int = Field(ge=1)


class Evaluate(_Strict):
    elicitation: Literal["forced_choice", "generate"]
    templates: list[str] = Field(min_length=1)
    calibration: Literal["none", "mean"]
    balanced: bool
    generate: Generate
    side_preference: SidePreference
    bootstrap: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    trajectory: bool

    @model_validator(mode="after")
    def _templates_hold_the_statement(self):
        _require(self.templates, "{statement}")
        return self


class Endpoint(Client):
    base_url: str | None = None  # null: a local `vllm serve` of the judge model, started and stopped by the stage


PRIMARY_JUDGE = "judge"  # the judge of judge.endpoint (or the local server), beside the panel's


class PanelJudge(_Strict):
    """A further judge behind an OpenAI-compatible endpoint (``judge.panel``); timeout, retries and concurrency are
    ``judge.endpoint``'s."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # its key in the judge's metrics and its answers column
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"


class Judge(_Strict):
    prompts: list[str] = Field(min_length=1)
    samples: int = Field(ge=1)
    temperature: float = Field(ge=0.0)
    max_new_tokens: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    method: Literal["logprobs", "json"]
    low: int
    high: int
    system: str
    rubric: str
    endpoint: Endpoint
    panel: list[PanelJudge] = []  # further judges: every answer is scored by each, and their agreement reported
    serve: dict[str, Any]  # `vllm serve` options, as --flags
    startup_timeout: float = Field(gt=0)

    @model_validator(mode="after")
    def _scale(self):
        if not 0 <= self.low < self.high <= 9:
            raise ValueError("low < high, both single digits (0-9)")
        if "{answer}" not in self.rubric or "{prompt}" not in self.rubric:
            raise ValueError("rubric must contain {prompt} and {answer}")
        names = [j.name for j in self.panel]
        if len(set(names)) != len(names) or PRIMARY_JUDGE in names:
            raise ValueError(f"panel names must be unique and not {PRIMARY_JUDGE!r} (got {names})")
        return self


class Gguf(_Strict):
    type: Literal["f32", "f16", "q8_0"]
    pre: str = Field(min_length=1)
    max_kl: float = Field(ge=0)
    min_top1: float = Field(ge=0, le=1)


class Export(_Strict):
    check_prompts: list[str] = Field(min_length=1)
    tolerance: float = Field(gt=0)
    gguf: Gguf | None


class Params(_Strict):
    """The params sections a stage loaded, validated once: ``params.annotate.threshold`` and so on. A section the
    stage did not declare is ``None``. ``lora``, ``sft`` and the preference methods' sections (``dpo``, ``kto``,
    ``orpo``, ``cpo``) stay mappings: they are TRL/PEFT fields, parsed strictly into ``LoraConfig``/``SFTConfig``/
    ``DPOConfig``... where they are used (``politune.training``)."""

    ideology: str | None = None
    base: Base | None = None
    models: Models | None = None
    ingest: Ingest | None = None
    annotate: Annotate | Score | Triplets | None = None  # the whole section, or one stage's keys
    datasets: Datasets | None = None
    launch: Launch | None = None
    recipe: Recipe | None = None
    lora: dict[str, Any] | None = None
    sft: dict[str, Any] | None = None
    dpo: dict[str, Any] | None = None
    kto: dict[str, Any] | None = None
    orpo: dict[str, Any] | None = None
    cpo: dict[str, Any] | None = None
    evaluate: Evaluate | None = None
    judge: Judge | None = None
    export: Export | None = None

    def as_dict(self) -> dict[str, Any]:
        """The loaded sections as plain values (for MLflow params and run fingerprints)."""
        return self.model_dump(mode="json", exclude_unset=True)


SECTION_MODELS: dict[str, type[BaseModel]] = {
    "base": Base, "models": Models, "ingest": Ingest, "annotate": Annotate, "datasets": Datasets,
    "launch": Launch, "recipe": Recipe, "lora": Lora, "evaluate": Evaluate, "judge": Judge,
    "export": Export,
}


def section_model(section: str, keys=None) -> type[BaseModel] | None:
    """The schema of a params section, or with ``keys`` (a stage that loads the section key by key) the model of
    ``SECTION_PARTS`` whose fields are exactly those keys."""
    if keys is None:
        return SECTION_MODELS.get(section)
    for model in SECTION_PARTS.get(section, ()):
        if set(model.model_fields) == set(keys):
            return model
    raise ValueError(f"no model in schema.SECTION_PARTS has exactly the {section} keys {sorted(keys)}")


def validate_sections(params: dict[str, Any], keyed=()) -> list[str]:
    """Return one message per problem (empty if valid), each naming its dotted key. ``keyed``: the sections loaded
    key by key (their keys make one of ``SECTION_PARTS``' models)."""
    problems = []
    for section, value in params.items():
        if section == "ideology":
            if not isinstance(value, str) or not value:
                problems.append(f"ideology: must be a viewpoint name, got {value!r}")
            elif isinstance(params.get("annotate"), dict):
                annotate = params["annotate"]
                if value not in (annotate.get("viewpoints") or {}):
                    names = ", ".join(annotate.get("viewpoints") or {})
                    problems.append(f"ideology: {value!r} is not one of annotate.viewpoints ({names})")
                elif value not in (annotate.get("prompts") or {}):
                    problems.append(f"ideology: {value!r} has no prompts in annotate.prompts")
            continue
        model = section_model(section, value if section in keyed else None)
        if model is None:
            if not isinstance(value, dict):
                problems.append(f"{section}: must be a mapping")
            continue
        try:
            model.model_validate(value)
        except ValidationError as exc:
            for err in exc.errors():
                key = ".".join(str(p) for p in (section, *err["loc"]))
                got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
                problems.append(f"{key}: {err['msg']}{got}")
    return problems
