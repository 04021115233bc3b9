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

.PHONY: run test book venv chromium clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-local.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-local.txt
	$(BIN)/python -m pip install --quiet -e ".[book,dev]"
	@rm -f $(VENV)/.installed-* && touch $@

# The book's config keeps execution off (the committed outputs are rendered as they are); `make run`
# renders from a copy that executes every notebook first, with its default (mini, CPU) parameters.
run: $(STAMP)
	$(BIN)/surgery-book zoo --preset mini
	@mkdir -p _build
	sed 's/execute_notebooks: "off"/execute_notebooks: force/' book/_config.yml > _build/config-execute.yml
	@grep -q "execute_notebooks: force" _build/config-execute.yml
	$(BOOK) --config _build/config-execute.yml
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
# each other (OpenMP), and one thread per worker is faster than two workers fighting. The slow step builds the
# mini zoo with torch's default thread count and nbval then runs with one thread, so every run checks that the
# compared notebook outputs do not depend on the thread count the zoo was built with. nbval gets the notebooks
# longest first (their measured runtimes, in the order below; any new one goes last): pytest-xdist starts each
# worker on two of them and hands out the rest as workers finish, so the longest ones run side by side and the
# short ones fill the gaps at the end.
ONE_THREAD := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
BY_RUNTIME := $(addprefix notebooks/,06_reproduce_tables.ipynb 05_surgery_v2.ipynb 04_surgery.ipynb \
  01_merging_basics.ipynb 02_adamerging.ipynb 03_representation_bias.ipynb 07_beyond_the_papers.ipynb \
  00_offline_benchmark.ipynb)
NBVAL_ORDER := $(filter $(NOTEBOOKS),$(BY_RUNTIME)) $(filter-out $(BY_RUNTIME),$(NOTEBOOKS))

test: $(STAMP) chromium
	$(ONE_THREAD) $(PYTEST) -n $(PYTEST_WORKERS) --dist loadfile -m "not slow and not browser" tests
	$(PYTEST) -m slow -s tests
	$(ONE_THREAD) $(PYTEST) -n $(PYTEST_WORKERS) --dist loadfile --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 \
	  $(NBVAL_ORDER)
	$(BOOK) --config book/_config.yml
	$(PYTEST) -m browser tests

clean:
	rm -rf $(VENV) .cache _build
