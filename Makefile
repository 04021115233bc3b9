# The two commands of the README:
#   make run    the main job: build the offline mini zoo, execute every notebook on it and render the book
#   make test   every test: unit tests, the mini-zoo acceptance checks, the notebooks under nbval,
#               the strict book build, and the rendered pages in headless chromium
# Both create or reuse the virtual environment .venv first. Data and models are cached in
# .cache/ inside the checkout (override with SURGERY_BOOK_CACHE=...), so a fresh clone builds
# everything from scratch and a second run reuses it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-local.txt | cksum | cut -d' ' -f1)
export SURGERY_BOOK_CACHE ?= $(CURDIR)/.cache
PYTEST_WORKERS ?= 2

BOOK := $(BIN)/jupyter-book build . --toc book/_toc.yml -W -n --keep-going
PYTEST := $(BIN)/python -m pytest

.PHONY: run test check format book venv chromium clean

venv: $(STAMP)

# uv installs the same pinned packages as pip, downloads and unpacking in parallel: 20 s instead of 120 s for this
# environment (measured on a cold cache). It does not read pip's configuration, so where uv cannot be installed or
# cannot install (a private index only pip is configured for), pip does the same two installs; INSTALLER=pip
# skips uv altogether.
INSTALLER ?= uv
UV_PIP := $(BIN)/python -m uv pip install --quiet --python $(BIN)/python
PIP := $(BIN)/python -m pip install --quiet

$(STAMP): pyproject.toml requirements-local.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ "$(INSTALLER)" = uv ] && $(PIP) "uv>=0.5" && $(UV_PIP) -r requirements-local.txt && $(UV_PIP) -e ".[book,dev]"; \
	then echo "installed .venv with uv"; \
	else [ "$(INSTALLER)" != uv ] || echo "uv could not install .venv; installing with pip"; \
	  $(PIP) -r requirements-local.txt && $(PIP) -e ".[book,dev]"; fi
	@rm -f $(VENV)/.installed-* && touch $@

# The book's config keeps execution off (the committed outputs are rendered as they are); `make run`
# renders from a copy that executes every notebook first, with its default (mini, CPU) parameters and torch's
# default thread count, one notebook after another: the regime the committed outputs come from.
run: $(STAMP)
	@$(STAGES) reset run
	@$(STAGES) run run zoo -- $(BIN)/surgery-book zoo --preset mini
	@mkdir -p _build
	sed 's/execute_notebooks: "off"/execute_notebooks: force/' book/_config.yml > _build/config-execute.yml
	@grep -q "execute_notebooks: force" _build/config-execute.yml
	@$(STAGES) run run book -- $(BOOK) --config _build/config-execute.yml
	@$(STAGES) report run
	@echo "book: $(CURDIR)/_build/html/index.html"

book: $(STAMP)
	$(BOOK) --config book/_config.yml
	@echo "book: $(CURDIR)/_build/html/index.html"

# Debian's chromium for the rendered-book test (the machine's closed network still reaches the registries).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

# Parallel pytest workers get one torch thread each: two processes with two threads each on two cores stall
# each other (OpenMP), and one thread per worker is faster than two workers fighting. The zoo stage builds the
# mini zoo with torch's default thread count and the notebooks then run with one thread, so every run checks that
# the compared notebook outputs do not depend on the thread count the zoo was built with.
#
# `make test` runs its stages through bench/stages.py, which times each one and ends with a table of seconds per
# stage (also in _build/stages-test.tsv), passed or failed. Chromium installs in the background from the start.
#   venv       install .venv (skipped when the stamp says it is current)
#   unit       every test that needs no mini zoo (-m "not slow and not browser"), the heavy ones included:
#              subprocess grids, concurrent builds, all eight notebooks by papermill on a fabricated CLIP preset;
#              test by test to whichever worker is free (--dist worksteal: 180 s instead of 224 s by file)
#   zoo        the mini zoo from scratch (two torch threads). Not beside the unit stage: started at nice 19 in the
#              background, the unit tests still slowed the zoo's OpenMP threads from 587 s to 821 s (measured),
#              more than the 209 s they take alone
#   notebooks  the mini acceptance checks (-m slow: they fill the merge cache the chapters read) and the eight
#              notebooks under nbval, exercise solutions included, in two one-thread workers, by file (a notebook's
#              cells share one kernel), longest first (their order below; a new one goes last). Longest first with
#              the acceptance checks last measured no better (535 s against 524 s)
#   book       the strict book build
#   browser    the rendered pages in headless chromium
ONE_THREAD := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
BY_RUNTIME := $(addprefix notebooks/,05_surgery_v2.ipynb 04_surgery.ipynb 06_reproduce_tables.ipynb 02_adamerging.ipynb \
  01_merging_basics.ipynb 03_representation_bias.ipynb 07_beyond_the_papers.ipynb 00_offline_benchmark.ipynb)
NBVAL_ORDER := $(filter $(NOTEBOOKS),$(BY_RUNTIME)) $(filter-out $(BY_RUNTIME),$(NOTEBOOKS))
STAGES := $(PYTHON) bench/stages.py
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=1200

test:
	@$(STAGES) reset test
	@$(STAGES) start test chromium -- $(MAKE) --no-print-directory chromium
	@$(STAGES) run test venv -- $(MAKE) --no-print-directory venv
	@$(STAGES) run test unit -- env $(ONE_THREAD) $(PYTEST) -n $(PYTEST_WORKERS) --dist worksteal -m "not slow and not browser" tests
	@$(STAGES) run test zoo -- $(BIN)/surgery-book zoo --preset mini --quiet
	@$(STAGES) run test notebooks -- env $(ONE_THREAD) $(PYTEST) -n $(PYTEST_WORKERS) --dist loadfile $(NBVAL) \
	  -m "slow or notebook" tests $(NBVAL_ORDER)
	@$(STAGES) run test book -- $(BOOK) --config book/_config.yml
	@$(STAGES) wait test chromium
	@$(STAGES) run test browser -- $(PYTEST) -m browser tests
	@$(STAGES) report test

# The quick check of the edit loop (about a minute): the unit tests without the heavy ones, no zoo, no notebooks.
# It is not the test command: `make test` runs everything.
check: $(STAMP)
	$(ONE_THREAD) $(PYTEST) -n $(PYTEST_WORKERS) --dist worksteal -q -m "not slow and not browser and not heavy" tests

# ruff, configured in pyproject.toml: format the code and apply the safe lint fixes (tests/test_style.py checks both).
format: $(STAMP)
	$(BIN)/ruff format surgery_lib tests bench
	$(BIN)/ruff check --fix surgery_lib tests bench

clean:
	rm -rf $(VENV) .cache _build
