// Python bindings for the decode step's per-call work on CPU: argument checks and the decode kernels' calls.
//
// A decode step calls an append and an attention op once per layer. In Python their checks read ~30 tensor
// attributes (~0.2 us each) and a ctypes call converts 13 to 24 arguments: ~20 us per call, more than the
// work of a small append. Here the same checks read the tensors' C++ metadata (nanoseconds) and the kernels
// are called directly. This file is a CPython extension module built against the installed PyTorch's headers
// (kvkernels/cpu/native.py: bindings()); it holds no kernels. The kernels (decode.cpp) live in the ctypes
// library, whose function addresses native.py passes in with set_kernels. The Python wrappers in native.py
// turn the kernels' error codes into exceptions, for both call paths.
//
// Each *_accepts function must return exactly what its Python twin in kvkernels/_validate.py returns
// (tests/test_ops.py runs both on the same valid and invalid arguments).
#include <Python.h>

#include <cstdint>

#include <optional>
#include <utility>

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

// The kernels of decode.cpp (signatures and contracts there).
using AppendKernel = int (*)(char*, char*, int64_t, int64_t, int64_t, int64_t, const int64_t*, int32_t*,
                             const int32_t*, int64_t, const char*, const char*, int64_t);
using RaggedDecodeKernel = int (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t,
                                   const int64_t*, const int32_t*, int64_t, int64_t, int64_t, float, float*, float*,
                                   int);
using QuantDecodeKernel = int (*)(const float*, const int32_t*, const float*, const float*, const int32_t*,
                                  const float*, const float*, const float*, const float*, int64_t, const int64_t*,
                                  const int32_t*, const int32_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                                  int64_t, int64_t, float, float*, float*, int);
using QuantAppendKernel = int (*)(char*, char*, int64_t, int64_t, const int64_t*, int32_t*, const int32_t*, int32_t*,
                                  int32_t*, const int32_t*, int64_t, const char*, const char*, int64_t, int64_t,
                                  int64_t, int, int32_t*, float*, float*, int32_t*, float*, float*, int64_t, int64_t);
AppendKernel append_kernel = nullptr;
RaggedDecodeKernel ragged_decode_kernel = nullptr;
QuantDecodeKernel quant_decode_kernel = nullptr;
QuantAppendKernel quant_append_kernel = nullptr;

bool kernels_set(const char* name) {
  if (append_kernel && ragged_decode_kernel && quant_decode_kernel && quant_append_kernel) return true;
  PyErr_Format(PyExc_RuntimeError, "%s: set_kernels was not called", name);
  return false;
}

// type(obj) is torch.Tensor (a subclass, a Parameter included, is not: it may need the dispatcher).
bool plain_tensor(PyObject* obj) { return Py_TYPE(obj) == reinterpret_cast<PyTypeObject*>(THPVariableClass); }

const at::Tensor& unpack(PyObject* obj) { return THPVariable_Unpack(obj); }

// type(obj) is int (not a bool): its value in *value and *overflow -1 / +1 when it lies below / above int64.
bool exact_int_value(PyObject* obj, int64_t* value, int* overflow) {
  if (!PyLong_CheckExact(obj)) return false;
  *value = PyLong_AsLongLongAndOverflow(obj, overflow);  // cannot fail on an exact int
  return true;
}

// type(obj) is int, stored in *value; false for ints outside int64 (Python's check accepts them only to
// reject them by range later, as here).
bool exact_int(PyObject* obj, int64_t* value) {
  int overflow = 0;
  return exact_int_value(obj, value, &overflow) && overflow == 0;
}

// type(obj) is int and obj >= 0 (any size: a value past int64 is stored as INT64_MAX).
bool exact_nonnegative_int(PyObject* obj, int64_t* value) {
  int overflow = 0;
  if (!exact_int_value(obj, value, &overflow)) return false;
  if (overflow > 0) *value = INT64_MAX;
  return overflow >= 0 && *value >= 0;
}

