# Two commands on a fresh machine:
#   make demo   install everything, then build ./edgekit.toml (the embedded default model in both formats:
#               export, parity gate, bench, eval, tarballs, report), select one and run both bundles
#   make test   install everything, run the static checks (make lint), then the whole test suite
#   make test-fast   the tests not marked slow (no real export, no runtime): under two minutes
# Everything installs into .venv with pinned versions (requirements.txt).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.edgekit-installed
# Repo-local cache so tests and the demo start from the same known state on a fresh clone.
export EDGEKIT_CACHE ?= $(CURDIR)/.cache/edgekit
# No model hub here: tests must never try it.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
# llama-cpp-python compiles llama.cpp (about 11 minutes on 2 cores; pip caches the wheel).
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# Headless Chromium (Debian package) renders `edgekit report`'s HTML in a test. Installed with
# apt as root or through passwordless sudo; the lists are refreshed only if the first try fails.
BROWSER_STAMP := $(VENV)/.edgekit-browser
$(BROWSER_STAMP): | $(STAMP)
	command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }
	touch $@

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

demo: install
	# The release build of ./edgekit.toml: SmolLM2-135M exported to both formats (and once more as a
	# phone bundle, benchmarked on the mobile-onnx profile), each verified
	# against the fp32 reference (exit 3 if a parity gate fails), benchmarked on this host's
	# profile, evaluated on the first 100 items of the shipped task set against the transformers
	# reference ([eval] gates; the eval table is in the build's summary), packed with SHA256SUMS,
	# summary and report.html in dist/release/. Then select picks a bundle from the stored results.
	# Each run is followed by the unquantized checkpoint's own answer (--reference) and where the
	# two part: SmolLM2-135M itself prefers "The" to "L" here by only 0.08 logits, so a 4-bit
	# bundle may answer "L'Étoile..." without any bug (benchmarks/results/first_token.md).
	$(VENV)/bin/edgekit build
	$(VENV)/bin/edgekit select dist/release/smollm2-135m-gguf-q4_k_m dist/release/smollm2-135m-onnx-int4 --stored --limit 100
	$(VENV)/bin/edgekit run dist/release/smollm2-135m-gguf-q4_k_m --max-tokens 48 --prompt "What is the capital of France?" --reference
	$(VENV)/bin/edgekit run dist/release/smollm2-135m-onnx-int4 --max-tokens 48 --prompt "What is the capital of France?" --reference
	# The phone bundle (model.ort, docs/mobile.md), run the way the desktop one is.
	$(VENV)/bin/edgekit run dist/release/smollm2-135m-mobile-onnx-int4 --max-tokens 48 --prompt "What is the capital of France?" --reference

# Lint first: a typo or a type error fails in seconds, before minutes of exports.
test: lint $(BROWSER_STAMP)
	$(PY) -m pytest -q

# The fast tier: every test not marked slow (no real export, no runtime), under two minutes.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Static checks, fastest first so a typo fails in seconds. actionlint runs shellcheck (from the
# venv) on every `run:` script of the workflows.
lint: install
	$(VENV)/bin/ruff check edgekit tests benchmarks
	$(VENV)/bin/ruff format --check edgekit tests benchmarks
	$(VENV)/bin/mypy
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/actionlint .github/workflows/*.yml

bench: install
	$(PY) benchmarks/export_overhead.py
	$(PY) benchmarks/arch_matrix.py

clean:
	rm -rf dist .pytest_cache
