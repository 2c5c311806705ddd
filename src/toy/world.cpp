// The toy world: attributes and their names, palettes, scene sampling, rendering and captions.
//
// Rendering works on whole-image tensors at `size * supersample` pixels: the object's inside test in its own
// rotated, scaled frame, the pattern and background fields in image coordinates, an outline band from a
// morphological erosion of the silhouette, then a box downsample (the anti-aliasing) and rounding to uint8.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <set>

#include "stylealigned/error.h"
#include "stylealigned/toy/world.h"
#include "toy/shapes.h"

namespace stylealigned::toy {
namespace {

constexpr std::array<std::string_view, 8> kObjectNames = {"circle", "square",  "triangle", "star",
                                                          "heart",  "diamond", "cross",    "crescent"};
constexpr std::array<std::string_view, 8> kPaletteNames = {"pastel",     "neon",   "earth",  "ocean",
                                                           "monochrome", "sunset", "forest", "candy"};
constexpr std::array<std::string_view, 5> kPatternNames = {"solid", "stripes", "dots", "checker", "gradient"};
constexpr std::array<std::string_view, 5> kPatternWords = {"solid", "striped", "dotted", "checkered", "gradient"};
constexpr std::array<std::string_view, 2> kBackgroundNames = {"plain", "textured"};
constexpr std::array<std::string_view, 2> kOutlineNames = {"none", "outlined"};
constexpr std::array<std::string_view, kNumAttributes> kAttributeNames = {"object", "palette", "pattern",
                                                                          "background", "outline"};

// Chosen so that every palette's colours are far from the other palettes' colour models (weighted distance >= 52
// in RGB) and, within a palette, fill, background and outline stay apart even when blurred into each other: the
// outline colour lies on no line through two other colours of its palette (a gray palette with a black outline
// failed that: a blurred black band over white reads as gray fill, hence monochrome's red accent).
const std::array<PaletteColors, 8> kPalettes = {{
    // fill            fill_alt          background        background_alt    outline
    {{250, 160, 185}, {150, 195, 250}, {255, 240, 215}, {210, 232, 190}, {105, 80, 130}},  // pastel
    {{255, 30, 190}, {30, 240, 110}, {25, 10, 50}, {70, 20, 110}, {250, 250, 60}},         // neon
    {{140, 80, 35}, {220, 170, 90}, {175, 185, 135}, {130, 145, 95}, {50, 30, 15}},        // earth
    {{25, 105, 200}, {70, 215, 215}, {205, 232, 248}, {150, 200, 235}, {5, 25, 65}},       // ocean
    {{90, 90, 90}, {170, 170, 170}, {245, 245, 245}, {215, 215, 215}, {220, 30, 30}},      // monochrome (red accent)
    {{250, 120, 30}, {200, 35, 85}, {255, 220, 150}, {250, 175, 120}, {85, 20, 45}},       // sunset
    {{150, 215, 75}, {245, 235, 130}, {45, 95, 60}, {20, 60, 35}, {255, 210, 0}},         // forest
    {{150, 60, 210}, {255, 250, 110}, {255, 185, 220}, {245, 140, 195}, {70, 20, 90}},     // candy
}};

template <size_t N>
std::optional<int> find_name(const std::array<std::string_view, N>& names, std::string_view s) {
  for (size_t i = 0; i < N; ++i) {
    if (names[i] == s) return static_cast<int>(i);
  }
  return std::nullopt;
}

void check_value(Attribute a, int value) {
  if (value < 0 || value >= num_values(a)) {
    throw Error(fmt::format("toy world: {} value {} is out of range [0, {})", attribute_name(a), value,
                            num_values(a)));
  }
}

// Interpolation weights of a smoothstep value-noise lattice with n points spanning [0, 1], sampled at `out`
// pixel centres: index of the left lattice point and the weight of the right one.
std::vector<std::pair<int, double>> lattice_weights(int64_t out, int n) {
  std::vector<std::pair<int, double>> w(static_cast<size_t>(out));
  for (int64_t i = 0; i < out; ++i) {
    const double u = (static_cast<double>(i) + 0.5) / static_cast<double>(out) * static_cast<double>(n - 1);
    const int k = std::min(static_cast<int>(std::floor(u)), n - 2);
    const double f = u - static_cast<double>(k);
    w[static_cast<size_t>(i)] = {k, f * f * (3.0 - 2.0 * f)};
  }
  return w;
}

// Background mix field in [0, 1], row-major [R, R]: two octaves of value noise pushed through a smoothstep, giving
// soft two-tone blotches a few pattern periods across (large enough to survive blur).
std::vector<float> texture_field(uint64_t seed, int64_t res) {
  std::mt19937_64 rng(seed);
  std::vector<double> field(static_cast<size_t>(res * res), 0.0);
  const std::array<std::pair<int, double>, 2> octaves = {{{6, 0.65}, {11, 0.35}}};
  for (const auto& [n, weight] : octaves) {
    std::vector<double> grid(static_cast<size_t>(n * n));
    for (auto& g : grid) g = detail::uniform01(rng);
    const auto w = lattice_weights(res, n);
    // Rows first: lattice rows interpolated at every pixel column, then between lattice rows.
    std::vector<double> across(static_cast<size_t>(n * res));
    for (int k = 0; k < n; ++k) {
      for (int64_t j = 0; j < res; ++j) {
        const auto [l, f] = w[static_cast<size_t>(j)];
        const double* row = &grid[static_cast<size_t>(k * n)];
        across[static_cast<size_t>(k * res + j)] = row[l] * (1.0 - f) + row[l + 1] * f;
      }
    }
    for (int64_t i = 0; i < res; ++i) {
      const auto [k, f] = w[static_cast<size_t>(i)];
      const double* top = &across[static_cast<size_t>(k * res)];
      const double* bottom = &across[static_cast<size_t>((k + 1) * res)];
      double* out = &field[static_cast<size_t>(i * res)];
      for (int64_t j = 0; j < res; ++j) out[j] += weight * (top[j] * (1.0 - f) + bottom[j] * f);
    }
  }
  // The sum of two uniform lattices has mean 0.5 and a spread of about 0.2: map 0.42 .. 0.58 onto the full range.
  std::vector<float> t(field.size());
  for (size_t i = 0; i < field.size(); ++i) {
    const double v = std::clamp((field[i] - 0.42) / 0.16, 0.0, 1.0);
    t[i] = static_cast<float>(v * v * (3.0 - 2.0 * v));
  }
  return t;
}

// Squared Euclidean distance transform in one dimension (Felzenszwalb and Huttenlocher): d[i] = min_j f[j] + (i-j)^2.
void distance_1d(const double* f, double* d, int64_t n, std::vector<int64_t>& v, std::vector<double>& z) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  v.assign(static_cast<size_t>(n), 0);
  z.assign(static_cast<size_t>(n + 1), 0.0);
  int64_t k = 0;
  v[0] = 0;
  z[0] = -inf;
  z[1] = inf;
  for (int64_t q = 1; q < n; ++q) {
    if (f[q] == inf && f[v[static_cast<size_t>(k)]] == inf) continue;  // both far: nothing to add
    double sq;
    while (true) {
      const int64_t p = v[static_cast<size_t>(k)];
      sq = ((f[q] + static_cast<double>(q * q)) - (f[p] + static_cast<double>(p * p))) / static_cast<double>(2 * (q - p));
      if (sq <= z[static_cast<size_t>(k)] && k > 0) {
        --k;
      } else {
        break;
      }
    }
    if (sq <= z[static_cast<size_t>(k)]) {  // k == 0 and the new parabola wins everywhere
      v[0] = q;
      z[0] = -inf;
      z[1] = inf;
      continue;
    }
    ++k;
    v[static_cast<size_t>(k)] = q;
    z[static_cast<size_t>(k)] = sq;
    z[static_cast<size_t>(k + 1)] = inf;
  }
  k = 0;
  for (int64_t q = 0; q < n; ++q) {
    while (z[static_cast<size_t>(k + 1)] < static_cast<double>(q)) ++k;
    const int64_t p = v[static_cast<size_t>(k)];
    d[q] = f[p] + static_cast<double>((q - p) * (q - p));
  }
}

// For every pixel inside `mask` ([R, R]), the squared distance (pixel units) to the nearest pixel outside it;
// outside the image counts as inside, so only the silhouette's own edge produces an outline.
std::vector<double> squared_distance_to_outside(const std::vector<uint8_t>& mask, int64_t res) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  std::vector<double> g(mask.size());
  for (size_t i = 0; i < mask.size(); ++i) g[i] = mask[i] ? inf : 0.0;
  std::vector<double> f(static_cast<size_t>(res)), d(static_cast<size_t>(res));
  std::vector<int64_t> v;
  std::vector<double> z;
  for (int64_t j = 0; j < res; ++j) {  // columns
    for (int64_t i = 0; i < res; ++i) f[static_cast<size_t>(i)] = g[static_cast<size_t>(i * res + j)];
    distance_1d(f.data(), d.data(), res, v, z);
    for (int64_t i = 0; i < res; ++i) g[static_cast<size_t>(i * res + j)] = d[static_cast<size_t>(i)];
  }
  for (int64_t i = 0; i < res; ++i) {  // rows
    double* row = &g[static_cast<size_t>(i * res)];
    std::copy(row, row + res, f.begin());
    distance_1d(f.data(), row, res, v, z);
  }
  return g;
}

