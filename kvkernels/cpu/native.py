"""The cpu backend's compiled kernels (``csrc/*.cpp``): built on first use, called via ctypes.

``csrc/decode.cpp`` holds the decode step's kernels (attention over the ragged and the quantized pool, and
their appends); KVzip's scoring has the attention of its reconstruction forward in ``csrc/attention.cpp``
and the max pass of its score in ``csrc/kvzip_score.cpp`` (both tiled in registers with ``csrc/vec.h``).
The sources are plain C++ with a C ABI (no PyTorch headers), so building them into one library takes the
system compiler a few seconds: ``c++ -O3 -march=native -fopenmp -shared`` (without ``-fopenmp`` if that
fails: one thread, same results). The library is cached under ``$KVKERNELS_CACHE_DIR`` (default
``~/.cache/kvkernels``) by a hash of the sources, the flags and the machine, and rebuilt only when one of
them changes. Kernels receive raw pointers: every caller passes contiguous tensors of the checked dtypes
(copying any that is not), and the kernels check every table entry against the buffer sizes before any
access (a bad table gives an error, never an out-of-bounds read or write).

The decode step's four kernels are also called from C++: ``csrc/bindings.cpp`` is a small CPython extension
module (no kernels in it) built on first use against the installed PyTorch's headers and Python's, which
checks the decode ops' arguments and calls the kernels (their addresses come from the ctypes library), for
a per-call cost of a few hundred nanoseconds instead of the ~20 us that Python attribute reads and ctypes
argument conversion cost. :func:`bindings` returns it, or None (then the Python checks and ctypes calls run).

``KVKERNELS_NATIVE=0`` turns the compiled kernels off (the eager PyTorch path runs instead, same results
within fp32 rounding). Without a working compiler the eager path runs too, after one warning that says
why. :func:`status` reports which path runs and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(CSRC / name for name in ("decode.cpp", "kvzip_score.cpp", "attention.cpp"))
HEADERS = (CSRC / "vec.h",)
BINDINGS = CSRC / "bindings.cpp"  # a CPython extension module, built separately (it needs PyTorch's headers)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")

_lock = threading.Lock()
_state: dict = {}  # "lib": ctypes.CDLL or None, "why": str


def enabled_by_env() -> bool:
    return os.environ.get("KVKERNELS_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    return Path(os.environ.get("KVKERNELS_CACHE_DIR", Path.home() / ".cache" / "kvkernels"))


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _build(cxx: str, flags: tuple[str, ...], sources: tuple[Path, ...] = SOURCES, headers: tuple[Path, ...] = HEADERS,
           stem: str = "kernels", libs: tuple[str, ...] = (), suffix: str = ".so", key_extra: str = "") -> Path:
    """Compile ``sources`` into the cache (atomically: a concurrent build writes its own file, then renames);
    ``libs`` go after the sources on the command line (link order)."""
    text = b"".join(path.read_bytes() for path in sources + headers)
    words = (cxx, *flags, *libs, platform.machine(), platform.node(), key_extra)
    key = hashlib.sha256(text + " ".join(words).encode())
    out_dir = _cache_dir() / "native"
    lib = out_dir / f"{stem}-{key.hexdigest()[:16]}{suffix}"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        result = subprocess.run([cxx, *flags, *map(str, sources), "-o", tmp, *libs], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load(cxx: str) -> ctypes.CDLL:
    """Build (or find in the cache) and load the kernels; a compiler without OpenMP gets a single-threaded build
    (the pragmas are then ignored: same results)."""
    try:
        path = _build(cxx, FLAGS)
    except RuntimeError:
        path = _build(cxx, tuple(f for f in FLAGS if f != "-fopenmp"))
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.kvk_ragged_decode_f32.argtypes = [p, p, p, i64, i64, i64, p, p, i64, i64, i64, f32, p, p, i32]
    lib.kvk_ragged_decode_f32.restype = i32
    lib.kvk_quant_decode_f32.argtypes = [p, p, p, p, p, p, p, p, p, i64, p, p, p, p, i64, i64, i64, i64, i64, i64,
                                         f32, p, p, i32]
    lib.kvk_quant_decode_f32.restype = i32
    lib.kvk_ragged_append.argtypes = [p, p, i64, i64, i64, i64, p, p, p, i64, p, p, i64]
    lib.kvk_ragged_append.restype = i32
    lib.kvk_quant_append.argtypes = [p, p, i64, i64, p, p, p, p, p, p, i64, p, p, i64, i64, i64, i32, p, p, p, p, p,
                                     p, i64, i64]
    lib.kvk_quant_append.restype = i32
    lib.kvk_score_max_f32.argtypes = [p, p, p, i64, i64, i64, i64, f32, p, i32]
    lib.kvk_score_max_f32.restype = i32
    lib.kvk_keys_per_tile.argtypes = []
    lib.kvk_keys_per_tile.restype = i64
    lib.kvk_reconstruction_attention_f32.argtypes = [p, p, i64, p, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64,
                                                     f32, p, p, i32]
    lib.kvk_reconstruction_attention_f32.restype = i32


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, building them on first call; None if turned off or if the build failed."""
    state = _state
    if "lib" in state:
        return state["lib"]
    with _lock:
        if "lib" in state:
            return state["lib"]
        lib, why = None, "turned off by KVKERNELS_NATIVE=0"
        if enabled_by_env():
            cxx = _compiler()
            if cxx is None:
                why = "no C++ compiler found (set CXX, or install g++)"
            else:
                try:
                    lib = _load(cxx)
                    why = f"built with {cxx} ({lib._name})"
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    lib, why = None, f"build failed: {exc}"
            if lib is None:
                warnings.warn(f"kvkernels: the cpu backend's compiled kernels are unavailable ({why}); "
                              "the decode step and KVzip scoring run the slower PyTorch path", RuntimeWarning,
                              stacklevel=2)
        state["why"] = why
        state["lib"] = lib
        return lib


