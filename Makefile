# The README's two commands. Both create .venv and install pinned dependencies on first use.
#   make demo   train -> sweep -> serve -> batch inference on a local Ray; prints where everything went
#   make test   the test suite (what .ci/run runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: demo test install clean tools

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt $(wildcard raystack/kernels/*.cpp raystack/kernels/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 -c constraints.txt
	$(BIN)/pip install --quiet -e '.[test]' -c constraints.txt
	@# The fused CPU decode op, compiled once into the venv (raystack/kernels); without a compiler, PyTorch ops run.
	$(BIN)/python -m raystack.kernels || echo "raystack CPU kernels not built: decode runs on PyTorch ops"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py $(ARGS)

# Tests drive Debian's chromium (the dashboard pages) and promtool (the alert rules, from the prometheus package);
# install what is missing when we may (root, apt-get present).
tools:
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="chromium"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) || \
		echo "not installed: $$missing (the tests that need it are skipped)"; }

test: $(STAMP) tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