bool one_of(PyObject* obj, std::initializer_list<int64_t> accepted, int64_t* value) {
  if (!exact_int(obj, value)) return false;
  for (int64_t a : accepted)
    if (*value == a) return true;
  return false;
}

bool float_dtype(c10::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; }

bool head_dim(int64_t d) { return d == 64 || d == 80 || d == 96 || d == 128 || d == 256; }

bool all_plain(PyObject* const* args, std::initializer_list<int> which) {
  for (int i : which)
    if (!plain_tensor(args[i])) return false;
  return true;
}

// _validate._append_ok: k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new.
bool append_ok(PyObject* const* args) {
  int64_t layer = 0;
  if (!all_plain(args, {0, 1, 2, 3, 4, 6, 7}) || !exact_int(args[5], &layer)) return false;
  const at::Tensor &k_pool = unpack(args[0]), &v_pool = unpack(args[1]), &seg_start = unpack(args[2]),
                   &seg_len = unpack(args[3]), &seg_cap = unpack(args[4]), &k_new = unpack(args[6]),
                   &v_new = unpack(args[7]);
  const auto dt = k_pool.scalar_type();
  const auto dev = k_pool.device();
  if (k_pool.dim() != 2 || !float_dtype(dt) || v_pool.scalar_type() != dt || v_pool.sizes() != k_pool.sizes())
    return false;
  if (seg_start.dim() != 3 || seg_start.scalar_type() != at::kLong || seg_len.scalar_type() != at::kInt ||
      seg_cap.scalar_type() != at::kInt || seg_len.sizes() != seg_start.sizes() ||
      seg_cap.sizes() != seg_start.sizes())
    return false;
  if (layer < 0 || layer >= seg_start.size(0)) return false;
  if (k_new.scalar_type() != dt || v_new.scalar_type() != dt || k_new.dim() != 4 ||
      k_new.size(0) != seg_start.size(1) || k_new.size(1) != seg_start.size(2) || k_new.size(3) != k_pool.size(1) ||
      v_new.sizes() != k_new.sizes())
    return false;
  return v_pool.device() == dev && seg_start.device() == dev && seg_len.device() == dev &&
         seg_cap.device() == dev && k_new.device() == dev && v_new.device() == dev;
}

// _validate._attention_ok: q, k_pool, v_pool, seg_start, seg_len.
bool attention_ok(PyObject* const* args) {
  if (!all_plain(args, {0, 1, 2, 3, 4})) return false;
  const at::Tensor &q = unpack(args[0]), &k_pool = unpack(args[1]), &v_pool = unpack(args[2]),
                   &seg_start = unpack(args[3]), &seg_len = unpack(args[4]);
  const auto dt = q.scalar_type();
  const auto dev = q.device();
  if (q.dim() != 4 || !float_dtype(dt) || !head_dim(q.size(3)) || q.size(2) < 1) return false;
  if (k_pool.dim() != 2 || k_pool.scalar_type() != dt || v_pool.scalar_type() != dt ||
      k_pool.size(1) != q.size(3) || v_pool.sizes() != k_pool.sizes())
    return false;
  if (seg_start.dim() != 2 || seg_start.scalar_type() != at::kLong || seg_len.scalar_type() != at::kInt ||
      seg_start.size(0) != q.size(0) || seg_len.sizes() != seg_start.sizes() || seg_start.size(1) <= 0 ||
      q.size(1) % seg_start.size(1) != 0)
    return false;
  return k_pool.device() == dev && v_pool.device() == dev && seg_start.device() == dev && seg_len.device() == dev;
}

bool sizes_are(const at::Tensor& t, std::initializer_list<int64_t> expected) {
  return t.sizes() == c10::IntArrayRef(expected);
}

