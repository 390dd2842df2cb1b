# minilora — every target sets itself up on a fresh machine: it creates .venv if missing, installs torch first
# (TORCH_SPEC), then the package with its dev extra, every package at the exact version of requirements.lock.
#
#   make demo        the guided tour (CPU, a few minutes), report in runs/demo/
#   make test        everything CI checks
#   make test-portable   the tests, exercises and notebooks again with other float kernels and a fresh cache
#   make test-7b     one QLoRA step of a real 7B (random weights) through the CLI on CPU: ~8 GiB, minutes
#   make lab         JupyterLab on notebooks/
#   make bench       benchmarks, Markdown tables in benchmarks/results/
#   make exercises   the exercise tests against YOUR stubs in exercises/learner/
#   make lock        refresh requirements.lock (a deliberate change: then run the whole of .ci/run)
#   make test-latest the tests in .venv-latest, with the newest versions pyproject.toml allows (what a refresh
#                    of the lock would bring); not part of CI
#
# GPU machines: make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" demo
# (any torch >= 2.6 works; the lock's torch, triton and CUDA libraries then step aside, the rest stays locked;
# the default is the lock's torch, the CPU build these machines keep on disk).

PYTHON      ?= python3
VENV        ?= .venv
LOCK        := requirements.lock
LOCK_TORCH  := $(shell sed -n 's/^\(torch==[^ ;]*\).*/\1/p' $(LOCK))
TORCH_SPEC  ?= $(LOCK_TORCH)
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.minilora-installed
# pip reads PIP_CONSTRAINT in every pip it starts, the isolated build of the package included (setuptools).
CONSTRAINTS := $(VENV)/constraints.txt
PIP_LOCKED  := PIP_CONSTRAINT=$(CONSTRAINTS) $(PY) -m pip install --quiet

# The running example is tiny (hidden size 64): one thread per process is as fast as two and gives the same
# numbers on every machine. Override with `make test OMP_NUM_THREADS=2`.
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS
# Nothing in this repository is downloaded from the Hugging Face Hub; say so to the libraries, which otherwise
# look for an optional kernel online on every import of bitsandbytes on AVX512-BF16 CPUs (minilora/machine.py).
HF_HUB_OFFLINE ?= 1
export HF_HUB_OFFLINE

.PHONY: demo test test-portable test-7b lint pytest exercises-reference exercises-stubs nbval lab bench exercises figures setup clean book book-serve book-check lock test-latest

setup: $(STAMP)

# The lock was resolved for Python >= 3.11 (some locked packages need it); pyproject.toml itself allows 3.10.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "make installs requirements.lock, which needs Python >= 3.11 (make PYTHON=python3.11); pip install -e . works on 3.10")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(filter $(LOCK_TORCH),$(TORCH_SPEC)),cp $(LOCK) $(CONSTRAINTS),\
	  grep -v -E '^(torch|triton|nvidia-[a-z0-9-]+)==' $(LOCK) > $(CONSTRAINTS))
	$(PIP_LOCKED) pip
	$(PIP_LOCKED) $(TORCH_SPEC)
	$(PIP_LOCKED) -e ".[dev]"
	touch $(STAMP)

# Refresh the lock: the newest versions pyproject.toml allows, for every platform (uv's universal resolution),
# torch held at TORCH_LOCK. Afterwards `make clean` and run .ci/run: the new versions are what CI then tests.
UV_SPEC     ?= uv==0.13.9
TORCH_LOCK  ?= $(or $(LOCK_TORCH),torch==2.13.0)
UV_VENV     := .venv-uv
lock:
	test -x $(UV_VENV)/bin/uv || ($(PYTHON) -m venv $(UV_VENV) && $(UV_VENV)/bin/python -m pip install --quiet $(UV_SPEC))
	printf '%s\npip\nsetuptools>=77\n' '$(TORCH_LOCK)' | $(UV_VENV)/bin/uv pip compile pyproject.toml - \
	  --extra dev --extra book --universal --python-version 3.11 --custom-compile-command "make lock" \
	  --quiet -o $(LOCK)
	@echo "requirements.lock refreshed: now 'make clean' and run .ci/run, and commit the lock with the results"

