// The toy world: attributes and their names, palettes, scene sampling, rendering and captions.
//
// Rendering works on whole-image tensors at `size * supersample` pixels: the object's inside test in its own
// rotated, scaled frame, the pattern and background fields in image coordinates, an outline band from a
// morphological erosion of the silhouette, then a box downsample (the anti-aliasing) and rounding to uint8.
#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cmath>
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
    {{15, 70, 160}, {60, 205, 215}, {205, 232, 248}, {150, 200, 235}, {5, 25, 65}},        // ocean
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

at::Tensor color_tensor(Rgb c) {
  return at::tensor({static_cast<float>(c.r), static_cast<float>(c.g), static_cast<float>(c.b)}, at::kFloat)
      .view({3, 1, 1});
}

// Interpolation matrix [out, n] of a smoothstep value-noise lattice with n points spanning [0, 1].
at::Tensor lattice_weights(int64_t out, int64_t n) {
  auto w = at::zeros({out, n}, at::kDouble);
  auto acc = w.accessor<double, 2>();
  for (int64_t i = 0; i < out; ++i) {
    const double u = (static_cast<double>(i) + 0.5) / static_cast<double>(out) * static_cast<double>(n - 1);
    const int64_t k = std::min<int64_t>(static_cast<int64_t>(std::floor(u)), n - 2);
    const double f = u - static_cast<double>(k);
    const double s = f * f * (3.0 - 2.0 * f);
    acc[i][k] += 1.0 - s;
    acc[i][k + 1] += s;
  }
  return w;
}

// Background mix field in [0, 1] ([R, R] float): two octaves of value noise pushed through a smoothstep, giving
// soft two-tone blotches a few pattern periods across (large enough to survive blur).
at::Tensor texture_field(uint64_t seed, int64_t res) {
  std::mt19937_64 rng(seed);
  at::Tensor field = at::zeros({res, res}, at::kDouble);
  const std::array<std::pair<int64_t, double>, 2> octaves = {{{6, 0.65}, {11, 0.35}}};
  for (const auto& [n, weight] : octaves) {
    auto grid = at::empty({n, n}, at::kDouble);
    auto acc = grid.accessor<double, 2>();
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) acc[i][j] = detail::uniform01(rng);
    }
    auto w = lattice_weights(res, n);
    field += weight * at::matmul(at::matmul(w, grid), w.t());
  }
  // The sum of two uniform lattices has mean 0.5 and a spread of about 0.2: map 0.5 +- 0.08 onto the full range.
  auto t = ((field - 0.42) / 0.16).clamp(0.0, 1.0);
  t = t * t * (3.0 - 2.0 * t);
  return t.to(at::kFloat);
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

// Float image [3, R, R] in 0..255 at the supersampled resolution.
at::Tensor render_supersampled(const Scene& s, int64_t res) {
  const PaletteColors& pal = palette_colors(s.attributes.palette);
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  // Pixel centres in image fractions; x varies along columns, y along rows.
  auto coord = (at::arange(res, opts) + 0.5) / static_cast<double>(res);
  auto xs = coord.view({1, res});
  auto ys = coord.view({res, 1});

  const double theta = s.rotation_deg * M_PI / 180.0;
  const double c = std::cos(theta), sn = std::sin(theta), r = s.size / 2.0;
  auto dx = xs - s.center_x;
  auto dy = ys - s.center_y;
  auto lx = (dx * (c / r) + dy * (sn / r));
  auto ly = (dx * (-sn / r) + dy * (c / r));
  at::Tensor mask = detail::inside(s.attributes.object, lx, ly).to(at::kFloat);  // [R, R]

  // Fill field: mix of fill (0) and fill_alt (1).
  const double scale64 = 64.0;  // pattern units: pixels of a 64-pixel image
  auto X = xs * scale64;
  auto Y = ys * scale64;
  at::Tensor t_fill;
  switch (s.attributes.pattern) {
    case Pattern::solid:
      t_fill = at::zeros({res, res}, opts);
      break;
    case Pattern::stripes: {
      auto u = (X + Y) / (std::sqrt(2.0) * detail::kStripePeriod64) + s.pattern_phase_x;
      t_fill = ((u - at::floor(u)) >= 0.5).to(at::kFloat);
      break;
    }
    case Pattern::checker: {
      auto cx = at::floor(X / detail::kCheckerCell64 + s.pattern_phase_x);
      auto cy = at::floor(Y / detail::kCheckerCell64 + s.pattern_phase_y);
      t_fill = at::remainder(cx + cy, 2.0);
      break;
    }
    case Pattern::dots: {
      auto fx = X / detail::kDotSpacing64 + s.pattern_phase_x;
      auto fy = Y / detail::kDotSpacing64 + s.pattern_phase_y;
      fx = (fx - at::floor(fx) - 0.5) * detail::kDotSpacing64;
      fy = (fy - at::floor(fy) - 0.5) * detail::kDotSpacing64;
      t_fill = ((fx * fx + fy * fy) <= detail::kDotRadius64 * detail::kDotRadius64).to(at::kFloat);
      break;
    }
    case Pattern::gradient: {
      // From the silhouette's top row to its bottom row, so every gradient spans the full fill range.
      auto rows = at::nonzero(mask.sum(1) > 0).view(-1);
      double top = 0.0, bottom = static_cast<double>(res - 1);
      if (rows.numel() > 0) {
        top = static_cast<double>(rows.min().item<int64_t>());
        bottom = static_cast<double>(rows.max().item<int64_t>());
      }
      auto row = at::arange(res, opts).view({res, 1});
      t_fill = ((row - top) / std::max(1.0, bottom - top)).clamp(0.0, 1.0).expand({res, res});
      break;
    }
  }
  auto fill = color_tensor(pal.fill);
  auto fill_alt = color_tensor(pal.fill_alt);
  auto fill_img = fill + (fill_alt - fill) * t_fill.unsqueeze(0);  // [3, R, R]

  auto bg = color_tensor(pal.background);
  auto bg_alt = color_tensor(pal.background_alt);
  at::Tensor bg_img;
  if (s.attributes.background == Background::textured) {
    bg_img = bg + (bg_alt - bg) * texture_field(s.texture_seed, res).unsqueeze(0);
  } else {
    bg_img = bg.expand({3, res, res});
  }

  at::Tensor object_img = fill_img;
  if (s.attributes.outline == Outline::outlined) {
    const auto radius =
        std::max<int64_t>(1, std::llround(detail::kOutlineWidth64 / 64.0 * static_cast<double>(res)));
    auto core = detail::erode(mask.view({1, 1, res, res}), radius).view({res, res});
    auto band = (mask - core).clamp(0.0, 1.0).unsqueeze(0);
    object_img = fill_img * (1.0 - band) + color_tensor(pal.outline) * band;
  }
  auto m = mask.unsqueeze(0);
  return object_img * m + bg_img * (1.0 - m);
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
  const int64_t res = options.size * options.supersample;
  auto img = render_supersampled(scene, res);
  if (options.supersample > 1) {
    img = at::avg_pool2d(img.unsqueeze(0), {options.supersample, options.supersample}).squeeze(0);
  }
  return img.round().clamp(0.0, 255.0).to(at::kByte).permute({1, 2, 0}).contiguous();
}

