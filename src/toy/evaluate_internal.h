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
  float pattern_alt_share = 0; ///< mean fill coordinate (share of the second fill colour)
  float corr_stripes = 0;      ///< best normalised correlation with each pattern model over its phases
  float corr_checker = 0;
  float corr_dots = 0;
  float corr_gradient = 0;     ///< correlation with the row (top to bottom), 0 if negative
  float background_spread = 0; ///< std of the (smoothed) background coordinate away from the object
  float outline_share = 0;     ///< mean outline-colour share (alpha) along the silhouette's inner edge
  int interior_pixels = 0;
  int background_pixels = 0;
  at::Tensor mask;  ///< the cleaned object mask, bool [64, 64]
};

/// evaluate() plus its measurements.
Evaluation evaluate_measured(const at::Tensor& image, Measurements* out);

}  // namespace stylealigned::toy::detail
