# The front-door commands (README): `make demo`, `make test` and `make test-fast`. Each sets
# everything up first, system packages included (as root through apt-get; otherwise one line with
# the command to run).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# $(call system_packages,PKG...): install them (as root), or stop make with the one line to run
system_packages = $(eval _fail := $(shell bash tools/system-packages.sh --error-to-stdout $(1)))$(if $(_fail),$(error $(_fail)))
# the built-in demo data; the tests add Chromium (the PNG of `submit report`) and what the local Slurm
# cluster needs
DEMO_PACKAGES := dataset-fashion-mnist
TEST_PACKAGES := $(DEMO_PACKAGES) chromium $(shell bash slurm/local-cluster.sh packages)

.PHONY: setup system-demo system-test demo test test-fast clean

setup: $(VENV)/.installed

system-demo:
	@:$(call system_packages,$(DEMO_PACKAGES))

system-test:
	@:$(call system_packages,$(TEST_PACKAGES))

# torch/torchvision pinned first (pip takes them from this machine's disk); deepspeed and selfsup are
# then built against that torch (no build isolation, so no second torch download)
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { \
	  echo "selfsup: needs Python 3.11; '$(PYTHON)' is $$($(PYTHON) --version 2>&1): run make with PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || bash tools/system-packages.sh python3-venv
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) --no-build-isolation "deepspeed>=0.16,<0.20"
	$(PIP) --no-build-isolation -e ".[test,atari]"
	touch $@

demo: system-demo setup
	$(VENV)/bin/submit pretrain spark convnext_b

# one pytest-xdist worker per core (tests/conftest.py shares the cores and the shard cache among them)
XDIST := -n auto --dist loadgroup

test: system-test setup
	$(PY) -m pytest $(XDIST)

# everything but the learning tests (the ones that pretrain and probe for minutes)
test-fast: system-test setup
	$(PY) -m pytest $(XDIST) -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
