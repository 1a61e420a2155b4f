//! CPU kernels for the forward pass: quantized matrix products in every GGUF block format
//! tiller runs (portable and x86 SIMD), attention over a host KV cache, the gated MLP's
//! activation, and the weight matrices they read. Picked at run time for the instruction set
//! of the machine (AMX tile units, AVX2, AVX-512 VNNI, or portable code), so one binary runs
//! everywhere.

#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
pub mod blocks;
pub mod gated;
pub mod matmul;
mod portable;
pub mod quant;
pub mod roofline;
pub mod team;
pub mod tiles;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Horizontal sum of eight floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}
