// Write-then-rename: a reader never sees a half-written output, and a failure leaves an existing file untouched.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>

namespace stylealigned::internal {

class AtomicFile {
 public:
  /// Creates a temporary file next to `target`. Throws stylealigned::Error naming `target` if the folder is not
  /// writable.
  explicit AtomicFile(std::filesystem::path target);
  ~AtomicFile();  ///< removes the temporary file unless commit() succeeded
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t size);
  /// Flushes to disk and renames over the target.
  void commit();

 private:
  std::filesystem::path target_;
  std::filesystem::path temp_;
  int fd_ = -1;
  bool committed_ = false;
};

/// Writes `bytes` to `target` atomically.
void write_file_atomic(const std::filesystem::path& target, const std::string& bytes);

}  // namespace stylealigned::internal
