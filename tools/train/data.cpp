#include "data.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <random>

#include <fmt/format.h>

#include "internal/splitmix.h"
#include "stylealigned/error.h"
#include "stylealigned/toy/world.h"

namespace stylealigned::train {
using internal::splitmix64;

uint64_t mix_seed(uint64_t seed, Stream stream, int64_t step, int64_t index) {
  uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ static_cast<uint64_t>(stream));
  h = splitmix64(h ^ static_cast<uint64_t>(step));
  return splitmix64(h ^ static_cast<uint64_t>(index));
}

at::Generator generator_for(uint64_t seed, Stream stream, int64_t step, int64_t index) {
  return at::detail::createCPUGenerator(mix_seed(seed, stream, step, index));
}

Batch render_batch(uint64_t seed, Stream stream, int64_t step, int64_t first_index, int64_t count,
                   int64_t image_size, bool with_captions) {
  if (count <= 0) throw Error(fmt::format("render_batch: count must be positive, got {}", count));
  std::vector<toy::Scene> scenes;
  Batch batch;
  scenes.reserve(static_cast<size_t>(count));
  for (int64_t i = first_index; i < first_index + count; ++i) {
    std::mt19937_64 rng(mix_seed(seed, stream, step, i));
    scenes.push_back(toy::sample_scene(rng));
    if (with_captions) batch.captions.push_back(toy::random_caption(scenes.back().attributes, rng));
  }
  toy::RenderOptions options;
  options.size = image_size;
  batch.images = to_model_pixels(toy::render_batch(scenes, options));  // parallel over the scenes
  return batch;
}

at::Tensor to_model_pixels(const at::Tensor& rgb) {
  return rgb.permute({0, 3, 1, 2}).to(at::kFloat).div(127.5).sub(1.0).contiguous();
}

at::Tensor to_rgb(const at::Tensor& pixels) {
  return pixels.detach().to(at::kCPU, at::kFloat).clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(at::kByte)
      .permute({0, 2, 3, 1}).contiguous();
}

}  // namespace stylealigned::train