// _validate._quant_buffers_ok: args[0..7] = k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail.
bool quant_buffers_ok(PyObject* const* args, PyObject* bits_obj, PyObject* gs_obj, int64_t tail_dims) {
  int64_t bits = 0, gs = 0;
  if (!all_plain(args, {0, 1, 2, 3, 4, 5, 6, 7}) || !one_of(bits_obj, {2, 4}, &bits) ||
      !one_of(gs_obj, {32, 64, 128}, &gs))
    return false;
  const at::Tensor &k_codes = unpack(args[0]), &k_scale = unpack(args[1]), &k_zero = unpack(args[2]),
                   &v_codes = unpack(args[3]), &v_scale = unpack(args[4]), &v_zero = unpack(args[5]),
                   &k_tail = unpack(args[6]), &v_tail = unpack(args[7]);
  const auto dt = k_tail.scalar_type();
  const auto dev = k_tail.device();
  if (k_tail.dim() != tail_dims || !float_dtype(dt) || v_tail.scalar_type() != dt ||
      v_tail.sizes() != k_tail.sizes() || !head_dim(k_tail.size(-1)) || v_codes.dim() != 2)
    return false;
  const int64_t D = k_tail.size(-1), F = 32 / bits, Q = v_codes.size(0);
  return Q % gs == 0 && v_codes.scalar_type() == at::kInt && k_codes.scalar_type() == at::kInt &&
         sizes_are(v_codes, {Q, D / F}) && sizes_are(k_codes, {Q / F, D}) && k_scale.scalar_type() == dt &&
         k_zero.scalar_type() == dt && v_scale.scalar_type() == dt && v_zero.scalar_type() == dt &&
         sizes_are(k_scale, {Q / gs, D}) && sizes_are(k_zero, {Q / gs, D}) && sizes_are(v_scale, {Q, D / gs}) &&
         sizes_are(v_zero, {Q, D / gs}) && k_codes.device() == dev && k_scale.device() == dev &&
         k_zero.device() == dev && v_codes.device() == dev && v_scale.device() == dev && v_zero.device() == dev &&
         v_tail.device() == dev;
}

// _validate._tables_ok: args[0] int64, the others int32, all of shape `table` on `dev`.
bool tables_ok(c10::IntArrayRef table, const c10::Device& dev, PyObject* const* args, int count) {
  for (int i = 0; i < count; ++i) {
    if (!plain_tensor(args[i])) return false;
    const at::Tensor& t = unpack(args[i]);
    if (t.scalar_type() != (i == 0 ? at::kLong : at::kInt) || t.sizes() != table || t.device() != dev) return false;
  }
  return true;
}

// _validate._quant_append_ok: the 20 arguments of quant_pool_append before flush_after.
bool quant_append_ok(PyObject* const* args) {
  int64_t residual = 0, layer = 0;
  if (!quant_buffers_ok(args, args[17], args[18], 5) || !exact_nonnegative_int(args[19], &residual) ||
      !all_plain(args, {15, 16}))
    return false;
  const at::Tensor &k_tail = unpack(args[6]), &k_new = unpack(args[15]), &v_new = unpack(args[16]);
  const int64_t L = k_tail.size(0), B = k_tail.size(1), H = k_tail.size(2), D = k_tail.size(4);
  const int64_t gs = PyLong_AsLongLong(args[18]);
  const auto dt = k_tail.scalar_type();
  const auto dev = k_tail.device();
  const int64_t table[3] = {L, B, H};
  return D % gs == 0 && exact_int(args[14], &layer) && layer >= 0 && layer < L &&
         tables_ok(c10::IntArrayRef(table, 3), dev, args + 8, 6) && k_new.scalar_type() == dt &&
         v_new.scalar_type() == dt && k_new.dim() == 4 && k_new.size(0) == B && k_new.size(1) == H &&
         k_new.size(3) == D && v_new.sizes() == k_new.sizes() && k_new.device() == dev && v_new.device() == dev;
}

