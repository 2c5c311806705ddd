#include <ATen/ATen.h>

#include <cstdio>

#include "stylealigned/batch_layout.h"
#include "stylealigned/ddim.h"
#include "stylealigned/io/safetensors.h"

int main(int argc, char** argv) {
  auto layout = stylealigned::BatchLayout::cfg(3);
  stylealigned::DDIMScheduler scheduler(stylealigned::SchedulerConfig::style_aligned_notebooks());
  scheduler.set_timesteps(10);
  auto path = std::string(argc > 1 ? argv[1] : "consumer.safetensors");
  stylealigned::io::save_safetensors(path, {{"t", scheduler.timesteps()}});
  auto back = stylealigned::io::SafetensorsFile::open(path).tensor("t");
  const bool ok = layout.batch_size() == 6 && back.equal(scheduler.timesteps()) && back[0].item<int64_t>() == 900;
  std::printf("consumer: %s (layout %s, first timestep %lld)\n", ok ? "ok" : "FAILED", layout.to_string().c_str(),
              static_cast<long long>(back[0].item<int64_t>()));
  return ok ? 0 : 1;
}
