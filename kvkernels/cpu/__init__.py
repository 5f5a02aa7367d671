"""Kernels for CPU tensors, written for speed (the ``cpu`` backend; ``auto`` picks it for CPU tensors).

Module names follow the other backends (``kvkernels/triton/<family>.py``): each module defines functions
named after the ops it implements, with the same signatures as the references in ``kvkernels.reference``.
The references stay the ground truth: every kernel here is tested against them.
"""
