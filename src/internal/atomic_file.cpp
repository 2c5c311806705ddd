#include "internal/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "stylealigned/error.h"

namespace stylealigned::internal {

AtomicFile::AtomicFile(std::filesystem::path target) : target_(std::move(target)) {
  auto dir = target_.parent_path().empty() ? std::filesystem::path(".") : target_.parent_path();
  std::string pattern = (dir / ("." + target_.filename().string() + ".tmp-XXXXXX")).string();
  fd_ = ::mkstemp(pattern.data());
  if (fd_ < 0) {
    throw Error(fmt::format("{}: cannot create a file in {} ({})", target_.string(), dir.string(),
                            std::strerror(errno)));
  }
  ::fchmod(fd_, 0644);
  temp_ = pattern;
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_ && !temp_.empty()) {
    std::error_code ec;
    std::filesystem::remove(temp_, ec);
  }
}

void AtomicFile::write(const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd_, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(fmt::format("{}: write failed ({})", target_.string(), std::strerror(errno)));
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
}

void AtomicFile::commit() {
  if (::fsync(fd_) != 0) throw Error(fmt::format("{}: fsync failed ({})", target_.string(), std::strerror(errno)));
  if (::close(fd_) != 0) {
    fd_ = -1;
    throw Error(fmt::format("{}: close failed ({})", target_.string(), std::strerror(errno)));
  }
  fd_ = -1;
  std::error_code ec;
  std::filesystem::rename(temp_, target_, ec);
  if (ec) throw Error(fmt::format("{}: cannot move the finished file into place ({})", target_.string(), ec.message()));
  committed_ = true;
}

void write_file_atomic(const std::filesystem::path& target, const std::string& bytes) {
  AtomicFile f(target);
  f.write(bytes.data(), bytes.size());
  f.commit();
}

}  // namespace stylealigned::internal
