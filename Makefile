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

.PHONY: run test test-order check format book venv chromium clean

venv: $(STAMP)

# uv installs the same pinned packages as pip, downloading and unpacking in parallel: 42 s instead of about 120 s for
# this environment (measured with a cold cache). It compiles the bytecode at install time as pip does: without it,
# where PYTHONDONTWRITEBYTECODE is set (this project's machines set it) every process compiles torch from source
# again (the unit tests took 290 s instead of 165 s). uv does not read pip's configuration, so where it cannot be
# installed or cannot install (a private index only pip is configured for), pip does the same two installs;
# INSTALLER=pip skips uv altogether.
INSTALLER ?= uv
UV_PIP := $(BIN)/python -m uv pip install --quiet --compile-bytecode --python $(BIN)/python
PIP := $(BIN)/python -m pip install --quiet

$(STAMP): pyproject.toml requirements-local.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ "$(INSTALLER)" = uv ] && $(PIP) "uv>=0.5" && $(UV_PIP) -r requirements-local.txt && $(UV_PIP) -e ".[book,dev]"; \
	then echo "installed .venv with uv"; \
	else [ "$(INSTALLER)" != uv ] || echo "uv could not install .venv; installing with pip"; \
	  $(PIP) -r requirements-local.txt && $(PIP) -e ".[book,dev]"; fi
	@rm -f $(VENV)/.installed-* && touch $@

# The book's config keeps execution off (the committed outputs are rendered as they are). `make run` executes every
# notebook first, with its default (mini, CPU) parameters, two at a time with one torch thread each (two processes
# of two threads stall each other), added longest first: jupyter-cache's parallel executor, into a fresh cache that the
# book build then reads (execute_notebooks: cache). `make test` checks on every run that one-thread outputs are
# the committed ones. A notebook that fails in the cache is executed again by the build, which then stops on it.
JUPYTER_CACHE := _build/.jupyter_cache
RUN_ORDER := $(addprefix notebooks/,05_surgery_v2.ipynb 02_adamerging.ipynb 06_reproduce_variants.ipynb 04_surgery.ipynb \
  04_surgery_ablations.ipynb 06_reproduce_tables.ipynb 01_merging_basics.ipynb 00_offline_benchmark.ipynb \
  03_representation_bias.ipynb 07_grid_details.ipynb 07_beyond_the_papers.ipynb)
run:
	@$(STAGES) reset run
	@$(STAGES) run run venv -- $(MAKE) --no-print-directory venv
	@$(STAGES) run run zoo -- $(BIN)/surgery-book zoo --preset mini
	@rm -rf $(JUPYTER_CACHE) && mkdir -p $(JUPYTER_CACHE)
	sed 's/execute_notebooks: "off"/execute_notebooks: cache/' book/_config.yml > _build/config-execute.yml
	@grep -q "execute_notebooks: cache" _build/config-execute.yml
	@$(BIN)/jcache notebook -p $(JUPYTER_CACHE) add $(wildcard $(RUN_ORDER)) $(filter-out $(RUN_ORDER),$(NOTEBOOKS)) > /dev/null
	@$(STAGES) run run notebooks -- env $(ONE_THREAD) $(BIN)/jcache project -p $(JUPYTER_CACHE) execute \
	  --executor local-parallel --timeout 1800 --verbosity WARNING
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
#   zoo        the mini zoo from scratch (two torch threads), alone: started at nice 19 beside the unit tests, its
#              OpenMP threads slowed from 587 s to 821 s (measured), more than the 209 s the tests take alone
#   tests      every test but the browser's, in one pool of two one-thread workers, file by file (a notebook's
#              cells share one kernel): the eleven notebooks under nbval, exercise solutions included, the mini
#              acceptance checks (-m slow), and the unit tests with the heavy ones (subprocess grids, concurrent
#              builds, all eleven notebooks by papermill on a fabricated CLIP preset). Longest first (LONGEST_FIRST,
#              one-thread seconds measured with --durations=0; every other file takes under 8 s and fills the tail);
#              --no-loadscope-reorder keeps that order (pytest-xdist would otherwise order files by their number
#              of tests), and every test file is named, not the folder: given the folder after some of its files,
#              pytest collected all of them alphabetically after the notebooks (`make test-order` prints the order;
#              tests/test_make.py checks that pytest collects it as given). One pool instead of a unit
#              stage before the zoo and a notebook stage after it: 640 s instead of 162 + 535 s, because neither
#              stage's tail leaves a core idle any more; 541 s for 1,065 s of one-thread work since a model's test
#              embeddings are stored next to the zoo (AMD EPYC, 2 cores: the two workers ended 1 s apart)
#   book       the strict book build
#   browser    the rendered pages in headless chromium
ONE_THREAD := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
LONGEST_FIRST := notebooks/05_surgery_v2.ipynb notebooks/02_adamerging.ipynb tests/test_clip_notebooks.py \
  notebooks/06_reproduce_variants.ipynb tests/test_cluster.py notebooks/06_reproduce_tables.ipynb \
  tests/test_committed_grid.py tests/test_cli.py notebooks/04_surgery_ablations.ipynb tests/test_mini_zoo.py \
  tests/test_merge_methods.py notebooks/07_beyond_the_papers.ipynb tests/test_reproducibility.py \
  notebooks/04_surgery.ipynb notebooks/07_grid_details.ipynb notebooks/00_offline_benchmark.ipynb \
  notebooks/03_representation_bias.ipynb tests/test_tuning.py tests/test_clip_setting.py notebooks/01_merging_basics.ipynb
TEST_FILES := $(sort $(wildcard tests/test_*.py))
TEST_ORDER := $(wildcard $(LONGEST_FIRST)) $(filter-out $(LONGEST_FIRST),$(NOTEBOOKS) $(TEST_FILES))
STAGES := $(PYTHON) bench/stages.py
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=1200

test:
	@$(STAGES) reset test
	@$(STAGES) start test chromium -- $(MAKE) --no-print-directory chromium
	@$(STAGES) run test venv -- $(MAKE) --no-print-directory venv
	@$(STAGES) run test zoo -- $(BIN)/surgery-book zoo --preset mini --quiet
	@$(STAGES) run test tests -- env $(ONE_THREAD) $(PYTEST) -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder \
	  $(NBVAL) -m "not browser" $(TEST_ORDER)
	@$(STAGES) run test book -- $(BOOK) --config book/_config.yml
	@$(STAGES) wait test chromium
	@$(STAGES) run test browser -- $(PYTEST) -m browser tests
	@$(STAGES) report test

# The files of the tests stage in the order it hands them to its workers, one per line.
test-order:
	@printf '%s\n' $(TEST_ORDER)

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
