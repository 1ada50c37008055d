// What the CPU and CUDA backends of hybrid_step share, header-only so that both compile the same code
// (docs/hybrid-step.md): the per-row and per-token arithmetic of the fused γ-hybrid step, operation by operation
// as the reference backend (hdlm_kernels/sampling/hybrid.py, module docstring "The fused form", _weights
// and _hybrid_step_reference). Every float64 operation is one correctly rounded IEEE operation
// (log64.h's add_rn / sub_rn / mul_rn, never fused), in the reference's order, so the weights, scores and
// winners are bit-identical on every backend.
//
// The three passes over a row of log-scores s (widened exactly to float64), "read" meaning the real
// tokens y != x (y != mask_id and y != x):
//   pass 1  m = max(read s_y) (a NaN or +inf read entry makes the row bad), hybrid_shift clamps it
//   pass 2  S_o = fixed-point sum of r'_y = exp64(s_y - m) over the read y (FixedSum)
//   pass 3  per token: log weight (hybrid_read_log_weight, the row's current cell, or -inf for MASK),
//           plus the Gumbel noise, argmax with beats() of gumbel_rule.h
// A bad row is computed as the reference does (its read entries count as -inf, so r' = 0) and reports a
// NaN winning score, from which the Python wrapper raises.
#pragma once

#include <cstdint>

#include "gumbel_rule.h"
#include "log64.h"
#include "philox.h"

