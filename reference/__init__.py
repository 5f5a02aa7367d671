"""Pure-PyTorch references of every kvkernels op, installed as ``kvkernels.reference``.

One module per kernel family, named like its Triton module in ``kvkernels/triton/`` and its tests in
``tests/``. Each function takes exactly the arguments of its ``torch.ops.kvkernels`` op, computes in
fp32 and favours clarity over speed. They are the CPU kernels of the ops and the ground truth of every
test. Input validation happens before they are called (``kvkernels._validate``).
"""