def _bindings_build_args() -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(compile flags, libraries, extra cache key) of the bindings: the installed PyTorch's headers and
    libraries, this Python's headers, the C++ ABI PyTorch was built with."""
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    flags = ("-O2", "-shared", "-fPIC", "-std=c++20", "-w", f"-I{include}", f"-I{include / 'torch/csrc/api/include'}",
             f"-I{sysconfig.get_paths()['include']}",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}")
    libs = (f"-L{lib}", "-ltorch_python", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}")
    return flags, libs, f"torch {torch.__version__} {sysconfig.get_config_var('EXT_SUFFIX')}"


def _load_bindings(cxx: str, lib: ctypes.CDLL):
    flags, libs, key = _bindings_build_args()
    path = _build(cxx, flags, (BINDINGS,), (), "bindings", libs, sysconfig.get_config_var("EXT_SUFFIX") or ".so",
                  key)
    spec = importlib.util.spec_from_file_location("kvk_bindings", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kernels = (lib.kvk_ragged_append, lib.kvk_ragged_decode_f32, lib.kvk_quant_decode_f32, lib.kvk_quant_append)
    module.set_kernels(*(ctypes.cast(k, ctypes.c_void_p).value for k in kernels))
    return module


def bindings():
    """The C++ bindings (``csrc/bindings.cpp``: the decode ops' argument checks and kernel calls), built on first
    call against the installed PyTorch, or None: compiled kernels off, or the build failed (e.g. no Python
    headers); the Python checks and ctypes calls then run, with the same results at a higher cost per call.
    Never warns (only the cost differs)."""
    state = _state
    if "bindings" in state:
        return state["bindings"]
    lib = library()
    with _lock:
        if "bindings" in state:
            return state["bindings"]
        module, why = None, "compiled kernels off"
        if lib is not None:
            cxx = _compiler()
            try:
                module = _load_bindings(cxx, lib)
                why = f"built with {cxx} against torch {torch.__version__}"
            except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as exc:
                why = f"build failed: {str(exc)[-300:]}"
        state["bindings"], state["bindings_why"] = module, why
        return module


def loaded_bindings():
    """The C++ bindings if a call on CPU tensors has built them already, else None; never builds (the ops' accept
    checks ask this, so that CUDA-only use never compiles the CPU kernels)."""
    return _state.get("bindings")


def status() -> str:
    """One line: whether the compiled kernels and their C++ bindings run, and why (builds them if not built
    yet)."""
    lib, checks = library(), bindings()
    return ("compiled kernels: " + ("on, " if lib is not None else "off, ") + _state["why"] + "; C++ bindings: "
            + ("on" if checks is not None else "off, " + _state["bindings_why"]))


def reset() -> None:
    """Forget the loaded state: the next call re-reads KVKERNELS_NATIVE and the compiler (tests)."""
    with _lock:
        _state.clear()


def compiler_available() -> bool:
    return _compiler() is not None


@contextlib.contextmanager
def forced(on: bool, checks: bool = True) -> Iterator[None]:
    """Within the block the compiled kernels are on (built if needed, whatever KVKERNELS_NATIVE says; raises
    if they cannot be built) or off (the eager path); with ``checks=False`` the C++ bindings are off
    (the Python checks and ctypes calls run). For tests and comparisons."""
    with _lock:
        saved = dict(_state)
    try:
        if on:
            cxx = _compiler()
            if cxx is None:
                raise RuntimeError("kvkernels: no C++ compiler found to build the compiled kernels")
            new = {"lib": _load(cxx), "why": f"forced on, built with {cxx}"}
            if checks:
                new.update(bindings=_load_bindings(cxx, new["lib"]), bindings_why="forced on")
        else:
            new = {"lib": None, "why": "forced off"}
        if not checks or not on:
            new.update(bindings=None, bindings_why="forced off")
        with _lock:
            _state.clear()
            _state.update(new)
        yield
    finally:
        with _lock:
            _state.clear()
            _state.update(saved)


class SegmentTableError(RuntimeError):
    """A segment table that points outside the buffers it indexes (found by a compiled kernel, nothing read)."""


def ragged_decode(lib, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, seg_start: torch.Tensor,
                  seg_len: torch.Tensor, sm_scale: float, return_lse: bool):
    """(o [B, Hq, 1, D], lse fp32 [B, Hq, 1] or None) of fp32 q [B, Hq, 1, D] over each KV head's segment of
    the pool (k_pool/v_pool fp32 [N, D] with channel stride 1; seg_start int64 / seg_len int32 [B, Hkv])."""
    cxx = bindings()
    if cxx is not None:
        code, o, lse = cxx.ragged_decode(q, k_pool, v_pool, seg_start, seg_len, sm_scale, return_lse)
    else:
        code, o, lse = _ragged_decode_ctypes(lib, q, k_pool, v_pool, seg_start, seg_len, sm_scale, return_lse)
    D = q.shape[3]
    if code < 0:
        raise ValueError(f"kvkernels.ragged_attention: no compiled decode kernel for head dim {D}")
    if code:
        s = code - 1
        start, n = int(seg_start.reshape(-1)[s]), int(seg_len.reshape(-1)[s])
        raise SegmentTableError(f"kvkernels.ragged_attention: segment {s} (start {start}, length {n}) lies outside "
                                f"the pool's {k_pool.shape[0]} rows")
    return o, lse


def _ragged_decode_ctypes(lib, q, k_pool, v_pool, seg_start, seg_len, sm_scale, return_lse):
    B, Hq, _, D = q.shape
    S = seg_start.numel()
    # Views and copies only where needed: this runs once per layer and token, its fixed cost is the point.
    q = q if q.is_contiguous() else q.contiguous()
    starts = seg_start if seg_start.is_contiguous() else seg_start.contiguous()
    lens = seg_len if seg_len.is_contiguous() else seg_len.contiguous()
    o = torch.empty(B, Hq, 1, D)
    lse = torch.empty(B, Hq, 1) if return_lse else None
    code = lib.kvk_ragged_decode_f32(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), k_pool.shape[0],
                                     k_pool.stride(0), v_pool.stride(0), starts.data_ptr(), lens.data_ptr(), S,
                                     Hq * B // S, D, sm_scale, o.data_ptr(), lse.data_ptr() if return_lse else None,
                                     torch.get_num_threads())
    return code, o, lse


