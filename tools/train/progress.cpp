#include "progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cmath>
#include <utility>

namespace stylealigned::train {

std::string format_duration(double seconds) {
  if (!(seconds >= 0)) return "?";
  const auto s = static_cast<int64_t>(std::llround(seconds));
  if (s >= 3600) return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
  if (s >= 60) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

ProgressReporter::ProgressReporter(std::string stage, std::string mode, int64_t line_every, std::FILE* out)
    : stage_(std::move(stage)), line_every_(line_every > 0 ? line_every : 1), out_(out) {
  if (mode == "none") {
    quiet_ = true;
  } else if (mode == "bar") {
    bar_ = true;
  } else if (mode == "auto") {
    bar_ = isatty(fileno(out_)) != 0;
  }
}

void ProgressReporter::update(const ProgressState& s, bool force_line) {
  if (quiet_) return;
  const std::string val = s.val_loss >= 0 ? fmt::format(" val {:.5f}", s.val_loss) : "";
  const std::string eta = s.eta_seconds >= 0 ? format_duration(s.eta_seconds) : "?";
  if (bar_) {
    std::string bar;
    if (s.max_steps > 0) {
      constexpr int kWidth = 24;
      const int filled = static_cast<int>(kWidth * std::min<double>(1.0, double(s.step) / double(s.max_steps)));
      bar = fmt::format(" |{}{}|", std::string(filled, '#'), std::string(kWidth - filled, '.'));
    }
    const std::string total = s.max_steps > 0 ? fmt::format("/{}", s.max_steps) : "";
    fmt::print(out_, "\r[{}] step {}{}{} loss {:.5f}{} {:.2f} s/step {:.1f} img/s ETA {}   ", stage_, s.step, total,
               bar, s.loss, val, s.step_seconds, s.images_per_second, eta);
    std::fflush(out_);
    bar_open_ = true;
    return;
  }
  if (force_line || s.step % line_every_ == 0) {
    fmt::print(out_, "[{}] step {}{} loss {:.5f}{} lr {:.3g} {:.3f} s/step {:.1f} img/s ETA {}\n", stage_, s.step,
               s.max_steps > 0 ? fmt::format("/{}", s.max_steps) : "", s.loss, val, s.lr, s.step_seconds,
               s.images_per_second, eta);
    std::fflush(out_);
  }
}

void ProgressReporter::message(const std::string& message) {
  if (bar_open_) {
    fmt::print(out_, "\n");
    bar_open_ = false;
  }
  fmt::print(out_, "{}\n", message);
  std::fflush(out_);
}

void ProgressReporter::finish() {
  if (bar_open_) fmt::print(out_, "\n");
  bar_open_ = false;
  std::fflush(out_);
}

}  // namespace stylealigned::train