void check_scene(const Scene& s, const RenderOptions& o) {
  for (Attribute a : kAllAttributes) check_value(a, s.attributes.get(a));
  auto finite = [](double v) { return std::isfinite(v); };
  if (!finite(s.center_x) || !finite(s.center_y)) throw Error("toy render: scene center_x/center_y must be finite");
  if (!finite(s.size) || s.size <= 0.0 || s.size > 2.0) {
    throw Error(fmt::format("toy render: scene size {} must be in (0, 2]", s.size));
  }
  if (!finite(s.rotation_deg)) throw Error("toy render: scene rotation_deg must be finite");
  if (!finite(s.pattern_phase_x) || !finite(s.pattern_phase_y)) {
    throw Error("toy render: scene pattern_phase_x/pattern_phase_y must be finite");
  }
  if (o.size < 8 || o.size > 4096) throw Error(fmt::format("toy render: option size {} must be in [8, 4096]", o.size));
  if (o.supersample < 1 || o.supersample > 16) {
    throw Error(fmt::format("toy render: option supersample {} must be in [1, 16]", o.supersample));
  }
}

double fract(double v) { return v - std::floor(v); }

// Renders into uint8 [size, size, 3] with plain loops over the supersampled pixels: no tensor kernels, so the bytes
// do not depend on the libtorch build or the CPU's vector units.
at::Tensor render_pixels(const Scene& s, int64_t size, int64_t ss) {
  const int64_t res = size * ss;
  const PaletteColors& pal = palette_colors(s.attributes.palette);
  const auto& a = s.attributes;

  // Silhouette at the supersampled resolution.
  const double theta = s.rotation_deg * M_PI / 180.0;
  const double c = std::cos(theta), sn = std::sin(theta), inv_r = 2.0 / s.size;
  std::vector<uint8_t> mask(static_cast<size_t>(res * res));
  int64_t top = res, bottom = -1;
  for (int64_t i = 0; i < res; ++i) {
    const double dy = (static_cast<double>(i) + 0.5) / static_cast<double>(res) - s.center_y;
    for (int64_t j = 0; j < res; ++j) {
      const double dx = (static_cast<double>(j) + 0.5) / static_cast<double>(res) - s.center_x;
      const double lx = (dx * c + dy * sn) * inv_r;
      const double ly = (-dx * sn + dy * c) * inv_r;
      const bool in = detail::inside(a.object, lx, ly);
      mask[static_cast<size_t>(i * res + j)] = in;
      if (in) {
        top = std::min(top, i);
        bottom = std::max(bottom, i);
      }
    }
  }
  std::vector<double> dist2;
  double band2 = 0.0;
  if (a.outline == Outline::outlined) {
    dist2 = squared_distance_to_outside(mask, res);
    const double band = detail::kOutlineWidth64 / 64.0 * static_cast<double>(res);
    band2 = band * band;
  }
  std::vector<float> texture;
  if (a.background == Background::textured) texture = texture_field(s.texture_seed, res);

  const double fill[3] = {double(pal.fill.r), double(pal.fill.g), double(pal.fill.b)};
  const double fill_alt[3] = {double(pal.fill_alt.r), double(pal.fill_alt.g), double(pal.fill_alt.b)};
  const double bg[3] = {double(pal.background.r), double(pal.background.g), double(pal.background.b)};
  const double bg_alt[3] = {double(pal.background_alt.r), double(pal.background_alt.g), double(pal.background_alt.b)};
  const double outline[3] = {double(pal.outline.r), double(pal.outline.g), double(pal.outline.b)};
  const double to64 = 64.0 / static_cast<double>(res);  // pattern units: pixels of a 64-pixel image
  const double grad_span = std::max<double>(1.0, static_cast<double>(bottom - top));

  auto out = at::empty({size, size, 3}, at::kByte);
  uint8_t* o = out.data_ptr<uint8_t>();
  std::vector<double> acc(static_cast<size_t>(size * 3));
  const double norm = 1.0 / static_cast<double>(ss * ss);
  for (int64_t oi = 0; oi < size; ++oi) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t i = oi * ss; i < (oi + 1) * ss; ++i) {
      const double Y = (static_cast<double>(i) + 0.5) * to64;
      for (int64_t j = 0; j < res; ++j) {
        const size_t p = static_cast<size_t>(i * res + j);
        const double X = (static_cast<double>(j) + 0.5) * to64;
        const double* col0;
        const double* col1;
        double t = 0.0;
        if (mask[p]) {
          if (a.outline == Outline::outlined && dist2[p] <= band2) {
            col0 = col1 = outline;
            t = 0.0;
          } else {
            col0 = fill;
            col1 = fill_alt;
            switch (a.pattern) {
              case Pattern::solid: t = 0.0; break;
              case Pattern::stripes:
                t = fract((X + Y) / (std::sqrt(2.0) * detail::kStripePeriod64) + s.pattern_phase_x) >= 0.5 ? 1.0 : 0.0;
                break;
              case Pattern::checker: {
                const double cx = std::floor(X / detail::kCheckerCell64 + s.pattern_phase_x);
                const double cy = std::floor(Y / detail::kCheckerCell64 + s.pattern_phase_y);
                t = std::fmod(std::fabs(cx + cy), 2.0);
                break;
              }
              case Pattern::dots: {
                const double fx = (fract(X / detail::kDotSpacing64 + s.pattern_phase_x) - 0.5) * detail::kDotSpacing64;
                const double fy = (fract(Y / detail::kDotSpacing64 + s.pattern_phase_y) - 0.5) * detail::kDotSpacing64;
                t = fx * fx + fy * fy <= detail::kDotRadius64 * detail::kDotRadius64 ? 1.0 : 0.0;
                break;
              }
              case Pattern::gradient:
                // From the silhouette's top row to its bottom row, so every gradient spans the full fill range.
                t = std::clamp(static_cast<double>(i - top) / grad_span, 0.0, 1.0);
                break;
            }
          }
        } else {
          col0 = bg;
          col1 = bg_alt;
          t = texture.empty() ? 0.0 : static_cast<double>(texture[p]);
        }
        double* px = &acc[static_cast<size_t>((j / ss) * 3)];
        for (int ch = 0; ch < 3; ++ch) px[ch] += col0[ch] + (col1[ch] - col0[ch]) * t;
      }
    }
    for (int64_t k = 0; k < size * 3; ++k) {
      o[oi * size * 3 + k] = static_cast<uint8_t>(std::clamp(std::floor(acc[static_cast<size_t>(k)] * norm + 0.5), 0.0, 255.0));
    }
  }
  return out;
}

}  // namespace

