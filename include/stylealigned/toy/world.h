// stylealigned/toy/world.h: the procedural world of the embedded toy model, and evaluators that read its truth back.
//
// The embedded text-to-image model is trained on images of this world: one object (circle, star, heart, ...) drawn
// in a style made of four attributes that are independent of the object: a palette (named colour scheme), a fill
// pattern, a plain or textured background, and an outline or none. Every image comes with the attributes that made
// it, and captions describe the object and any chosen subset of the style, so a prompt that leaves the palette out
// leaves it to chance: the ambiguity StyleAligned resolves.
//
// The evaluators read every attribute back from an image (exact image analysis against the world's definitions, no
// learned weights), so a generated set can be scored: object accuracy and set style consistency.
//
//   namespace toy = stylealigned::toy;
//   toy::AttributeConstraints fixed;
//   fixed.object = toy::Object::star;
//   toy::Scene scene = toy::sample_scene(/*seed=*/42, fixed);
//   at::Tensor rgb = toy::render(scene);                        // uint8 [64, 64, 3]
//   std::string text = toy::caption(scene.attributes, toy::AttributeSet{toy::Attribute::pattern});  // "a star in striped style"
//   toy::Evaluation seen = toy::evaluate(rgb);                  // seen.attributes == scene.attributes
//
// Everything is deterministic: a seed gives the same scene, the same scene the same bytes (no global RNG is used).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace stylealigned::toy {

// Attributes ----------------------------------------------------------------------------------------------------------

/// The object classes. Every class is drawn with the same random size, position and rotation ranges.
enum class Object : int { circle, square, triangle, star, heart, diamond, cross, crescent };
/// Named colour schemes; each fixes the fill colours, the background colours and the outline colour.
enum class Palette : int { pastel, neon, earth, ocean, monochrome, sunset, forest, candy };
/// How the object is filled with its palette's two fill colours.
enum class Pattern : int { solid, stripes, dots, checker, gradient };
/// Plain: one flat colour. Textured: soft blotches of the palette's two background colours.
enum class Background : int { plain, textured };
/// Outlined: a band of the palette's outline colour just inside the object's silhouette (the silhouette does not
/// change, so the object reads the same with or without it).
enum class Outline : int { none, outlined };

/// The five attributes of an image, in the order used by every table (confusion tables, AttributeSet bits).
enum class Attribute : int { object, palette, pattern, background, outline };
inline constexpr int kNumAttributes = 5;
inline constexpr std::array<Attribute, kNumAttributes> kAllAttributes = {
    Attribute::object, Attribute::palette, Attribute::pattern, Attribute::background, Attribute::outline};

/// Number of values an attribute takes (objects 8, palettes 8, patterns 5, backgrounds 2, outlines 2).
int num_values(Attribute attribute);
/// "object", "palette", "pattern", "background", "outline".
std::string_view attribute_name(Attribute attribute);
/// The name of one value: "star", "pastel", "stripes", "textured", "outlined", ... Throws stylealigned::Error for a
/// value out of range.
std::string_view value_name(Attribute attribute, int value);
/// Inverse of value_name (also accepts the caption words "striped", "dotted", "checkered", "no outline").
std::optional<int> value_from_name(Attribute attribute, std::string_view name);

std::string_view name(Object object);
std::string_view name(Palette palette);
std::string_view name(Pattern pattern);
std::string_view name(Background background);
std::string_view name(Outline outline);

/// One value per attribute: the truth of a rendered image, or what an evaluator read.
struct Attributes {
  Object object = Object::circle;
  Palette palette = Palette::pastel;
  Pattern pattern = Pattern::solid;
  Background background = Background::plain;
  Outline outline = Outline::none;

  /// The value of `attribute` as an int (the enum's underlying value), for generic tables.
  int get(Attribute attribute) const;
  /// Sets `attribute` from an int; throws stylealigned::Error if out of range.
  void set(Attribute attribute, int value);
  bool operator==(const Attributes& other) const;
  bool operator!=(const Attributes& other) const { return !(*this == other); }
};

/// A set of attributes (which a caption mentions, which a comparison looks at).
class AttributeSet {
 public:
  constexpr AttributeSet() = default;
  constexpr AttributeSet(std::initializer_list<Attribute> attributes) {
    for (Attribute a : attributes) bits_ |= bit(a);
  }
  static constexpr AttributeSet all() { return AttributeSet(0x1f); }
  /// palette, pattern, background, outline: everything but the object.
  static constexpr AttributeSet style() { return AttributeSet(0x1e); }

