# ctest driver for stylealigned_bench_vae (no timing is asserted): BENCH is run with ARGS; it must exit 0, its last
# line must be the JSON summary, the analytic walk must count exactly the built decoder's parameters, and with
# CHECK_RUN every promised key must be there, with a finite output and (reduced dtypes) a pixel error below 0.1.
cmake_minimum_required(VERSION 3.19)  # string(JSON)
include(${CMAKE_CURRENT_LIST_DIR}/bench_smoke_common.cmake)
run_bench(last ${ARGS})
string(JSON params GET "${last}" decoder_params)
string(JSON params_analytic GET "${last}" decoder_params_analytic)
if(NOT params EQUAL params_analytic)
  message(FATAL_ERROR "the FLOP walk counts ${params_analytic} decoder parameters, the model has ${params}")
endif()
message(STATUS "decoder parameters: ${params} (walk: ${params_analytic})")
if(CHECK_RUN)
  require_keys("${last}" KEYS seconds seconds_fp32 gflops gemm_gflops efficiency peak_rss_mb gflop_per_decode
                             speedup_vs_fp32 max_abs_vs_fp32 rel_l2_vs_fp32)
  string(JSON finite GET "${last}" output_finite)
  string(JSON max_abs GET "${last}" max_abs_vs_fp32)
  if(NOT finite OR NOT max_abs LESS 0.1)
    message(FATAL_ERROR "decode not finite or far from fp32 (max abs ${max_abs}):\n${last}")
  endif()
endif()
