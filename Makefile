# make demo: set up .venv, embed data/sample with the tiny model (offline) and validate it with 10-shot k-NN.  make test: the test suite.
PY ?= python3
VENV := .venv
EXTRAS ?= test,serve,ray

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c .ci/constraints.txt -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/python -m pipelines.embed model=tiny
	$(VENV)/bin/python -m pipelines.validate model=tiny

test: install
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) outputs
