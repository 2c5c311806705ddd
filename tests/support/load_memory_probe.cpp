// sa_load_memory_probe FOLDER [--copy]: loads FOLDER with Pipeline::load in this fresh process and prints one JSON
// line with the weights' bytes and the RSS before, the peak RSS during and the RSS after loading (MiB).
// test_load_memory runs it; measuring inside the test process instead would count (or hide, by reusing freed memory)
// what other tests did. --copy loads with map_weights off (every tensor copied out of the file).
#include <fmt/format.h>

#include <optional>
#include <string>

#include "internal/process_memory.h"
#include "stylealigned/pipeline.h"
#include "stylealigned/runtime.h"

int main(int argc, char** argv) {
  namespace sai = stylealigned::internal;
  const bool copy = argc == 3 && std::string(argv[2]) == "--copy";
  if (argc != 2 && !copy) {
    fmt::print(stderr, "usage: sa_load_memory_probe MODEL_FOLDER [--copy]\n");
    return 2;
  }
  try {
    stylealigned::configure_threads();
    sai::warm_up_torch();
    std::optional<stylealigned::Pipeline> pipeline;
    stylealigned::PipelineLoadOptions options;
    options.map_weights = !copy;
    const sai::MemoryDelta m =
        sai::measure_memory([&] { pipeline.emplace(stylealigned::Pipeline::load(argv[1], options)); });
    fmt::print(
        "{{\"weights_bytes\": {}, \"rss_before_mb\": {:.2f}, \"peak_rss_mb\": {:.2f}, \"rss_after_mb\": {:.2f}, "
        "\"anon_change_mb\": {:.2f}, \"file_change_mb\": {:.2f}, \"peak_reset\": {}}}\n",
        sai::safetensors_bytes(argv[1]), m.before_mib, m.peak_mib, m.after_mib, m.anon_change_mib, m.file_change_mib,
        m.peak_reset);
  } catch (const std::exception& e) {
    fmt::print(stderr, "sa_load_memory_probe: {}\n", e.what());
    return 1;
  }
  return 0;
}
