"""Triton kernels, one module per kernel family (named like its reference in ``kvkernels.reference``).

Each module exposes functions with exactly the signature of the matching reference function; the
dispatcher (``kvkernels._backend``) imports a module only when its backend is chosen, so ``import
kvkernels`` never imports Triton.
"""
