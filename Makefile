# nslab: the README's two commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-fast bench lint ui screenshots fashion-mnist clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# torchattacks is only our attacks' cross-check; its metadata pins requests~=2.25, which would
	# downgrade requests under Ray and MLflow (its code never imports requests): install it alone.
	$(PY) -m pip install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m pipelines.study --config configs/study/quick.yaml

# Two workers, one test file each at a time (module fixtures stay in one process), the longest files first
# (tests/conftest.py): they fill the gaps where a test waits on Ray, a server or a subprocess. The suite is
# CPU-bound: the two cores were 90% busy with two workers; a third made them 98.5% busy and saved nothing
# measurable (633 s against 642 s) while stretching the longest tests toward their timeouts.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests --durations=15

# The edit loop: no Ray, no subprocess, no training beyond a few steps (a test that starts one fails there).
test-fast: setup
	NSLAB_TEST_TIER=fast $(PY) -m pytest -q -m "not slow" tests --durations=5

bench: setup
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check .

ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

# The MLflow UI of the newest demo study in a real headless Chromium (Debian's), as PNGs under shots/.
screenshots: setup
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	$(PY) -m pip install -q -e '.[ui]'
	$(PY) tools/mlflow_screenshots.py --tracking-uri sqlite:///$(CURDIR)/mlflow.db --experiment nslab-quick --out shots

# Full Fashion-MNIST (70k images, MIT) from Debian; ns_core.data unpacks it on first use.
fashion-mnist:
	apt-get update -q && apt-get install -y -q dataset-fashion-mnist

clean:
	rm -rf $(VENV) .pytest_cache