// --- names -----------------------------------------------------------------------------------------------------------

int num_values(Attribute attribute) {
  switch (attribute) {
    case Attribute::object: return static_cast<int>(kObjectNames.size());
    case Attribute::palette: return static_cast<int>(kPaletteNames.size());
    case Attribute::pattern: return static_cast<int>(kPatternNames.size());
    case Attribute::background: return static_cast<int>(kBackgroundNames.size());
    case Attribute::outline: return static_cast<int>(kOutlineNames.size());
  }
  throw Error(fmt::format("toy world: unknown attribute {}", static_cast<int>(attribute)));
}

std::string_view attribute_name(Attribute attribute) {
  const int i = static_cast<int>(attribute);
  if (i < 0 || i >= kNumAttributes) throw Error(fmt::format("toy world: unknown attribute {}", i));
  return kAttributeNames[static_cast<size_t>(i)];
}

std::string_view value_name(Attribute attribute, int value) {
  check_value(attribute, value);
  const auto v = static_cast<size_t>(value);
  switch (attribute) {
    case Attribute::object: return kObjectNames[v];
    case Attribute::palette: return kPaletteNames[v];
    case Attribute::pattern: return kPatternNames[v];
    case Attribute::background: return kBackgroundNames[v];
    case Attribute::outline: return kOutlineNames[v];
  }
  return {};
}

