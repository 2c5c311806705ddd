// stylealigned/batch_layout.h: how the rows of one forward pass split into style groups.
//
// StyleAligned needs to know, for every row of a batch, which row is its reference. diffusers' convention
// ([uncond n ; cond n], references at 0 and n) is one layout among several: without classifier-free guidance there
// is a single group, and a host that runs cond and uncond in separate passes has one group per pass. The layout is
// therefore explicit and travels with every forward pass, never derived from `batch / 2`.
//
//   auto layout = stylealigned::BatchLayout::cfg(4);          // 8 rows: [uncond 4 ; cond 4], references 0 and 4
//   auto solo   = stylealigned::BatchLayout::single_group(3);  // no CFG: 3 rows, reference 0
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace stylealigned {

/// Rows [begin, end) of a batch that share one reference row (`begin <= reference < end`).
struct CfgGroup {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t reference = 0;

  int64_t size() const { return end - begin; }
  friend bool operator==(const CfgGroup& a, const CfgGroup& b) {
    return a.begin == b.begin && a.end == b.end && a.reference == b.reference;
  }
};

/// A partition of the batch rows [0, batch_size) into consecutive groups, each with one reference row.
class BatchLayout {
 public:
  /// An empty layout (batch size 0). Use one of the factories below.
  BatchLayout() = default;

  /// Validates that `groups` are non-empty, consecutive, start at row 0 and that each reference lies in its group.
  /// Throws stylealigned::Error otherwise.
  explicit BatchLayout(std::vector<CfgGroup> groups);

  /// `branches` groups of `images` rows each (diffusers CFG order: uncond first); reference = first row of each.
  static BatchLayout cfg(int64_t images, int64_t branches = 2);
  /// One group of `rows` rows with reference 0: generation without classifier-free guidance.
  static BatchLayout single_group(int64_t rows);
  /// Every row is its own group (and its own reference): StyleAligned then reduces to plain attention.
  static BatchLayout independent(int64_t rows);

  int64_t batch_size() const { return batch_size_; }
  const std::vector<CfgGroup>& groups() const { return groups_; }
  /// For every row, the index of its group's reference row.
  const std::vector<int64_t>& reference_of_row() const { return reference_of_row_; }
  bool is_reference(int64_t row) const { return reference_of_row_.at(static_cast<size_t>(row)) == row; }
  /// True if some group holds more than one row (i.e. there is something to align).
  bool has_targets() const;

  /// Throws stylealigned::Error naming `what` unless this layout describes exactly `batch` rows.
  void check_batch(int64_t batch, std::string_view what) const;

  std::string to_string() const;

  friend bool operator==(const BatchLayout& a, const BatchLayout& b) { return a.groups_ == b.groups_; }

 private:
  std::vector<CfgGroup> groups_;
  std::vector<int64_t> reference_of_row_;
  int64_t batch_size_ = 0;
};

}  // namespace stylealigned
