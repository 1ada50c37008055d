// Python bindings of hdlm_kernels._C. Import torch before this module (it links against libc10).
#include <torch/extension.h>
#include <pybind11/stl.h>  // std::array <-> Python list, for philox4x32_10

#include "cpu_isa.h"
#include "decode_attention.h"
#include "gumbel.h"
#include "hybrid.h"
#include "log64_cpu.h"
#include "screen_cpu.h"
#include "uniform53.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hdlm-kernels compiled operators (docs/sampling-stream.md); use them through hdlm_kernels.sampling";

#ifdef HDLM_WITH_CUDA
  m.attr("with_cuda") = pybind11::bool_(true);
#else
  m.attr("with_cuda") = pybind11::bool_(false);
#endif

  m.def("philox4x32_10", &hdlm::philox4x32_10_block, pybind11::arg("counter"), pybind11::arg("key"),
        "Philox4x32-10 of counter (4 uint32) under key (2 uint32) -> 4 uint32 words");
  m.def("uniform53_cpu", &hdlm::uniform53_cpu, pybind11::arg("seed"), pybind11::arg("step"),
        pybind11::arg("stream"), pybind11::arg("index"),
        "float64 uniforms of the int64 CPU tensor of element ids `index` (any shape), same shape");
  m.def("gumbel_argmax_cpu", &hdlm::gumbel_argmax_cpu, pybind11::arg("logits"), pybind11::arg("take"),
        pybind11::arg("row_ids"), pybind11::arg("seed"), pybind11::arg("step"), pybind11::arg("temperature"),
        pybind11::arg("exclude"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "FP64 Gumbel-max of CPU logits [K, V] (rows `take` or all, identities `row_ids`) -> (tokens int64 [n], "
        "winning scores float64 [n])");
  m.def("gumbel_argmax_counted_cpu", &hdlm::gumbel_argmax_counted_cpu, pybind11::arg("logits"), pybind11::arg("take"),
        pybind11::arg("row_ids"), pybind11::arg("seed"), pybind11::arg("step"), pybind11::arg("temperature"),
        pybind11::arg("exclude"), pybind11::arg("count"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "gumbel_argmax_cpu plus, with count=True, the tokens scored exactly per row (int64 [n]): the screen's "
        "candidates (docs/sampling-screen.md)");
  m.def("set_cpu_isa", &hdlm::set_cpu_isa, pybind11::arg("isa"),
        "instruction set of the CPU samplers' screening stage: 'auto', 'scalar', 'avx2' or 'avx512' (the γ step's exact row sum in 8 float64 lanes)");
  m.def("cpu_isa", &hdlm::cpu_isa_name, "the instruction set the CPU samplers' screening stage runs with now");
  m.def("screen_scores_cpu", &hdlm::screen_scores_cpu, pybind11::arg("word_a"), pybind11::arg("word_b"),
        pybind11::arg("logit"), pybind11::arg("scale"), pybind11::arg("atanh") = false,
        "the screen of csrc/screen.h elementwise: (noise, lo, hi) float32 of the uniforms' words (int64 tensors "
        "holding uint32) and float32 logits at scale float32(1/T); the noise of screen_noise_fast (the CPU "
        "tiles'), or of screen_noise with atanh=True");
  m.def("screen_noise_bound_cpu", &hdlm::screen_noise_bound_cpu, pybind11::arg("word_a"),
        "screen_noise_bound of csrc/screen.h elementwise: float32 upper bounds of the exact Gumbel noise of every "
        "uniform whose first Philox word is word_a (int64 tensor holding uint32)");
  m.def("screen_philox_words_cpu", &hdlm::screen_philox_words_cpu, pybind11::arg("seed"), pybind11::arg("step"),
        pybind11::arg("stream"), pybind11::arg("first_pair"),
        "the words [4, 128] (int64) of Philox pairs first_pair.. of `stream` from the AVX2 tile stage");
  m.def("log64_cpu", &hdlm::log64_cpu, pybind11::arg("x"), pybind11::arg("gumbel") = false,
        "log64 (or, with gumbel=True, -log64(-log64 x)) of a float64 CPU tensor, same shape");
  m.def("log64_constants", &hdlm::log64_constants,
        "the constants of log64.h: the Horner coefficients C[0..10], LN2_HI, LN2_LO");
  m.def("hybrid_step_cpu", &hdlm::hybrid_step_cpu, pybind11::arg("log_score"), pybind11::arg("x"),
        pybind11::arg("coefficients"), pybind11::arg("row_ids"), pybind11::arg("mask_id"), pybind11::arg("seed"),
        pybind11::arg("step"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "fused γ-hybrid step of CPU log-scores [R, V] (current tokens x, constants c1..c6 [R, 6], identities "
        "`row_ids`) -> (tokens int64 [R], winning scores float64 [R]: NaN for a bad row, -inf without weight)");
  m.def("hybrid_step_counted_cpu", &hdlm::hybrid_step_counted_cpu, pybind11::arg("log_score"), pybind11::arg("x"),
        pybind11::arg("coefficients"), pybind11::arg("row_ids"), pybind11::arg("mask_id"), pybind11::arg("seed"),
        pybind11::arg("step"), pybind11::arg("count"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "hybrid_step_cpu plus, with count=True, the tokens scored exactly per row (int64 [R]): the current cell "
        "and the screen's candidates (docs/sampling-screen.md)");
  m.def("exp64_cpu", &hdlm::exp64_cpu, pybind11::arg("x"), "exp64 of a float64 CPU tensor, same shape");
  m.def("exp64_constants", &hdlm::exp64_constants,
        "the constants of exp64 in log64.h: E[2..5] = 1/n!, 64 / ln 2, ln 2 / 64 (high, low), EXP64_MIN, "
        "then the table 2^(j/64), j = 0..63, high parts and low parts");
#ifdef HDLM_WITH_CUDA
  m.def("uniform53_cuda", &hdlm::uniform53_cuda, pybind11::arg("seed"), pybind11::arg("step"),
        pybind11::arg("stream"), pybind11::arg("index"),
        "float64 uniforms of the int64 CUDA tensor of element ids `index` (any shape), same shape");
  m.def("gumbel_argmax_cuda", &hdlm::gumbel_argmax_cuda, pybind11::arg("logits"), pybind11::arg("take"),
        pybind11::arg("row_ids"), pybind11::arg("seed"), pybind11::arg("step"), pybind11::arg("temperature"),
        pybind11::arg("exclude"),
        "FP64 Gumbel-max of CUDA logits [K, V] (rows `take` or all, identities `row_ids`) -> (tokens int64 [n], "
        "winning scores float64 [n])");
  m.def("gumbel_argmax_counted_cuda", &hdlm::gumbel_argmax_counted_cuda, pybind11::arg("logits"),
        pybind11::arg("take"), pybind11::arg("row_ids"), pybind11::arg("seed"), pybind11::arg("step"),
        pybind11::arg("temperature"), pybind11::arg("exclude"), pybind11::arg("count"),
        "gumbel_argmax_cuda plus, with count=True, the tokens scored exactly per row (int64 [n]): the screen's "
        "candidates, or V on the exact walk (docs/sampling-screen.md)");
  m.def("hybrid_step_cuda", &hdlm::hybrid_step_cuda, pybind11::arg("log_score"), pybind11::arg("x"),
        pybind11::arg("coefficients"), pybind11::arg("row_ids"), pybind11::arg("mask_id"), pybind11::arg("seed"),
        pybind11::arg("step"),
        "fused γ-hybrid step of CUDA log-scores [R, V] (current tokens x, constants c1..c6 [R, 6], identities "
        "`row_ids`) -> (tokens int64 [R], winning scores float64 [R]: NaN for a bad row, -inf without weight)");
  m.def("hybrid_step_counted_cuda", &hdlm::hybrid_step_counted_cuda, pybind11::arg("log_score"), pybind11::arg("x"),
        pybind11::arg("coefficients"), pybind11::arg("row_ids"), pybind11::arg("mask_id"), pybind11::arg("seed"),
        pybind11::arg("step"), pybind11::arg("count"),
        "hybrid_step_cuda plus, with count=True, the tokens scored exactly per row (int64 [R]): the current cell "
        "and the screen's candidates, or V on the full race (docs/sampling-screen.md)");
  m.def("decode_attention_cuda", &hdlm::decode_attention_cuda, pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("prefix_end"), pybind11::arg("window_start"),
        pybind11::arg("window_end"), pybind11::arg("scale"), pybind11::arg("num_splits"),
        "KV-cached attention of q [B, S, H, D] over k, v [B, L, H, D] under the interval mask (int32 [1 or B, "
        "S] prefix_end, window_start, window_end); num_splits 0 = automatic split-KV; -> [B, S, H, D] in q's "
        "dtype, zeros for rows without keys");
#endif
}
