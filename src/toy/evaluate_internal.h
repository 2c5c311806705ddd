// Internal: the raw measurements behind toy::evaluate, for tests and threshold tuning.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

#include "stylealigned/toy/world.h"

namespace stylealigned::toy::detail {

struct Measurements {
  std::array<float, 8> palette_error{};  ///< mean clipped squared colour-model error per palette (lower = better)
  std::array<float, 8> object_iou{};     ///< best template IoU per object class
  float pattern_spread = 0;    ///< std of the (smoothed) fill coordinate inside the object
  float pattern_plane_r2 = 0;  ///< share of that variance a plane in (x, y) explains
  float pattern_coherence = 0; ///< orientation coherence of the fill coordinate's gradients
  float pattern_alt_share = 0; ///< mean fill coordinate (share of the second fill colour)
  float rho_stripes = 0;       ///< periodogram shares at the stripes', checker's and dots' fundamentals
  float rho_stripes_cross = 0; ///< (the stripes' frequency mirrored: the checker has both, stripes one)
  float rho_checker = 0;       ///< twice the smaller of the two diagonal fundamentals
  float rho_dots = 0;
  float background_spread = 0; ///< std of the (smoothed) background coordinate away from the object
  float outline_share = 0;     ///< mean outline-colour share (alpha) along the silhouette's inner edge
  int interior_pixels = 0;
  int background_pixels = 0;
  at::Tensor mask;  ///< the cleaned object mask, bool [64, 64]
};

/// evaluate() plus its measurements.
Evaluation evaluate_measured(const at::Tensor& image, Measurements* out);

}  // namespace stylealigned::toy::detail
