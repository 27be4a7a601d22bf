// Schema of the calibration binning op: one pass over [S, N, C] probabilities (or logits) that
// finds each row's confidence and predicted class of the S-averaged distribution, bins it
// (common/calibration.h) and accumulates float64 (count, confidence sum, correct sum) per bin.
//   probs:   [S, N, C] floating (fp64/fp32/fp16/bf16), S >= 1 draws averaged inside, C >= 1
//   targets: int64 [N], class indices; rows with a target outside [0, C) are counted and skipped
//   classwise=False -> bins float64 [n_bins, 3] over the top-label confidence (slots kStat* in
//                      common/layouts.h);
//   classwise=True  -> bins float64 [C, n_bins, 3] over every class probability p_c, "correct"
//                      meaning target == c
//   diag: float64 [4] row counts (bad row sum beyond sum_tol, negative entry, bad target,
//         non-finite: kDiag* in common/layouts.h); the first two are only checked when
//         from_logits is false.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyfastbayes, m) {
  m.def("calibration_bins(Tensor probs, Tensor targets, int n_bins, bool from_logits=False, "
        "bool classwise=False, float sum_tol=0.0001) -> (Tensor, Tensor)");
}
