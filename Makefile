# Two commands for a newcomer: `make run` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?=
TORCH  ?= torch==2.13.0
TORCHVISION ?= torchvision==0.28.0
# GPU=1: CUDA torch and its matching torchvision, both from TORCH_INDEX_URL (PyTorch's CUDA 12.8 wheels by
# default). GPU=0: the CPU build as on the development machines. Default: 1 where `nvidia-smi -L` lists a GPU.
GPU    ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cu128
TORCH_STAMP := $(VENV)/.torch-gpu$(GPU)
PYTEST_ARGS ?=

.PHONY: run test env system-deps lint clean

env: $(STAMP)

# torch first, alone (and, on GPU hosts, torchvision from the same index so that both match): the constraints
# then keep pip from swapping either (a `+cu128` or `+cpu` local version satisfies `torch==2.13.0`).
$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# Switching GPU=0 <-> 1: `torch==2.13.0` is satisfied by either build, so remove the other one first.
	@if ls $(VENV)/.torch-gpu* >/dev/null 2>&1; then $(BIN)/pip uninstall --quiet -y torch torchvision; fi
ifeq ($(GPU),1)
	@echo "GPU host (nvidia-smi found, or GPU=1): installing CUDA $(TORCH) and $(TORCHVISION) from $(TORCH_INDEX_URL)"
	$(BIN)/pip install --quiet --index-url "$(TORCH_INDEX_URL)" "$(TORCH)" "$(TORCHVISION)"
else
	@echo "no GPU (or GPU=0): installing $(TORCH) as resolved by pip (the CPU build here); GPU=1 forces CUDA"
	$(BIN)/pip install --quiet "$(TORCH)"
endif
	rm -f $(VENV)/.torch-gpu*
	touch $@

$(STAMP): pyproject.toml constraints.txt $(TORCH_STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,ray]'
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
