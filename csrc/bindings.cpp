// The one pybind11 module, devit_ext._C. No torch headers: tensors cross as raw
// data pointers (integers), sizes, element strides and dtype codes (dtype.h);
// CUDA streams as integers. Python (devit_ext/ops/quant.py) validates arguments
// first; the checks here only keep bad calls from reaching the kernels.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "dtype.h"
#include "quant.h"

#ifndef DEVIT_VERSION
#define DEVIT_VERSION "unknown"
#endif
#ifndef DEVIT_CUDA_ARCHS
#define DEVIT_CUDA_ARCHS ""
#endif
#ifndef DEVIT_CUDA_MODE
#define DEVIT_CUDA_MODE "unknown"
#endif
#ifndef DEVIT_CUDA_COMPILER
#define DEVIT_CUDA_COMPILER ""
#endif
#ifndef DEVIT_CXX_COMPILER
#define DEVIT_CXX_COMPILER ""
#endif

namespace py = pybind11;

#ifndef DEVIT_WITH_CUDA
// CPU-only build: the CUDA entry points exist and say so.
namespace devit {
bool cuda_compiled() { return false; }
[[noreturn]] static void no_cuda() {
  throw std::runtime_error("devit_ext._C was built without CUDA kernels (DEVIT_CUDA=0 or no nvcc at build time)");
}
void quantize_int8_cuda(const void*, int, int64_t, int64_t, int64_t, int64_t, int8_t*, float*, int, intptr_t) {
  no_cuda();
}
void dequantize_int8_cuda(const int8_t*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, void*, int, int,
                          intptr_t) {
  no_cuda();
}
void layernorm_quantize_int8_cuda(const void*, int, int64_t, int64_t, int64_t, int64_t, const void*, int, int64_t,
                                  const void*, int, int64_t, float, int8_t*, float*, int, intptr_t) {
  no_cuda();
}
}  // namespace devit
#endif