std::optional<int> value_from_name(Attribute attribute, std::string_view n) {
  switch (attribute) {
    case Attribute::object: return find_name(kObjectNames, n);
    case Attribute::palette: return find_name(kPaletteNames, n);
    case Attribute::pattern:
      if (auto v = find_name(kPatternNames, n)) return v;
      return find_name(kPatternWords, n);
    case Attribute::background: return find_name(kBackgroundNames, n);
    case Attribute::outline:
      if (n == "no outline") return 0;
      return find_name(kOutlineNames, n);
  }
  return std::nullopt;
}

std::string_view name(Object v) { return value_name(Attribute::object, static_cast<int>(v)); }
std::string_view name(Palette v) { return value_name(Attribute::palette, static_cast<int>(v)); }
std::string_view name(Pattern v) { return value_name(Attribute::pattern, static_cast<int>(v)); }
std::string_view name(Background v) { return value_name(Attribute::background, static_cast<int>(v)); }
std::string_view name(Outline v) { return value_name(Attribute::outline, static_cast<int>(v)); }

int Attributes::get(Attribute a) const {
  switch (a) {
    case Attribute::object: return static_cast<int>(object);
    case Attribute::palette: return static_cast<int>(palette);
    case Attribute::pattern: return static_cast<int>(pattern);
    case Attribute::background: return static_cast<int>(background);
    case Attribute::outline: return static_cast<int>(outline);
  }
  throw Error(fmt::format("toy world: unknown attribute {}", static_cast<int>(a)));
}

void Attributes::set(Attribute a, int value) {
  check_value(a, value);
  switch (a) {
    case Attribute::object: object = static_cast<Object>(value); break;
    case Attribute::palette: palette = static_cast<Palette>(value); break;
    case Attribute::pattern: pattern = static_cast<Pattern>(value); break;
    case Attribute::background: background = static_cast<Background>(value); break;
    case Attribute::outline: outline = static_cast<Outline>(value); break;
  }
}