// _validate._quant_attention_ok: q, the 8 buffers, q_start, q_len, t_head, seg_len, bits, group_size.
bool quant_attention_ok(PyObject* const* args) {
  if (!plain_tensor(args[0]) || unpack(args[0]).dim() != 4 || !quant_buffers_ok(args + 1, args[13], args[14], 4))
    return false;
  const at::Tensor &q = unpack(args[0]), &k_tail = unpack(args[7]);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3), H = k_tail.size(1);
  const auto dev = k_tail.device();
  const int64_t table[2] = {B, H};
  return q.scalar_type() == k_tail.scalar_type() && D == k_tail.size(3) && Lq >= 1 && k_tail.size(0) == B &&
         H > 0 && Hq % H == 0 && q.device() == dev && tables_ok(c10::IntArrayRef(table, 2), dev, args + 9, 4);
}

bool scale_and_lse_ok(PyObject* const* args, Py_ssize_t n, Py_ssize_t first) {
  const bool scale_ok = n <= first || args[first] == Py_None || PyFloat_CheckExact(args[first]);
  return scale_ok && (n <= first + 1 || PyBool_Check(args[first + 1]));
}

// _validate.meta_or_autograd, for arguments an *_ok check accepted (args[0] a tensor on every tensor's device):
// meta tensors (the dispatcher runs the fake kernel for them) or, with grad mode on, a tensor that requires grad.
bool meta_or_autograd(PyObject* const* args, Py_ssize_t n) {
  if (unpack(args[0]).is_meta()) return true;
  if (!at::GradMode::is_enabled()) return false;
  for (Py_ssize_t i = 0; i < n; ++i)
    if (plain_tensor(args[i]) && unpack(args[i]).requires_grad()) return true;
  return false;
}