def quant_decode(lib, q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, t_head,
                 seg_len, bits: int, group_size: int, sm_scale: float, return_lse: bool):
    """(o [B, Hq, 1, D], lse fp32 [B, Hq, 1] or None) of fp32 q [B, Hq, 1, D] over each segment of one layer
    of the quantized pool (buffers in the layouts of ``kvkernels.reference.quant_pool``; the layer's rings
    k_tail/v_tail [B, H, TC, D] and tables [B, H]); tensors that are not contiguous are copied first."""
    args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, t_head, seg_len)
    cxx = bindings()
    if cxx is not None:  # its checks (quant_attention_ok) hold the buffers to one row count Q
        code, o, lse = cxx.quant_decode(*args, bits, group_size, sm_scale, return_lse)
    else:
        code, o, lse = _quant_decode_ctypes(lib, args, bits, group_size, sm_scale, return_lse)
    if code < 0:
        raise ValueError(f"kvkernels.quant_pool_attention: no compiled decode kernel for head dim {q.shape[3]}")
    if code:
        s = code - 1
        start, nq, head, n = (int(t.reshape(-1)[s]) for t in (q_start, q_len, t_head, seg_len))
        raise SegmentTableError(
            f"kvkernels.quant_pool_attention: segment {s}'s tables (q_start {start}, q_len {nq}, t_head {head}, "
            f"seg_len {n}) point outside the pool's buffers ({v_codes.shape[0]} quantized rows, {k_tail.shape[2]} "
            f"ring slots)")
    return o, lse


