// stylealigned/log.h: where the library's warnings go.
//
// The library never prints on its own initiative except through this sink, so a host can route warnings into its
// own logging (or a test can capture them):
//
//   stylealigned::set_warning_handler([](std::string_view msg) { my_log.warn("{}", msg); });
#pragma once

#include <functional>
#include <string_view>

namespace stylealigned {

using WarningHandler = std::function<void(std::string_view message)>;

/// Replaces the warning sink and returns the previous one. The default writes "stylealigned: warning: ..." to stderr.
/// Passing an empty function restores the default.
WarningHandler set_warning_handler(WarningHandler handler);

/// Sends one warning to the current sink (thread-safe).
void warn(std::string_view message);

}  // namespace stylealigned
