# The README's commands. Each creates .venv and installs requirements.txt (the pinned
# lock of pyproject.toml's dependencies) when needed; the checkout itself runs, uninstalled.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test test-large lint bench lock

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

quickstart: $(VENV)/.installed
	$(PY) train.py --variant deeplabv3-resnet10-cpu \
		--model-dir runs/quickstart --overwrite --log-every 300
	$(PY) predict.py --checkpoint runs/quickstart --output-dir runs/quickstart/predictions \
		--overwrite 'data/shapes/raw/JPEGImages/val_0000[0-5].jpg'
	@echo "Overlays of 6 val images: runs/quickstart/predictions/*_overlay.jpg (masks: *.png)"
	$(PY) export.py --model-dir runs/quickstart --format savedmodel tflite \
		--export-dir runs/exports --name quickstart --version 1 --overwrite

# The suite but the large tests (end to end in other processes; tests/conftest.py), then
# its numerics tests again on the CPU kernels this machine does not run by default:
# TensorFlow's own where its oneDNN kernels are on (CPUs with AVX512_VNNI, AVX512_BF16,
# AVX_VNNI or AMX), oneDNN's where they are off. test-large: the large tests, both ways.
# .ci/run runs both targets.
OTHER_KERNELS = other=$$(TF_CPP_MIN_LOG_LEVEL=3 $(PY) -c 'from deeplab_tf.precision import \
	onednn_enabled; print(0 if onednn_enabled() else 1)' 2>/dev/null) || exit 1; \
	echo "The numerics tests again with TF_ENABLE_ONEDNN_OPTS=$$other (not this CPU's default):"; \
	TF_ENABLE_ONEDNN_OPTS=$$other

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -m "not large"
	@$(OTHER_KERNELS) $(PY) -m pytest -q -m "numerics and not large"

test-large: $(VENV)/.installed
	$(PY) -m pytest -q -m large
	@$(OTHER_KERNELS) $(PY) -m pytest -q -m "numerics and large"

lint: $(VENV)/.installed
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(VENV)/.installed
	$(PY) bench/atrous.py

# Regenerates requirements.txt from pyproject.toml (its dependencies and the crf, serving
# and test extras) in a scratch virtual environment: the newest releases the ranges allow.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --upgrade pip
	.lock-venv/bin/python -m pip install '.[test]'
	{ echo "# Pinned lock of pyproject.toml for make quickstart / make test: make lock regenerates it."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude pip --exclude deeplab_tf; } > requirements.txt
	rm -rf .lock-venv
