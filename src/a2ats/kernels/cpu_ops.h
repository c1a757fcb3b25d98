// The extension's functions, declared once: every kernel source includes this (so a definition that drifts from
// its declaration fails to compile), and cpu_module.cpp binds them to Python. Kept apart from the bindings so the
// kernel sources compile against ATen's tensor header alone: torch/extension.h costs ~20 s a source file.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

// cpu_attention.cpp: the dense passes' causal attention in bf16
bool bf16_attention();
at::Tensor causal_attention(at::Tensor q, at::Tensor k, at::Tensor v, double scaling, int64_t start);

// cpu_kernels.cpp: attention over the selection, key encoding
at::Tensor sparse_attention(at::Tensor q, at::Tensor k_buf, at::Tensor v_buf, at::Tensor idx, at::Tensor count,
                            double scaling, std::optional<at::Tensor> k_scale, std::optional<at::Tensor> v_scale);
at::Tensor encode_nearest(at::Tensor z, at::Tensor t, at::Tensor half);

// cpu_kmeans.cpp: calibration's k-means (seeding, the assignment over every centroid, among candidates)
at::Tensor kmeans_pp_picks(at::Tensor pts, at::Tensor first, at::Tensor u);
at::Tensor kmeans_nearest(at::Tensor x, at::Tensor cents, at::Tensor half);
at::Tensor kmeans_nearest_among(at::Tensor pts, at::Tensor cents, at::Tensor half, at::Tensor cand, at::Tensor cur);

// cpu_selection.cpp: scoring and top-K selection
at::Tensor score(at::Tensor lut, at::Tensor codes, std::optional<at::Tensor> offsets);
std::vector<at::Tensor> score_select(at::Tensor lut, at::Tensor codes, std::optional<at::Tensor> offsets,
                                     at::Tensor valid, at::Tensor k, int64_t sinks, int64_t window);
std::vector<at::Tensor> score_select_direct(at::Tensor q, at::Tensor centroids, int64_t bands, bool group_max,
                                            at::Tensor codes, std::optional<at::Tensor> offsets, at::Tensor valid,
                                            at::Tensor k, int64_t sinks, int64_t window);
at::Tensor huge_page_copy(at::Tensor src);
at::Tensor tile_centroids(at::Tensor cent);
at::Tensor lookup_tables(at::Tensor q, at::Tensor tiles, int64_t C, int64_t groups);

// cpu_linear.cpp: quantized-weight projections
at::Tensor linear_bf16w(at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias, std::optional<at::Tensor> norm,
                        double eps, bool gated, std::optional<at::Tensor> residual);
at::Tensor linear_int8w(at::Tensor x, at::Tensor w, at::Tensor scale, std::optional<at::Tensor> bias,
                        std::optional<at::Tensor> norm, double eps, bool gated, std::optional<at::Tensor> residual);
bool int8_tiles();
at::Tensor linear_int8w_tiles(at::Tensor x, at::Tensor tiles, at::Tensor scale, int64_t O, std::optional<at::Tensor> bias,
                              std::optional<at::Tensor> norm, double eps, bool gated,
                              std::optional<at::Tensor> residual);
at::Tensor linear_int4w(at::Tensor x, at::Tensor w, at::Tensor scale, at::Tensor mins, std::optional<at::Tensor> bias,
                        std::optional<at::Tensor> norm, double eps, bool gated, std::optional<at::Tensor> residual);
at::Tensor prepare_activations(at::Tensor x, std::optional<at::Tensor> norm, double eps, bool gated);
std::vector<at::Tensor> quantize_activations(at::Tensor x);

// cpu_decode.cpp: a decode layer's glue
at::Tensor rope(at::Tensor x, at::Tensor cos, at::Tensor signed_sin);
void store_rows(at::Tensor k_dst, at::Tensor v_dst, at::Tensor flat, at::Tensor k, at::Tensor v);
