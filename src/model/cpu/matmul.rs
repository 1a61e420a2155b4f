//! `y = x · Wᵀ` on the CPU for weights in any of the block formats of [`super::blocks`]
//! (or `f32`), each weight row read in its own format.
//!
//! For quantized weights the activations are rounded to **16-bit** integers (`x ≈ d_x q_x`,
//! relative error below 2⁻¹⁵ of the largest value sharing the scale), with one scale per 32
//! values, or per 256 against K-quant weights. The products are summed exactly in integers
//! (`vpmaddwd`, or `vpdpwssd` with AVX-512 VNNI) and scaled once per block, or once per
//! K-quant super-block, whose integer sub-block scales are folded into the weights (see
//! [`super::portable`] for the arithmetic and its `i32` bounds). For a block with a minimum,
//! `Σ (d_w q_w + m_w) x = d_w d_x Σ q_w q_x + m_w Σ x`, with `Σ x` the exact sum of each 32
//! activations. llama.cpp rounds activations to 8 bits instead (`q8_1`, `q8_K`); on
//! SmolLM2-135M that flips the greedy reply to "What is the capital of France?" (a 0.1-logit
//! margin), while 16 bits keep the dequantized model's answers.
//!
//! **Batches.** Each weight row is unpacked once for a group of up to [`ROW_GROUP`]
//! activation rows, whose rounded values the SIMD kernels read from a copy tiled by group
//! ([`Tiled`]): a block's activations for all rows of the group lie side by side, so the
//! kernel's working set is the unpacked weights, one accumulator per row and three pointers.
//! Threads split the weight rows into chunks small enough to stay in cache while every group
//! of rows passes over them, so each weight block comes from memory once per product.
//!
//! **Batch invariance.** Every output element is computed by the same operations in the same
//! order whatever the number of rows in `x` and however the work is split between threads
//! (integer sums are exact, so even the instruction set does not change them), so a sequence
//! gets bit-identical results alone or packed in a batch with others.

// Index loops over the rows of a group read more clearly than zipped iterators here.
#![allow(clippy::needless_range_loop)]

use super::portable;
use super::quant::{BlockFormat, WeightData, WeightMatrix, QK, QK_K};
use std::sync::OnceLock;

/// The instruction set the kernels use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    /// AVX2 plus `vpdpwssd` on 256-bit registers (AVX-512 VNNI with VL).
    Avx2Vnni,
    /// [`Isa::Avx2Vnni`] plus the tile units (AMX-INT8) and AVX-512BW: weights are repacked
    /// for tile products ([`super::tiles`]).
    Amx,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2+fma",
            Isa::Avx2Vnni => "avx2+fma+avx512vnni",
            Isa::Amx => "avx512+amx-int8",
        }
    }
}

/// Detected once per process; `TILLER_KERNELS=scalar`, `avx2` or `vnni` caps it.
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
                if cap != "vnni" && super::amx::available() {
                    return Isa::Amx;
                }
                return Isa::Avx2Vnni;
            }
            return Isa::Avx2;
        }
        Isa::Scalar
    })
}

/// `1.5 * 2^23`: adding and removing it rounds an f32 below `2^22` to the nearest integer
/// (even on ties), in a form that vectorizes (`f32::round` is a libm call here).
pub(crate) const ROUNDER: f32 = 12_582_912.0;

/// Activation rows processed together against one weight row (weights expanded once).
pub(crate) const ROW_GROUP: usize = 8;

/// Activations rounded to 16 bits, `[rows, cols]`, with one scale per `block` values (32, or
/// 256 for K-quant weights) and the exact f32 sum of every 32.
struct Quantized16 {
    q: Vec<i16>,
    d: Vec<f32>,
    s: Vec<f32>,
    block: usize,
    /// The same values tiled for the SIMD kernels (for more than one row: a single row is
    /// already laid out as its tile).
    tiled: Option<Tiled>,
}

