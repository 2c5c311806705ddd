// Progress of a training run: a one-line bar redrawn in place on a terminal, plain lines otherwise (nohup logs).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace stylealigned::train {

struct ProgressState {
  int64_t step = 0;
  int64_t max_steps = 0;     ///< 0: no step limit
  double loss = 0.0;         ///< smoothed training loss
  double val_loss = -1.0;    ///< last validation loss (< 0: none yet)
  double step_seconds = 0;   ///< smoothed seconds per step
  double images_per_second = 0;
  double eta_seconds = -1;   ///< < 0: unknown
  double lr = 0;
};

class ProgressReporter {
 public:
  /// `mode`: "auto" (bar if `out` is a terminal), "bar", "lines" or "none". Lines are written every
  /// `line_every` steps.
  ProgressReporter(std::string stage, std::string mode, int64_t line_every, std::FILE* out = stderr);
  void update(const ProgressState& state, bool force_line = false);
  /// Ends the bar's line and prints `message` on its own line.
  void message(const std::string& message);
  void finish();

 private:
  std::string stage_;
  bool bar_ = false;
  bool quiet_ = false;
  bool bar_open_ = false;
  int64_t line_every_;
  std::FILE* out_;
};

/// "1h02m", "4m05s", "12s".
std::string format_duration(double seconds);

}  // namespace stylealigned::train
