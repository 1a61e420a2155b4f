//! `y = x · Wᵀ` on the CPU for weights in `Q4_1`, `Q8_0` or `f32`.
//!
//! For quantized weights the activations are rounded to **16-bit** integers per block of 32
//! (`x ≈ d_x q_x`, relative error below 2⁻¹⁵ of the block's largest value) and the products
//! are summed exactly in integers (`vpmaddwd`, or `vpdpwssd` with AVX-512 VNNI), then scaled:
//! for a `Q4_1` block, `Σ (d_w q_w + m_w) x = d_w d_x Σ q_w q_x + m_w Σ x`, with `Σ x` kept
//! exact in f32. llama.cpp rounds activations to 8 bits instead (`q8_1`); on SmolLM2-135M that
//! flips the greedy reply to "What is the capital of France?" (a 0.1-logit margin), while 16
//! bits keep the dequantized model's answers.
//!
//! **Batch invariance.** Every output element is computed by the same operations in the same
//! order whatever the number of rows in `x` and however the work is split between threads
//! (integer sums are exact, so even the instruction set does not change them), so a sequence
//! gets bit-identical results alone or packed in a batch with others.

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
    /// AVX2 plus `vpdpwssd` on 256-bit registers (AVX-512 VNNI with VL).
    Avx2Vnni,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2+fma",
            Isa::Avx2Vnni => "avx2+fma+avx512vnni",
        }
    }
}

/// Detected once per process; `TILLER_KERNELS=scalar` or `avx2` caps it.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("TILLER_KERNELS").unwrap_or_default();
        if cap == "scalar" {
            return Isa::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            if cap != "avx2"
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
            {
                return Isa::Avx2Vnni;
            }
            return Isa::Avx2;
        }
        Isa::Scalar
    })
}

const ROUNDER: f32 = 12_582_912.0;

/// Activation rows processed together against one weight row (weights expanded once).
const ROW_GROUP: usize = 4;

/// Activations rounded to 16 bits, `[rows, cols]` with per-block scale and exact sum.
struct Quantized16 {
    q: Vec<i16>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Quantized16 {
    fn new(x: &[f32], m: usize, cols: usize) -> Self {
        let nb = cols / QK;
        let mut out = Self {
            q: vec![0; m * cols],
            d: vec![0.0; m * nb],
            s: vec![0.0; m * nb],
        };
        let row = |(((q, d), s), x): RowParts| {
            for (b, x) in x.chunks_exact(QK).enumerate() {
                let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
                let scale = amax / 32767.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (qi, &xi) in q[b * QK..(b + 1) * QK].iter_mut().zip(x) {
                    // Round to nearest (even) by adding and removing 1.5 * 2^23: exact for
                    // |v| <= 32767, and vectorizes (`f32::round` is a libm call here).
                    let v = (xi * inv).clamp(-32767.0, 32767.0);
                    *qi = ((v + ROUNDER) - ROUNDER) as i16;
                }
                d[b] = scale;
                s[b] = x.iter().sum();
            }
        };
        if m >= 16 {
            out.q
                .par_chunks_mut(cols)
                .zip(out.d.par_chunks_mut(nb))
                .zip(out.s.par_chunks_mut(nb))
                .zip(x.par_chunks(cols))
                .for_each(row);
        } else {
            out.q
                .chunks_mut(cols)
                .zip(out.d.chunks_mut(nb))
                .zip(out.s.chunks_mut(nb))
                .zip(x.chunks(cols))
                .for_each(row);
        }
        out
    }
}

/// One activation row's 16-bit values, scales and sums, and its f32 input.
type RowParts<'a> = (((&'a mut [i16], &'a mut [f32]), &'a mut [f32]), &'a [f32]);