bool Attributes::operator==(const Attributes& o) const {
  return object == o.object && palette == o.palette && pattern == o.pattern && background == o.background &&
         outline == o.outline;
}

bool same(const Attributes& a, const Attributes& b, AttributeSet on) {
  for (Attribute x : kAllAttributes) {
    if (on.has(x) && a.get(x) != b.get(x)) return false;
  }
  return true;
}

const PaletteColors& palette_colors(Palette palette) {
  check_value(Attribute::palette, static_cast<int>(palette));
  return kPalettes[static_cast<size_t>(palette)];
}

// --- sampling and rendering -----------------------------------------------------------------------------------------

Scene sample_scene(std::mt19937_64& rng, const AttributeConstraints& fixed) {
  Scene s;
  // Draw order is part of the format: changing it changes every dataset made from seeds.
  auto& a = s.attributes;
  a.object = static_cast<Object>(detail::uniform_int(rng, num_values(Attribute::object)));
  a.palette = static_cast<Palette>(detail::uniform_int(rng, num_values(Attribute::palette)));
  a.pattern = static_cast<Pattern>(detail::uniform_int(rng, num_values(Attribute::pattern)));
  a.background = static_cast<Background>(detail::uniform_int(rng, num_values(Attribute::background)));
  a.outline = static_cast<Outline>(detail::uniform_int(rng, num_values(Attribute::outline)));
  if (fixed.object) a.object = *fixed.object;
  if (fixed.palette) a.palette = *fixed.palette;
  if (fixed.pattern) a.pattern = *fixed.pattern;
  if (fixed.background) a.background = *fixed.background;
  if (fixed.outline) a.outline = *fixed.outline;
  for (Attribute x : kAllAttributes) check_value(x, a.get(x));

  s.size = detail::uniform(rng, 0.5, 0.8);
  s.rotation_deg = detail::uniform(rng, -45.0, 45.0);
  const double margin = 0.02, r = s.size / 2.0;
  s.center_x = detail::uniform(rng, r + margin, 1.0 - r - margin);
  s.center_y = detail::uniform(rng, r + margin, 1.0 - r - margin);
  s.pattern_phase_x = detail::uniform01(rng);
  s.pattern_phase_y = detail::uniform01(rng);
  s.texture_seed = rng();
  return s;
}

Scene sample_scene(uint64_t seed, const AttributeConstraints& constraints) {
  std::mt19937_64 rng(seed);
  return sample_scene(rng, constraints);
}

at::Tensor render(const Scene& scene, const RenderOptions& options) {
  check_scene(scene, options);
  return render_pixels(scene, options.size, options.supersample);
}

at::Tensor render_batch(const std::vector<Scene>& scenes, const RenderOptions& options) {
  if (scenes.empty()) throw Error("toy render_batch: no scenes");
  // Each image is a pure function of its scene, so they render in parallel and the batch is the same for any
  // thread count (a GPU training run needs every core here: one renders ~60 images/s).
  std::vector<at::Tensor> images(scenes.size());
  at::parallel_for(0, static_cast<int64_t>(scenes.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      images[static_cast<size_t>(i)] = render(scenes[static_cast<size_t>(i)], options);
    }
  });
  return at::stack(images);
}

namespace {

// Resamples [1, 3, H, W] at positions displaced by a smooth random field (value noise on a 5x5 lattice per axis,
// up to `amplitude` pixels), bilinearly, clamping at the border.
at::Tensor warp_image(const at::Tensor& x, double amplitude, std::mt19937_64& rng) {
  const int64_t h = x.size(2), w = x.size(3);
  const int n = 5;
  std::array<std::vector<double>, 2> grid;
  for (auto& g : grid) {
    g.resize(static_cast<size_t>(n * n));
    for (auto& v : g) v = detail::uniform(rng, -amplitude, amplitude);
  }
  const auto wy = lattice_weights(h, n), wx = lattice_weights(w, n);
  auto field = [&](const std::vector<double>& g, int64_t i, int64_t j) {
    const auto [k, fy] = wy[static_cast<size_t>(i)];
    const auto [l, fx] = wx[static_cast<size_t>(j)];
    auto at_ = [&](int a, int b) { return g[static_cast<size_t>(a * n + b)]; };
    return (at_(k, l) * (1 - fx) + at_(k, l + 1) * fx) * (1 - fy) + (at_(k + 1, l) * (1 - fx) + at_(k + 1, l + 1) * fx) * fy;
  };
  auto src = x.contiguous();
  auto out = at::empty_like(src);
  const float* in = src.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < h; ++i) {
    for (int64_t j = 0; j < w; ++j) {
      const double sy = std::clamp(static_cast<double>(i) + field(grid[0], i, j), 0.0, static_cast<double>(h - 1));
      const double sx = std::clamp(static_cast<double>(j) + field(grid[1], i, j), 0.0, static_cast<double>(w - 1));
      const int64_t y0 = std::min<int64_t>(static_cast<int64_t>(sy), h - 2), x0 = std::min<int64_t>(static_cast<int64_t>(sx), w - 2);
      const double fy = sy - static_cast<double>(y0), fx = sx - static_cast<double>(x0);
      for (int64_t c = 0; c < 3; ++c) {
        const float* p = in + c * h * w;
        const double v = (p[y0 * w + x0] * (1 - fx) + p[y0 * w + x0 + 1] * fx) * (1 - fy) +
                         (p[(y0 + 1) * w + x0] * (1 - fx) + p[(y0 + 1) * w + x0 + 1] * fx) * fy;
        o[c * h * w + i * w + j] = static_cast<float>(v);
      }
    }
  }
  return out;
}

}  // namespace

