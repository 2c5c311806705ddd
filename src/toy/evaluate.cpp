// Evaluators of the toy world: exact image analysis against the world's own definitions (no learned weights).
//
// Order of the analysis, each step using the previous ones:
//   1. palette: the palette whose colour model explains the pixels best. A palette's model is three parts: the
//      background segment (background .. background_alt in RGB), the fill segment (fill .. fill_alt) and the outline
//      colour; a pixel's error is its distance to the nearest part (only the background segment for the image's
//      2-pixel frame, which is background in every render), clipped so the blurred edge pixels (mixtures no palette
//      models) weigh the same for every palette.
//   2. colour cast and object mask: the frame's median offset from the background segment is subtracted from the
//      image; then pixels nearer the fill segment or the outline colour than the background segment, the largest
//      4-connected component with its holes filled.
//   3. object: the silhouette, normalised for position (centroid) and scale (square root of the area), against
//      templates of every class at every 5 degrees drawn with the renderer's own inside test; best soft IoU wins.
//   4. outline: along the silhouette's inner 3-pixel edge, the mean share of the way each pixel has moved from the
//      nearest colour the palette can produce there without an outline (fill, background and their blends) towards
//      the outline colour.
//   5. pattern: the fill coordinate (position along the fill segment) inside the eroded mask: its spread after 3x3
//      smoothing (solid vs the rest), then the best of each periodic pattern's normalised correlation, maximised
//      over the pattern's phase (stripes, checker, dots), and the correlation with the row (gradient).
//   6. background: spread of the smoothed background coordinate away from the object (textured vs plain).
#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <vector>
#include <mutex>

#include "stylealigned/error.h"
#include "stylealigned/toy/world.h"
#include "toy/evaluate_internal.h"
#include "toy/shapes.h"