/// The activation rows of one group.
struct Group<'a> {
    len: usize,
    /// f32 rows (for f32 weights).
    xs: [&'a [f32]; ROW_GROUP],
    /// 16-bit rows, scales and sums (for quantized weights).
    q: [&'a [i16]; ROW_GROUP],
    d: [&'a [f32]; ROW_GROUP],
    s: [&'a [f32]; ROW_GROUP],
}

/// `out[i * w.rows + j] = Σ_k x[i * w.cols + k] * W[j, k]` for `i < m`.
pub fn matmul(x: &[f32], m: usize, w: &WeightMatrix, out: &mut [f32]) {
    assert_eq!(x.len(), m * w.cols, "matmul: x is not [m, cols]");
    assert_eq!(out.len(), m * w.rows, "matmul: out is not [m, rows]");
    let cols = w.cols;
    let nb = cols / QK;
    let quantized = !matches!(w.data, WeightData::F32(_));
    let q16 = quantized.then(|| Quantized16::new(x, m, cols));
    let groups: Vec<Group> = (0..m)
        .step_by(ROW_GROUP)
        .map(|start| {
            let mut g = Group {
                len: ROW_GROUP.min(m - start),
                xs: [&[]; ROW_GROUP],
                q: [&[]; ROW_GROUP],
                d: [&[]; ROW_GROUP],
                s: [&[]; ROW_GROUP],
            };
            for k in 0..g.len {
                let i = start + k;
                g.xs[k] = &x[i * cols..(i + 1) * cols];
                if let Some(a) = &q16 {
                    g.q[k] = &a.q[i * cols..(i + 1) * cols];
                    g.d[k] = &a.d[i * nb..(i + 1) * nb];
                    g.s[k] = &a.s[i * nb..(i + 1) * nb];
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
            match isa() {
                // SAFETY: `isa()` checked the CPU features each variant is compiled for; the
                // weight row and every activation row of the group hold `nb` blocks.
                Isa::Avx2Vnni => return unsafe { x86::vnni::dot_q4_1(wr, g, out) },
                Isa::Avx2 => return unsafe { x86::avx2::dot_q4_1(wr, g, out) },
                Isa::Scalar => {}
            }
            scalar::dot_q4_1(wr, g, out)
        }
        WeightData::Q8_0(blocks) => {
            let wr = &blocks[r * nb..(r + 1) * nb];
            #[cfg(target_arch = "x86_64")]
            match isa() {
                // SAFETY: as above.
                Isa::Avx2Vnni => return unsafe { x86::vnni::dot_q8_0(wr, g, out) },
                Isa::Avx2 => return unsafe { x86::avx2::dot_q8_0(wr, g, out) },
                Isa::Scalar => {}
            }
            scalar::dot_q8_0(wr, g, out)
        }
    }
}

/// Inner product of two float vectors with the kernels' summation order.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Scalar {
        // SAFETY: `isa()` checked for AVX2 and FMA.
        return unsafe { x86::dot_f32(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Portable kernels: the same arithmetic as the SIMD ones (exact integer block sums, scaled
/// and accumulated in f32) up to float summation order.
mod scalar {
    use super::*;

    pub fn dot_q4_1(w: &[BlockQ4_1], g: &Group, out: &mut [f32; ROW_GROUP]) {
        for k in 0..g.len {
            let (mut acc, mut macc) = ([0f32; 2], [0f32; 2]);
            for (i, wb) in w.iter().enumerate() {
                let qx = &g.q[k][i * QK..(i + 1) * QK];
                let mut isum = 0i32;
                for j in 0..QK / 2 {
                    isum += (wb.qs[j] & 0x0F) as i32 * qx[j] as i32;
                    isum += (wb.qs[j] >> 4) as i32 * qx[j + QK / 2] as i32;
                }
                acc[i & 1] += isum as f32 * (wb.d.to_f32() * g.d[k][i]);
                macc[i & 1] += wb.m.to_f32() * g.s[k][i];
            }
            out[k] = (acc[0] + acc[1]) + (macc[0] + macc[1]);
        }
    }

    pub fn dot_q8_0(w: &[BlockQ8_0], g: &Group, out: &mut [f32; ROW_GROUP]) {
        for k in 0..g.len {
            let mut acc = [0f32; 2];
            for (i, wb) in w.iter().enumerate() {
                let qx = &g.q[k][i * QK..(i + 1) * QK];
                let isum: i32 = wb
                    .qs
                    .iter()
                    .zip(qx)
                    .map(|(&a, &b)| a as i32 * b as i32)
                    .sum();
                acc[i & 1] += isum as f32 * (wb.d.to_f32() * g.d[k][i]);
            }
            out[k] = acc[0] + acc[1];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::hsum;
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

    /// The f16 scale (and, for `Q4_1`, minimum) at the start of a block, as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn halves(p: *const u8) -> (f32, f32) {
        let bits = std::ptr::read_unaligned(p as *const i32);
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }

    /// Adds `Q4_1` block `$i` of the weight row to the accumulators of every activation row.
    /// A macro rather than a function so that it is inlined in every build profile (the
    /// accumulators must stay in registers).
    macro_rules! q4_1_block {
        ($dot2:ident, $wb:expr, $i:expr, $q:ident, $d:ident, $s:ident, $acc:ident, $macc:ident) => {{
            let wb: &BlockQ4_1 = $wb;
            let i: usize = $i;
            let (dw, mw) = halves(wb as *const BlockQ4_1 as *const u8);
            let w16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(wb.qs.as_ptr() as *const __m128i));
            // Elements 0..16 are the low nibbles, 16..32 the high ones.
            let lo = _mm256_and_si256(w16, _mm256_set1_epi16(0x0F));
            let hi = _mm256_srli_epi16(w16, 4);
            for k in 0..$acc.len() {
                let x = $q[k].add(i * QK) as *const __m256i;
                let p = $dot2(lo, _mm256_loadu_si256(x), hi, _mm256_loadu_si256(x.add(1)));
                let scale = _mm256_set1_ps(dw * *$d[k].add(i));
                $acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, $acc[k]);
                $macc[k] += mw * *$s[k].add(i);
            }
        }};
    }

    /// The same for a `Q8_0` block.
    macro_rules! q8_0_block {
        ($dot2:ident, $wb:expr, $i:expr, $q:ident, $d:ident, $acc:ident) => {{
            let wb: &BlockQ8_0 = $wb;
            let i: usize = $i;
            let (dw, _) = halves(wb as *const BlockQ8_0 as *const u8);
            let qs = wb.qs.as_ptr() as *const __m128i;
            let a = _mm256_cvtepi8_epi16(_mm_loadu_si128(qs));
            let b = _mm256_cvtepi8_epi16(_mm_loadu_si128(qs.add(1)));
            for k in 0..$acc.len() {
                let x = $q[k].add(i * QK) as *const __m256i;
                let p = $dot2(a, _mm256_loadu_si256(x), b, _mm256_loadu_si256(x.add(1)));
                let scale = _mm256_set1_ps(dw * *$d[k].add(i));
                $acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, $acc[k]);
            }
        }};
    }

    /// Defines the quantized kernels for one instruction set; `$dot2` adds `a·x + b·y` (16-bit
    /// lanes, pairwise) to eight `i32` accumulators.
    macro_rules! kernels {
        ($module:ident, $features:literal, $dot2:ident) => {
            pub(super) mod $module {
                use super::super::super::quant::{BlockQ4_1, BlockQ8_0, QK};
                use super::super::{Group, ROW_GROUP};
                use super::*;

                /// Even and odd blocks go to separate accumulators (two dependency chains);
                /// the loop is unrolled by two so that both stay in registers.
                #[target_feature(enable = $features)]
                unsafe fn q4_1_rows<const R: usize>(
                    w: &[BlockQ4_1],
                    g: &Group,
                    out: &mut [f32; ROW_GROUP],
                ) {
                    let (mut even, mut odd) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
                    let (mut meven, mut modd) = ([0f32; R], [0f32; R]);
                    let q: [*const i16; R] = std::array::from_fn(|k| g.q[k].as_ptr());
                    let d: [*const f32; R] = std::array::from_fn(|k| g.d[k].as_ptr());
                    let s: [*const f32; R] = std::array::from_fn(|k| g.s[k].as_ptr());
                    let mut pairs = w.chunks_exact(2);
                    let mut i = 0;
                    for pair in &mut pairs {
                        q4_1_block!($dot2, &pair[0], i, q, d, s, even, meven);
                        q4_1_block!($dot2, &pair[1], i + 1, q, d, s, odd, modd);
                        i += 2;
                    }
                    if let [last] = pairs.remainder() {
                        q4_1_block!($dot2, last, i, q, d, s, even, meven);
                    }
                    for k in 0..R {
                        out[k] = hsum(_mm256_add_ps(even[k], odd[k])) + (meven[k] + modd[k]);
                    }
                }

                #[target_feature(enable = $features)]
                unsafe fn q8_0_rows<const R: usize>(
                    w: &[BlockQ8_0],
                    g: &Group,
                    out: &mut [f32; ROW_GROUP],
                ) {
                    let (mut even, mut odd) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
                    let q: [*const i16; R] = std::array::from_fn(|k| g.q[k].as_ptr());
                    let d: [*const f32; R] = std::array::from_fn(|k| g.d[k].as_ptr());
                    let mut pairs = w.chunks_exact(2);
                    let mut i = 0;
                    for pair in &mut pairs {
                        q8_0_block!($dot2, &pair[0], i, q, d, even);
                        q8_0_block!($dot2, &pair[1], i + 1, q, d, odd);
                        i += 2;
                    }
                    if let [last] = pairs.remainder() {
                        q8_0_block!($dot2, last, i, q, d, even);
                    }
                    for k in 0..R {
                        out[k] = hsum(_mm256_add_ps(even[k], odd[k]));
                    }
                }

                /// The group size is a constant in each instance so the accumulators stay in
                /// registers.
                #[target_feature(enable = $features)]
                pub unsafe fn dot_q4_1(w: &[BlockQ4_1], g: &Group, out: &mut [f32; ROW_GROUP]) {
                    match g.len {
                        1 => q4_1_rows::<1>(w, g, out),
                        2 => q4_1_rows::<2>(w, g, out),
                        3 => q4_1_rows::<3>(w, g, out),
                        _ => q4_1_rows::<4>(w, g, out),
                    }
                }

                #[target_feature(enable = $features)]
                pub unsafe fn dot_q8_0(w: &[BlockQ8_0], g: &Group, out: &mut [f32; ROW_GROUP]) {
                    match g.len {
                        1 => q8_0_rows::<1>(w, g, out),
                        2 => q8_0_rows::<2>(w, g, out),
                        3 => q8_0_rows::<3>(w, g, out),
                        _ => q8_0_rows::<4>(w, g, out),
                    }
                }
            }
        };
    }

    #[target_feature(enable = "avx2")]
    unsafe fn dot2_avx2(a: __m256i, x: __m256i, b: __m256i, y: __m256i) -> __m256i {
        _mm256_add_epi32(_mm256_madd_epi16(a, x), _mm256_madd_epi16(b, y))
    }

    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    unsafe fn dot2_vnni(a: __m256i, x: __m256i, b: __m256i, y: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(_mm256_madd_epi16(a, x), b, y)
    }

    kernels!(avx2, "avx2,fma,f16c", dot2_avx2);
    kernels!(vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot2_vnni);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        crate::testing::pseudo_random(n, seed, 1.0)
    }

    fn weights(rows: usize, cols: usize, dtype: GgmlDType) -> WeightMatrix {
        let t =
            Tensor::from_vec(pseudo_random(rows * cols, 7), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        WeightMatrix::from_qtensor(&q, super::super::quant::WeightFormat::Native).unwrap()
    }

    /// Every kernel equals the dequantized product (computed in f64) to within the 16-bit
    /// rounding of activations, and every row of a batched product is bit-identical to the
    /// same row computed alone.
    #[test]
    fn kernels_are_accurate_and_batch_invariant() {
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
                        (got as f64 - exact).abs() <= 1e-4 * scale + 1e-6,
                        "{dtype:?} {i},{r}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    /// The SIMD kernels give bit-identical results to the portable ones (integer block sums
    /// are exact and the float steps happen in the same order).
    #[test]
    fn simd_kernels_equal_the_portable_ones() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (rows, cols, m) = (9, 128, 5);
            let w = weights(rows, cols, dtype);
            let x = pseudo_random(m * cols, 5);
            let a = Quantized16::new(&x, m, cols);
            let nb = cols / QK;
            let g = Group {
                len: 4,
                xs: std::array::from_fn(|k| &x[k * cols..(k + 1) * cols]),
                q: std::array::from_fn(|k| &a.q[k * cols..(k + 1) * cols]),
                d: std::array::from_fn(|k| &a.d[k * nb..(k + 1) * nb]),
                s: std::array::from_fn(|k| &a.s[k * nb..(k + 1) * nb]),
            };
            for r in 0..rows {
                let mut simd = [0f32; ROW_GROUP];
                dot_row(&w, r, &g, &mut simd);
                let mut portable = [0f32; ROW_GROUP];
                match &w.data {
                    WeightData::Q4_1(b) => {
                        scalar::dot_q4_1(&b[r * nb..(r + 1) * nb], &g, &mut portable)
                    }
                    WeightData::Q8_0(b) => {
                        scalar::dot_q8_0(&b[r * nb..(r + 1) * nb], &g, &mut portable)
                    }
                    WeightData::F32(_) => unreachable!(),
                }
                for k in 0..4 {
                    assert!(
                        (simd[k] - portable[k]).abs() <= 1e-5 * (1.0 + simd[k].abs()),
                        "{dtype:?} {r},{k}: {simd:?} vs {portable:?}"
                    );
                }
            }
        }
    }

    /// A product big enough to be split across threads gives the same result as one row.
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
