# The two commands of the README:
#   make run    the main job: build the offline mini zoo and print its accuracy table
#   make test   every test (unit tests, then the full mini-zoo acceptance check)
# Both create or reuse the virtual environment .venv first. Data and models are cached in
# .cache/ inside the checkout (override with SURGERY_BOOK_CACHE=...), so a fresh clone builds
# everything from scratch and a second run reuses it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-local.txt | cksum | cut -d' ' -f1)
export SURGERY_BOOK_CACHE ?= $(CURDIR)/.cache
PYTEST_WORKERS ?= 2

.PHONY: run test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-local.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-local.txt
	$(BIN)/python -m pip install --quiet -e ".[book,dev]"
	@rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(BIN)/surgery-book zoo --preset mini

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not slow" tests
	$(BIN)/python -m pytest -m slow tests

clean:
	rm -rf $(VENV) .cache _build
