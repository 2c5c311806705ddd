// The exponential pass of softmax over contiguous float32 rows, fused and vectorised for the CPU attention kernel.
//
// libtorch 1.13's CPU `exp_` runs at about 1 ns per element on our machines, a third of the cost of the two GEMMs
// around it. This pass computes row <- exp(row - max(row)) in place in two sweeps over each row (the row stays in L1
// between them) and hands back each row's max and sum, so the caller folds the 1/sum normalisation into the much
// smaller output block and gets the log-sum-exp (max + log sum) for free.
#pragma once

#include <cstdint>

namespace stylealigned::detail {

/// True when a vectorised kernel (AVX2 + FMA; AVX-512 where the CPU has it) runs on this CPU; otherwise
/// exp_rows_inplace uses std::exp.
bool fast_exp_rows_available();

/// For each of `rows` rows of `cols` floats (row r starts at data + r * ld), with y = alpha * row (the logit scale
/// applied on the fly, so the GEMM before needs no scaled copy of q): row <- exp(y - max(y)); writes max(y) and the
/// sum of the new row to row_max[r] and row_sum[r]. Rows are spread over ATen's intra-op threads.
void exp_rows_inplace(float* data, int64_t rows, int64_t cols, int64_t ld, float alpha, float* row_max,
                      float* row_sum);

/// One key chunk of an online softmax (flash-attention style), on the calling thread: row_max / row_sum hold the
/// running max of y and sum of exp(y - max) over the earlier chunks (-inf and 0 before the first). Each row becomes
/// exp(y - new max), the running values are updated, and correction[r] = exp(old max - new max) is the factor the
/// caller applies to its output accumulator row before adding this chunk's P·V (0 on the first chunk, 1 when the
/// max did not move).
void exp_rows_online(float* data, int64_t rows, int64_t cols, int64_t ld, float alpha, float* row_max,
                     float* row_sum, float* correction);

/// fp32 rows to bf16 (round to nearest even), for the bf16 P·V product of the attention kernel.
void rows_to_bf16(const float* src, int64_t rows, int64_t cols, int64_t ld_src, uint16_t* dst, int64_t ld_dst);

}  // namespace stylealigned::detail