PyObject* as_bool(bool b) {
  if (b) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

bool arg_count(const char* name, Py_ssize_t n, Py_ssize_t lo, Py_ssize_t hi) {
  if (n >= lo && n <= hi) return true;
  PyErr_Format(PyExc_TypeError, "%s takes %zd to %zd arguments, got %zd", name, lo, hi, n);
  return false;
}

// ragged_append_accepts(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new) -> bool
PyObject* ragged_append_accepts(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (n != 8) Py_RETURN_FALSE;  // the dispatcher raises its schema error
  return as_bool(append_ok(args) && !meta_or_autograd(args, n));
}

// ragged_attention_accepts(q, k_pool, v_pool, seg_start, seg_len, sm_scale=None, return_lse=False) -> bool
PyObject* ragged_attention_accepts(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (n < 5 || n > 7) Py_RETURN_FALSE;  // the dispatcher raises its schema error
  return as_bool(scale_and_lse_ok(args, n, 5) && attention_ok(args) && !meta_or_autograd(args, n));
}

// ragged_append(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new) -> int, on arguments that
// ragged_append_accepts takes, CPU tensors: 0 when appended; 1 + s when segment s lacks room or lies outside
// the pool (nothing written); -1 when the layout is not the kernel's (a pool's channel stride is not 1, a
// table is not contiguous) or the arguments are not accepted: the caller takes its general path. New rows
// that are not contiguous are copied first.
PyObject* ragged_append(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (!arg_count("ragged_append", n, 8, 8) || !kernels_set("ragged_append")) return nullptr;
  if (!append_ok(args) || !unpack(args[0]).is_cpu()) return PyLong_FromLong(-1);
  const at::Tensor &k_pool = unpack(args[0]), &v_pool = unpack(args[1]), &seg_start = unpack(args[2]),
                   &seg_len = unpack(args[3]), &seg_cap = unpack(args[4]);
  if (k_pool.stride(1) != 1 || v_pool.stride(1) != 1 || !seg_start.is_contiguous() || !seg_len.is_contiguous() ||
      !seg_cap.is_contiguous())
    return PyLong_FromLong(-1);
  const at::Tensor k_rows = unpack(args[6]).contiguous(), v_rows = unpack(args[7]).contiguous();  // no copy if so
  const int64_t layer = PyLong_AsLongLong(args[5]);
  const int64_t B = k_rows.size(0), H = k_rows.size(1), t = k_rows.size(2), D = k_rows.size(3);
  const int64_t size = k_pool.element_size(), first = layer * B * H;  // the layer's first table entry
  const int code = append_kernel(
      static_cast<char*>(k_pool.data_ptr()), static_cast<char*>(v_pool.data_ptr()), k_pool.size(0),
      k_pool.stride(0) * size, v_pool.stride(0) * size, D * size, seg_start.data_ptr<int64_t>() + first,
      seg_len.data_ptr<int32_t>() + first, seg_cap.data_ptr<int32_t>() + first, B * H,
      static_cast<const char*>(k_rows.data_ptr()), static_cast<const char*>(v_rows.data_ptr()), t);
  return PyLong_FromLong(code);
}

// quant_pool_append_accepts(k_codes, ..., residual, flush_after=False) -> bool
PyObject* quant_pool_append_accepts(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (n < 20 || n > 21) Py_RETURN_FALSE;  // the dispatcher raises its schema error
  return as_bool((n < 21 || PyBool_Check(args[20])) && quant_append_ok(args) && !meta_or_autograd(args, n));
}

// quant_pool_attention_accepts(q, ..., bits, group_size, sm_scale=None, return_lse=False) -> bool
PyObject* quant_pool_attention_accepts(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (n < 15 || n > 17) Py_RETURN_FALSE;  // the dispatcher raises its schema error
  return as_bool(scale_and_lse_ok(args, n, 15) && quant_attention_ok(args) && !meta_or_autograd(args, n));
}

PyObject* not_the_kernels_case(const char* name) {
  PyErr_Format(PyExc_ValueError, "%s: arguments the compiled kernel does not take (the caller checks first)", name);
  return nullptr;
}

// (o [B, Hq, 1, D], lse [B, Hq, 1] or None) allocated for a decode call of fp32 q [B, Hq, 1, D].
std::pair<at::Tensor, std::optional<at::Tensor>> decode_outputs(const at::Tensor& q, bool return_lse) {
  at::Tensor o = at::empty(q.sizes(), q.options());
  if (!return_lse) return {o, std::nullopt};
  return {o, at::empty({q.size(0), q.size(1), 1}, q.options())};
}

PyObject* code_and_outputs(int code, const at::Tensor& o, const std::optional<at::Tensor>& lse) {
  PyObject* lse_obj = lse ? THPVariable_Wrap(*lse) : (Py_INCREF(Py_None), Py_None);
  return Py_BuildValue("(iNN)", code, THPVariable_Wrap(o), lse_obj);
}

// ragged_decode(q, k_pool, v_pool, seg_start, seg_len, sm_scale, return_lse) -> (code, o, lse or None): the
// compiled decode kernel on accepted fp32 CPU arguments with Lq = 1 and pools of channel stride 1, with
// torch.get_num_threads() threads. code: the kernel's (0; 1 + s for segment s outside the pool; -1 no kernel
// for this head dim); o and lse are valid only when it is 0.
PyObject* ragged_decode(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (!arg_count("ragged_decode", n, 7, 7) || !kernels_set("ragged_decode")) return nullptr;
  if (!attention_ok(args) || !PyFloat_Check(args[5])) return not_the_kernels_case("ragged_decode");
  const at::Tensor &k_pool = unpack(args[1]), &v_pool = unpack(args[2]);
  const at::Tensor q = unpack(args[0]).contiguous(), seg_start = unpack(args[3]).contiguous(),
                   seg_len = unpack(args[4]).contiguous();
  if (!q.is_cpu() || q.scalar_type() != at::kFloat || q.size(2) != 1 || k_pool.stride(1) != 1 ||
      v_pool.stride(1) != 1)
    return not_the_kernels_case("ragged_decode");
  const bool return_lse = PyObject_IsTrue(args[6]);
  auto [o, lse] = decode_outputs(q, return_lse);
  const int64_t S = seg_start.numel();
  const int code = ragged_decode_kernel(
      q.data_ptr<float>(), k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), k_pool.size(0), k_pool.stride(0),
      v_pool.stride(0), seg_start.data_ptr<int64_t>(), seg_len.data_ptr<int32_t>(), S, q.size(1) * q.size(0) / S,
      q.size(3), static_cast<float>(PyFloat_AsDouble(args[5])), o.data_ptr<float>(),
      lse ? lse->data_ptr<float>() : nullptr, at::get_num_threads());
  return code_and_outputs(code, o, lse);
}

