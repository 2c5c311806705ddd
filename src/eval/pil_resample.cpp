// Pillow's 8-bit resampler (libImaging/Resample.c semantics, Pillow 9.x), written from its documented behaviour:
// per output pixel, filter taps at the pixel centre, support scaled by the downscale factor, weights normalised in
// double precision, then converted to signed 22-bit fixed point; accumulation in integers starting at one half, the
// result shifted down and clamped to uint8. Width pass first, its uint8 output feeds the height pass.
#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "stylealigned/error.h"
#include "stylealigned/eval/image_processor.h"

namespace stylealigned::eval {
namespace {

constexpr double kPi = 3.14159265358979323846;
// 32-bit accumulators, 8 bits of result, 2 bits of headroom for filters with negative lobes (Pillow's choice).
constexpr int kPrecisionBits = 32 - 8 - 2;

double box_filter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

double triangle_filter(double x) {
  x = std::abs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

double hamming_filter(double x) {
  x = std::abs(x);
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x *= kPi;
  // Pillow writes the window constants as float literals; keep them so the weights agree to the last bit.
  return std::sin(x) / x * (0.54f + 0.46f * std::cos(x));
}

double cubic_filter(double x) {  // Keys' cubic convolution with a = -0.5
  constexpr double a = -0.5;
  x = std::abs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

double sinc(double x) {
  if (x == 0.0) return 1.0;
  x *= kPi;
  return std::sin(x) / x;
}

double lanczos_filter(double x) { return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0; }

struct Filter {
  double (*fn)(double);
  double support;
};

Filter filter_of(Resample r) {
  switch (r) {
    case Resample::box:
      return {box_filter, 0.5};
    case Resample::bilinear:
      return {triangle_filter, 1.0};
    case Resample::hamming:
      return {hamming_filter, 1.0};
    case Resample::bicubic:
      return {cubic_filter, 2.0};
    case Resample::lanczos:
      return {lanczos_filter, 3.0};
    case Resample::nearest:
      break;
  }
  throw Error("resize: nearest has no filter kernel");
}

using FixedWeights = Eigen::Matrix<int32_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// The taps of one axis: output pixel i reads `count[i]` input pixels from `first[i]` with weights row i.
struct AxisTaps {
  std::vector<int64_t> first;
  std::vector<int64_t> count;
  FixedWeights weights;
};

AxisTaps axis_taps(int64_t in_size, int64_t out_size, const Filter& filter) {
  // Pillow computes the scale from float box coordinates; sizes below 2^24 are exact in float.
  const double scale = double(float(in_size)) / double(out_size);
  const double filter_scale = std::max(scale, 1.0);
  const double support = filter.support * filter_scale;
  const int64_t ksize = int64_t(std::ceil(support)) * 2 + 1;

  Eigen::MatrixXd w = Eigen::MatrixXd::Zero(out_size, ksize);
  AxisTaps taps;
  taps.first.resize(size_t(out_size));
  taps.count.resize(size_t(out_size));
  for (int64_t i = 0; i < out_size; ++i) {
    const double center = (double(i) + 0.5) * scale;
    const double inv = 1.0 / filter_scale;
    // Truncation toward zero, then clamping, as Pillow rounds the window ends.
    const int64_t lo = std::max<int64_t>(0, int64_t(center - support + 0.5));
    const int64_t hi = std::min<int64_t>(in_size, int64_t(center + support + 0.5));
    const int64_t n = std::max<int64_t>(0, hi - lo);
    double total = 0.0;  // summed in tap order, like Pillow, so the normalisation rounds identically
    for (int64_t k = 0; k < n; ++k) {
      const double v = filter.fn((double(k + lo) - center + 0.5) * inv);
      w(i, k) = v;
      total += v;
    }
    if (total != 0.0) w.row(i).head(n) /= total;
    taps.first[size_t(i)] = lo;
    taps.count[size_t(i)] = n;
  }
  const double one = double(int64_t{1} << kPrecisionBits);
  // Round half away from zero (truncating v * 2^22 -/+ 0.5), as Pillow converts its weights.
  taps.weights = w.unaryExpr([one](double v) { return static_cast<int32_t>(v < 0 ? -0.5 + v * one : 0.5 + v * one); });
  return taps;
}

inline uint8_t clip8(int64_t acc) {
  const int64_t v = acc >> kPrecisionBits;  // arithmetic shift: floor, as Pillow's table lookup
  return static_cast<uint8_t>(std::clamp<int64_t>(v, 0, 255));
}

// in: [rows, in_w, c] contiguous -> [rows, out_w, c]
at::Tensor horizontal_pass(const at::Tensor& in, const AxisTaps& taps, int64_t out_w) {
  const int64_t rows = in.size(0), in_w = in.size(1), c = in.size(2);
  at::Tensor out = at::empty({rows, out_w, c}, at::kByte);
  const uint8_t* src = in.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t y = 0; y < rows; ++y) {
    const uint8_t* row = src + y * in_w * c;
    for (int64_t x = 0; x < out_w; ++x) {
      const int32_t* k = taps.weights.row(x).data();
      const uint8_t* p = row + taps.first[size_t(x)] * c;
      for (int64_t ch = 0; ch < c; ++ch) {
        int64_t acc = int64_t{1} << (kPrecisionBits - 1);
        for (int64_t t = 0; t < taps.count[size_t(x)]; ++t) acc += int64_t(p[t * c + ch]) * k[t];
        dst[(y * out_w + x) * c + ch] = clip8(acc);
      }
    }
  }
  return out;
}

// in: [in_h, w, c] contiguous -> [out_h, w, c]
at::Tensor vertical_pass(const at::Tensor& in, const AxisTaps& taps, int64_t out_h) {
  const int64_t w = in.size(1), c = in.size(2), stride = w * c;
  at::Tensor out = at::empty({out_h, w, c}, at::kByte);
  const uint8_t* src = in.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t y = 0; y < out_h; ++y) {
    const int32_t* k = taps.weights.row(y).data();
    const uint8_t* base = src + taps.first[size_t(y)] * stride;
    const int64_t n = taps.count[size_t(y)];
    for (int64_t i = 0; i < stride; ++i) {
      int64_t acc = int64_t{1} << (kPrecisionBits - 1);
      for (int64_t t = 0; t < n; ++t) acc += int64_t(base[t * stride + i]) * k[t];
      dst[y * stride + i] = clip8(acc);
    }
  }
  return out;
}

// Pillow resizes with NEAREST through an affine scaling transform: the source coordinate of each output pixel centre
// is accumulated by repeated addition and truncated.
std::vector<int64_t> nearest_index(int64_t in_size, int64_t out_size) {
  const double step = double(float(in_size)) / double(out_size);
  std::vector<int64_t> index(static_cast<size_t>(out_size));
  double pos = step * 0.5;
  for (int64_t i = 0; i < out_size; ++i) {
    index[size_t(i)] = std::min<int64_t>(in_size - 1, pos < 0.0 ? 0 : int64_t(pos));
    pos += step;
  }
  return index;
}

at::Tensor resize_nearest(const at::Tensor& in, int64_t width, int64_t height) {
  const auto xs = nearest_index(in.size(1), width);
  const auto ys = nearest_index(in.size(0), height);
  return in.index_select(0, at::tensor(ys, at::kLong)).index_select(1, at::tensor(xs, at::kLong)).contiguous();
}

}  // namespace

const char* to_string(Resample filter) {
  switch (filter) {
    case Resample::nearest:
      return "nearest";
    case Resample::lanczos:
      return "lanczos";
    case Resample::bilinear:
      return "bilinear";
    case Resample::bicubic:
      return "bicubic";
    case Resample::box:
      return "box";
    case Resample::hamming:
      return "hamming";
  }
  return "unknown";
}

at::Tensor resize_like_pil(const at::Tensor& image, int64_t width, int64_t height, Resample filter) {
  if (!image.defined() || image.dim() != 3 || image.scalar_type() != at::kByte || image.size(0) < 1 ||
      image.size(1) < 1 || image.size(2) < 1 || image.size(2) > 4) {
    throw Error(fmt::format("resize: expected a uint8 [height, width, 1-4] image, got {} [{}]",
                            image.defined() ? c10::toString(image.scalar_type()) : "undefined",
                            image.defined() ? fmt::format("{}", fmt::join(image.sizes(), ", ")) : ""));
  }
  if (width < 1 || height < 1) {
    throw Error(fmt::format("resize: the output size must be positive, got {}x{} (width x height)", width, height));
  }
  at::Tensor in = image.to(at::kCPU).contiguous();
  const int64_t in_h = in.size(0), in_w = in.size(1);
  if (in_w == width && in_h == height) return in.clone();
  if (filter == Resample::nearest) return resize_nearest(in, width, height);

  const Filter f = filter_of(filter);
  at::Tensor out = in;
  if (in_h != height) {
    const AxisTaps vertical = axis_taps(in_h, height, f);
    if (in_w != width) {
      // Only the input rows the vertical pass reads go through the horizontal pass (as Pillow does).
      const int64_t first = vertical.first.front();
      const int64_t last = vertical.first.back() + vertical.count.back();
      AxisTaps shifted = vertical;
      for (auto& v : shifted.first) v -= first;
      out = horizontal_pass(in.narrow(0, first, last - first).contiguous(), axis_taps(in_w, width, f), width);
      return vertical_pass(out, shifted, height);
    }
    return vertical_pass(in, vertical, height);
  }
  return horizontal_pass(in, axis_taps(in_w, width, f), width);
}

}  // namespace stylealigned::eval