at::Tensor degrade(const at::Tensor& rgb, const Degradation& d, uint64_t seed) {
  if (!rgb.defined() || rgb.dim() != 3 || rgb.size(2) != 3 || rgb.scalar_type() != at::kByte) {
    throw Error("toy degrade: expected a uint8 [height, width, 3] image");
  }
  if (!(d.warp >= 0.0) || !(d.blur_sigma >= 0.0) || !(d.noise_sigma >= 0.0) || !(d.color_shift >= 0.0)) {
    throw Error("toy degrade: warp, blur_sigma, noise_sigma and color_shift must be >= 0");
  }
  std::mt19937_64 rng(seed);
  auto x = rgb.to(at::kFloat).permute({2, 0, 1}).unsqueeze(0).contiguous();  // [1, 3, H, W]
  if (d.warp > 0.0) x = warp_image(x, d.warp, rng);
  if (d.blur_sigma > 0.0) {
    const int64_t radius = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(3.0 * d.blur_sigma)));
    auto k = at::arange(-radius, radius + 1, at::kFloat);
    k = at::exp(-(k * k) / (2.0 * d.blur_sigma * d.blur_sigma));
    k = k / k.sum();
    auto padded = at::replication_pad2d(x, {radius, radius, radius, radius});
    auto kx = k.view({1, 1, 1, -1}).repeat({3, 1, 1, 1});
    auto ky = k.view({1, 1, -1, 1}).repeat({3, 1, 1, 1});
    const at::Tensor no_bias;
    x = at::conv2d(at::conv2d(padded, kx, no_bias, at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0},
                              at::IntArrayRef{1, 1}, 3),
                   ky, no_bias, at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0}, at::IntArrayRef{1, 1}, 3);
  }
  if (d.color_shift > 0.0) {
    const float shift[3] = {static_cast<float>(detail::uniform(rng, -d.color_shift, d.color_shift)),
                            static_cast<float>(detail::uniform(rng, -d.color_shift, d.color_shift)),
                            static_cast<float>(detail::uniform(rng, -d.color_shift, d.color_shift))};
    x = x + at::tensor({shift[0], shift[1], shift[2]}, at::kFloat).view({1, 3, 1, 1});
  }
  if (d.noise_sigma > 0.0) {
    auto noise = at::empty(x.sizes(), at::kFloat);
    float* p = noise.data_ptr<float>();
    const int64_t n = noise.numel();
    for (int64_t i = 0; i < n; i += 2) {  // Box-Muller: the same numbers with every standard library
      const double u1 = 1.0 - detail::uniform01(rng), u2 = detail::uniform01(rng);
      const double rad = std::sqrt(-2.0 * std::log(u1));
      p[i] = static_cast<float>(rad * std::cos(2.0 * M_PI * u2) * d.noise_sigma);
      if (i + 1 < n) p[i + 1] = static_cast<float>(rad * std::sin(2.0 * M_PI * u2) * d.noise_sigma);
    }
    x = x + noise;
  }
  return x.squeeze(0).round().clamp(0.0, 255.0).to(at::kByte).permute({1, 2, 0}).contiguous();
}

// --- geometry --------------------------------------------------------------------------------------------------------

