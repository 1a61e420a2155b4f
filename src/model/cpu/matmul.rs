//! `y = x · Wᵀ` on the CPU for weights in `Q4_1`, `Q8_0` or `f32`, with `f32` activations.
//!
//! Weights are expanded to floats block by block in registers and multiplied with the
//! activations as they are: no 8-bit rounding of activations (llama.cpp's `q8_1` scheme), so
//! results equal the dequantized model's up to float summation order. (On SmolLM2-135M the
//! greedy reply to "What is the capital of France?" hinges on a 0.1-logit margin that 8-bit
//! activations flip.) For a `Q4_1` block, `Σ (d q + m) x = d Σ q x + m Σ x`, with `Σ x` per
//! block computed once per row.
//!
//! **Batch invariance.** Every output element is computed by the same instructions in the same
//! order whatever the number of rows in `x` and however the work is split between threads, so
//! a sequence gets bit-identical results alone or packed in a batch with others.

// Index loops over the rows of a group read more clearly than zipped iterators here.
#![allow(clippy::needless_range_loop)]

use super::quant::{BlockQ4_1, BlockQ8_0, WeightData, WeightMatrix, QK};
use rayon::prelude::*;
use std::sync::OnceLock;

/// The instruction set the kernels use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2+fma",
        }
    }
}

/// Detected once per process; `TILLER_KERNELS=scalar` forces the portable code.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var("TILLER_KERNELS").is_ok_and(|v| v == "scalar") {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
        Isa::Scalar
    })
}

/// Activation rows processed together against one weight row (weights expanded once).
const ROW_GROUP: usize = 4;

/// The activation rows of one group: their data and, for `Q4_1`, their per-block sums.
struct Group<'a> {
    xs: [&'a [f32]; ROW_GROUP],
    sums: [&'a [f32]; ROW_GROUP],
    len: usize,
}

/// `out[i * w.rows + j] = Σ_k x[i * w.cols + k] * W[j, k]` for `i < m`.
pub fn matmul(x: &[f32], m: usize, w: &WeightMatrix, out: &mut [f32]) {
    assert_eq!(x.len(), m * w.cols, "matmul: x is not [m, cols]");
    assert_eq!(out.len(), m * w.rows, "matmul: out is not [m, rows]");
    let cols = w.cols;
    let nb = cols / QK;
    let sums: Vec<f32> = match w.data {
        WeightData::Q4_1(_) => x.chunks_exact(QK).map(|b| b.iter().sum()).collect(),
        _ => Vec::new(),
    };
    let groups: Vec<Group> = (0..m)
        .step_by(ROW_GROUP)
        .map(|start| {
            let len = ROW_GROUP.min(m - start);
            let mut g = Group {
                xs: [&[]; ROW_GROUP],
                sums: [&[]; ROW_GROUP],
                len,
            };
            for k in 0..len {
                let i = start + k;
                g.xs[k] = &x[i * cols..(i + 1) * cols];
                if !sums.is_empty() {
                    g.sums[k] = &sums[i * nb..(i + 1) * nb];
                }
            }
            g
        })
        .collect();
    let n = w.rows;
    let threads = rayon::current_num_threads().max(1);
    // Chunks of weight rows; several per thread so that work stealing evens out.
    let chunk = if m * n * cols < 1 << 16 || threads == 1 {
        n
    } else {
        n.div_ceil(threads * 4).max(8)
    };
    let out_ptr = SendPtr(out.as_mut_ptr());
    let body = |start: usize| {
        let end = (start + chunk).min(n);
        let mut res = [0f32; ROW_GROUP];
        for (gi, g) in groups.iter().enumerate() {
            for r in start..end {
                dot_row(w, r, g, &mut res);
                for (k, &v) in res[..g.len].iter().enumerate() {
                    let i = gi * ROW_GROUP + k;
                    // SAFETY: `out` is `[m, n]`; each task owns the columns `start..end`, so
                    // writes from different tasks never touch the same element.
                    unsafe { *out_ptr.get().add(i * n + r) = v };
                }
            }
        }
    };
    if chunk >= n {
        body(0);
    } else {
        (0..n).into_par_iter().step_by(chunk).for_each(body);
    }
}

struct SendPtr(*mut f32);
impl SendPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}
// SAFETY: used only for disjoint writes (see `matmul`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

