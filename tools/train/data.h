// Training data of the toy world, rendered on the fly from deterministic seeds.
//
// Every random draw of a run is a pure function of (run seed, stream, step, index): image `i` of the batch of step
// `s` is always the same scene and caption, and the noise and timesteps of step `s` are always the same, so a run
// resumed from a checkpoint continues exactly as the uninterrupted run would have.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace stylealigned::train {

/// Independent random streams of a run.
enum class Stream : uint64_t { train = 1, validation = 2, noise = 3, statistics = 4 };

/// A 64-bit seed for (run seed, stream, step, index), from a splitmix64 chain: nearby inputs give unrelated seeds.
uint64_t mix_seed(uint64_t seed, Stream stream, int64_t step, int64_t index = 0);
/// A CPU generator seeded with mix_seed(...): draw on the CPU, then move to the device, so runs match across devices.
at::Generator generator_for(uint64_t seed, Stream stream, int64_t step, int64_t index = 0);

struct Batch {
  at::Tensor images;                  ///< float32 [n, 3, size, size] in [-1, 1], CPU
  std::vector<std::string> captions;  ///< one toy::random_caption per image (empty when not asked for)
};

/// Renders images first_index .. first_index + count - 1 of (stream, step): scene from toy::sample_scene and caption
/// from toy::random_caption, both seeded with mix_seed(seed, stream, step, index).
Batch render_batch(uint64_t seed, Stream stream, int64_t step, int64_t first_index, int64_t count,
                   int64_t image_size, bool with_captions);

/// uint8 [n, H, W, 3] -> float32 [n, 3, H, W] in [-1, 1] (the VAE's pixel range).
at::Tensor to_model_pixels(const at::Tensor& rgb);
/// float [n, 3, H, W] in [-1, 1] (clamped) -> uint8 [n, H, W, 3].
at::Tensor to_rgb(const at::Tensor& pixels);

}  // namespace stylealigned::train
