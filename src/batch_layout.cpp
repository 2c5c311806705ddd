#include "stylealigned/batch_layout.h"

#include <fmt/format.h>

#include "stylealigned/error.h"

namespace stylealigned {

BatchLayout::BatchLayout(std::vector<CfgGroup> groups) : groups_(std::move(groups)) {
  int64_t expected_begin = 0;
  for (size_t i = 0; i < groups_.size(); ++i) {
    const auto& g = groups_[i];
    if (g.begin != expected_begin || g.end <= g.begin || g.reference < g.begin || g.reference >= g.end) {
      throw Error(fmt::format(
          "BatchLayout: group {} (rows [{}, {}), reference {}) is invalid: groups must be non-empty, consecutive "
          "from row 0, and contain their reference row",
          i, g.begin, g.end, g.reference));
    }
    expected_begin = g.end;
  }
  batch_size_ = expected_begin;
  reference_of_row_.resize(static_cast<size_t>(batch_size_));
  for (const auto& g : groups_) {
    for (int64_t r = g.begin; r < g.end; ++r) reference_of_row_[static_cast<size_t>(r)] = g.reference;
  }
}

BatchLayout BatchLayout::cfg(int64_t images, int64_t branches) {
  if (images < 1 || branches < 1) {
    throw Error(fmt::format("BatchLayout::cfg: images ({}) and branches ({}) must be positive", images, branches));
  }
  std::vector<CfgGroup> groups;
  for (int64_t b = 0; b < branches; ++b) groups.push_back({b * images, (b + 1) * images, b * images});
  return BatchLayout(std::move(groups));
}

BatchLayout BatchLayout::single_group(int64_t rows) { return cfg(rows, 1); }

BatchLayout BatchLayout::independent(int64_t rows) {
  if (rows < 1) throw Error(fmt::format("BatchLayout::independent: rows ({}) must be positive", rows));
  return cfg(1, rows);
}

bool BatchLayout::has_targets() const {
  for (const auto& g : groups_) {
    if (g.size() > 1) return true;
  }
  return false;
}

void BatchLayout::check_batch(int64_t batch, std::string_view what) const {
  if (batch != batch_size_) {
    throw Error(fmt::format("{}: batch has {} rows but the batch layout describes {} ({})", what, batch, batch_size_,
                            to_string()));
  }
}

std::string BatchLayout::to_string() const {
  std::string s = "[";
  for (size_t i = 0; i < groups_.size(); ++i) {
    const auto& g = groups_[i];
    s += fmt::format("{}rows {}..{} ref {}", i ? "; " : "", g.begin, g.end - 1, g.reference);
  }
  return s + "]";
}

}  // namespace stylealigned