# The suite against the newest versions pyproject.toml allows (torch stays TORCH_SPEC: an eager upgrade would
# otherwise replace it with PyPI's newest, a multi-GB CUDA build), in its own venv: what a refresh of the lock
# would break. scripts/lock_drift.py lists the versions that differ from the lock.
LATEST      := .venv-latest
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(LATEST)/bin/python -m pip freeze | grep -E '^torch==' > $(LATEST)/torch-constraint.txt
	PIP_CONSTRAINT=$(LATEST)/torch-constraint.txt \
	  $(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	touch $(LATEST)/.minilora-installed
	$(LATEST)/bin/python scripts/lock_drift.py $(LOCK)
	MINILORA_UNLOCKED=1 $(MAKE) --no-print-directory pytest exercises-reference exercises-stubs nbval VENV=$(LATEST)

demo: $(STAMP)
	$(PY) -m minilora demo

test: lint pytest exercises-reference exercises-stubs nbval

lint: $(STAMP)
	$(PY) -m ruff check minilora tests exercises benchmarks scripts book

pytest: $(STAMP)
	$(PY) -m pytest -q tests

exercises-reference: $(STAMP)
	$(PY) -m pytest -q exercises --impl=reference

exercises-stubs: $(STAMP)
	$(PY) exercises/check_stubs_fail.py

# --nbval-lax: only cells marked `# NBVAL_CHECK_OUTPUT` are byte-compared; every cell must run, and the
# notebooks assert their claims (the rule: notebooks/README.md).
nbval: $(STAMP)
	$(PY) -m pytest -q --nbval-lax notebooks -p no:cacheprovider

# A reader's CPU is not ours: float kernels (ATen's vectorized code, MKL, oneDNN) differ per instruction set and
# sum in other orders, and the running example's pretrained cache is trained on the machine. Emulate another
# CPU on this one: cap every kernel library at an older instruction set, and pretrain afresh.
PORTABLE_ENV = ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41

test-portable: $(STAMP)
	cache=$$(mktemp -d) && trap 'rm -rf "$$cache"' EXIT && \
	$(PORTABLE_ENV) MINILORA_CACHE=$$cache $(PY) -m pytest -q tests -p no:cacheprovider && \
	$(PORTABLE_ENV) MINILORA_CACHE=$$cache $(PY) -m pytest -q exercises --impl=reference -p no:cacheprovider && \
	$(PORTABLE_ENV) MINILORA_CACHE=$$cache $(PY) -m pytest -q --nbval-lax notebooks -p no:cacheprovider

# The real-scale check (scripts/check_7b.py): `python -m minilora.train --recipe qlora-7b --model llama-7b
# --random-init` for one optimizer step on the CPU, its adapter checked (r 64, the 224 block linears) and its peak
# memory against the memory model, with a margin derived term by term; peak resident <= 11 GiB (a Colab host).
# SEVEN_B_WRAP runs it under a command, e.g. SEVEN_B_WRAP="../shared/tools/with-memory-limit 11G" (a cgroup).
SEVEN_B_WRAP ?=

test-7b: $(STAMP)
	$(PY) scripts/check_7b.py $(if $(SEVEN_B_WRAP),--wrap "$(SEVEN_B_WRAP)")

# As root (containers, Colab-like machines) Jupyter refuses to start without --allow-root, so root gets it.
# LAB_TOKEN: "auto" (Jupyter makes a random login token and prints the URL with it), "none" (no login, only
# on a machine nobody else can reach) or a token of your own; jupyter-server 2's option IdentityProvider.token
# (ServerApp.token is deprecated).
LAB_TOKEN ?= auto
LAB_ARGS := $(if $(filter 0,$(shell id -u)),--allow-root) \
            $(if $(filter none,$(LAB_TOKEN)),--IdentityProvider.token='', \
              $(if $(filter auto,$(LAB_TOKEN)),,--IdentityProvider.token='$(LAB_TOKEN)'))

lab: $(STAMP)
	$(PY) -m jupyter lab notebooks $(strip $(LAB_ARGS))

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# Each stub's hint is printed once, at the first test that reaches it (exercises/conftest.py).
exercises: $(STAMP)
	$(PY) -m pytest exercises --impl=learner -v --tb=short

figures: $(STAMP)
	$(PY) scripts/figures.py

# The book as a website (scripts/book.py, book/mkdocs.yml): `make book` builds site/, `make book-serve` serves it
# on http://127.0.0.1:8000/, `make book-check` builds it and reads every page in headless Chromium, offline.
BOOK_STAMP  := $(VENV)/.minilora-book-installed

$(BOOK_STAMP): $(STAMP)
	$(PIP_LOCKED) -e ".[dev,book]"
	touch $(BOOK_STAMP)

book: $(BOOK_STAMP)
	$(PY) scripts/book.py

book-serve: book
	$(PY) -m http.server --directory site --bind 127.0.0.1 8000

book-check: $(BOOK_STAMP)
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)
	$(PY) scripts/check_book.py

clean:
	rm -rf $(VENV) $(LATEST) $(UV_VENV) .cache runs .pytest_cache site build/book