at::Tensor render_batch(const std::vector<Scene>& scenes, const RenderOptions& options) {
  if (scenes.empty()) throw Error("toy render_batch: no scenes");
  std::vector<at::Tensor> images;
  images.reserve(scenes.size());
  for (const auto& s : scenes) images.push_back(render(s, options));
  return at::stack(images);
}

at::Tensor degrade(const at::Tensor& rgb, const Degradation& d, uint64_t seed) {
  if (!rgb.defined() || rgb.dim() != 3 || rgb.size(2) != 3 || rgb.scalar_type() != at::kByte) {
    throw Error("toy degrade: expected a uint8 [height, width, 3] image");
  }
  if (!(d.blur_sigma >= 0.0) || !(d.noise_sigma >= 0.0) || !(d.color_shift >= 0.0)) {
    throw Error("toy degrade: blur_sigma, noise_sigma and color_shift must be >= 0");
  }
  auto x = rgb.to(at::kFloat).permute({2, 0, 1}).unsqueeze(0).contiguous();  // [1, 3, H, W]
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
  std::mt19937_64 rng(seed);
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
at::Tensor inside_polygon(const std::vector<std::pair<double, double>>& v, const at::Tensor& x, const at::Tensor& y) {
  at::Tensor in = at::zeros(at::broadcast_tensors({x, y})[0].sizes(), at::kBool);
  const size_t n = v.size();
  for (size_t i = 0, j = n - 1; i < n; j = i++) {
    const auto [xi, yi] = v[i];
    const auto [xj, yj] = v[j];
    if (yi == yj) continue;  // horizontal edges never cross a horizontal ray
    auto crosses = (y < yi) != (y < yj);
    auto x_at = (y - yi) * ((xj - xi) / (yj - yi)) + xi;
    in = in ^ (crosses & (x < x_at));
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

at::Tensor inside(Object object, const at::Tensor& x, const at::Tensor& y) {
  switch (object) {
    case Object::circle: return (x * x + y * y) <= 1.0;
    case Object::square: return at::maximum(x.abs(), y.abs()) <= 0.70;
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
      auto X = x * 1.25;
      auto Y = y * -1.25 + 0.25;
      auto q = X * X + Y * Y - 1.0;
      return (q * q * q - X * X * Y * Y * Y) <= 0.0;
    }
    case Object::diamond: return (x.abs() / 0.62 + y.abs()) <= 1.0;
    case Object::cross: {
      auto ax = x.abs(), ay = y.abs();
      return ((ax <= 0.32) & (ay <= 0.94)) | ((ay <= 0.32) & (ax <= 0.94));
    }
    case Object::crescent: {
      auto inner_x = x - 0.45;
      return ((x * x + y * y) <= 1.0) & ((inner_x * inner_x + y * y) > 0.75 * 0.75);
    }
  }
  throw Error(fmt::format("toy world: unknown object {}", static_cast<int>(object)));
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
