# scoreaction developer entry points. Every target sets up what it needs (the venv) first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= outputs/demo

.PHONY: venv demo serve test test-slow lint format bench image clean

venv: $(STAMP)

# torch 2.14.1 / torchvision 0.29.1 come from the machine's local wheel store (constraints.txt pins them).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The main job on the default (tiny) preset; the demo folder is scratch and is written afresh.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	HF_HUB_OFFLINE=1 $(PY) jobs/finetune.py --preset tiny --output-dir $(DEMO_DIR)

# The image service: the tiny base model + every run under outputs/ (make demo's is model `demo`); Ctrl-C stops it.
serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/serve run serve/config.yaml

test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

# The playground in a real headless Chromium: Debian's chromium + chromium-driver (apt; no browser download)
# and selenium pointed at them.
.PHONY: test-browser
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver)
	$(PY) -m pip install -q -c constraints.txt 'selenium>=4.20'
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m browser tests/test_feedback_browser.py

LINT_PATHS := $(wildcard scoreaction jobs serve tests)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) jobs/benchmark.py --out outputs/benchmark.json

# The KubeRay / ray up image (cluster/docker/Dockerfile); the build context is the repository root.
IMAGE ?= scoreaction:0.1.0-ray2.60.0-py311-gpu
image:
	docker build -f cluster/docker/Dockerfile -t $(IMAGE) .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
