# Depth Workbench: one command to set up and serve, one to set up and test.
#   make serve   -> local .venv with what serving needs, then `panel serve apps/` on http://localhost:5006/apps
#   make test    -> local .venv with the test extras too + Chromium, then unit, notebook (nbval) and browser tests
#   make bench   -> benchmark table (ratios measured in one run)
#   make device-check -> the engine on a GPU machine (bench/device_check.py; make device-wheels first, here)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of torch first, so the range in pyproject (torch>=2.4) does not pull a CUDA build.
# Elsewhere: make TORCH_SPEC="torch" for the build that suits your machine.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PORT   ?= 5006
PYTEST_ARGS ?=

.PHONY: setup setup-serve setup-test serve test test-quick bench browser clean device-check device-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

INSTALL_TORCH = $(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)" \
	  || $(BIN)/pip install torch --index-url $(TORCH_CPU_INDEX)

# What serving needs: the package with its Hugging Face and Dask extras (no test tools).
$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(INSTALL_TORCH)
	$(BIN)/pip install -e ".[hf,dask]"
	touch $@

# What the tests need on top: the test extras (pytest, Playwright, hypothesis, TransformerLens, nbval).
$(VENV)/.installed-test: $(VENV)/.installed-serve
	$(BIN)/pip install -e ".[hf,dask,test]"
	touch $@

setup-serve: $(VENV)/.installed-serve
setup-test: $(VENV)/.installed-test
setup: setup-serve

# The server's launch environment: torch's OpenMP threads sleep when idle instead of spinning (read when
# torch loads, so it must be set at process start). README "Classroom mode"; measured in bench/bench_classroom.py.
SERVE_ENV ?= OMP_WAIT_POLICY=PASSIVE
# Local only: bound to 127.0.0.1 (no sign-in yet); serving to others is the classroom mode (with sign-in).
serve: setup-serve
	$(SERVE_ENV) $(BIN)/python -m panel serve apps/ --port $(PORT) --address 127.0.0.1 \
	  --allow-websocket-origin=localhost:$(PORT) --allow-websocket-origin=127.0.0.1:$(PORT) --show

# Classroom mode (README "Classroom mode", docs/security.md): our sign-in (apps/auth.py) with a credentials
# file, every interface, one process (one job queue). CLASS_LIST (one user name a line) creates CREDENTIALS
# if missing. The cookie secret never goes on a command line: export WORKBENCH_COOKIE_SECRET, or name a
# file (mode 600) in COOKIE_SECRET_FILE; neither: a new random one each start (everyone signs in again).
# TLS: SSL_CERTFILE and SSL_KEYFILE (both). ALLOW_HUB=1: students may name Hugging Face Hub models.
CREDENTIALS      ?= classroom-users.json
CLASS_LIST       ?=
CLASS_HOST       ?= $(shell hostname)
CLASS_SECONDS    ?= 7200
COOKIE_SECRET_FILE ?=
SSL_CERTFILE     ?=
SSL_KEYFILE      ?=
ALLOW_HUB        ?=
.PHONY: classroom
classroom: setup
	@if [ ! -e "$(CREDENTIALS)" ] && [ -n "$(CLASS_LIST)" ]; then \
	  $(BIN)/python -m workbench.classroom credentials "$(CLASS_LIST)" -o "$(CREDENTIALS)"; fi
	@$(SERVE_ENV) $(BIN)/python -m workbench.classroom serve \
	  --credentials "$(CREDENTIALS)" --host "$(CLASS_HOST)" --port $(PORT) --session-seconds $(CLASS_SECONDS) \
	  $(if $(COOKIE_SECRET_FILE),--cookie-secret-file "$(COOKIE_SECRET_FILE)") \
	  $(if $(SSL_CERTFILE),--ssl-certfile "$(SSL_CERTFILE)" --ssl-keyfile "$(SSL_KEYFILE)") \
	  $(if $(ALLOW_HUB),--allow-hub)

# Chromium for the browser tests (Debian/Ubuntu as root); fonts-unifont for glyph embeddings.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-unifont; \
	  else echo "Install Chromium (/usr/bin/chromium) for the browser tests, e.g. sudo apt-get install chromium"; exit 1; fi; \
	fi

# Two pytest workers (pytest-xdist), one torch thread each; a file's tests stay on one worker (module
# fixtures, a notebook's cells in order, one browser server per file).
TEST_WORKERS ?= 2
test: setup-test browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider \
	  -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Everything but the browser tests and notebooks (a quick check while editing).
test-quick: setup-test
	$(BIN)/python -m pytest tests -m "not ui" -q -p no:cacheprovider $(PYTEST_ARGS)

bench: setup-test
	$(BIN)/pip install -q -e ".[bench]" || true
	$(BIN)/python -m bench

# The engine on an accelerator machine (its own python3 with torch and CUDA, no network): bench/device_check.py
# in one call (under 8 minutes). It installs the packages that machine lacks from bench/wheels/, which
# `make device-wheels` fills here (git-ignored: carry it to that machine with the working tree).
DEVICE ?= cuda
DEVICE_ARGS ?=
device-check:
	$(PYTHON) bench/device_check.py --device $(DEVICE) $(DEVICE_ARGS)

WHEEL_PYTHONS ?= 3.10 3.11 3.12 3.13
WHEEL_PLATFORMS = --only-binary=:all: --implementation cp $(foreach p,manylinux2014 manylinux_2_28 manylinux_2_27 \
	manylinux_2_24 manylinux_2_17 manylinux2010 manylinux_2_12 manylinux1 manylinux_2_5,--platform $(p)_x86_64)
device-wheels: | $(BIN)/python
	mkdir -p bench/wheels
	for v in $(WHEEL_PYTHONS); do \
	  $(BIN)/pip download -q $(WHEEL_PLATFORMS) --python-version $$v -d bench/wheels --no-deps "pot>=0.9,<0.9.7" && \
	  $(BIN)/pip download -q $(WHEEL_PLATFORMS) --python-version $$v -d bench/wheels "dask[distributed]>=2024.1" \
	    pytest || exit 1; done
	du -sh bench/wheels

clean:
	rm -rf $(VENV) artifacts .pytest_cache