// quant_decode(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_tail, v_tail, q_start, q_len, t_head,
// seg_len, bits, group_size, sm_scale, return_lse) -> (code, o, lse or None): the compiled decode kernel over
// one layer of the quantized pool (rings [B, H, TC, D], tables [B, H]) on accepted fp32 CPU arguments with
// Lq = 1. code: the kernel's (0; 1 + s for segment s whose tables point outside the buffers; -1 no kernel for
// this head dim); o and lse are valid only when it is 0.
PyObject* quant_decode(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (!arg_count("quant_decode", n, 17, 17) || !kernels_set("quant_decode")) return nullptr;
  if (!quant_attention_ok(args) || !PyFloat_Check(args[15])) return not_the_kernels_case("quant_decode");
  at::Tensor t[13];
  for (int i = 0; i < 13; ++i) t[i] = unpack(args[i]).contiguous();
  const at::Tensor& q = t[0];
  if (!q.is_cpu() || q.scalar_type() != at::kFloat || q.size(2) != 1) return not_the_kernels_case("quant_decode");
  const int64_t bits = PyLong_AsLongLong(args[13]), gs = PyLong_AsLongLong(args[14]);
  const int64_t H = t[7].size(1), TC = t[7].size(2), D = q.size(3), Q = t[4].size(0);
  const bool return_lse = PyObject_IsTrue(args[16]);
  auto [o, lse] = decode_outputs(q, return_lse);
  const int code = quant_decode_kernel(
      q.data_ptr<float>(), t[1].data_ptr<int32_t>(), t[2].data_ptr<float>(), t[3].data_ptr<float>(),
      t[4].data_ptr<int32_t>(), t[5].data_ptr<float>(), t[6].data_ptr<float>(), t[7].data_ptr<float>(),
      t[8].data_ptr<float>(), Q, t[9].data_ptr<int64_t>(), t[10].data_ptr<int32_t>(), t[11].data_ptr<int32_t>(),
      t[12].data_ptr<int32_t>(), q.size(0) * H, q.size(1) / H, D, TC, bits, gs,
      static_cast<float>(PyFloat_AsDouble(args[15])), o.data_ptr<float>(), lse ? lse->data_ptr<float>() : nullptr,
      at::get_num_threads());
  return code_and_outputs(code, o, lse);
}