  constexpr bool has(Attribute a) const { return (bits_ & bit(a)) != 0; }
  constexpr AttributeSet with(Attribute a) const { return AttributeSet(bits_ | bit(a)); }
  constexpr AttributeSet without(Attribute a) const { return AttributeSet(bits_ & ~bit(a)); }
  /// The attributes in `all()` that are not in this set.
  constexpr AttributeSet complement() const { return AttributeSet(~bits_ & 0x1f); }
  constexpr bool empty() const { return bits_ == 0; }
  constexpr unsigned bits() const { return bits_; }
  constexpr bool operator==(AttributeSet other) const { return bits_ == other.bits_; }
  constexpr bool operator!=(AttributeSet other) const { return bits_ != other.bits_; }

 private:
  constexpr explicit AttributeSet(unsigned bits) : bits_(bits) {}
  static constexpr unsigned bit(Attribute a) { return 1u << static_cast<unsigned>(a); }
  unsigned bits_ = 0;
};

/// True when `a` and `b` agree on every attribute in `on`: the set-style-consistency test for a target against its
/// reference, with `on` = the attributes the prompt leaves out.
bool same(const Attributes& a, const Attributes& b, AttributeSet on);

// Palettes ------------------------------------------------------------------------------------------------------------

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
};

/// The colours of one palette. Patterns mix `fill` and `fill_alt` (dots are `fill_alt` on `fill`, the gradient runs
/// from `fill` at the top to `fill_alt` at the bottom); textured backgrounds mix `background` and `background_alt`.
/// The palettes are chosen so that no two explain each other's colours (see the evaluator).
struct PaletteColors {
  Rgb fill, fill_alt, background, background_alt, outline;
};
const PaletteColors& palette_colors(Palette palette);

// Scenes and rendering ------------------------------------------------------------------------------------------------

/// Everything that determines one image. Coordinates are fractions of the image side (x right, y down), so a scene
/// renders to the same picture at any resolution.
struct Scene {
  Attributes attributes;
  double center_x = 0.5;      ///< centre of the object's bounding circle
  double center_y = 0.5;
  double size = 0.6;          ///< diameter of the bounding circle; sampled in [0.5, 0.8]
  double rotation_deg = 0.0;  ///< clockwise on screen; sampled in [-45, 45]
  double pattern_phase_x = 0.0;  ///< pattern offsets, fractions of a pattern period in [0, 1)
  double pattern_phase_y = 0.0;
  uint64_t texture_seed = 0;  ///< seeds the textured background's noise (std::mt19937_64)
};

/// Attribute values to hold fixed while sampling; unset ones are drawn uniformly.
struct AttributeConstraints {
  std::optional<Object> object;
  std::optional<Palette> palette;
  std::optional<Pattern> pattern;
  std::optional<Background> background;
  std::optional<Outline> outline;
};

/// Draws a scene. Every attribute is drawn from `rng` even when constrained (the constraint then overrides it), so
/// the same generator state gives the same layout whatever the constraints: a target can differ from its reference
/// only in the attributes one chooses.
Scene sample_scene(std::mt19937_64& rng, const AttributeConstraints& constraints = {});
/// sample_scene with a fresh std::mt19937_64 seeded with `seed`.
Scene sample_scene(uint64_t seed, const AttributeConstraints& constraints = {});

struct RenderOptions {
  int64_t size = 64;       ///< output width and height in pixels (>= 8)
  int64_t supersample = 4;  ///< anti-aliasing: render at size * supersample and box-downsample (>= 1)
};

/// Renders a scene to uint8 [size, size, 3] RGB. Deterministic: the same scene and options give the same bytes.
/// Throws stylealigned::Error naming the field for an invalid scene or option.
at::Tensor render(const Scene& scene, const RenderOptions& options = {});
/// Renders several scenes into uint8 [N, size, size, 3].
at::Tensor render_batch(const std::vector<Scene>& scenes, const RenderOptions& options = {});

/// What degrade() does to an image; zero fields do nothing.
struct Degradation {
  double warp = 0.0;         ///< smooth random displacement of up to this many pixels (wobbly shapes)
  double blur_sigma = 0.0;   ///< Gaussian blur, pixels
  double noise_sigma = 0.0;  ///< additive Gaussian noise per channel, 0..255 units
  double color_shift = 0.0;  ///< one offset per channel for the whole image, uniform in [-shift, shift]
};

/// Warps, blurs, shifts colours, then adds noise to a uint8 [H, W, 3] image (random parts seeded by `seed`),
/// returning uint8: a stand-in for the softness and colour drift of a small diffusion model's samples when testing
/// evaluators, or a training augmentation. Throws stylealigned::Error for a bad image or negative field.
at::Tensor degrade(const at::Tensor& rgb, const Degradation& degradation, uint64_t seed);

// Captions ------------------------------------------------------------------------------------------------------------

enum class CaptionForm {
  phrase,  ///< "a star in pastel striped style, outlined, on a textured background"
  list,    ///< "a star, pastel, striped, outlined, textured background"
};

