# The two commands of the README:
#   make run    the main job: build the offline mini zoo, print its accuracy table, render the book
#   make test   every test: unit tests, the mini-zoo acceptance checks, the notebooks under nbval,
#               and the strict book build
# Both create or reuse the virtual environment .venv first. Data and models are cached in
# .cache/ inside the checkout (override with SURGERY_BOOK_CACHE=...), so a fresh clone builds
# everything from scratch and a second run reuses it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-local.txt | cksum | cut -d' ' -f1)
export SURGERY_BOOK_CACHE ?= $(CURDIR)/.cache
PYTEST_WORKERS ?= 2

BOOK := $(BIN)/jupyter-book build . --config book/_config.yml --toc book/_toc.yml

.PHONY: run test book venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-local.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-local.txt
	$(BIN)/python -m pip install --quiet -e ".[book,dev]"
	@rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(BIN)/surgery-book zoo --preset mini
	$(MAKE) book

book: $(STAMP)
	$(BOOK) -W -n --keep-going
	@echo "book: $(CURDIR)/_build/html/index.html"

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not slow" tests
	$(BIN)/python -m pytest -m slow -s tests
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 notebooks
	$(BOOK) -W -n --keep-going

clean:
	rm -rf $(VENV) .cache _build
