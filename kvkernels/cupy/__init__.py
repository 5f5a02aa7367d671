"""CuPy RawKernels (CUDA C++ compiled at first use by NVRTC), for the ops where CUDA C++ does better.

Imported lazily by the dispatcher; CuPy itself is optional (``pip install kvkernels[cupy]``).
"""
