# The README's two commands. Both create .venv and install pinned dependencies on first use.
#   make demo   train the tiny model on the default corpus on a local Ray; prints where the artifact went
#   make test   the test suite (what .ci/run runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 -c constraints.txt
	$(BIN)/pip install --quiet -e '.[test]' -c constraints.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/train.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