fn dot_row(w: &WeightMatrix, r: usize, g: &Group, out: &mut [f32; ROW_GROUP]) {
    let cols = w.cols;
    let nb = cols / QK;
    match &w.data {
        WeightData::F32(data) => {
            let wr = &data[r * cols..(r + 1) * cols];
            for k in 0..g.len {
                out[k] = dot_f32(wr, g.xs[k]);
            }
        }
        WeightData::Q4_1(blocks) => {
            let wr = &blocks[r * nb..(r + 1) * nb];
            #[cfg(target_arch = "x86_64")]
            if isa() == Isa::Avx2 {
                // SAFETY: `isa()` checked for AVX2, FMA and F16C; rows are `nb` blocks long.
                return unsafe { x86::dot_q4_1(wr, g, out) };
            }
            scalar::dot_q4_1(wr, g, out)
        }
        WeightData::Q8_0(blocks) => {
            let wr = &blocks[r * nb..(r + 1) * nb];
            #[cfg(target_arch = "x86_64")]
            if isa() == Isa::Avx2 {
                // SAFETY: as above.
                return unsafe { x86::dot_q8_0(wr, g, out) };
            }
            scalar::dot_q8_0(wr, g, out)
        }
    }
}

/// Inner product of two float vectors with the kernels' summation order.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 {
        // SAFETY: `isa()` checked for AVX2 and FMA.
        return unsafe { x86::dot_f32(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Portable kernels.
mod scalar {
    use super::*;

    pub fn dot_q4_1(w: &[BlockQ4_1], g: &Group, out: &mut [f32; ROW_GROUP]) {
        for k in 0..g.len {
            let x = g.xs[k];
            let mut sum = 0f32;
            for (i, wb) in w.iter().enumerate() {
                let xb = &x[i * QK..(i + 1) * QK];
                let mut qx = 0f32;
                for j in 0..QK / 2 {
                    qx += (wb.qs[j] & 0x0F) as f32 * xb[j];
                    qx += (wb.qs[j] >> 4) as f32 * xb[j + QK / 2];
                }
                sum += wb.d.to_f32() * qx + wb.m.to_f32() * g.sums[k][i];
            }
            out[k] = sum;
        }
    }

    pub fn dot_q8_0(w: &[BlockQ8_0], g: &Group, out: &mut [f32; ROW_GROUP]) {
        for k in 0..g.len {
            let x = g.xs[k];
            let mut sum = 0f32;
            for (i, wb) in w.iter().enumerate() {
                let xb = &x[i * QK..(i + 1) * QK];
                let qx: f32 = wb.qs.iter().zip(xb).map(|(&q, &v)| q as f32 * v).sum();
                sum += wb.d.to_f32() * qx;
            }
            out[k] = sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::hsum;
    use super::{BlockQ4_1, BlockQ8_0, Group, QK, ROW_GROUP};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(a.as_ptr().add(i + 8 * k));
                let y = _mm256_loadu_ps(b.as_ptr().add(i + 8 * k));
                *acc = _mm256_fmadd_ps(x, y, *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            let x = _mm256_loadu_ps(a.as_ptr().add(i));
            let y = _mm256_loadu_ps(b.as_ptr().add(i));
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut sum = hsum(s);
        while i < n {
            sum += a[i] * b[i];
            i += 1;
        }
        sum
    }

    /// The f16 scale (and minimum) at the start of a block, as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn halves(p: *const u8) -> (f32, f32) {
        let bits = std::ptr::read_unaligned(p as *const i32);
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }

    /// `Σ_j w_j x_j` over one block of 32 as eight lanes, for weights already in floats:
    /// two independent chains, then their sum.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_dot(w: &[__m256; 4], x: *const f32) -> __m256 {
        let t = _mm256_fmadd_ps(
            w[1],
            _mm256_loadu_ps(x.add(8)),
            _mm256_mul_ps(w[0], _mm256_loadu_ps(x)),
        );
        let u = _mm256_fmadd_ps(
            w[3],
            _mm256_loadu_ps(x.add(24)),
            _mm256_mul_ps(w[2], _mm256_loadu_ps(x.add(16))),
        );
        _mm256_add_ps(t, u)
    }

    /// Expands a `Q4_1` block's nibbles to floats: elements 0..8, 8..16 (low nibbles),
    /// 16..24, 24..32 (high nibbles).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn expand_q4(qs: *const u8) -> [__m256; 4] {
        let mask = _mm256_set1_epi32(0x0F);
        let lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs as *const __m128i));
        let hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.add(8) as *const __m128i));
        [
            _mm256_cvtepi32_ps(_mm256_and_si256(lo, mask)),
            _mm256_cvtepi32_ps(_mm256_and_si256(hi, mask)),
            _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4)),
            _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4)),
        ]
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn expand_q8(qs: *const i8) -> [__m256; 4] {
        let part = |o: usize| {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                qs.add(o) as *const __m128i
            )))
        };
        [part(0), part(8), part(16), part(24)]
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_rows<const R: usize>(w: &[BlockQ4_1], g: &Group, out: &mut [f32; ROW_GROUP]) {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut macc = [0f32; R];
        let xs: [*const f32; R] = std::array::from_fn(|k| g.xs[k].as_ptr());
        let sums: [*const f32; R] = std::array::from_fn(|k| g.sums[k].as_ptr());
        for (i, wb) in w.iter().enumerate() {
            let (d, m) = halves(wb as *const BlockQ4_1 as *const u8);
            let wf = expand_q4(wb.qs.as_ptr());
            let dv = _mm256_set1_ps(d);
            for k in 0..R {
                acc[k] = _mm256_fmadd_ps(dv, block_dot(&wf, xs[k].add(i * QK)), acc[k]);
                macc[k] += m * *sums[k].add(i);
            }
        }
        for k in 0..R {
            out[k] = hsum(acc[k]) + macc[k];
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_rows<const R: usize>(w: &[BlockQ8_0], g: &Group, out: &mut [f32; ROW_GROUP]) {
        let mut acc = [_mm256_setzero_ps(); R];
        let xs: [*const f32; R] = std::array::from_fn(|k| g.xs[k].as_ptr());
        for (i, wb) in w.iter().enumerate() {
            let (d, _) = halves(wb as *const BlockQ8_0 as *const u8);
            let wf = expand_q8(wb.qs.as_ptr());
            let dv = _mm256_set1_ps(d);
            for k in 0..R {
                acc[k] = _mm256_fmadd_ps(dv, block_dot(&wf, xs[k].add(i * QK)), acc[k]);
            }
        }
        for k in 0..R {
            out[k] = hsum(acc[k]);
        }
    }

    /// `R` (the group's size) is a constant in each instance so the accumulators stay in
    /// registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1(w: &[BlockQ4_1], g: &Group, out: &mut [f32; ROW_GROUP]) {
        match g.len {
            1 => q4_1_rows::<1>(w, g, out),
            2 => q4_1_rows::<2>(w, g, out),
            3 => q4_1_rows::<3>(w, g, out),
            _ => q4_1_rows::<4>(w, g, out),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0(w: &[BlockQ8_0], g: &Group, out: &mut [f32; ROW_GROUP]) {
        match g.len {
            1 => q8_0_rows::<1>(w, g, out),
            2 => q8_0_rows::<2>(w, g, out),
            3 => q8_0_rows::<3>(w, g, out),
            _ => q8_0_rows::<4>(w, g, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn weights(rows: usize, cols: usize, dtype: GgmlDType) -> WeightMatrix {
        let t =
            Tensor::from_vec(pseudo_random(rows * cols, 7), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        WeightMatrix::from_qtensor(&q, super::super::quant::WeightFormat::Native).unwrap()
    }

    /// Every kernel equals the dequantized product (computed in f64) to float rounding, and
    /// every row of a batched product is bit-identical to the same row computed alone.
    #[test]
    fn kernels_are_exact_and_batch_invariant() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::F32] {
            let (rows, cols, m) = (70, 96, 7);
            let w = weights(rows, cols, dtype);
            let x = pseudo_random(m * cols, 3);
            let mut batched = vec![0f32; m * rows];
            matmul(&x, m, &w, &mut batched);
            let mut wr = vec![0f32; cols];
            for i in 0..m {
                let xr = &x[i * cols..(i + 1) * cols];
                let mut alone = vec![0f32; rows];
                matmul(xr, 1, &w, &mut alone);
                assert_eq!(
                    &batched[i * rows..(i + 1) * rows],
                    &alone[..],
                    "{dtype:?} row {i}"
                );
                for (r, &got) in alone.iter().enumerate() {
                    w.dequantize_row(r, &mut wr);
                    let exact: f64 = wr.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let scale: f64 = wr
                        .iter()
                        .zip(xr)
                        .map(|(a, b)| (*a as f64 * *b as f64).abs())
                        .sum();
                    assert!(
                        (got as f64 - exact).abs() <= 1e-5 * scale + 1e-6,
                        "{dtype:?} {i},{r}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    /// A product big enough to be split across threads gives the same result as one thread.
    #[test]
    fn threaded_split_matches_single_row_products() {
        let (rows, cols, m) = (300, 256, 9);
        let w = weights(rows, cols, GgmlDType::Q4_1);
        let x = pseudo_random(m * cols, 11);
        let mut all = vec![0f32; m * rows];
        matmul(&x, m, &w, &mut all);
        for i in 0..m {
            let mut one = vec![0f32; rows];
            matmul(&x[i * cols..(i + 1) * cols], 1, &w, &mut one);
            assert_eq!(&all[i * rows..(i + 1) * rows], &one[..]);
        }
    }
}
