# The two commands of README.md. Both create .venv and install what they need on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sprintrt-installed
# -qq: errors only, so `make demo` on a fresh clone shows sprintrt's steps, not pip's and setuptools' notices.
PIP    := $(PY) -m pip install -qq
# CPU machines take torch's CPU wheel first, so nothing pulls a multi-GB CUDA build.
TORCH  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "" || echo "torch==2.13.0")

.PHONY: demo test install browser clean

demo: $(STAMP)
	$(VENV)/bin/sprintrt demo

test: $(STAMP) browser
	$(PY) -m pytest

# The page's browser test drives Debian's headless chromium (Playwright's own browser download fails offline).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& echo "sprintrt: installing Debian's chromium for the browser test" \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "sprintrt: chromium is not installed (needs root and apt): the browser test will be skipped"

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@echo "sprintrt: installing into $(VENV) (first run only; a few minutes)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PIP) --upgrade pip
	@test -z "$(TORCH)" || $(PIP) "$(TORCH)"
	@$(PIP) -c constraints.txt -e ".[export,bench,dev,openvino,serve,tensorrt-rtx,ui]"
	@touch $(STAMP)

clean:
	rm -rf out .pytest_cache