namespace stylealigned::toy {
namespace {

constexpr int64_t kSide = 64;           // analysis resolution
constexpr double kClip = 50.0;          // colour-model error clip (0..255 units)
constexpr double kMaxCast = 25.0;       // largest global colour offset undone (0..255 units)
constexpr int64_t kGrid = 40;           // template grid side
constexpr double kExtent = 1.3;         // template half-extent in units of sqrt(area)
constexpr int kAngles = 72;             // template rotations (5 degrees apart)

// Thresholds of the decisions (measured on renders with and without blur and noise; see tests/test_world.cpp).
constexpr double kSolidSpread = 0.10;
constexpr double kSolidPlaneR2 = 0.6;
constexpr double kTexturedSpread = 0.12;
constexpr double kOutlineShare = 0.15;
constexpr double kFillExplained = 25.0;  // colour distance within which a pixel counts as fill

at::Tensor color(Rgb c) {
  return at::tensor({static_cast<float>(c.r), static_cast<float>(c.g), static_cast<float>(c.b)}, at::kFloat);
}

// Distance of every pixel (rows of P [N, 3]) to the segment a..b, and the unclamped position along it.
std::pair<at::Tensor, at::Tensor> segment(const at::Tensor& P, const at::Tensor& a, const at::Tensor& b) {
  auto ab = b - a;
  auto t = at::matmul(P - a, ab) / ab.dot(ab);
  auto q = a + t.clamp(0.0, 1.0).unsqueeze(1) * ab;
  return {(P - q).norm(2, 1), t};
}

// Nearest point [N, 3] of the union of segments to every pixel.
at::Tensor nearest_on_segments(const at::Tensor& P, const std::vector<std::pair<at::Tensor, at::Tensor>>& segs) {
  at::Tensor best_d, best_q;
  for (const auto& [a, b] : segs) {
    auto ab = b - a;
    auto t = (at::matmul(P - a, ab) / ab.dot(ab)).clamp(0.0, 1.0);
    auto q = a + t.unsqueeze(1) * ab;
    auto d = (P - q).norm(2, 1);
    if (!best_d.defined()) {
      best_d = d;
      best_q = q;
    } else {
      auto closer = (d < best_d).unsqueeze(1);
      best_q = at::where(closer, q, best_q);
      best_d = at::minimum(d, best_d);
    }
  }
  return best_q;
}

at::Tensor point_distance(const at::Tensor& P, const at::Tensor& a) { return (P - a).norm(2, 1); }

// uint8 [H, W, 3] or float [3, H, W] in [0, 1] -> float [64, 64, 3] in 0..255.
at::Tensor normalise_input(const at::Tensor& image) {
  if (!image.defined()) throw Error("toy evaluate: image tensor is undefined");
  at::Tensor chw;
  if (image.dim() == 3 && image.size(2) == 3 && image.scalar_type() == at::kByte) {
    chw = image.to(at::kFloat).permute({2, 0, 1});
  } else if (image.dim() == 3 && image.size(0) == 3 && at::isFloatingType(image.scalar_type())) {
    chw = image.detach().to(at::kCPU, at::kFloat) * 255.0;
  } else {
    std::string shape;
    for (int64_t d = 0; d < image.dim(); ++d) shape += (d ? ", " : "") + std::to_string(image.size(d));
    throw Error(fmt::format("toy evaluate: image must be uint8 [H, W, 3] or float [3, H, W] in [0, 1], got {} [{}]",
                            c10::toString(image.scalar_type()), shape));
  }
  chw = chw.to(at::kCPU).contiguous();
  const int64_t h = chw.size(1), w = chw.size(2);
  if (h != w || h < 16) {
    throw Error(fmt::format("toy evaluate: image must be square and at least 16 pixels, got {}x{}", h, w));
  }
  if (h != kSide) {
    auto x = chw.unsqueeze(0);
    if (h > kSide && h % kSide == 0) {
      x = at::avg_pool2d(x, {h / kSide, h / kSide});
    } else if (h > kSide) {
      x = at::adaptive_avg_pool2d(x, {kSide, kSide});
    } else {
      x = at::upsample_bilinear2d(x, {kSide, kSide}, false);
    }
    chw = x.squeeze(0);
  }
  return chw.permute({1, 2, 0}).contiguous();  // [64, 64, 3]
}

// Largest 4-connected component of a bool [S, S] mask, with the holes (background components not touching the
// border) filled.
at::Tensor clean_mask(const at::Tensor& mask) {
  const int64_t S = mask.size(0);
  auto m = mask.to(at::kBool).contiguous();
  const bool* in = m.data_ptr<bool>();
  std::vector<int> label(static_cast<size_t>(S * S), -1);
  std::vector<int64_t> sizes;
  std::deque<int64_t> queue;
  for (int64_t start = 0; start < S * S; ++start) {
    if (!in[start] || label[static_cast<size_t>(start)] >= 0) continue;
    const int id = static_cast<int>(sizes.size());
    int64_t count = 0;
    label[static_cast<size_t>(start)] = id;
    queue.push_back(start);
    while (!queue.empty()) {
      const int64_t p = queue.front();
      queue.pop_front();
      ++count;
      const int64_t r = p / S, c = p % S;
      const int64_t nb[4] = {r > 0 ? p - S : -1, r + 1 < S ? p + S : -1, c > 0 ? p - 1 : -1, c + 1 < S ? p + 1 : -1};
      for (int64_t q : nb) {
        if (q >= 0 && in[q] && label[static_cast<size_t>(q)] < 0) {
          label[static_cast<size_t>(q)] = id;
          queue.push_back(q);
        }
      }
    }
    sizes.push_back(count);
  }
  auto out = at::zeros({S, S}, at::kBool);
  if (sizes.empty()) return out;
  const int best = static_cast<int>(std::max_element(sizes.begin(), sizes.end()) - sizes.begin());
  bool* o = out.data_ptr<bool>();
  for (int64_t p = 0; p < S * S; ++p) o[p] = label[static_cast<size_t>(p)] == best;
  // Flood the outside from the border through non-object pixels; what is not reached is a hole.
  std::vector<char> outside(static_cast<size_t>(S * S), 0);
  for (int64_t p = 0; p < S * S; ++p) {
    const int64_t r = p / S, c = p % S;
    if ((r == 0 || c == 0 || r == S - 1 || c == S - 1) && !o[p]) {
      outside[static_cast<size_t>(p)] = 1;
      queue.push_back(p);
    }
  }
  while (!queue.empty()) {
    const int64_t p = queue.front();
    queue.pop_front();
    const int64_t r = p / S, c = p % S;
    const int64_t nb[4] = {r > 0 ? p - S : -1, r + 1 < S ? p + S : -1, c > 0 ? p - 1 : -1, c + 1 < S ? p + 1 : -1};
    for (int64_t q : nb) {
      if (q >= 0 && !o[q] && !outside[static_cast<size_t>(q)]) {
        outside[static_cast<size_t>(q)] = 1;
        queue.push_back(q);
      }
    }
  }
  for (int64_t p = 0; p < S * S; ++p) o[p] = !outside[static_cast<size_t>(p)];
  return out;
}

// Template cell centres in normalised units, [G] (the same along x and y).
at::Tensor template_axis() {
  return (at::arange(kGrid, at::kDouble) + 0.5) * (2.0 * kExtent / kGrid) - kExtent;
}

// Silhouette templates [objects * angles, G * G] (float in [0, 1]), normalised like an observed mask: the origin is
// the shape's centroid and the unit is the square root of its area.
const at::Tensor& templates() {
  static const at::Tensor table = [] {
    const int n_obj = num_values(Attribute::object);
    auto out = at::zeros({n_obj * kAngles, kGrid * kGrid}, at::kFloat);
    float* o = out.data_ptr<float>();
    // Each shape's area and centroid in local units, from a fine grid over its bounding square.
    const int fine = 1001;
    const double cell = 2.1 / fine;
    // 3x3 subsamples per template cell.
    const int sub = 3;
    const double step = 2.0 * kExtent / kGrid;
    for (int obj = 0; obj < n_obj; ++obj) {
      const auto object = static_cast<Object>(obj);
      double area = 0.0, sx = 0.0, sy = 0.0;
      for (int i = 0; i < fine; ++i) {
        const double y = (i + 0.5) * cell - 1.05;
        for (int j = 0; j < fine; ++j) {
          const double x = (j + 0.5) * cell - 1.05;
          if (detail::inside(object, x, y)) {
            area += 1.0;
            sx += x;
            sy += y;
          }
        }
      }
      const double c0x = sx / area, c0y = sy / area;
      const double unit = std::sqrt(area * cell * cell);
      for (int k = 0; k < kAngles; ++k) {
        const double th = 2.0 * M_PI * k / kAngles;
        const double c = std::cos(th), s = std::sin(th);
        // The renderer maps local to screen offsets by [c -s; s c]; the shape's centroid sits at R c0.
        const double ox = c * c0x - s * c0y, oy = s * c0x + c * c0y;
        float* row = o + static_cast<int64_t>(obj * kAngles + k) * kGrid * kGrid;
        for (int gi = 0; gi < kGrid; ++gi) {
          for (int gj = 0; gj < kGrid; ++gj) {
            int hits = 0;
            for (int a = 0; a < sub; ++a) {
              const double qy = -kExtent + (gi + (a + 0.5) / sub) * step;
              for (int b = 0; b < sub; ++b) {
                const double qx = -kExtent + (gj + (b + 0.5) / sub) * step;
                const double dx = qx * unit + ox, dy = qy * unit + oy;
                hits += detail::inside(object, dx * c + dy * s, -dx * s + dy * c);
              }
            }
            row[gi * kGrid + gj] = static_cast<float>(hits) / (sub * sub);
          }
        }
      }
    }
    return out;
  }();
  return table;
}

const at::Tensor& template_sums() {
  static const at::Tensor sums = templates().sum(1);
  return sums;
}

// Anti-aliased pattern models on the 64-pixel grid (4x4 subsamples per pixel, as rendered). The checker and dots
// repeat every 16 and 12 pixels, so one tile per pattern, shifted by whole pixels, gives every phase to within half
// a pixel; the diagonal stripes depend on i + j only, so one table per phase step.
struct PatternModels {
  static constexpr int kSub = 4;
  static constexpr int kStripePhases = 20;
  int checker_period = 0, dot_period = 0;
  std::vector<double> checker, dots;  // [period * period]
  std::vector<double> stripes;        // [kStripePhases][2 * 64]
};

const PatternModels& pattern_models() {
  static const PatternModels m = [] {
    PatternModels pm;
    pm.checker_period = static_cast<int>(std::lround(2.0 * detail::kCheckerCell64));
    pm.dot_period = static_cast<int>(std::lround(detail::kDotSpacing64));
    const int sub = PatternModels::kSub;
    auto sample = [&](int i, int j, auto&& fn) {
      double acc = 0.0;
      for (int a = 0; a < sub; ++a) {
        for (int b = 0; b < sub; ++b) acc += fn(i + (a + 0.5) / sub, j + (b + 0.5) / sub);
      }
      return acc / (sub * sub);
    };
    const int pc = pm.checker_period, pd = pm.dot_period;
    pm.checker.resize(static_cast<size_t>(pc * pc));
    pm.dots.resize(static_cast<size_t>(pd * pd));
    for (int i = 0; i < pc; ++i) {
      for (int j = 0; j < pc; ++j) {
        pm.checker[static_cast<size_t>(i * pc + j)] = sample(i, j, [&](double y, double x) {
          return std::fmod(std::floor(x / detail::kCheckerCell64) + std::floor(y / detail::kCheckerCell64), 2.0);
        });
      }
    }
    for (int i = 0; i < pd; ++i) {
      for (int j = 0; j < pd; ++j) {
        pm.dots[static_cast<size_t>(i * pd + j)] = sample(i, j, [&](double y, double x) {
          const double fx = (x - std::floor(x / pd) * pd) - pd / 2.0, fy = (y - std::floor(y / pd) * pd) - pd / 2.0;
          return fx * fx + fy * fy <= detail::kDotRadius64 * detail::kDotRadius64 ? 1.0 : 0.0;
        });
      }
    }
    const int span = 2 * kSide;
    pm.stripes.resize(static_cast<size_t>(PatternModels::kStripePhases * span));
    const double period = std::sqrt(2.0) * detail::kStripePeriod64;
    for (int ph = 0; ph < PatternModels::kStripePhases; ++ph) {
      const double phase = static_cast<double>(ph) / PatternModels::kStripePhases;
      for (int d = 0; d < span; ++d) {  // d = i + j; subsamples of pixel (i, j) sit at x + y = d + (a + b + 1) / sub
        pm.stripes[static_cast<size_t>(ph * span + d)] = sample(d, 0, [&](double y, double x) {
          const double u = (x + y) / period + phase;
          return u - std::floor(u) >= 0.5 ? 1.0 : 0.0;
        });
      }
    }
    return pm;
  }();
  return m;
}

// Best normalised correlation of t (row-major [S, S]) over the pixels `idx` with the stripes, checker and dots
// models, each maximised over its phases.
std::array<double, 3> pattern_correlations(const double* t, const std::vector<int>& idx, int S) {
  std::array<double, 3> best = {0.0, 0.0, 0.0};
  const size_t n = idx.size();
  if (n < 4) return best;
  double mean = 0.0;
  for (int p : idx) mean += t[p];
  mean /= static_cast<double>(n);
  std::vector<double> tc(n);
  double tt = 0.0;
  for (size_t k = 0; k < n; ++k) {
    tc[k] = t[idx[k]] - mean;
    tt += tc[k] * tc[k];
  }
  if (tt <= 1e-12) return best;
  auto score = [&](auto&& model) {  // model(i, j) -> value; correlation with tc
    double sp = 0.0, spp = 0.0, stp = 0.0;
    for (size_t k = 0; k < n; ++k) {
      const double v = model(idx[k] / S, idx[k] % S);
      sp += v;
      spp += v * v;
      stp += tc[k] * v;
    }
    const double var_p = spp - sp * sp / static_cast<double>(n);
    return var_p > 1e-9 ? stp / std::sqrt(var_p * tt) : 0.0;
  };
  const auto& pm = pattern_models();
  const int span = 2 * kSide;
  for (int ph = 0; ph < PatternModels::kStripePhases; ++ph) {
    const double* row = &pm.stripes[static_cast<size_t>(ph * span)];
    best[0] = std::max(best[0], score([&](int i, int j) { return row[i + j]; }));
  }
  const int pc = pm.checker_period, pd = pm.dot_period;
  for (int a = 0; a < pc; ++a) {
    for (int b = 0; b < pc; ++b) {
      best[1] = std::max(best[1], score([&](int i, int j) {
        return pm.checker[static_cast<size_t>(((i + a) % pc) * pc + (j + b) % pc)];
      }));
    }
  }
  for (int a = 0; a < pd; ++a) {
    for (int b = 0; b < pd; ++b) {
      best[2] = std::max(best[2], score([&](int i, int j) {
        return pm.dots[static_cast<size_t>(((i + a) % pd) * pd + (j + b) % pd)];
      }));
    }
  }
  return best;
}

at::Tensor box3(const at::Tensor& field) {  // [S, S] -> [S, S], 3x3 mean (edges: mean of the pixels present)
  return at::avg_pool2d(field.unsqueeze(0).unsqueeze(0), {3, 3}, {1, 1}, {1, 1}, false, false).squeeze(0).squeeze(0);
}

float clamp01(double v) { return static_cast<float>(std::clamp(v, 0.0, 1.0)); }

}  // namespace

namespace detail {

Evaluation evaluate_measured(const at::Tensor& image, Measurements* meas) {
  Measurements local;
  Measurements& M = meas ? *meas : local;
  const auto hwc = normalise_input(image);
  const int64_t S = kSide;
  const auto P = hwc.view({S * S, 3});
  Evaluation ev;

  // 1. Palette. The image's outer frame is background in every rendered image (objects keep a margin), so there
  // only the background segment may explain a pixel: a palette whose fill colours resemble another palette's
  // background cannot claim that background as its object.
  const int n_pal = num_values(Attribute::palette);
  auto frame = at::ones({S, S}, at::kBool);
  frame.narrow(0, 2, S - 4).narrow(1, 2, S - 4).fill_(false);
  frame = frame.view({S * S});
  for (int p = 0; p < n_pal; ++p) {
    const auto& pc = palette_colors(static_cast<Palette>(p));
    auto d_bg = segment(P, color(pc.background), color(pc.background_alt)).first;
    auto d_fill = segment(P, color(pc.fill), color(pc.fill_alt)).first;
    auto d_out = point_distance(P, color(pc.outline));
    auto e = at::where(frame, d_bg, at::minimum(at::minimum(d_bg, d_fill), d_out)).clamp_max(kClip);
    M.palette_error[static_cast<size_t>(p)] = (e * e).mean().item<float>();
  }
  std::vector<int> order(static_cast<size_t>(n_pal));
  for (int p = 0; p < n_pal; ++p) order[static_cast<size_t>(p)] = p;
  std::sort(order.begin(), order.end(),
            [&](int a, int b) { return M.palette_error[static_cast<size_t>(a)] < M.palette_error[static_cast<size_t>(b)]; });
  const Palette palette = static_cast<Palette>(order[0]);
  ev.attributes.palette = palette;
  {
    const double best = M.palette_error[static_cast<size_t>(order[0])];
    const double second = M.palette_error[static_cast<size_t>(order[1])];
    ev.confidence[static_cast<size_t>(Attribute::palette)] = clamp01(1.0 - best / std::max(second, 1e-6));
  }

  // 2. Object mask under the chosen palette, after undoing a global colour cast (a generated image's colours
  // drift): the median offset of the image's frame from the background segment, at most kMaxCast per channel.
  const auto& pc = palette_colors(palette);
  const auto A = color(pc.fill), B = color(pc.fill_alt), G = color(pc.background), G2 = color(pc.background_alt);
  const auto O = color(pc.outline);
  at::Tensor Pc;
  {
    auto Pf = P.index({frame});
    auto gg = G2 - G;
    auto t = (at::matmul(Pf - G, gg) / gg.dot(gg)).clamp(0.0, 1.0);
    auto cast = std::get<0>((Pf - (G + t.unsqueeze(1) * gg)).median(0)).clamp(-kMaxCast, kMaxCast);
    Pc = P - cast;
  }
  auto [d_bg, t_bg] = segment(Pc, G, G2);
  auto [d_fill, t_fill] = segment(Pc, A, B);
  auto d_out = point_distance(Pc, O);
  auto d_obj = at::minimum(d_fill, d_out);
  auto soft = (d_bg / (d_bg + d_obj + 1e-3)).view({S, S});
  auto mask = clean_mask((d_obj < d_bg).view({S, S}));
  M.mask = mask;
  auto maskf = mask.to(at::kFloat).view({1, 1, S, S});
  const double area_px = maskf.sum().item<double>();
  ev.object_area = static_cast<float>(area_px / static_cast<double>(S * S));
  if (area_px < 4.0) {
    // Nothing object-like: keep defaults, with zero confidence everywhere but the palette.
    ev.object_match = 0.0f;
    return ev;
  }

  // 3. Object: soft silhouette (hard core, soft values near its edge), normalised, against the templates.
  {
    auto core = detail::erode(maskf, 1).view({S, S});
    auto near = detail::dilate(maskf, 2).view({S, S});
    auto sil = at::maximum(soft * near, core).clamp(0.0, 1.0);
    const double a = sil.sum().item<double>();
    auto pix = at::arange(S, at::kFloat) + 0.5;
    const double cx = (sil * pix.view({1, S})).sum().item<double>() / a;
    const double cy = (sil * pix.view({S, 1})).sum().item<double>() / a;
    const double unit = std::sqrt(a);
    auto axis = template_axis().to(at::kFloat);
    auto gx = ((axis * unit + cx) / static_cast<double>(S)) * 2.0 - 1.0;  // grid_sample coordinates
    auto gy = ((axis * unit + cy) / static_cast<double>(S)) * 2.0 - 1.0;
    auto grid = at::stack({gx.view({1, kGrid}).expand({kGrid, kGrid}), gy.view({kGrid, 1}).expand({kGrid, kGrid})}, 2)
                    .unsqueeze(0);
    auto sampled = at::grid_sampler(sil.view({1, 1, S, S}), grid, /*bilinear*/ 0, /*zeros*/ 0, false)
                       .reshape({1, kGrid * kGrid});
    const auto& T = templates();
    // Soft IoU without a [templates, cells] temporary: sum(min) and sum(max) from the sums and the L1 distance.
    auto l1 = at::cdist(T, sampled, 1.0).squeeze(1);
    auto sums = template_sums() + sampled.sum();
    auto iou = (sums - l1) / (sums + l1).clamp_min(1e-6);
    auto per_class = std::get<0>(iou.view({-1, kAngles}).max(1));
    auto acc = per_class.contiguous();
    const float* pv = acc.data_ptr<float>();
    int best = 0;
    for (int o = 0; o < num_values(Attribute::object); ++o) {
      M.object_iou[static_cast<size_t>(o)] = pv[o];
      if (pv[o] > pv[best]) best = o;
    }
    float second = 0.0f;
    for (int o = 0; o < num_values(Attribute::object); ++o) {
      if (o != best) second = std::max(second, pv[o]);
    }
    ev.attributes.object = static_cast<Object>(best);
    ev.object_match = pv[best];
    // A rendered object never touches the image border and covers at most half the image: a mask that does
    // (noise, a failed generation, a background mistaken for the object) gets no confidence, whatever its match.
    auto m2 = mask.to(at::kFloat);
    const double border = (m2.select(0, 0).sum() + m2.select(0, S - 1).sum() + m2.select(1, 0).sum() +
                           m2.select(1, S - 1).sum()).item<double>() / static_cast<double>(4 * S);
    const double plausible = clamp01(1.0 - std::max(0.0, border - 0.02) / 0.1) *
                             clamp01(1.0 - std::max(0.0, ev.object_area - 0.55) / 0.15);
    ev.confidence[static_cast<size_t>(Attribute::object)] =
        clamp01(plausible * (pv[best] - second) / std::max(pv[best], 1e-6f));
  }

  // 4. Outline: how much outline colour the silhouette's inner edge holds beyond what the palette's other colours
  // (fill, background and their blends) explain. Per pixel: the nearest non-outline colour q, and the share
  // alpha of the way from q to the outline colour that the pixel has moved; 1 for a clean outline pixel, about
  // half for a blurred one, 0 (+- noise, which averages out) without an outline.
  {
    auto ring = (maskf - detail::erode(maskf, 3)).view({S * S}) > 0.5;
    const double n = ring.sum().item<double>();
    if (n > 0) {
      auto Pr = Pc.index({ring});
      auto q = nearest_on_segments(Pr, {{A, B}, {G, G2}, {A, G}, {B, G}, {A, G2}, {B, G2}});
      auto v = O - q;
      auto alpha = ((Pr - q) * v).sum(1) / (v * v).sum(1).clamp_min(1.0);
      M.outline_share = alpha.clamp(-1.0, 1.0).mean().item<float>();
    }
    ev.attributes.outline = M.outline_share > kOutlineShare ? Outline::outlined : Outline::none;
    ev.confidence[static_cast<size_t>(Attribute::outline)] =
        clamp01(std::abs(M.outline_share - kOutlineShare) / kOutlineShare);
  }

  // 5. Pattern from the smoothed fill coordinate inside the eroded mask.
  {
    const int64_t depth = ev.attributes.outline == Outline::outlined ? 4 : 3;
    auto interior = detail::erode(maskf, depth).view({S, S}) > 0.5;
    if (interior.sum().item<int64_t>() < 16) interior = detail::erode(maskf, 1).view({S, S}) > 0.5;
    if (interior.sum().item<int64_t>() < 4) interior = mask;
    // Only pixels the fill segment explains (measured on the 3x3-smoothed image, where noise is a third): blur
    // mixes background and outline into the silhouette's edge.
    auto smooth = at::avg_pool2d(Pc.view({S, S, 3}).permute({2, 0, 1}).unsqueeze(0), {3, 3}, {1, 1}, {1, 1}, false, false)
                      .squeeze(0).permute({1, 2, 0}).reshape({S * S, 3});
    auto explained = interior & (segment(smooth, A, B).first.view({S, S}) < kFillExplained);
    if (explained.sum().item<int64_t>() >= 16) interior = explained;
    auto t = box3(t_fill.view({S, S}).clamp(-0.5, 1.5));
    auto tv = t.masked_select(interior).to(at::kDouble);  // smoothed: a third of the noise, for the solid test
    const int64_t n = tv.numel();
    M.interior_pixels = static_cast<int>(n);
    const double mean = tv.mean().item<double>();
    const double var = (tv - mean).pow(2).mean().item<double>();
    M.pattern_alt_share = static_cast<float>(mean);
    M.pattern_spread = static_cast<float>(std::sqrt(var));
    // Plane fit t ~ 1 + x + y by least squares.
    auto pix = at::arange(S, at::kDouble);
    auto xs = pix.view({1, S}).expand({S, S}).masked_select(interior);
    auto ys = pix.view({S, 1}).expand({S, S}).masked_select(interior);
    // With centred coordinates the intercept is the mean and the slopes solve a 2x2 system.
    auto xc = xs - xs.mean(), yc = ys - ys.mean(), tc = tv - mean;
    const double sxx = (xc * xc).sum().item<double>(), syy = (yc * yc).sum().item<double>();
    const double sxy = (xc * yc).sum().item<double>();
    const double sxt = (xc * tc).sum().item<double>(), syt = (yc * tc).sum().item<double>();
    const double det = sxx * syy - sxy * sxy;
    double bx = 0.0, by = 0.0;
    if (std::abs(det) > 1e-9) {
      bx = (sxt * syy - syt * sxy) / det;
      by = (syt * sxx - sxt * sxy) / det;
    }
    const double rvar = (tc - xc * bx - yc * by).pow(2).mean().item<double>();
    M.pattern_plane_r2 = var > 1e-9 ? static_cast<float>(1.0 - rvar / var) : 0.0f;
    // Best normalised correlation of the raw fill coordinate with each periodic pattern over all its phases (the
    // patterns are drawn in image coordinates, so only the phase is unknown).
    {
      const auto raw = t_fill.clamp(-0.5, 1.5).to(at::kDouble).contiguous();
      const double* tr = raw.data_ptr<double>();
      auto in_acc = interior.contiguous();
      const bool* inside_px = in_acc.data_ptr<bool>();
      std::vector<int> idx;
      for (int64_t p = 0; p < S * S; ++p) {
        if (inside_px[p]) idx.push_back(static_cast<int>(p));
      }
      const auto corr = pattern_correlations(tr, idx, static_cast<int>(S));
      M.corr_stripes = static_cast<float>(corr[0]);
      M.corr_checker = static_cast<float>(corr[1]);
      M.corr_dots = static_cast<float>(corr[2]);
      // The gradient runs from the fill colour at the top to the second colour at the bottom: correlation with
      // the row (a tilted ramp, e.g. one stripe of a small object, correlates less).
      const double syy_t = (yc * yc).sum().item<double>() * (tc * tc).sum().item<double>();
      M.corr_gradient = syy_t > 1e-12 ? static_cast<float>(std::max(0.0, syt / std::sqrt(syy_t))) : 0.0f;
    }
    // Solid when the fill coordinate barely varies (a gradient across a short interior varies little, but a plane
    // explains it; noise on a solid fill it does not); else the best-correlated pattern.
    Pattern pat = Pattern::solid;
    double conf = std::min((kSolidSpread - M.pattern_spread) / kSolidSpread,
                           (kSolidPlaneR2 - M.pattern_plane_r2) / kSolidPlaneR2);
    if (M.pattern_spread >= kSolidSpread || M.pattern_plane_r2 >= kSolidPlaneR2) {
      const std::array<std::pair<Pattern, double>, 4> scores = {{
          {Pattern::gradient, M.corr_gradient},
          {Pattern::stripes, M.corr_stripes},
          {Pattern::checker, M.corr_checker},
          {Pattern::dots, M.corr_dots},
      }};
      size_t best = 0;
      for (size_t k = 1; k < scores.size(); ++k) {
        if (scores[k].second > scores[best].second) best = k;
      }
      double second = 0.0;
      for (size_t k = 0; k < scores.size(); ++k) {
        if (k != best) second = std::max(second, scores[k].second);
      }
      pat = scores[best].first;
      conf = (scores[best].second - second) / std::max(scores[best].second, 1e-6) / 0.2;
    }
    ev.attributes.pattern = pat;
    ev.confidence[static_cast<size_t>(Attribute::pattern)] = clamp01(conf);
  }

  // 6. Background: spread of the smoothed background coordinate at least 3 pixels from the object, over pixels the
  // background segment explains (so a piece of the object the mask missed does not count as texture).
  {
    auto away = (detail::dilate(maskf, 3).view({S, S}) < 0.5) & (d_bg.view({S, S}) < kClip);
    auto tb = box3(t_bg.view({S, S}).clamp(-0.5, 1.5)).masked_select(away).to(at::kDouble);
    M.background_pixels = static_cast<int>(tb.numel());
    double spread = 0.0;
    if (tb.numel() > 1) spread = std::sqrt((tb - tb.mean()).pow(2).mean().item<double>());
    M.background_spread = static_cast<float>(spread);
    ev.attributes.background = spread > kTexturedSpread ? Background::textured : Background::plain;
    ev.confidence[static_cast<size_t>(Attribute::background)] =
        clamp01(std::abs(spread - kTexturedSpread) / kTexturedSpread);
  }
  return ev;
}

}  // namespace detail

Evaluation evaluate(const at::Tensor& image) { return detail::evaluate_measured(image, nullptr); }

std::vector<Evaluation> evaluate_batch(const at::Tensor& images) {
  if (!images.defined() || images.dim() != 4) {
    throw Error("toy evaluate_batch: images must be uint8 [N, H, W, 3] or float [N, 3, H, W]");
  }
  std::vector<Evaluation> out;
  out.reserve(static_cast<size_t>(images.size(0)));
  for (int64_t i = 0; i < images.size(0); ++i) out.push_back(evaluate(images[i]));
  return out;
}

}  // namespace stylealigned::toy
