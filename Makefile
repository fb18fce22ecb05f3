# make demo: convert the embedded sample and train ResNet-18 on it (CPU, a few minutes).
# make test: the test suite (CPU).
# make bench: loader (and where its time goes), training-loop, augmentation, writer and
# decoder-quality benchmarks (tables; CSV + PNG in bench-results/). The decoder parity study (about
# an hour) is separate: benchmarks/decoder_parity.py.
# make carry: .carry/ (ffcv, our JPEG decoder library, the check's images) for an offline GPU machine.
# make gpu-check: the one-shot CUDA check (benchmarks/gpu_check.sh; bench-results/gpu.md, gpu.csv).
# make gpu-speed: the GPU speed measurement (benchmarks/gpu_speed.sh; bench-results/gpu_speed.md, .csv).
# demo, test, bench and carry first install what is missing (gpu-check and gpu-speed do not): the system packages ffcv and our JPEG region decoder build
# against, then .venv with the pins of requirements.txt and the package itself (pip install -e .,
# which builds the decoder; again whenever jpeg_region.c or the packaging files change).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := libopencv-dev libturbojpeg0-dev libjpeg-dev pkg-config

.PHONY: setup sysdeps demo test bench carry gpu-check gpu-speed clean

setup: $(VENV)/.installed

sysdeps:
	@if pkg-config --exists opencv4 libturbojpeg libjpeg 2>/dev/null; then \
	  echo "system packages present: $(APT_PACKAGES)"; \
	else \
	  echo "+ $(SUDO) apt-get update && $(SUDO) apt-get install -y $(APT_PACKAGES)"; \
	  $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y $(APT_PACKAGES); \
	fi

$(VENV)/.installed: requirements.txt pyproject.toml setup.py imagenet_ffcv/jpeg_region.c
	@$(MAKE) --no-print-directory sysdeps
	@[ -x $(PY) ] || { echo "+ $(PYTHON) -m venv $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -c requirements.txt -e .
	touch $@

demo: setup
	$(PY) write_beton.py --data-dir demo/imagenette_sample --split train --max-res 128 --out demo_out/train_128.beton --overwrite
	$(PY) write_beton.py --data-dir demo/imagenette_sample --split val --max-res 128 --out demo_out/val_128.beton --overwrite
	$(PY) train_imagenet.py --config demo_configs/rn18_demo.yaml

# Two pytest processes (pytest-xdist), each test file in one of them (its module fixtures built
# once): on CI's 2 cores the suite takes about two thirds of the time of one process (360 s against
# 551 s, docs/reliability.md), which leaves a core idle while a test compiles, imports or waits on
# its subprocesses.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# DALI (its CPU pipeline is a peer in bench_loader) is installed here only, never by setup or test;
# pinned with requirements.txt as constraints so that it moves none of the project's pins.
DALI_PIN := nvidia-dali-cuda130==2.4.0
bench: setup
	$(PY) -m pip install -q -c requirements.txt $(DALI_PIN) || echo "DALI not installed: its rows are skipped"
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/loader_profile.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_augment.py
	$(PY) benchmarks/bench_writer.py
	$(PY) benchmarks/decoder_quality.py

carry: setup
	bash benchmarks/make_carry.sh

# No set-up first: on the lent GPU machine there is no .venv (gpu_check.sh uses .carry there).
gpu-check:
	bash benchmarks/gpu_check.sh

gpu-speed:
	bash benchmarks/gpu_speed.sh

clean:
	rm -rf demo_out build *.egg-info