/// The caption of `attributes` naming the object and the style attributes in `mentioned` (the object is always
/// named; `Attribute::object` in `mentioned` is ignored). With nothing mentioned both forms give "a star".
///   phrase: "a {object}" [" in" [" {palette}"] [" {pattern word}"] " style"] [", outlined" | ", no outline"]
///           [[","] " on a {plain|textured} background"]   (the comma after an outline part)
///   list:   "a {object}" then ", {word}" for palette, pattern word, "outlined"/"no outline", "{..} background"
/// Pattern words: solid, striped, dotted, checkered, gradient.
std::string caption(const Attributes& attributes, AttributeSet mentioned, CaptionForm form = CaptionForm::phrase);

/// A training caption: with probability 0.2 the object alone, 0.2 every style attribute, else each style attribute
/// independently with probability 0.5; the phrase form with probability 0.75. Deterministic given `rng`.
std::string random_caption(const Attributes& attributes, std::mt19937_64& rng, AttributeSet* mentioned = nullptr);

/// Every word and punctuation mark a caption can contain, sorted, without duplicates (the CLIP vocabulary of the
/// embedded model is built from it). Captions split on spaces, with "," split off as its own token.
std::vector<std::string> vocabulary();

/// What a prompt says about the world, read word by word (tolerant of extra words, order and case, so it also reads
/// prompts with a style text appended).
struct ParsedCaption {
  std::optional<Object> object;
  std::optional<Palette> palette;
  std::optional<Pattern> pattern;
  std::optional<Background> background;
  std::optional<Outline> outline;
  /// The attributes the prompt names (object included when found).
  AttributeSet mentioned() const;
  /// Words of the prompt (lowercased, once each, in order) that no caption of the world contains. The embedded model
  /// was trained on none of them: "a zebra" reaches its text encoder as byte-level pieces it has never seen, so it
  /// draws something arbitrary. Tools warn with these.
  std::vector<std::string> unknown_words;
};
ParsedCaption parse_caption(std::string_view text);

// Evaluators ----------------------------------------------------------------------------------------------------------

/// What the evaluators read from one image.
struct Evaluation {
  Attributes attributes;
  /// Per attribute (indexed by Attribute), in [0, 1]: how clearly the winner beat the runner-up. Low values flag
  /// images that look like no rendered image (e.g. a failed generation); the object's is 0 when the segmented
  /// object touches the image border or covers more than about 60% of it, as no rendered object does.
  std::array<float, kNumAttributes> confidence{};
  /// Best match of the segmented silhouette against the object templates (soft intersection over union, 0..1).
  float object_match = 0.0f;
  /// Share of the image covered by the segmented object.
  float object_area = 0.0f;

  float confidence_of(Attribute a) const { return confidence[static_cast<size_t>(a)]; }
};

/// Reads object, palette, pattern, background and outline from one image: uint8 [H, W, 3] (0..255) or float
/// [3, H, W] in [0, 1], square, at least 16 pixels (resized to 64x64 when different). Throws stylealigned::Error for
/// other shapes or dtypes. Thread-safe; about 10 ms on one core (the first call builds the templates, ~0.4 s).
///
/// How: the palette is the one whose colour model (background segment, fill segment, outline colour; the image's
/// outer frame may only be background) explains the pixels best; a global colour cast is then undone; pixels
/// nearer the fill or outline colours than the background form the object mask; the object is the class whose
/// silhouette template (normalised for position, scale and rotation) overlaps the mask best; the outline is read
/// from how much outline colour the silhouette's inner edge holds; the pattern from the fill coordinate inside the
/// mask (its spread for solid, else the best normalised correlation with each pattern, maximised over the phase,
/// or with the row for the gradient); the background from the spread of the background coordinate away from it.
/// Measured accuracy: tests/test_world.cpp prints confusion tables for clean and degraded renders.
Evaluation evaluate(const at::Tensor& image);
/// evaluate for each image of uint8 [N, H, W, 3] or float [N, 3, H, W].
std::vector<Evaluation> evaluate_batch(const at::Tensor& images);

/// Counts of (truth, prediction) pairs for one attribute, for reports.
class ConfusionTable {
 public:
  explicit ConfusionTable(Attribute attribute);
  void add(int truth, int predicted);
  Attribute attribute() const { return attribute_; }
  int64_t count(int truth, int predicted) const;
  int64_t total() const;
  double accuracy() const;  ///< 0 when empty
  /// A fixed-width text table (rows: truth, columns: prediction) followed by the accuracy.
  std::string to_string() const;

 private:
  Attribute attribute_;
  int n_;
  std::vector<int64_t> counts_;
};

}  // namespace stylealigned::toy
