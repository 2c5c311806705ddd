// splitmix64 (Steele, Lea, Flood 2014): the seed mixer behind every derived random stream of the toy world's
// study and trainer, so nearby inputs (set 0, 1, 2; step s, s + 1) give unrelated generator seeds.
#pragma once

#include <cstdint>

namespace stylealigned::internal {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace stylealigned::internal
