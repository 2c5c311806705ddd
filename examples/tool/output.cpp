#include "tool/output.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "stylealigned/error.h"
#include "stylealigned/io/safetensors.h"

namespace sa_tool {

namespace fs = std::filesystem;
using stylealigned::Error;

OutputSet::OutputSet(fs::path folder, bool force) : folder_(std::move(folder)), force_(force) {
  std::error_code ec;
  if (fs::exists(folder_, ec) && !fs::is_directory(folder_, ec)) {
    throw Error(fmt::format("--out {}: exists and is not a folder", folder_.string()));
  }
  fs::create_directories(folder_, ec);
  if (ec) throw Error(fmt::format("--out {}: cannot create the folder ({})", folder_.string(), ec.message()));
  std::string pattern = (folder_ / ".stylealigned-staging-XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) {
    throw Error(fmt::format("--out {}: folder is not writable", folder_.string()));
  }
  staging_ = pattern;
  // Fail early (before minutes of generation) if a target exists.
  for (const char* name : {"00-reference.png", "grid.png", "settings.json"}) check_target(folder_ / name);
}

OutputSet::~OutputSet() {
  std::error_code ec;
  fs::remove_all(staging_, ec);
  if (!committed_) {
    for (const auto& [staged, target] : moves_) fs::remove(staged, ec);
  }
}

void OutputSet::check_target(const fs::path& target) const {
  if (!force_ && fs::exists(target)) {
    throw Error(fmt::format("{}: exists; use --force to overwrite", target.string()));
  }
}

void OutputSet::add_png(const std::string& name, const at::Tensor& rgb, const stylealigned::image::TextChunks& text) {
  check_target(folder_ / name);
  stylealigned::image::write_png(staging_ / name, rgb, text);
  moves_.emplace_back(staging_ / name, folder_ / name);
}

void OutputSet::add_text(const std::string& name, const std::string& text) {
  check_target(folder_ / name);
  std::ofstream out(staging_ / name, std::ios::binary);
  out << text;
  out.close();
  if (!out) throw Error(fmt::format("{}: cannot write", (folder_ / name).string()));
  moves_.emplace_back(staging_ / name, folder_ / name);
}

void OutputSet::add_external_safetensors(const fs::path& path,
                                         const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  check_target(path);
  auto staged = path;
  staged += ".staging";
  stylealigned::io::save_safetensors(staged, tensors);
  moves_.emplace_back(staged, path);
}

void OutputSet::commit() {
  for (const auto& [staged, target] : moves_) {
    std::error_code ec;
    fs::rename(staged, target, ec);
    if (ec) throw Error(fmt::format("{}: cannot move into place ({})", target.string(), ec.message()));
  }
  committed_ = true;
}

ProgressBar::ProgressBar(int64_t total, bool quiet) : total_(total), enabled_(!quiet && ::isatty(2)) {}

void ProgressBar::update(int64_t done, double step_seconds) {
  elapsed_ += step_seconds;
  if (!enabled_) return;
  constexpr int kWidth = 30;
  const int filled = static_cast<int>(kWidth * done / std::max<int64_t>(total_, 1));
  const double eta = done > 0 ? elapsed_ / done * (total_ - done) : 0;
  fmt::print(stderr, "\r[{}{}] {}/{} steps  {:.2f} s/step  ETA {:.0f} s ", std::string(filled, '#'),
             std::string(kWidth - filled, '.'), done, total_, step_seconds, eta);
  std::fflush(stderr);
}

void ProgressBar::finish() {
  if (enabled_) fmt::print(stderr, "\n");
}

}  // namespace sa_tool