/// Each group's rows interleaved block by block (a block: the values sharing one scale, 32 or
/// 256): in the group of rows `start..start + len`, row `k`'s block `b` lies at
/// `start * cols + (b * len + k) * block`, its scale at `start * blocks + b * len + k`, and
/// its sums (one per 32 values) from `start * cols / 32 + (b * len + k) * block / 32`. A
/// kernel then walks one pointer per array whatever the number of rows (the rows' pointers no
/// longer crowd out its registers), and reads a block's activations for all rows as one
/// contiguous run and their scales and sums side by side.
struct Tiled {
    q: Vec<i16>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Tiled {
    fn new(a: &Quantized16, m: usize, cols: usize) -> Self {
        let (unit, nb, per) = (a.block, cols / a.block, a.block / QK);
        let mut t = Tiled {
            q: vec![0; a.q.len()],
            d: vec![0.0; a.d.len()],
            s: vec![0.0; a.s.len()],
        };
        for start in (0..m).step_by(ROW_GROUP) {
            let len = ROW_GROUP.min(m - start);
            for k in 0..len {
                let row = start + k;
                for b in 0..nb {
                    let (tile, src) = (b * len + k, row * nb + b);
                    let q = start * cols + tile * unit;
                    t.q[q..q + unit].copy_from_slice(&a.q[src * unit..(src + 1) * unit]);
                    t.d[start * nb + tile] = a.d[src];
                    let s = start * nb * per + tile * per;
                    t.s[s..s + per].copy_from_slice(&a.s[src * per..(src + 1) * per]);
                }
            }
        }
        t
    }
}

impl Quantized16 {
    fn new(x: &[f32], m: usize, cols: usize, block: usize) -> Self {
        let (nd, ns) = (cols / block, cols / QK);
        let mut out = Self {
            q: vec![0; m * cols],
            d: vec![0.0; m * nd],
            s: vec![0.0; m * ns],
            block,
            tiled: None,
        };
        let row = |(((q, d), s), x): &mut RowParts| {
            for ((q, d), x) in q
                .chunks_exact_mut(block)
                .zip(d.iter_mut())
                .zip(x.chunks_exact(block))
            {
                let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
                let scale = amax / 32767.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (qi, &xi) in q.iter_mut().zip(x) {
                    // Round to nearest (even) by adding and removing 1.5 * 2^23: exact for
                    // |v| <= 32767, and vectorizes (`f32::round` is a libm call here).
                    let v = (xi * inv).clamp(-32767.0, 32767.0);
                    *qi = ((v + ROUNDER) - ROUNDER) as i16;
                }
                *d = scale;
            }
            for (s, x) in s.iter_mut().zip(x.chunks_exact(QK)) {
                *s = x.iter().sum();
            }
        };
        let rows = out
            .q
            .chunks_mut(cols)
            .zip(out.d.chunks_mut(nd))
            .zip(out.s.chunks_mut(ns))
            .zip(x.chunks(cols));
        if m >= 16 {
            let mut rows: Vec<RowParts> = rows.collect();
            super::team::for_each_mut(&mut rows, &|_, p| row(p));
        } else {
            rows.for_each(|mut p| row(&mut p));
        }
        // One row is its own tile (`b * 1 + 0 = b`): decode at batch 1 copies nothing.
        if isa() != Isa::Scalar && m > 1 {
            out.tiled = Some(Tiled::new(&out, m, cols));
        }
        out
    }

