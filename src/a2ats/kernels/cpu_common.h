// Helpers shared by the CPU kernels' source files (one extension, several translation units).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace a2ats {

template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < d * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off, 0, 3);
}

inline float to_f(float x) { return x; }
inline float to_f(int8_t x) { return static_cast<float>(x); }  // int8 rows carry a scale per row
inline float to_f(c10::BFloat16 x) {
  // bf16 is the top half of an fp32: a shift, which vectorizes (c10's conversion may not).
  uint16_t raw;
  std::memcpy(&raw, &x, 2);
  uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace a2ats

// Each source file adds its functions to the module (cpu_kernels.cpp defines the module itself).
void register_selection(pybind11::module_& m);
void register_linear(pybind11::module_& m);