def _quant_decode_ctypes(lib, args, bits: int, group_size: int, sm_scale: float, return_lse: bool):
    q, k_codes, k_scale, v_codes, k_tail = args[0], args[1], args[2], args[4], args[7]
    Q = _quantized_rows(k_codes, k_scale, v_codes, bits, group_size)
    if Q is None:  # the kernel bounds every access by Q: the buffers must agree on it
        raise ValueError("kvkernels.quant_pool_attention: the quantized buffers disagree on the row count")
    B, Hq, _, D = q.shape
    _, H, TC, _ = k_tail.shape
    tensors = [t if t.is_contiguous() else t.contiguous() for t in args]
    o = torch.empty(B, Hq, 1, D)
    lse = torch.empty(B, Hq, 1) if return_lse else None
    code = lib.kvk_quant_decode_f32(*(t.data_ptr() for t in tensors[:9]), Q,
                                    *(t.data_ptr() for t in tensors[9:]), B * H, Hq // H, D, TC, bits, group_size,
                                    sm_scale, o.data_ptr(), lse.data_ptr() if return_lse else None,
                                    torch.get_num_threads())
    return code, o, lse


def _quantized_rows(k_codes, k_scale, v_codes, bits: int, group_size: int) -> Optional[int]:
    """The quantized pool's row count Q (v_codes' rows), or None if k_codes / k_scale disagree with it: the
    kernels bound every access by Q and derive the other buffers' sizes from it."""
    Q = v_codes.shape[0]
    return Q if k_codes.shape[0] * (32 // bits) == Q and k_scale.shape[0] * group_size == Q else None


def ragged_append(lib, k_pool: torch.Tensor, v_pool: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
                  seg_cap: torch.Tensor, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> int:
    """Append k_new/v_new [B, H, t, D] after each segment's live rows of layer ``layer`` (tables [L, B, H];
    seg_len written in place), as bytes: 0; 1 + s for the first segment s without room or outside the pool
    (then nothing was written); -1 when the kernel does not take the layout (a pool's channel stride is not 1,
    a table is not contiguous: nothing written, the caller runs its general path)."""
    cxx = bindings()
    if cxx is not None:
        return cxx.ragged_append(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new)
    if not (k_pool.stride(1) == 1 and v_pool.stride(1) == 1 and seg_start.is_contiguous() and seg_len.is_contiguous()
            and seg_cap.is_contiguous()):
        return -1
    B, H, t, D = k_new.shape
    k_new = k_new if k_new.is_contiguous() else k_new.contiguous()
    v_new = v_new if v_new.is_contiguous() else v_new.contiguous()
    size, first = k_pool.element_size(), layer * B * H  # the layer's first table entry (no select ops)
    return lib.kvk_ragged_append(k_pool.data_ptr(), v_pool.data_ptr(), k_pool.shape[0], k_pool.stride(0) * size,
                                 v_pool.stride(0) * size, D * size, seg_start.data_ptr() + 8 * first,
                                 seg_len.data_ptr() + 4 * first, seg_cap.data_ptr() + 4 * first, B * H,
                                 k_new.data_ptr(), v_new.data_ptr(), t)


def quant_append(lib, bufs, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, bits: int, residual: int,
                 group_size: int, flush_after: bool) -> bool:
    """Append k_new/v_new [B, H, t, D] to layer ``layer`` of the quantized pool ``bufs`` (a ``QuantPool``'s
    buffers: rings [L, B, H, TC, D] and tables [L, B, H]; the tables written in place). Groups leaving the
    full-precision window are quantized too when the rings and scales are fp32 and ``flush_after`` is false.
    True if done; False if the general path must run (nothing was written): a call that flushes otherwise,
    or rings or tables that are not contiguous."""
    cxx = bindings()
    if cxx is not None:
        return cxx.quant_append(*bufs, layer, k_new, v_new, bits, group_size, residual, bool(flush_after))
    (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, q_cap, t_head, seg_len,
     seg_cap) = bufs
    if not all(x.is_contiguous() for x in (k_tail, v_tail, q_start, q_len, q_cap, t_head, seg_len, seg_cap)):
        return False
    B, H, t, D = k_new.shape
    k_new = k_new if k_new.is_contiguous() else k_new.contiguous()
    v_new = v_new if v_new.is_contiguous() else v_new.contiguous()
    TC, size, first = k_tail.shape[3], k_tail.element_size(), layer * B * H  # no select ops
    ring = first * TC * D * size
    Q = _quantized_rows(k_codes, k_scale, v_codes, bits, group_size)
    flushable = (not flush_after and Q is not None and k_tail.dtype == v_tail.dtype == torch.float32
                 and all(x.dtype == torch.float32 and x.is_contiguous() for x in (k_scale, k_zero, v_scale, v_zero))
                 and k_codes.is_contiguous() and v_codes.is_contiguous())
    codes = [x.data_ptr() if flushable else None for x in (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)]
    return lib.kvk_quant_append(k_tail.data_ptr() + ring, v_tail.data_ptr() + ring, TC, D * size,
                                q_start.data_ptr() + 8 * first, q_len.data_ptr() + 4 * first,
                                q_cap.data_ptr() + 4 * first, t_head.data_ptr() + 4 * first,
                                seg_len.data_ptr() + 4 * first, seg_cap.data_ptr() + 4 * first, B * H,
                                k_new.data_ptr(), v_new.data_ptr(), t, residual, group_size, int(flush_after), *codes,
                                Q or 0, bits) == 0


def _keys_transposed(lib, keys: torch.Tensor) -> torch.Tensor:
    """fp32 [S, D, M] copy of keys [S, n, D] with the keys along the last dim (the scoring kernels' vector
    lanes), zero-padded to M, the next multiple of their key tile."""
    S, n, D = keys.shape
    tile = lib.kvk_keys_per_tile()
    keys_t = torch.empty(S, D, -(-n // tile) * tile)
    keys_t[:, :, :n] = keys.transpose(1, 2)
    keys_t[:, :, n:] = 0
    return keys_t


def score_max(lib, q_rows: torch.Tensor, sm_scale: float, lse: torch.Tensor,
              keys: torch.Tensor) -> Optional[torch.Tensor]:
    """fp32 [S, m]: per key j of keys [S, m, D], max over the rows r of fp32 q_rows [S, R, D] of
    ``sm_scale * q_rows[r] . keys[j] - lse[r]`` (lse fp32 [S, R]); None for a head dim without a kernel.
    The keys are copied transposed (keys along the vector lanes), zero-padded to the kernel's key tile."""
    S, R, D = q_rows.shape
    m = keys.shape[1]
    q_rows = q_rows if q_rows.is_contiguous() else q_rows.contiguous()
    lse = lse if lse.is_contiguous() else lse.contiguous()
    keys_t = _keys_transposed(lib, keys)
    m_pad = keys_t.shape[2]
    out = torch.empty(S, m_pad)
    code = lib.kvk_score_max_f32(q_rows.data_ptr(), lse.data_ptr(), keys_t.data_ptr(), S, R, m_pad, D, sm_scale,
                                 out.data_ptr(), torch.get_num_threads())
    if code == -1:
        return None
    if code:
        raise RuntimeError(f"kvkernels: kvk_score_max_f32 rejected its shapes (code {code}): a bug")
    return out[:, :m].contiguous()  # the op returns a contiguous tensor (its fake kernel says so)


def reconstruction_attention(lib, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_context: int,
                             sm_scale: float, scored: Optional[tuple[int, int, int]]):
    """(o [B, Hq, Lq, D], lse over the scored keys fp32 [B, Hq, Lq] or None), or None for a head dim without
    a kernel: fp32 q over k/v [B, Hkv, n_context + Lq, D], every row seeing the context and its own keys
    causally (see ``context_then_causal_self``); ``scored = (sink_len, chunk_start, chunk_end)``.
    The keys are copied transposed (keys along the vector lanes), zero-padded to the kernel's key tile."""
    B, Hq, Lq, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    S, R = B * Hkv, (Hq // Hkv) * Lq
    q_rows = q.reshape(S, R, D)
    q_rows = q_rows if q_rows.is_contiguous() else q_rows.contiguous()
    keys_t = _keys_transposed(lib, k.reshape(S, n, D))
    values = v.reshape(S, n, D)
    if values.stride(2) != 1:
        values = values.contiguous()
    o = torch.empty(B, Hq, Lq, D)
    lse_scored = torch.empty(B, Hq, Lq) if scored is not None else None
    sink, start, end = scored if scored is not None else (0, 0, 0)
    code = lib.kvk_reconstruction_attention_f32(
        q_rows.data_ptr(), keys_t.data_ptr(), keys_t.shape[2], values.data_ptr(), values.stride(0), values.stride(1),
        S, R, D, n_context, Lq, sink, start, end, sm_scale, o.data_ptr(),
        lse_scored.data_ptr() if scored is not None else None, torch.get_num_threads())
    if code == -1:
        return None
    if code:
        raise RuntimeError(f"kvkernels: kvk_reconstruction_attention_f32 rejected its shapes (code {code}): a bug")
    return o, lse_scored