    /// The rows of `x` (and their rounded values) in groups of [`ROW_GROUP`].
    fn groups<'a>(this: Option<&'a Self>, x: &'a [f32], m: usize, cols: usize) -> Vec<Group<'a>> {
        (0..m)
            .step_by(ROW_GROUP)
            .map(|start| {
                let mut g = Group {
                    len: ROW_GROUP.min(m - start),
                    xs: [&[]; ROW_GROUP],
                    q: [&[]; ROW_GROUP],
                    d: [&[]; ROW_GROUP],
                    s: [&[]; ROW_GROUP],
                    tiled: (&[], &[], &[]),
                };
                if let Some(a) = this.filter(|a| a.tiled.is_none() && m == 1) {
                    g.tiled = (&a.q[..], &a.d[..], &a.s[..]);
                } else if let Some((a, t)) = this.and_then(|a| Some((a, a.tiled.as_ref()?))) {
                    let (nd, ns) = (cols / a.block, cols / QK);
                    let rows = start..start + g.len;
                    g.tiled = (
                        &t.q[rows.start * cols..rows.end * cols],
                        &t.d[rows.start * nd..rows.end * nd],
                        &t.s[rows.start * ns..rows.end * ns],
                    );
                }
                for k in 0..g.len {
                    let i = start + k;
                    g.xs[k] = &x[i * cols..(i + 1) * cols];
                    if let Some(a) = this {
                        let (nd, ns) = (cols / a.block, cols / QK);
                        g.q[k] = &a.q[i * cols..(i + 1) * cols];
                        g.d[k] = &a.d[i * nd..(i + 1) * nd];
                        g.s[k] = &a.s[i * ns..(i + 1) * ns];
                    }
                }
                g
            })
            .collect()
    }
}

/// One activation row's 16-bit values, scales and sums, and its f32 input.
type RowParts<'a> = (((&'a mut [i16], &'a mut [f32]), &'a mut [f32]), &'a [f32]);

