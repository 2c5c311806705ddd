// stylealigned/io/safetensors.h: memory-mapped safetensors reading and atomic writing.
//
// The reader validates the whole header before handing out a tensor (length, JSON, dtypes, shapes, offsets in
// bounds and non-overlapping, byte sizes) and returns tensors that alias the mapping, so loading a checkpoint does
// not copy it. Sharded checkpoints (`*.safetensors.index.json`) open as one Checkpoint.
//
//   auto file = stylealigned::io::SafetensorsFile::open("unet/diffusion_pytorch_model.safetensors");
//   at::Tensor w = file.tensor("conv_in.weight");            // aliases the mapping; dtype as stored
//   stylealigned::io::save_safetensors("out.safetensors", {{"latents", latents}});
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace stylealigned::io {

/// The safetensors dtypes we read and write.
enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

std::string_view dtype_name(DType dtype);  ///< "F32", ...
size_t dtype_size(DType dtype);            ///< bytes per element

/// One header entry.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  ///< byte offsets relative to the data section
  uint64_t end = 0;
  int64_t numel() const;
};

struct Mapping;  // the memory map; shared by every tensor handed out

/// A validated, memory-mapped safetensors file.
class SafetensorsFile {
 public:
  /// Maps and validates `path`. Throws stylealigned::Error naming the file (and tensor) for any defect.
  static SafetensorsFile open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  /// Entries in file order (ascending offsets).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(std::string_view name) const;
  /// Throws stylealigned::Error naming the file and tensor if absent.
  const TensorInfo& info(std::string_view name) const;

  /// A CPU tensor with the stored dtype that aliases the mapping (copied only if the data is misaligned for its
  /// dtype). It keeps the mapping alive. Treat it as read-only.
  at::Tensor tensor(std::string_view name) const;

 private:
  std::filesystem::path path_;
  std::shared_ptr<Mapping> mapping_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
  uint64_t data_begin_ = 0;  ///< absolute offset of the data section
};

/// A model checkpoint: a single safetensors file or the shards named by a `*.safetensors.index.json`.
class Checkpoint {
 public:
  /// `path` is a .safetensors file or a .safetensors.index.json. Throws stylealigned::Error on any defect,
  /// including a tensor listed in the index but missing from its shard.
  static Checkpoint open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  /// All tensor names, sorted.
  std::vector<std::string> names() const;
  bool contains(std::string_view name) const;
  const TensorInfo& info(std::string_view name) const;
  at::Tensor tensor(std::string_view name) const;
  /// The file that holds `name` (for error messages).
  const std::filesystem::path& file_of(std::string_view name) const;
  /// Sum of the byte sizes of all tensors.
  uint64_t total_bytes() const;

 private:
  std::filesystem::path path_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t, std::less<>> file_of_;
};

/// Writes tensors (any device; copied to CPU, made contiguous) to `path` atomically: a temporary file in the same
/// folder is written, flushed and renamed over `path`, so a reader never sees a half-written file. Names must be
/// unique and non-empty. Throws stylealigned::Error naming the file or tensor at fault.
void save_safetensors(const std::filesystem::path& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

/// Convenience: every tensor of a file, copied into memory owned by the tensors (no mapping kept).
std::vector<std::pair<std::string, at::Tensor>> load_safetensors(const std::filesystem::path& path);

}  // namespace stylealigned::io
