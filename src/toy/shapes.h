// Internal: the geometry shared by the renderer and the object evaluator (which matches silhouettes against
// templates drawn with the same inside test), and small deterministic random helpers.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <random>

#include "stylealigned/toy/world.h"

namespace stylealigned::toy::detail {

/// Width of the outline band, in pixels of a 64-pixel image (scaled with the resolution).
inline constexpr double kOutlineWidth64 = 2.5;
/// Pattern geometry in pixels of a 64-pixel image.
// Coarse enough that a pattern survives a factor-4 VAE and the blur of a small model's samples.
inline constexpr double kStripePeriod64 = 14.0;  // diagonal stripes, half of each colour
inline constexpr double kCheckerCell64 = 8.0;
inline constexpr double kDotSpacing64 = 12.0;
inline constexpr double kDotRadius64 = 3.3;  // about a quarter of the area

/// Whether local object coordinates (x right, y down, the bounding circle is the unit circle) lie inside `object`.
bool inside(Object object, double x, double y);

/// Uniform double in [0, 1) from the top 53 bits: the same numbers with every standard library (std::
/// distributions are implementation-defined).
inline double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }
inline int uniform_int(std::mt19937_64& rng, int n) {
  int v = static_cast<int>(uniform01(rng) * n);
  return v < n ? v : n - 1;
}
inline double uniform(std::mt19937_64& rng, double lo, double hi) { return lo + (hi - lo) * uniform01(rng); }

/// Erodes a float {0,1} mask [1, 1, H, W] (the evaluator's masks) by `radius` pixels with an octagonal element (alternating 3x3 square and
/// plus steps, close to a disc), treating outside the image as inside (so the image border does not erode).
at::Tensor erode(const at::Tensor& mask, int64_t radius);
/// Dilates the same way (outside the image counts as outside).
at::Tensor dilate(const at::Tensor& mask, int64_t radius);

}  // namespace stylealigned::toy::detail