namespace {

using devit::valid_float_dtype;

void check_dtype(const char* name, int code) {
  if (!valid_float_dtype(code)) throw std::invalid_argument(std::string(name) + ": unknown dtype code " + std::to_string(code));
}

void check_rows(int64_t rows, int64_t cols) {
  if (rows < 0) throw std::invalid_argument("rows: expected >= 0, got " + std::to_string(rows));
  if (cols < 1) throw std::invalid_argument("cols: expected >= 1, got " + std::to_string(cols));
}

void check_ptr(const char* name, uintptr_t p, int64_t rows) {
  if (p == 0 && rows > 0) throw std::invalid_argument(std::string(name) + ": null pointer");
}

void check_eps(double eps) {
  if (!std::isfinite(eps) || eps < 0) throw std::invalid_argument("eps: expected a finite float >= 0");
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

py::list split_archs(const std::string& s) {
  py::list out;
  std::string cur;
  for (char c : s) {
    if (c == ',') {
      if (!cur.empty()) out.append(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.append(cur);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "devit_ext native kernels (torch-free C++/CUDA): int8 feature-transfer ops";
  using py::arg;
  auto nogil = py::call_guard<py::gil_scoped_release>();

  // ---- CPU ----
  m.def(
      "quantize_int8_cpu",
      [](uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t rs, int64_t cs, uintptr_t q, uintptr_t scale,
         int nthreads) {
        check_dtype("x", dtype);
        check_rows(rows, cols);
        check_ptr("x", x, rows);
        devit::quantize_int8_cpu(ptr<const void>(x), dtype, rows, cols, rs, cs, ptr<int8_t>(q), ptr<float>(scale),
                                 nthreads);
      },
      arg("x"), arg("dtype"), arg("rows"), arg("cols"), arg("row_stride"), arg("col_stride"), arg("q"),
      arg("scale"), arg("nthreads") = 0, nogil);

  m.def(
      "dequantize_int8_cpu",
      [](uintptr_t q, int64_t rows, int64_t cols, int64_t rs, int64_t cs, uintptr_t scale, int64_t ss, uintptr_t out,
         int out_dtype, int nthreads) {
        check_dtype("dtype", out_dtype);
        check_rows(rows, cols);
        check_ptr("q", q, rows);
        devit::dequantize_int8_cpu(ptr<const int8_t>(q), rows, cols, rs, cs, ptr<const float>(scale), ss,
                                   ptr<void>(out), out_dtype, nthreads);
      },
      arg("q"), arg("rows"), arg("cols"), arg("row_stride"), arg("col_stride"), arg("scale"), arg("scale_stride"),
      arg("out"), arg("out_dtype"), arg("nthreads") = 0, nogil);

  m.def(
      "layernorm_quantize_int8_cpu",
      [](uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t rs, int64_t cs, uintptr_t w, int wd, int64_t ws,
         uintptr_t b, int bd, int64_t bs, double eps, uintptr_t q, uintptr_t scale, int nthreads) {
        check_dtype("x", dtype);
        if (w) check_dtype("weight", wd);
        if (b) check_dtype("bias", bd);
        check_rows(rows, cols);
        check_ptr("x", x, rows);
        check_eps(eps);
        devit::layernorm_quantize_int8_cpu(ptr<const void>(x), dtype, rows, cols, rs, cs, ptr<const void>(w), wd, ws,
                                           ptr<const void>(b), bd, bs, static_cast<float>(eps), ptr<int8_t>(q),
                                           ptr<float>(scale), nthreads);
      },
      arg("x"), arg("dtype"), arg("rows"), arg("cols"), arg("row_stride"), arg("col_stride"), arg("weight"),
      arg("weight_dtype"), arg("weight_stride"), arg("bias"), arg("bias_dtype"), arg("bias_stride"), arg("eps"),
      arg("q"), arg("scale"), arg("nthreads") = 0, nogil);

  // ---- CUDA ----
  m.def(
      "quantize_int8_cuda",
      [](uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t rs, int64_t cs, uintptr_t q, uintptr_t scale,
         int device, intptr_t stream) {
        check_dtype("x", dtype);
        check_rows(rows, cols);
        check_ptr("x", x, rows);
        devit::quantize_int8_cuda(ptr<const void>(x), dtype, rows, cols, rs, cs, ptr<int8_t>(q), ptr<float>(scale),
                                  device, stream);
      },
      arg("x"), arg("dtype"), arg("rows"), arg("cols"), arg("row_stride"), arg("col_stride"), arg("q"),
      arg("scale"), arg("device"), arg("stream"), nogil);

  m.def(
      "dequantize_int8_cuda",
      [](uintptr_t q, int64_t rows, int64_t cols, int64_t rs, int64_t cs, uintptr_t scale, int64_t ss, uintptr_t out,
         int out_dtype, int device, intptr_t stream) {
        check_dtype("dtype", out_dtype);
        check_rows(rows, cols);
        check_ptr("q", q, rows);
        devit::dequantize_int8_cuda(ptr<const int8_t>(q), rows, cols, rs, cs, ptr<const float>(scale), ss,
                                    ptr<void>(out), out_dtype, device, stream);
      },
      arg("q"), arg("rows"), arg("cols"), arg("row_stride"), arg("col_stride"), arg("scale"), arg("scale_stride"),
      arg("out"), arg("out_dtype"), arg("device"), arg("stream"), nogil);

  m.def(
      "layernorm_quantize_int8_cuda",
      [](uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t rs, int64_t cs, uintptr_t w, int wd, int64_t ws,
         uintptr_t b, int bd, int64_t bs, double eps, uintptr_t q, uintptr_t scale, int device, intptr_t stream) {
        check_dtype("x", dtype);
        if (w) check_dtype("weight", wd);
        if (b) check_dtype("bias", bd);
        check_rows(rows, cols);
        check_ptr("x", x, rows);
        check_eps(eps);
        devit::layernorm_quantize_int8_cuda(ptr<const void>(x), dtype, rows, cols, rs, cs, ptr<const void>(w), wd,
                                            ws, ptr<const void>(b), bd, bs, static_cast<float>(eps), ptr<int8_t>(q),
                                            ptr<float>(scale), device, stream);
      },
      arg("x"), arg("dtype"), arg("rows"), arg("cols"), arg("row_stride"), arg("col_stride"), arg("weight"),
      arg("weight_dtype"), arg("weight_stride"), arg("bias"), arg("bias_dtype"), arg("bias_stride"), arg("eps"),
      arg("q"), arg("scale"), arg("device"), arg("stream"), nogil);

  // ---- build facts (read by devit_ext.build_info) ----
  m.def("cuda_compiled", &devit::cuda_compiled, "True when the CUDA kernels were compiled into this module");
  // everything else about the build is one dict: version, compilers, CUDA mode and archs, OpenMP
  m.def("build_config", [] {
    py::dict d;
    d["version"] = DEVIT_VERSION;
    d["cuda_mode"] = DEVIT_CUDA_MODE;
    d["cuda_compiler"] = DEVIT_CUDA_COMPILER;
    d["cxx_compiler"] = DEVIT_CXX_COMPILER;
    d["cuda_archs"] = split_archs(DEVIT_CUDA_ARCHS);
    d["cuda_compiled"] = devit::cuda_compiled();
#ifdef _OPENMP
    d["openmp"] = static_cast<int>(_OPENMP);
#else
    d["openmp"] = 0;
#endif
    return d;
  });
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = static_cast<int>(devit::kFloat32),
                                   py::arg("float16") = static_cast<int>(devit::kFloat16),
                                   py::arg("bfloat16") = static_cast<int>(devit::kBFloat16));
}
