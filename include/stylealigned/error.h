// stylealigned/error.h: the one exception type the library throws.
//
// Every error message names the thing at fault (file, tensor, key or option) so a user can act on it without a
// debugger:
//
//   try { auto f = stylealigned::io::SafetensorsFile::open("unet.safetensors"); }
//   catch (const stylealigned::Error& e) { std::cerr << e.what() << "\n"; }  // "unet.safetensors: header ..."
#pragma once

#include <stdexcept>
#include <string>

namespace stylealigned {

/// Thrown for invalid input (files, configs, options, tensor shapes). Derives from std::runtime_error so hosts that
/// already catch std::exception keep working.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace stylealigned
