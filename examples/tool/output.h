// Output handling of the tool: a set of files that appears all at once (staged, then moved into place), the
// progress bar, and the usage-error type (exit code 2).
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "stylealigned/image.h"

namespace sa_tool {

/// A usage error: main prints it and exits with code 2.
class UsageError : public std::runtime_error {
 public:
  explicit UsageError(const std::string& m) : std::runtime_error(m) {}
};

/// Files written into a hidden staging folder inside the output folder and moved into place by commit(). Nothing
/// that exists is overwritten without `force`; if anything fails before commit(), the staging folder is removed
/// and the output folder is as before.
class OutputSet {
 public:
  OutputSet(std::filesystem::path folder, bool force);
  ~OutputSet();
  void add_png(const std::string& name, const at::Tensor& rgb, const stylealigned::image::TextChunks& text);
  void add_text(const std::string& name, const std::string& text);
  /// A file outside the folder (e.g. --save-latents); staged next to its target and moved by commit().
  void add_external_safetensors(const std::filesystem::path& path,
                                const std::vector<std::pair<std::string, at::Tensor>>& tensors);
  void commit();

 private:
  void check_target(const std::filesystem::path& target) const;
  std::filesystem::path folder_, staging_;
  bool force_;
  bool committed_ = false;
  std::vector<std::pair<std::filesystem::path, std::filesystem::path>> moves_;  // staged -> target
};

/// A one-line progress bar with step time and ETA, drawn only on a terminal (stderr) and never with --quiet.
class ProgressBar {
 public:
  ProgressBar(int64_t total, bool quiet);
  void update(int64_t done, double step_seconds);
  void finish();

 private:
  int64_t total_;
  bool enabled_;
  double elapsed_ = 0;
};

}  // namespace sa_tool