// quant_append(k_codes, ..., seg_cap, layer, k_new, v_new, bits, group_size, residual, flush_after) -> bool:
// native.quant_append's contract (True: appended, groups leaving the window quantized for fp32 rings in KIVI's
// order; False: nothing written, the caller runs the general path) on accepted CPU arguments.
PyObject* quant_append(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (!arg_count("quant_append", n, 21, 21) || !kernels_set("quant_append")) return nullptr;
  int64_t residual = 0;
  if (!quant_append_ok(args) || !unpack(args[6]).is_cpu() || !exact_nonnegative_int(args[19], &residual) ||
      residual == INT64_MAX)
    Py_RETURN_FALSE;
  for (int i = 6; i < 14; ++i)  // rings and tables: written in place, so no copies
    if (!unpack(args[i]).is_contiguous()) Py_RETURN_FALSE;
  const at::Tensor &k_tail = unpack(args[6]), &v_tail = unpack(args[7]);
  const at::Tensor k_new = unpack(args[15]).contiguous(), v_new = unpack(args[16]).contiguous();
  const int64_t layer = PyLong_AsLongLong(args[14]), bits = PyLong_AsLongLong(args[17]),
                gs = PyLong_AsLongLong(args[18]);
  const bool flush_after = PyObject_IsTrue(args[20]);
  const int64_t B = k_new.size(0), H = k_new.size(1), t = k_new.size(2), D = k_new.size(3), TC = k_tail.size(3);
  const int64_t size = k_tail.element_size(), first = layer * B * H;  // the layer's first table entry
  const int64_t ring = first * TC * D * size;
  bool flushable = !flush_after && k_tail.scalar_type() == at::kFloat;  // accepted: every buffer has its dtype
  for (int i = 0; i < 6; ++i) flushable = flushable && unpack(args[i]).is_contiguous();
  auto codes = [&](int i) { return flushable ? unpack(args[i]).data_ptr() : nullptr; };
  const int code = quant_append_kernel(
      static_cast<char*>(k_tail.data_ptr()) + ring, static_cast<char*>(v_tail.data_ptr()) + ring, TC, D * size,
      unpack(args[8]).data_ptr<int64_t>() + first, unpack(args[9]).data_ptr<int32_t>() + first,
      unpack(args[10]).data_ptr<int32_t>() + first, unpack(args[11]).data_ptr<int32_t>() + first,
      unpack(args[12]).data_ptr<int32_t>() + first, unpack(args[13]).data_ptr<int32_t>() + first, B * H,
      static_cast<const char*>(k_new.data_ptr()), static_cast<const char*>(v_new.data_ptr()), t, residual, gs,
      flush_after, static_cast<int32_t*>(codes(0)), static_cast<float*>(codes(1)), static_cast<float*>(codes(2)),
      static_cast<int32_t*>(codes(3)), static_cast<float*>(codes(4)), static_cast<float*>(codes(5)),
      unpack(args[3]).size(0), bits);
  return as_bool(code == 0);
}

// set_kernels(append, ragged_decode, quant_decode, quant_append): the ctypes library's function addresses.
PyObject* set_kernels(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (!arg_count("set_kernels", n, 4, 4)) return nullptr;
  void* p[4];
  for (int i = 0; i < 4; ++i) {
    p[i] = PyLong_AsVoidPtr(args[i]);
    if (p[i] == nullptr) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "set_kernels: null address");
      return nullptr;
    }
  }
  append_kernel = reinterpret_cast<AppendKernel>(p[0]);
  ragged_decode_kernel = reinterpret_cast<RaggedDecodeKernel>(p[1]);
  quant_decode_kernel = reinterpret_cast<QuantDecodeKernel>(p[2]);
  quant_append_kernel = reinterpret_cast<QuantAppendKernel>(p[3]);
  Py_RETURN_NONE;
}

template <typename F>
PyMethodDef fastcall(const char* name, F fn, const char* doc) {
  return {name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn)), METH_FASTCALL, doc};
}

PyMethodDef methods[] = {
    fastcall("ragged_append_accepts", ragged_append_accepts, "_validate.ragged_append_accepts in C++"),
    fastcall("ragged_attention_accepts", ragged_attention_accepts, "_validate.ragged_attention_accepts in C++"),
    fastcall("quant_pool_append_accepts", quant_pool_append_accepts, "_validate.quant_pool_append_accepts in C++"),
    fastcall("quant_pool_attention_accepts", quant_pool_attention_accepts,
             "_validate.quant_pool_attention_accepts in C++"),
    fastcall("ragged_append", ragged_append, "the compiled ragged append (see the comment in bindings.cpp)"),
    fastcall("ragged_decode", ragged_decode, "the compiled ragged decode (see the comment in bindings.cpp)"),
    fastcall("quant_decode", quant_decode, "the compiled quantized-pool decode (see the comment in bindings.cpp)"),
    fastcall("quant_append", quant_append, "the compiled quantized-pool append (see the comment in bindings.cpp)"),
    fastcall("set_kernels", set_kernels, "the ctypes library's kernel addresses"),
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "kvk_bindings", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_kvk_bindings() { return PyModule_Create(&module_def); }
