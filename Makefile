# Two commands for a newcomer: `make run` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?=
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: run test env system-deps lint clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, alone: the constraints then keep pip from replacing it with a CUDA build.
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# Debian packages the tests need: Prometheus and promtool (dashboards, alerts), systemd (unit checks, boot test),
# libgs-common (a CMYK ICC profile for the loader's colour test), shellcheck (install.sh lint).
system-deps:
	@if ! command -v promtool >/dev/null 2>&1 || ! command -v systemd-analyze >/dev/null 2>&1 \
	    || ! dpkg -s libgs-common >/dev/null 2>&1 || ! command -v shellcheck >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus systemd libgs-common shellcheck >/dev/null; \
	  else echo "note: not root; install prometheus and systemd with apt-get for the full suite (tests skip otherwise)"; fi; \
	fi

run: $(STAMP)
	$(BIN)/binner run $(if $(CONFIG),--config $(CONFIG),)

test: $(STAMP) system-deps
	$(BIN)/ruff check app stages queues tests
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .binner .pytest_cache
