// The one place that knows which libtorch we are built against (Debian's 1.13 here, 2.x with CUDA elsewhere).
#pragma once

#include <torch/csrc/api/include/torch/version.h>

#if TORCH_VERSION_MAJOR >= 2
#define STYLEALIGNED_HAS_SDPA 1
#else
#define STYLEALIGNED_HAS_SDPA 0
#endif
