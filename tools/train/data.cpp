#include "data.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <random>

#include <fmt/format.h>

#include "stylealigned/error.h"
#include "stylealigned/toy/world.h"

namespace stylealigned::train {
namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
}  // namespace

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
  // Every image depends only on its own seed, so the images render in parallel and the batch is the same for any
  // thread count (a GPU run needs all cores here: one thread renders ~500 images/s, the GPU trains on thousands).
  std::vector<at::Tensor> images(static_cast<size_t>(count));
  Batch batch;
  if (with_captions) batch.captions.resize(static_cast<size_t>(count));
  toy::RenderOptions options;
  options.size = image_size;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      std::mt19937_64 rng(mix_seed(seed, stream, step, first_index + k));
      const toy::Scene scene = toy::sample_scene(rng);
      if (with_captions) batch.captions[static_cast<size_t>(k)] = toy::random_caption(scene.attributes, rng);
      images[static_cast<size_t>(k)] = toy::render(scene, options);
    }
  });
  batch.images = to_model_pixels(at::stack(images));
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
