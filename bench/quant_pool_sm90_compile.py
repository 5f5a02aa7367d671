"""Compile the quant_pool Triton kernels for sm_90 without a GPU; print registers, stack (spills) and shared memory.

Run: ``TRITON_DEFAULT_FP_FUSION=1 python -m bench.quant_pool_sm90_compile`` (no GPU, no driver needed:
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, then ``cuobjdump --dump-resource-usage``
on the cubin). STACK is the per-thread local frame (register spills); LOCAL the spilled bytes reported.
"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from kvkernels.triton import quant_pool as qp

target = GPUTarget("cuda", 90, 32)

def show(name, kernel, signature, constexprs, num_warps=4, num_stages=2):
    sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    c = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
    md = c.metadata
    import subprocess, tempfile, re
    from triton.backends.nvidia.compiler import get_ptxas
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(c.asm["cubin"])
    out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                         text=True).stdout
    regs = re.search(r"REG:(\d+)", out).group(1)
    stack = re.search(r"STACK:(\d+)", out).group(1)
    spill = re.search(r"LOCAL:(\d+)", out).group(1)
    print(f"{name}: regs={regs} stack={stack} local(spill)={spill} B, shared={md.shared} B "
          f"(warps {num_warps}, stages {num_stages})")

def ptrs(names, dt):
    return {n: dt for n in names}

for DT, dtname in (("*bf16", "bf16"), ("*fp16", "fp16")):
    sig = {}
    a = qp._quant_chunks_kernel.arg_names
    types = {"q_ptr": DT, "kc_ptr": "*i32", "ks_ptr": DT, "kz_ptr": DT, "vc_ptr": "*i32", "vs_ptr": DT, "vz_ptr": DT,
             "kt_ptr": DT, "vt_ptr": DT, "q_start_ptr": "*i64", "q_len_ptr": "*i32", "t_head_ptr": "*i32",
             "seg_len_ptr": "*i32", "ws_o_ptr": "*fp32", "ws_lse_ptr": "*fp32", "item_off_ptr": "*i32",
             "qk_scale": "fp32"}
    for n in a:
        sig[n] = types.get(n, "i32")
    for D, G in ((128, 4), (64, 3)):
        for bn, w in ((32, 8), (64, 4)):  # the default (_GPU_DEFAULT), and the first default (spills)
            ce = dict(CHUNK=256, BLOCK_N=bn, BLOCK_M=16, BLOCK_D=D, BLOCK_S=8, NUM_S_BLOCKS=1, BITS=2, F=16, GROUP=32,
                      IS_FP32=False, DYNAMIC=True)
            show(f"_quant_chunks_kernel {dtname} D{D} G{G} 2-bit BLOCK_N={bn}", qp._quant_chunks_kernel, sig, ce,
                 num_warps=w)
    sig = {}
    types = {"kc_ptr": "*i32", "ks_ptr": DT, "kz_ptr": DT, "vc_ptr": "*i32", "vs_ptr": DT, "vz_ptr": DT,
             "kt_ptr": DT, "vt_ptr": DT, "q_start_ptr": "*i64", "q_len_ptr": "*i32", "t_head_ptr": "*i32",
             "seg_len_ptr": "*i32", "kn_ptr": DT, "vn_ptr": DT, "status_ptr": "*i32"}
    for n in qp._qp_append_kernel.arg_names:
        sig[n] = types.get(n, "i32")
    for D in (128, 64):
        ce = dict(GROUP=32, BITS=2, F=16, BLOCK_D=D, BLOCK_T=2, FLUSH_AFTER=False, DYNAMIC=True)
        show(f"_qp_append_kernel {dtname} D{D} 2-bit", qp._qp_append_kernel, sig, ce, num_stages=1)

print("--- variants of the attention kernel (bf16, G4)")
DT = "*bf16"
types = {"q_ptr": DT, "kc_ptr": "*i32", "ks_ptr": DT, "kz_ptr": DT, "vc_ptr": "*i32", "vs_ptr": DT, "vz_ptr": DT,
         "kt_ptr": DT, "vt_ptr": DT, "q_start_ptr": "*i64", "q_len_ptr": "*i32", "t_head_ptr": "*i32",
         "seg_len_ptr": "*i32", "ws_o_ptr": "*fp32", "ws_lse_ptr": "*fp32", "item_off_ptr": "*i32", "qk_scale": "fp32"}
sig = {n: types.get(n, "i32") for n in qp._quant_chunks_kernel.arg_names}
for D, bn, w, st, bits in ((64, 32, 8, 2, 2), (64, 64, 8, 2, 2), (128, 32, 8, 2, 4), (256, 32, 8, 2, 2), (256, 16, 8, 2, 2)):
    ce = dict(CHUNK=256, BLOCK_N=bn, BLOCK_M=16, BLOCK_D=D, BLOCK_S=8, NUM_S_BLOCKS=1, BITS=bits, F=32 // bits, GROUP=32,
              IS_FP32=False, DYNAMIC=True)
    show(f"_quant_chunks_kernel bf16 D{D} G4 {bits}-bit BLOCK_N={bn}", qp._quant_chunks_kernel, sig, ce, num_warps=w, num_stages=st)