namespace detail {
namespace {

// Even-odd inside test of a closed polygon given as (x, y) vertex pairs.
bool inside_polygon(const std::vector<std::pair<double, double>>& v, double x, double y) {
  bool in = false;
  const size_t n = v.size();
  for (size_t i = 0, j = n - 1; i < n; j = i++) {
    const auto [xi, yi] = v[i];
    const auto [xj, yj] = v[j];
    if ((y < yi) != (y < yj) && x < (y - yi) * ((xj - xi) / (yj - yi)) + xi) in = !in;
  }
  return in;
}

std::vector<std::pair<double, double>> regular(int points, double outer, double inner) {
  std::vector<std::pair<double, double>> v;
  const int n = inner > 0 ? 2 * points : points;
  for (int i = 0; i < n; ++i) {
    const double a = -M_PI / 2.0 + 2.0 * M_PI * i / n;
    const double rr = (inner > 0 && i % 2 == 1) ? inner : outer;
    v.emplace_back(rr * std::cos(a), rr * std::sin(a));
  }
  return v;
}

}  // namespace

bool inside(Object object, double x, double y) {
  switch (object) {
    case Object::circle: return x * x + y * y <= 1.0;
    case Object::square: return std::max(std::fabs(x), std::fabs(y)) <= 0.70;
    case Object::triangle: {
      static const auto tri = regular(3, 1.0, 0.0);
      return inside_polygon(tri, x, y);
    }
    case Object::star: {
      static const auto star = regular(5, 1.0, 0.5);
      return inside_polygon(star, x, y);
    }
    case Object::heart: {
      // (X^2 + Y^2 - 1)^3 - X^2 Y^3 <= 0 with Y up, scaled and shifted so the unit circle bounds it.
      const double X = x * 1.25, Y = y * -1.25 + 0.25;
      const double q = X * X + Y * Y - 1.0;
      return q * q * q - X * X * Y * Y * Y <= 0.0;
    }
    case Object::diamond: return std::fabs(x) / 0.62 + std::fabs(y) <= 1.0;
    case Object::cross: {
      const double ax = std::fabs(x), ay = std::fabs(y);
      return (ax <= 0.32 && ay <= 0.94) || (ay <= 0.32 && ax <= 0.94);
    }
    case Object::crescent: {
      const double ix = x - 0.45;
      return x * x + y * y <= 1.0 && ix * ix + y * y > 0.75 * 0.75;
    }
  }
  return false;
}

at::Tensor erode(const at::Tensor& mask, int64_t radius) { return 1.0 - dilate(1.0 - mask, radius); }

at::Tensor dilate(const at::Tensor& mask, int64_t radius) {
  at::Tensor m = mask;
  for (int64_t i = 0; i < radius; ++i) {
    if (i % 2 == 0) {
      m = at::max_pool2d(m, {3, 3}, {1, 1}, {1, 1});
    } else {
      m = at::maximum(at::max_pool2d(m, {1, 3}, {1, 1}, {0, 1}), at::max_pool2d(m, {3, 1}, {1, 1}, {1, 0}));
    }
  }
  return m;
}

}  // namespace detail

// --- captions --------------------------------------------------------------------------------------------------------

std::string caption(const Attributes& a, AttributeSet mentioned, CaptionForm form) {
  const std::string_view object = name(a.object);
  const std::string_view palette = name(a.palette);
  const std::string_view pattern = kPatternWords[static_cast<size_t>(a.pattern)];
  const std::string outline = a.outline == Outline::outlined ? "outlined" : "no outline";
  const std::string_view background = name(a.background);
  std::string out = fmt::format("a {}", object);
  if (form == CaptionForm::phrase) {
    if (mentioned.has(Attribute::palette) || mentioned.has(Attribute::pattern)) {
      out += " in";
      if (mentioned.has(Attribute::palette)) out += fmt::format(" {}", palette);
      if (mentioned.has(Attribute::pattern)) out += fmt::format(" {}", pattern);
      out += " style";
    }
    if (mentioned.has(Attribute::outline)) out += ", " + outline;
    if (mentioned.has(Attribute::background)) {
      out += fmt::format("{} on a {} background", mentioned.has(Attribute::outline) ? "," : "", background);
    }
  } else {
    if (mentioned.has(Attribute::palette)) out += fmt::format(", {}", palette);
    if (mentioned.has(Attribute::pattern)) out += fmt::format(", {}", pattern);
    if (mentioned.has(Attribute::outline)) out += ", " + outline;
    if (mentioned.has(Attribute::background)) out += fmt::format(", {} background", background);
  }
  return out;
}

std::string random_caption(const Attributes& attributes, std::mt19937_64& rng, AttributeSet* mentioned) {
  AttributeSet set;
  const double kind = detail::uniform01(rng);
  if (kind < 0.2) {
    set = AttributeSet{};
  } else if (kind < 0.4) {
    set = AttributeSet::style();
  } else {
    for (Attribute a : {Attribute::palette, Attribute::pattern, Attribute::background, Attribute::outline}) {
      if (detail::uniform01(rng) < 0.5) set = set.with(a);
    }
  }
  const CaptionForm form = detail::uniform01(rng) < 0.75 ? CaptionForm::phrase : CaptionForm::list;
  if (mentioned) *mentioned = set;
  return caption(attributes, set, form);
}

