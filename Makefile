# The two front-door commands (README): `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# torch/torchvision pinned first (pip takes them from this machine's disk); deepspeed and selfsup are
# then built against that torch (no build isolation, so no second torch download)
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) --no-build-isolation "deepspeed>=0.16,<0.20"
	$(PIP) --no-build-isolation -e ".[test,atari]"
	touch $@

demo: setup
	$(VENV)/bin/submit pretrain spark convnext_b

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
