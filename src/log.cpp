#include "stylealigned/log.h"

#include <iostream>
#include <mutex>
#include <utility>

namespace stylealigned {
namespace {
std::mutex& sink_mutex() {
  static std::mutex m;
  return m;
}
WarningHandler& sink() {
  static WarningHandler handler;
  return handler;
}
}  // namespace

WarningHandler set_warning_handler(WarningHandler handler) {
  std::lock_guard<std::mutex> lock(sink_mutex());
  return std::exchange(sink(), std::move(handler));
}

void warn(std::string_view message) {
  std::lock_guard<std::mutex> lock(sink_mutex());
  if (sink()) {
    sink()(message);
  } else {
    std::cerr << "stylealigned: warning: " << message << '\n';
  }
}

}  // namespace stylealigned
