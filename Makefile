# Two commands from a fresh clone (Python 3.11 + pip, no network beyond PyPI, no GPU needed):
#   make demo   installs ftjob into .venv and runs the offline CPU demo end to end
#   make test   installs the test tools and runs the test suite (what .ci/run does)
PY   ?= python3
VENV ?= .venv
BIN  := $(VENV)/bin
# torch is pinned here, not in requirements.lock: 2.13.0 is the CPU build; a GPU image brings its own.
TORCH ?= torch==2.13.0

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock requirements-test.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -r requirements.lock -r requirements-test.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo-assets/tiny-gpt2/config.json: | install
	$(BIN)/ftjob demo-assets demo-assets

demo: install demo-assets/tiny-gpt2/config.json
	$(BIN)/ftjob run examples/demo.yaml
	@echo "Look at runs/demo/report.md, runs/demo/samples/after.md and runs/demo/final/"

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 3 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf runs demo-assets
