# make demo: set up .venv, embed data/sample with the tiny model (offline) and validate it with 10-shot k-NN.  make test: the test suite.
PY ?= python3
VENV := .venv
# cpu: faiss-cpu. On a CUDA 12 host use EXTRAS=test,serve,ray,remote,gpu instead (faiss-gpu-cu12; never cpu and gpu both).
EXTRAS ?= test,serve,ray,remote,cpu

.PHONY: demo test install clean browser

# pip reports each package as it is collected, downloaded (with its size) and installed.
$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	@echo "Installing siglip-pipelines[$(EXTRAS)] into $(VENV): about 3.5 GB to download, 7.1 GB on disk, 2-10 minutes"
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install --progress-bar on -c .ci/constraints.txt -e '.[$(EXTRAS)]'
	@touch $@
	@echo "Installed: $$(du -sh $(VENV) | cut -f1) in $(VENV) (source $(VENV)/bin/activate)"

install: $(VENV)/.installed browser

# The explore page's browser tests drive Debian's chromium through chromium-driver; installed where missing (root or
# sudo needed; without them the browser tests skip, saying so).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver \
		|| echo "could not install chromium + chromium-driver: the browser tests will be skipped"; \
	else echo "no apt-get: install chromium and its chromedriver to run the browser tests"; fi

demo: install
	$(VENV)/bin/python -m pipelines.embed model=tiny
	$(VENV)/bin/python -m pipelines.validate model=tiny

test: install
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) outputs
