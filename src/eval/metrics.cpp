// Metric arithmetic: cosines in float32 as transformers computes them, statistics in double.
#include "stylealigned/eval/metrics.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <Eigen/Core>
#include <cmath>

#include "stylealigned/error.h"

namespace stylealigned::eval {
namespace {

at::Tensor as_rows(const at::Tensor& t, const char* what) {
  if (!t.defined() || t.dim() != 2 || t.size(1) < 1 || !at::isFloatingType(t.scalar_type())) {
    throw Error(fmt::format("{}: expected float embeddings [count, dim], got {}", what,
                            t.defined()
                                ? fmt::format("{} [{}]", c10::toString(t.scalar_type()), fmt::join(t.sizes(), ", "))
                                : "undefined"));
  }
  return t.detach().to(at::kCPU, at::kFloat);
}

at::Tensor l2_normalize(const at::Tensor& rows) { return rows / rows.norm(2, {-1}, /*keepdim=*/true); }

}  // namespace

at::Tensor cosine_matrix(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = as_rows(a, "cosine_matrix"), y = as_rows(b, "cosine_matrix");
  if (x.size(1) != y.size(1)) {
    throw Error(fmt::format("cosine_matrix: embedding sizes differ ({} vs {})", x.size(1), y.size(1)));
  }
  return at::matmul(l2_normalize(x), l2_normalize(y).t());
}

at::Tensor paired_cosine(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = as_rows(a, "paired_cosine"), y = as_rows(b, "paired_cosine");
  if (x.sizes() != y.sizes()) {
    throw Error(fmt::format("paired_cosine: shapes differ ([{}] vs [{}])", fmt::join(x.sizes(), ", "),
                            fmt::join(y.sizes(), ", ")));
  }
  return (l2_normalize(x) * l2_normalize(y)).sum(-1);
}

at::Tensor pairwise_cosine(const at::Tensor& embeds) {
  const at::Tensor x = as_rows(embeds, "set consistency");
  const int64_t n = x.size(0);
  if (n < 2) {
    throw Error(fmt::format("set consistency needs at least two images (pairs of embeddings), got {}", n));
  }
  const at::Tensor cos = cosine_matrix(x, x);
  const at::Tensor upper = at::triu_indices(n, n, /*offset=*/1);  // row-major: (0,1), (0,2), ..., (1,2), ...
  return cos.index({upper[0], upper[1]});
}

double set_consistency(const at::Tensor& embeds) {
  const at::Tensor pairs = pairwise_cosine(embeds).to(at::kDouble).contiguous();
  return Eigen::Map<const Eigen::VectorXd>(pairs.data_ptr<double>(), pairs.numel()).mean();
}

MeanStd mean_std(const std::vector<double>& values) {
  if (values.empty()) throw Error("mean_std: no values");
  const Eigen::Map<const Eigen::VectorXd> v(values.data(), Eigen::Index(values.size()));
  MeanStd out;
  out.count = int64_t(values.size());
  out.mean = v.mean();
  out.std = std::sqrt((v.array() - out.mean).square().mean());
  return out;
}

Summary summarize(const std::vector<SetScores>& sets) {
  if (sets.empty()) throw Error("summarize: no sets");
  std::vector<double> alignment, consistency;
  for (const auto& s : sets) {
    alignment.push_back(s.mean_text_alignment);
    consistency.push_back(s.set_consistency);
  }
  return {mean_std(alignment), mean_std(consistency)};
}

}  // namespace stylealigned::eval
