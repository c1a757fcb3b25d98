// The Python module: binds the functions cpu_ops.h declares. The only source that includes torch's pybind11
// headers (the slowest to compile), so the kernel sources build beside it in parallel.

#include <torch/csrc/utils/pybind.h>

#include "cpu_ops.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // cpu_attention.cpp
  m.def("bf16_attention", &bf16_attention, "whether this build has causal_attention (AVX-512 BF16)");
  m.def("causal_attention", &causal_attention, "causal attention with bf16 operands, fp32 out; queries from `start`",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scaling"), py::arg("start") = 0);

  // cpu_kernels.cpp
  m.def("sparse_attention", &sparse_attention, "attention over selected rows", py::arg("q"), py::arg("k_buf"),
        py::arg("v_buf"), py::arg("idx"), py::arg("count"), py::arg("scaling"), py::arg("k_scale") = py::none(),
        py::arg("v_scale") = py::none());
  m.def("encode_nearest", &encode_nearest, "nearest centroid (argmax of z.t - half) -> int16 codes");

  // cpu_kmeans.cpp
  m.def("kmeans_pp_picks", &kmeans_pp_picks, "k-means++ seeding: the sample index of each of k picks per point set");
  m.def("kmeans_nearest", &kmeans_nearest, "k-means assignment over every centroid: first argmax of x.c - half");
  m.def("kmeans_nearest_among", &kmeans_nearest_among, "k-means assignment among each point's candidate centroids");

  // cpu_selection.cpp
  m.def("score", &score, "LUT scores (B, Hkv*G, n)");
  m.def("score_select", &score_select, "LUT scoring + union top-K selection -> (idx, count)");
  m.def("score_select_direct", &score_select_direct,
        "score_select's selection with only the entries in use computed from the centroids -> (idx, count)",
        py::arg("q"), py::arg("centroids"), py::arg("bands"), py::arg("group_max"), py::arg("codes"), py::arg("offsets"),
        py::arg("valid"), py::arg("k"), py::arg("sinks"), py::arg("window"));
  m.def("huge_page_copy", &huge_page_copy, "a copy in memory advised as huge pages (fewer TLB misses for scattered reads)");
  m.def("tile_centroids", &tile_centroids, "centroids (H, C, d) -> tiles (H, ceil(C/16), d, 16)");
  m.def("lookup_tables", &lookup_tables, "q . centroids^T from tiles -> (B, H, R, C), or its max over groups",
        py::arg("q"), py::arg("tiles"), py::arg("C"), py::arg("groups") = 1);

  // cpu_linear.cpp; after the weights: a decode layer's glue, fused (see prologue and epilogue there)
  const auto bias = py::arg("bias") = py::none(), norm = py::arg("norm") = py::none(), eps = py::arg("eps") = 1e-6,
             gated = py::arg("gated") = false, residual = py::arg("residual") = py::none();
  m.def("linear_bf16w", &linear_bf16w, "x @ w.T (+ bias) with bf16 weights, fp32 math", py::arg("x"), py::arg("w"),
        bias, norm, eps, gated, residual);
  m.def("linear_int8w", &linear_int8w,
        "x @ w.T (+ bias) with int8 weights (a scale per output row), x quantized in blocks of 32: integer dots",
        py::arg("x"), py::arg("w"), py::arg("scale"), bias, norm, eps, gated, residual);
  m.def("int8_tiles", &int8_tiles, "whether this build has linear_int8w_tiles (AVX-512 VNNI)");
  m.def("linear_int8w_tiles", &linear_int8w_tiles,
        "linear_int8w with the weights in tiles of 16 output rows (weights.tiles): 16 rows per dpbusd",
        py::arg("x"), py::arg("tiles"), py::arg("scale"), py::arg("O"), bias, norm, eps, gated, residual);
  m.def("linear_int4w", &linear_int4w,
        "x @ w.T (+ bias) with 4-bit weights in groups of 32 (scale, min), x quantized in blocks of 32: integer dots",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("mins"), bias, norm, eps, gated, residual);
  m.def("prepare_activations", &prepare_activations,
        "the rows the linear kernels multiply: x, x RMS-normalized by `norm`, or silu(gate) * up (`gated`)",
        py::arg("x"), norm, eps, gated);
  m.def("quantize_activations", &quantize_activations,
        "x (M, I) float32 -> (int8 (M, I), float32 scales (M, ceil(I / 32))): the int kernels' activation blocks");

  // cpu_decode.cpp
  m.def("rope", &rope, "x * cos + roll(x) * signed_sin on the first rot dims (RoPE as the lean model applies it)");
  m.def("store_rows", &store_rows, "a decode step's new K and V rows into a layer's cache (float32 or bf16 rows)");
}
