// Python bindings for the decode step's per-call work on CPU: argument checks and the append kernel's call.
//
// A decode step calls ragged_append / ragged_attention once per layer. Their Python checks read ~30 tensor
// attributes (~0.2 us each) and the ctypes call converts a dozen arguments: ~20 us per call, more than the
// work of a small append. Here the same checks read the tensors' C++ metadata (nanoseconds) and the kernel
// is called directly. This file is a CPython extension module built against the installed PyTorch's headers
// (kvkernels/cpu/native.py: bindings()); it holds no kernels. The append kernel (decode.cpp) lives in the
// ctypes library, whose function address native.py passes in with set_append_kernel.
//
// Each *_accepts function must return exactly what its Python twin in kvkernels/_validate.py returns
// (tests/test_ops.py runs both on the same valid and invalid arguments).
#include <Python.h>

#include <cstdint>

#include <torch/csrc/autograd/python_variable.h>

namespace {

using AppendKernel = int (*)(char*, char*, int64_t, int64_t, int64_t, int64_t, const int64_t*, int32_t*,
                             const int32_t*, int64_t, const char*, const char*, int64_t);
AppendKernel append_kernel = nullptr;

// type(obj) is torch.Tensor (a subclass, a Parameter included, is not: it may need the dispatcher).
bool plain_tensor(PyObject* obj) { return Py_TYPE(obj) == reinterpret_cast<PyTypeObject*>(THPVariableClass); }

const at::Tensor& unpack(PyObject* obj) { return THPVariable_Unpack(obj); }

// type(obj) is int (not a bool), stored in *value; false for ints outside int64 (Python's check accepts them
// only to reject them by range later, as here).
bool exact_int(PyObject* obj, int64_t* value) {
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  *value = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0 || (*value == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  return true;
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
  if (!arg_count("ragged_append_accepts", n, 8, 8)) return nullptr;
  return as_bool(append_ok(args));
}

// ragged_attention_accepts(q, k_pool, v_pool, seg_start, seg_len, sm_scale=None, return_lse=False) -> bool
PyObject* ragged_attention_accepts(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (!arg_count("ragged_attention_accepts", n, 5, 7)) return nullptr;
  const bool scale_ok = n < 6 || args[5] == Py_None || PyFloat_CheckExact(args[5]);
  const bool lse_ok = n < 7 || PyBool_Check(args[6]);
  return as_bool(scale_ok && lse_ok && attention_ok(args));
}

// ragged_append(k_pool, v_pool, seg_start, seg_len, seg_cap, layer, k_new, v_new) -> int, on arguments that
// ragged_append_accepts takes, CPU tensors: 0 when appended; 1 + s when segment s lacks room or lies outside
// the pool (nothing written); -1 when the layout is not the kernel's (a pool's channel stride is not 1, a
// table is not contiguous) or the arguments are not accepted: the caller takes its general path. New rows
// that are not contiguous are copied first.
PyObject* ragged_append(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (!arg_count("ragged_append", n, 8, 8)) return nullptr;
  if (append_kernel == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "ragged_append: set_append_kernel was not called");
    return nullptr;
  }
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

// set_append_kernel(address: int): the ctypes library's kvk_ragged_append.
PyObject* set_append_kernel(PyObject*, PyObject* address) {
  void* p = PyLong_AsVoidPtr(address);
  if (p == nullptr) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "set_append_kernel: null address");
    return nullptr;
  }
  append_kernel = reinterpret_cast<AppendKernel>(p);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"ragged_append_accepts", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(ragged_append_accepts)),
     METH_FASTCALL, "kvkernels._validate.ragged_append_accepts in C++"},
    {"ragged_attention_accepts",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(ragged_attention_accepts)), METH_FASTCALL,
     "kvkernels._validate.ragged_attention_accepts in C++"},
    {"ragged_append", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(ragged_append)), METH_FASTCALL,
     "the compiled append on accepted CPU arguments: 0, 1 + segment without room, or -1 (general path)"},
    {"set_append_kernel", set_append_kernel, METH_O, "the address of the ctypes library's kvk_ragged_append"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "kvk_bindings", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_kvk_bindings() { return PyModule_Create(&module_def); }