/// The activation rows of one group.
pub(crate) struct Group<'a> {
    pub len: usize,
    /// f32 rows (for f32 weights).
    pub xs: [&'a [f32]; ROW_GROUP],
    /// 16-bit rows, per-block scales and sums (for quantized weights).
    pub q: [&'a [i16]; ROW_GROUP],
    pub d: [&'a [f32]; ROW_GROUP],
    pub s: [&'a [f32]; ROW_GROUP],
    /// The same rows tiled (values, scales, sums; see [`Tiled`]) for the SIMD kernels; empty
    /// for the portable ones.
    pub tiled: (&'a [i16], &'a [f32], &'a [f32]),
}

/// `out[i * w.rows + j] = Σ_k x[i * w.cols + k] * W[j, k]` for `i < m`.
pub fn matmul(x: &[f32], m: usize, w: &WeightMatrix, out: &mut [f32]) {
    assert_eq!(x.len(), m * w.cols, "matmul: x is not [m, cols]");
    assert_eq!(out.len(), m * w.rows, "matmul: out is not [m, rows]");
    if m == 0 || w.rows == 0 {
        return;
    }
    if w.parts
        .iter()
        .any(|p| matches!(p.data, WeightData::Tiled(_)))
    {
        return super::tiles::matmul(x, m, w, out);
    }
    let cols = w.cols;
    // Activations rounded once for each activation block size the parts' formats use.
    let rounded = |block: usize| {
        w.parts
            .iter()
            .map(|p| p.data.format())
            .any(|f| f != BlockFormat::F32 && f.activation_block() == block)
            .then(|| Quantized16::new(x, m, cols, block))
    };
    let (q32, q256) = (rounded(QK), rounded(QK_K));
    let groups = [
        Quantized16::groups(q32.as_ref(), x, m, cols),
        Quantized16::groups(q256.as_ref(), x, m, cols),
    ];
    let n = w.rows;
    let threads = rayon::current_num_threads().max(1);
    // Chunks of weight rows; several per thread so that work stealing evens out.
    let chunk = if m * n * cols < 1 << 16 || threads == 1 {
        n
    } else {
        n.div_ceil(threads * 4).max(8)
    };
    let out_ptr = super::team::DisjointMut(out.as_mut_ptr());
    let body = |start: usize| {
        let end = (start + chunk).min(n);
        let mut res = [0f32; ROW_GROUP];
        for gi in 0..groups[0].len() {
            let g = [&groups[0][gi], &groups[1][gi]];
            for r in start..end {
                dot_row(w, r, g, &mut res);
                for (k, &v) in res[..g[0].len].iter().enumerate() {
                    let i = gi * ROW_GROUP + k;
                    // SAFETY: `out` is `[m, n]`; each task owns the columns `start..end`, so
                    // writes from different tasks never touch the same element.
                    unsafe { *out_ptr.get().add(i * n + r) = v };
                }
            }
        }
    };
    super::team::parallel_for(n.div_ceil(chunk), &|task| body(task * chunk));
}

/// Runs `$kernel` (a function of every instruction set) on row `$r` of `$blocks`, or the
/// portable `$portable`.
macro_rules! dispatch {
    ($blocks:expr, $per_row:expr, $r:expr, $g:expr, $out:expr, $kernel:ident) => {
        dispatch!($blocks, $per_row, $r, $g, $out, $kernel, dot)
    };
    ($blocks:expr, $per_row:expr, $r:expr, $g:expr, $out:expr, $kernel:ident, $portable:ident) => {{
        let wr = &$blocks[$r * $per_row..($r + 1) * $per_row];
        #[cfg(target_arch = "x86_64")]
        match isa() {
            // SAFETY: `isa()` checked the CPU features each variant is compiled for; the
            // weight row holds `cols` values and every activation row of the group as many.
            Isa::Avx2Vnni | Isa::Amx => return unsafe { super::x86::vnni::$kernel(wr, $g, $out) },
            Isa::Avx2 => return unsafe { super::x86::avx2::$kernel(wr, $g, $out) },
            Isa::Scalar => {}
        }
        portable::$portable(wr, $g, $out)
    }};
}

/// Row `r` of `w` against a group of activation rows, rounded per 32 values (`g[0]`) and per
/// 256 (`g[1]`, for the K-quants).
fn dot_row(w: &WeightMatrix, r: usize, g: [&Group; 2], out: &mut [f32; ROW_GROUP]) {
    let cols = w.cols;
    let (part, r) = w.part_of(r);
    let g = g[(part.data.format().activation_block() == QK_K) as usize];
    let per_row = cols / part.data.format().block_elems();
    match &part.data {
        WeightData::F32(data) => {
            let wr = &data[r * cols..(r + 1) * cols];
            for k in 0..g.len {
                out[k] = dot_f32(wr, g.xs[k]);
            }
        }
        WeightData::Q4_0(b) => dispatch!(b, per_row, r, g, out, q4_0),
        WeightData::Q4_1(b) => dispatch!(b, per_row, r, g, out, q4_1),
        WeightData::Q5_0(b) => dispatch!(b, per_row, r, g, out, q5_0),
        WeightData::Q5_1(b) => dispatch!(b, per_row, r, g, out, q5_1),
        WeightData::Q8_0(b) => dispatch!(b, per_row, r, g, out, q8_0),
        WeightData::Q4K(b) => dispatch!(b, per_row, r, g, out, q4k, dot_k),
        WeightData::Q5K(b) => dispatch!(b, per_row, r, g, out, q5k, dot_k),
        WeightData::Q6K(b) => dispatch!(b, per_row, r, g, out, q6k, dot_k),
        WeightData::Tiled(_) => unreachable!("tiled matrices take `tiles::matmul`"),
    }
}

/// Inner product of two float vectors with the kernels' summation order.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Scalar {
        // SAFETY: `isa()` checked for AVX2 and FMA.
        return unsafe { super::x86::dot_f32(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::cpu::quant::{BlockQ5K, BlockQ6K, WeightFormat};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use crate::model::cpu::quant::tests::BLOCK_FORMATS;

    /// The block formats and f32.
    const FORMATS: [GgmlDType; 9] = {
        let mut all = [GgmlDType::F32; 9];
        let mut i = 0;
        while i < BLOCK_FORMATS.len() {
            all[i] = BLOCK_FORMATS[i];
            i += 1;
        }
        all
    };

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        crate::testing::pseudo_random(n, seed, 1.0)
    }

    /// Random weights with some blocks far larger or smaller than the rest (extreme scales),
    /// and rows shifted so that the K-quants need their minimums.
    fn weights_values(rows: usize, cols: usize) -> Vec<f32> {
        let mut v = pseudo_random(rows * cols, 7);
        for (i, x) in v.iter_mut().enumerate() {
            let (r, block) = (i / cols, (i % cols) / 32);
            *x = match (r + block) % 5 {
                0 => *x * 1e3,
                1 => *x * 1e-3,
                2 => *x + 2.0,
                _ => *x,
            };
        }
        v
    }

    pub(crate) fn weights(rows: usize, cols: usize, dtype: GgmlDType) -> WeightMatrix {
        let t = Tensor::from_vec(weights_values(rows, cols), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        WeightMatrix::from_qtensor(&q, WeightFormat::Native).unwrap()
    }

    /// Every kernel equals the dequantize-then-multiply reference (computed in f64) to within
    /// the 16-bit rounding of activations, and every row of a batched product is
    /// bit-identical to the same row computed alone.
    #[test]
    fn kernels_are_accurate_and_batch_invariant() {
        for dtype in FORMATS {
            // A full group of rows and a partial one (the kernels' tiles differ in length), and
            // an odd number of 32-value blocks (the kernels' last block has no pair).
            let cols = if dtype.block_size() == 32 { 544 } else { 512 };
            let (rows, m) = (37, ROW_GROUP + 3);
            let w = weights(rows, cols, dtype);
            let x = pseudo_random(m * cols, 3);
            assert_batch_invariant_and_accurate(&w, &x, m, &format!("{dtype:?}"));
        }
    }

    /// Every row of the product of `m` rows `x` with `w` is bit-identical to the same row
    /// multiplied alone, and matches the dequantized product.
    pub(crate) fn assert_batch_invariant_and_accurate(
        w: &WeightMatrix,
        x: &[f32],
        m: usize,
        what: &str,
    ) {
        let (rows, cols) = (w.rows, w.cols);
        let mut batched = vec![0f32; m * rows];
        matmul(&x[..m * cols], m, w, &mut batched);
        for i in 0..m {
            let xr = &x[i * cols..(i + 1) * cols];
            let mut alone = vec![0f32; rows];
            matmul(xr, 1, w, &mut alone);
            let what = format!("{what}, row {i} of {m}");
            assert_eq!(&batched[i * rows..(i + 1) * rows], &alone[..], "{what}");
            assert_matches_dequantized(w, xr, &alone, &what);
        }
    }

    /// Each of `got` (one activation row `x` times every row of `w`) equals the
    /// dequantize-then-multiply product, computed in f64, to within the 16-bit rounding of
    /// activations.
    pub(crate) fn assert_matches_dequantized(w: &WeightMatrix, x: &[f32], got: &[f32], what: &str) {
        let mut wr = vec![0f32; w.cols];
        for (r, &got) in got.iter().enumerate() {
            w.dequantize_row(r, &mut wr);
            let exact: f64 = wr.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
            let scale: f64 = wr
                .iter()
                .zip(x)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            assert!(
                (got as f64 - exact).abs() <= 1e-4 * scale + 1e-6,
                "{what}, output {r}: {got} vs {exact}"
            );
        }
    }

    /// The SIMD kernels agree with the portable ones on every format.
    #[test]
    fn simd_kernels_equal_the_portable_ones() {
        for dtype in &FORMATS[..8] {
            let (rows, cols, m) = (9, 512, 5);
            let w = weights(rows, cols, *dtype);
            let x = pseudo_random(m * cols, 5);
            let block = w.parts[0].data.format().activation_block();
            let a = Quantized16::new(&x, m, cols, block);
            let groups = Quantized16::groups(Some(&a), &x, m, cols);
            let g = &groups[0];
            for r in 0..rows {
                let mut simd = [0f32; ROW_GROUP];
                dot_row(&w, r, [g, g], &mut simd);
                let mut portable = [0f32; ROW_GROUP];
                let per_row = cols / w.parts[0].data.format().block_elems();
                let rows_of = |r: usize| r * per_row..(r + 1) * per_row;
                let out = &mut portable;
                match &w.parts[0].data {
                    WeightData::Q4_0(b) => portable::dot(&b[rows_of(r)], g, out),
                    WeightData::Q4_1(b) => portable::dot(&b[rows_of(r)], g, out),
                    WeightData::Q5_0(b) => portable::dot(&b[rows_of(r)], g, out),
                    WeightData::Q5_1(b) => portable::dot(&b[rows_of(r)], g, out),
                    WeightData::Q8_0(b) => portable::dot(&b[rows_of(r)], g, out),
                    WeightData::Q4K(b) => portable::dot_k(&b[rows_of(r)], g, out),
                    WeightData::Q5K(b) => portable::dot_k(&b[rows_of(r)], g, out),
                    WeightData::Q6K(b) => portable::dot_k(&b[rows_of(r)], g, out),
                    WeightData::F32(_) | WeightData::Tiled(_) => unreachable!(),
                }
                for k in 0..4 {
                    let tol = 1e-5 * (1.0 + simd[k].abs().max(portable[k].abs()));
                    assert!(
                        (simd[k] - portable[k]).abs() <= tol,
                        "{dtype:?} {r},{k}: {simd:?} vs {portable:?}"
                    );
                }
            }
        }
    }

    /// K-quant super-blocks at the extremes of their integer bounds (largest values and
    /// sub-block scales, activations all at the rounding limit) sum without overflowing.
    #[test]
    fn k_quant_integer_sums_do_not_overflow_at_the_bounds() {
        let cols = 512;
        let x = vec![-1f32; 3 * cols];
        let q5k = BlockQ5K {
            d: half::f16::from_f32(0.5),
            dmin: half::f16::from_f32(0.0),
            scales: [0xFF; 12],
            qh: [0xFF; 32],
            qs: [0xFF; 128],
        };
        let q6k = BlockQ6K {
            ql: [0; 128],
            qh: [0; 64],
            scales: [-128; 16],
            d: half::f16::from_f32(0.5),
        };
        let mats = [
            WeightMatrix::new(2, cols, WeightData::Q5K(vec![q5k; 4])).unwrap(),
            WeightMatrix::new(2, cols, WeightData::Q6K(vec![q6k; 4])).unwrap(),
        ];
        for w in mats {
            let mut out = vec![0f32; 3 * 2];
            matmul(&x, 3, &w, &mut out);
            let mut row = vec![0f32; cols];
            w.dequantize_row(0, &mut row);
            let exact: f32 = row.iter().map(|v| -v).sum();
            for got in out {
                assert!(
                    (got - exact).abs() <= 1e-4 * exact.abs(),
                    "{got} vs {exact}"
                );
            }
        }
    }

    /// Rows stacked from tensors of different formats each use their own kernel.
    #[test]
    fn stacked_formats_give_each_part_its_own_product() {
        let cols = 256;
        let parts = [GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q6K];
        let ms: Vec<WeightMatrix> = parts.iter().map(|&d| weights(3, cols, d)).collect();
        let stacked = WeightMatrix::stack(ms.clone()).unwrap();
        let x = pseudo_random(2 * cols, 13);
        let mut all = vec![0f32; 2 * 9];
        matmul(&x, 2, &stacked, &mut all);
        for (p, m) in ms.iter().enumerate() {
            let mut one = vec![0f32; 2 * 3];
            matmul(&x, 2, m, &mut one);
            for i in 0..2 {
                assert_eq!(
                    &all[i * 9 + 3 * p..i * 9 + 3 * p + 3],
                    &one[i * 3..i * 3 + 3]
                );
            }
        }
    }

    /// A product big enough to be split across threads gives the same result as one row.
    #[test]
    fn threaded_split_matches_single_row_products() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q4K] {
            let (rows, cols, m) = (300, 256, 9);
            let w = weights(rows, cols, dtype);
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
}