namespace hdlm {

namespace hybrid_detail {

// The fixed-point sum (hybrid.py FIXED_*): trunc(r' * 2^32) and the next 31 bits of r' in [0, 1], two
// int64 accumulators that are exact in any order of additions for V < 2^31.
constexpr double kFixedHiScale = 0x1p32;
constexpr double kFixedLoScale = 0x1p31;
constexpr double kFixedHiUnit = 0x1p-32;
constexpr double kFixedLoUnit = 0x1p-63;
// Weights below count as 0 (hybrid.py SMALLEST_WEIGHT): log64 needs normal inputs.
constexpr double kSmallestWeight = 0x1p-1022;

HDLM_HOST_DEVICE inline double plus_infinity() { return log64_detail::double_of(0x7FF0000000000000ull); }
HDLM_HOST_DEVICE inline double minus_infinity() { return log64_detail::double_of(0xFFF0000000000000ull); }

}  // namespace hybrid_detail

// The per-row constants c1..c6 of step_coefficients (the [R, 6] float64 tensor, row-major).
struct HybridCoefficients {
  double c1, c2, c3, c4, c5, c6;
};

HDLM_HOST_DEVICE inline HybridCoefficients load_coefficients(const double* row) {
  return HybridCoefficients{row[0], row[1], row[2], row[3], row[4], row[5]};
}

// What a column of a row is: the current token x (its log-score is not read: r_x = 1), the MASK column
// of a real row (weight 0, not read either), or a read real token.
enum class HybridCell : int { kRead, kCurrent, kMask };

HDLM_HOST_DEVICE inline HybridCell hybrid_cell(int64_t column, int64_t current, int64_t mask_id) {
  if (column == current) {
    return HybridCell::kCurrent;  // also when x = MASK: the MASK column is then the current cell
  }
  return column == mask_id ? HybridCell::kMask : HybridCell::kRead;
}

// ---------------------------------------------------------------- pass 1

// A read entry that makes the row bad: NaN or +inf (-inf is a ratio of 0 and allowed).
HDLM_HOST_DEVICE inline bool hybrid_bad_score(double s) { return s != s || s == hybrid_detail::plus_infinity(); }

// The running maximum of a row's read entries (start at -inf). Max is exact, so any order or reduction
// tree gives the same value up to the sign of a zero maximum, which changes no later result (s - (+0)
// and s - (-0) differ only for s = ±0, where exp64 returns 1 either way, and exp64(∓0) = 1).
HDLM_HOST_DEVICE inline double hybrid_max(double a, double b) { return b > a ? b : a; }

// m of the fused form from the maximum of the read entries (-inf for a bad row or a row without read
// entries, as the reference's amax over its -inf fill): at least 0 when x is real (r_x = 1 is a ratio
// too), then at least EXP64_MIN, so that u = exp64(-m) <= e^708 and exp64(s - m) stays in [0, 1].
HDLM_HOST_DEVICE inline double hybrid_shift(double read_max, bool x_is_real) {
  double m = read_max;
  if (x_is_real && m < 0.0) {
    m = 0.0;
  }
  return m < log64_detail::kExp64Min ? log64_detail::kExp64Min : m;
}

// ---------------------------------------------------------------- pass 2

// The scaled ratio r' = exp64(s - m) in [0, 1] of a read entry.
HDLM_HOST_DEVICE inline double hybrid_ratio(double s, double shift) { return exp64(sub_rn(s, shift)); }

// Two int64 accumulators of the fixed-point ratios (integer sums: exact in any order).
struct FixedSum {
  int64_t hi;
  int64_t lo;
};

HDLM_HOST_DEVICE inline void fixed_add(FixedSum& sum, double ratio) {
  const double scaled = mul_rn(ratio, hybrid_detail::kFixedHiScale);
  const int64_t hi = double_to_int64_rz(scaled);  // = floor for r' >= 0; exact
  sum.hi += hi;
  sum.lo += double_to_int64_rz(mul_rn(sub_rn(scaled, int64_to_double_rn(hi)), hybrid_detail::kFixedLoScale));
}

// S_o = double(hi) * 2^-32 + double(lo) * 2^-63 (conversions rounded to nearest, as torch's).
HDLM_HOST_DEVICE inline double fixed_value(const FixedSum& sum) {
  return add_rn(mul_rn(int64_to_double_rn(sum.hi), hybrid_detail::kFixedHiUnit),
                mul_rn(int64_to_double_rn(sum.lo), hybrid_detail::kFixedLoUnit));
}

// The log weight of a weight: log64(w) for w >= 2^-1022, else -inf (w <= 0, subnormal, or NaN, as the
// reference's masked_fill and `weights > 0`).
HDLM_HOST_DEVICE inline double hybrid_log_weight(double w) {
  return w >= hybrid_detail::kSmallestWeight ? log64(w) : hybrid_detail::minus_infinity();
}

// ---------------------------------------------------------------- pass 3

// What pass 3 needs of a row, from m, the fixed-point sum and c1..c6 (every thread or token of the row
// computes the same bits from the same inputs).
struct HybridRow {
  double shift;               // m
  double c1;                  // read weights w_y = c1 * (r'_y - c2 * S)
  double c2_total;            // c2 * S
  double current_log_weight;  // log w_x of the current cell, w_x = c4 * (c5 * u - c6 * S), or -inf
};

HDLM_HOST_DEVICE inline HybridRow hybrid_row(double shift, const FixedSum& sum, const HybridCoefficients& c) {
  const double u = exp64(-shift);  // the scaled r_x = 1 (negation is exact)
  const double total = add_rn(fixed_value(sum), mul_rn(c.c3, u));  // S = S_o + c3 * u
  const double current = mul_rn(c.c4, sub_rn(mul_rn(c.c5, u), mul_rn(c.c6, total)));
  return HybridRow{shift, c.c1, mul_rn(c.c2, total), hybrid_log_weight(current)};
}

// log w_y of a read token with scaled ratio r' (0 on a bad row): (r' - c2 * S) * c1, the reference's
// in-place sub_ then mul_.
HDLM_HOST_DEVICE inline double hybrid_read_log_weight(double ratio, const HybridRow& row) {
  return hybrid_log_weight(mul_rn(sub_rn(ratio, row.c2_total), row.c1));
}

// The log weight of column `cell` whose log-score (read tokens only) is produced by `load` on demand, so
// that the current and MASK columns are never read.
template <typename Load>
HDLM_HOST_DEVICE inline double hybrid_cell_log_weight(HybridCell cell, const HybridRow& row, bool bad,
                                                      const Load& load) {
  if (cell == HybridCell::kCurrent) {
    return row.current_log_weight;
  }
  if (cell == HybridCell::kMask) {
    return hybrid_detail::minus_infinity();
  }
  return hybrid_read_log_weight(bad ? 0.0 : hybrid_ratio(load(), row.shift), row);
}

// score = log w + Gumbel noise: one rounded addition; a token of no weight scores -inf whatever its noise
// (finite), so callers may skip the noise of such tokens.
HDLM_HOST_DEVICE inline double hybrid_score(double log_weight, double noise) { return add_rn(log_weight, noise); }

// A row's winner from the best candidate among the tokens it scored (column < 0: none had a weight):
// every score -inf reports -inf at column 0, as torch.max over an all -inf row; a bad row reports NaN.
HDLM_HOST_DEVICE inline Candidate hybrid_winner(const Candidate& best, bool bad) {
  Candidate winner = best.column < 0 ? Candidate{hybrid_detail::minus_infinity(), 0} : best;
  if (bad) {
    winner.score = log64_detail::double_of(0x7FF8000000000000ull);  // quiet NaN
  }
  return winner;
}

}  // namespace hdlm