std::vector<std::string> vocabulary() {
  std::set<std::string> words = {"a", "in", "style", ",", "outlined", "no", "outline", "on", "background"};
  for (auto n : kObjectNames) words.emplace(n);
  for (auto n : kPaletteNames) words.emplace(n);
  for (auto n : kPatternWords) words.emplace(n);
  for (auto n : kBackgroundNames) words.emplace(n);
  return {words.begin(), words.end()};
}

AttributeSet ParsedCaption::mentioned() const {
  AttributeSet s;
  if (object) s = s.with(Attribute::object);
  if (palette) s = s.with(Attribute::palette);
  if (pattern) s = s.with(Attribute::pattern);
  if (background) s = s.with(Attribute::background);
  if (outline) s = s.with(Attribute::outline);
  return s;
}

ParsedCaption parse_caption(std::string_view text) {
  std::vector<std::string> words;
  std::string cur;
  for (char ch : text) {
    const auto uc = static_cast<unsigned char>(ch);
    if (std::isalpha(uc)) {
      cur += static_cast<char>(std::tolower(uc));
    } else if (!cur.empty()) {
      words.push_back(std::move(cur));
      cur.clear();
    }
  }
  if (!cur.empty()) words.push_back(cur);

  ParsedCaption p;
  static const std::set<std::string> known = [] {
    const auto v = vocabulary();
    return std::set<std::string>(v.begin(), v.end());
  }();
  for (const auto& w : words) {
    if (!known.count(w) && std::find(p.unknown_words.begin(), p.unknown_words.end(), w) == p.unknown_words.end())
      p.unknown_words.push_back(w);
  }
  for (size_t i = 0; i < words.size(); ++i) {
    const std::string& w = words[i];
    if (auto v = find_name(kObjectNames, w)) {
      p.object = static_cast<Object>(*v);
    } else if (auto v2 = find_name(kPaletteNames, w)) {
      p.palette = static_cast<Palette>(*v2);
    } else if (auto v3 = value_from_name(Attribute::pattern, w)) {
      p.pattern = static_cast<Pattern>(*v3);
    } else if (w == "stripe" || w == "dot" || w == "checkerboard" || w == "checkered") {
      p.pattern = w == "stripe" ? Pattern::stripes : (w == "dot" ? Pattern::dots : Pattern::checker);
    } else if (w == "plain" || w == "textured") {
      p.background = w == "plain" ? Background::plain : Background::textured;
    } else if (w == "outlined") {
      p.outline = Outline::outlined;
    } else if (w == "outline" || w == "outlines") {
      const bool negated = i > 0 && (words[i - 1] == "no" || words[i - 1] == "without");
      p.outline = negated ? Outline::none : Outline::outlined;
    }
  }
  return p;
}

// --- confusion tables ------------------------------------------------------------------------------------------------

ConfusionTable::ConfusionTable(Attribute attribute)
    : attribute_(attribute), n_(num_values(attribute)), counts_(static_cast<size_t>(n_ * n_), 0) {}

void ConfusionTable::add(int truth, int predicted) {
  check_value(attribute_, truth);
  check_value(attribute_, predicted);
  ++counts_[static_cast<size_t>(truth * n_ + predicted)];
}

int64_t ConfusionTable::count(int truth, int predicted) const {
  check_value(attribute_, truth);
  check_value(attribute_, predicted);
  return counts_[static_cast<size_t>(truth * n_ + predicted)];
}

int64_t ConfusionTable::total() const {
  int64_t t = 0;
  for (auto c : counts_) t += c;
  return t;
}

double ConfusionTable::accuracy() const {
  const int64_t t = total();
  if (t == 0) return 0.0;
  int64_t ok = 0;
  for (int i = 0; i < n_; ++i) ok += counts_[static_cast<size_t>(i * n_ + i)];
  return static_cast<double>(ok) / static_cast<double>(t);
}

std::string ConfusionTable::to_string() const {
  size_t w = 5;
  for (int i = 0; i < n_; ++i) w = std::max(w, value_name(attribute_, i).size());
  const size_t cw = std::max<size_t>(5, std::min<size_t>(w, 10));
  std::string out = fmt::format("{:>{}} |", fmt::format("{} \\ read", attribute_name(attribute_)), w + 8);
  for (int j = 0; j < n_; ++j) {
    out += fmt::format(" {:>{}}", value_name(attribute_, j).substr(0, cw), cw);
  }
  out += "\n";
  for (int i = 0; i < n_; ++i) {
    out += fmt::format("{:>{}} |", value_name(attribute_, i), w + 8);
    for (int j = 0; j < n_; ++j) out += fmt::format(" {:>{}}", counts_[static_cast<size_t>(i * n_ + j)], cw);
    out += "\n";
  }
  out += fmt::format("accuracy {:.4f} ({} images)\n", accuracy(), total());
  return out;
}

}  // namespace stylealigned::toy
