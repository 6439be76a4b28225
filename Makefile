# The two commands of README.md. Both create .venv and install what they need on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sprintrt-installed
# -qq: errors only, so `make demo` on a fresh clone shows sprintrt's steps, not pip's and setuptools' notices.
PIP    := $(PY) -m pip install -qq
# CPU machines take torch's CPU wheel first, so nothing pulls a multi-GB CUDA build.
TORCH  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "" || echo "torch==2.13.0")

.PHONY: demo test install clean

demo: $(STAMP)
	$(VENV)/bin/sprintrt demo

test: $(STAMP)
	$(PY) -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@echo "sprintrt: installing into $(VENV) (first run only; a few minutes)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PIP) --upgrade pip
	@test -z "$(TORCH)" || $(PIP) "$(TORCH)"
	@$(PIP) -c constraints.txt -e ".[export,bench,dev,openvino,serve,tensorrt-rtx]"
	@touch $(STAMP)

clean:
	rm -rf out .pytest_cache
