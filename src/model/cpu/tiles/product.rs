//! The tile products: [`portable_panel`] writes out the arithmetic of the module above one
//! operation at a time; [`matmul`] splits a product into panels between threads and runs
//! each on the tile units (`amx`) when the machine has them, else portably, with the same
//! results.

// Index loops over tile rows and columns read more clearly than zipped iterators here.
#![allow(clippy::needless_range_loop)]

use super::{TileActivations, TiledWeights, ABLOCK, CHUNK, PANEL};
use crate::model::cpu::matmul::{dot_f32, isa, Isa};
use crate::model::cpu::quant::{WeightData, WeightMatrix};
use crate::model::cpu::team::DisjointMut;

/// The products of panel `p` of `w` (its f32 scales and minimums `scales`, as
/// [`TiledWeights::panel_scales`] gives them) with the tokens of chunk `c` of `a`, in
/// `out[t][n]`: the arithmetic of the module above, one operation at a time.
pub fn portable_panel(
    w: &TiledWeights,
    p: usize,
    scales: &(Vec<f32>, Vec<f32>),
    a: &TileActivations,
    c: usize,
    out: &mut [[f32; PANEL]; CHUNK],
) {
    let (span, spans) = (w.layout.span, w.spans());
    debug_assert!(
        !w.layout.mins || span == ABLOCK,
        "minimums are per 32 values"
    );
    let mut tile = vec![0i8; 64 * w.layout.tile_rows()];
    let mut acc = [[0f32; PANEL]; CHUNK];
    for s in 0..spans {
        w.unpack_tile(p, s, &mut tile);
        let (b, first) = (s * span / ABLOCK, s * span % ABLOCK);
        let (x, dx) = (a.tile(c, b), a.per_token(&a.scales, c, b));
        let dw = &scales.0[s * PANEL..][..PANEL];
        for t in 0..CHUNK {
            for n in 0..PANEL {
                let mut i = 0i32;
                for k in 0..span {
                    let q = tile[64 * (k / 4) + 4 * n + k % 4] as i32;
                    let hi = x[2 * t * ABLOCK + first + k] as i32;
                    let lo = x[(2 * t + 1) * ABLOCK + first + k] as i32;
                    i += q * (256 * hi + lo);
                }
                acc[t][n] = (i as f32 * dx[t]).mul_add(dw[n], acc[t][n]);
            }
        }
    }
    *out = acc;
    if w.layout.mins {
        let mut macc = [[0f32; PANEL]; CHUNK];
        for s in 0..spans {
            let sx = a.per_token(&a.sums, c, s);
            let mw = &scales.1[s * PANEL..][..PANEL];
            for t in 0..CHUNK {
                for n in 0..PANEL {
                    macc[t][n] = mw[n].mul_add(sx[t], macc[t][n]);
                }
            }
        }
        for t in 0..CHUNK {
            for n in 0..PANEL {
                out[t][n] = acc[t][n] + macc[t][n];
            }
        }
    }
}

/// What one task of [`matmul`] computes.
enum Work<'a> {
    /// Panels of a tiled part whose rows start at output column `col0`.
    Panels(&'a TiledWeights, usize, std::ops::Range<usize>),
    /// An f32 part of `rows` rows from column `col0`, row by row.
    Dense(&'a [f32], usize, usize),
}

/// `out[i * w.rows + j] = Σ_k x[i * w.cols + k] * W[j, k]` for a matrix whose block parts are
/// tiled: on the tile units when this machine has them, else in [`portable_panel`] (the same
/// results, slowly). Threads split the panels; each panel's weights are read once for every
/// token.
pub(crate) fn matmul(x: &[f32], m: usize, w: &WeightMatrix, out: &mut [f32]) {
    matmul_on(x, m, w, out, isa() == Isa::Amx)
}

/// [`matmul`] on the tile units (`amx`, which must be this machine's [`isa`]) or not.
fn matmul_on(x: &[f32], m: usize, w: &WeightMatrix, out: &mut [f32], amx: bool) {
    assert!(!amx || isa() == Isa::Amx, "no tile units here");
    let a = TileActivations::new(x, m, w.cols);
    let panels: usize = w.parts.iter().map(|p| p.rows.div_ceil(PANEL)).sum();
    let threads = rayon::current_num_threads().max(1);
    let per_task = if m * w.rows * w.cols < 1 << 16 || threads == 1 {
        panels.max(1)
    } else {
        panels.div_ceil(threads * 4).max(1)
    };
    let mut work = Vec::new();
    let mut col0 = 0;
    for part in &w.parts {
        match &part.data {
            WeightData::Tiled(t) => {
                // The kernels write `t.rows` columns from `col0`: they must be this part's.
                assert!(
                    t.rows == part.rows && t.cols == w.cols,
                    "tiled part [{}, {}] in a [{}, {}] part",
                    t.rows,
                    t.cols,
                    part.rows,
                    w.cols
                );
                for start in (0..t.panels()).step_by(per_task) {
                    work.push(Work::Panels(
                        t,
                        col0,
                        start..(start + per_task).min(t.panels()),
                    ));
                }
            }
            WeightData::F32(v) => work.push(Work::Dense(v, col0, part.rows)),
            other => panic!("{} rows in a tiled matrix", other.format().name()),
        }
        col0 += part.rows;
    }
    assert_eq!(col0, w.rows, "the parts hold {col0} rows of {}", w.rows);
    let (n, cols, out_ptr) = (w.rows, w.cols, DisjointMut(out.as_mut_ptr()));
    #[cfg(not(target_arch = "x86_64"))]
    let _ = amx;
    let run = |work: &Work| match work {
        Work::Panels(t, col0, panels) => {
            #[cfg(target_arch = "x86_64")]
            if amx {
                let out = crate::model::cpu::amx::Out {
                    ptr: out_ptr.get(),
                    stride: n,
                    col0: *col0,
                };
                // SAFETY: `isa()` found the tile units; `out` is `[m, n]` and each task owns
                // the columns of its panels.
                return unsafe { crate::model::cpu::amx::panels(t, panels.clone(), &a, &out) };
            }
            let mut res = [[0f32; PANEL]; CHUNK];
            for p in panels.clone() {
                let scales = t.panel_scales(p);
                for c in 0..a.chunks() {
                    portable_panel(t, p, &scales, &a, c, &mut res);
                    for (t_i, row) in res.iter().enumerate().take(m - c * CHUNK) {
                        for (j, &v) in row.iter().enumerate().take(t.rows - p * PANEL) {
                            let (i, r) = (c * CHUNK + t_i, col0 + p * PANEL + j);
                            // SAFETY: inside `[m, n]`; each task owns its panels' columns.
                            unsafe { *out_ptr.get().add(i * n + r) = v };
                        }
                    }
                }
            }
        }
        Work::Dense(v, col0, rows) => {
            for r in 0..*rows {
                for i in 0..m {
                    let d = dot_f32(&v[r * cols..(r + 1) * cols], &x[i * cols..(i + 1) * cols]);
                    // SAFETY: as above.
                    unsafe { *out_ptr.get().add(i * n + col0 + r) = d };
                }
            }
        }
    };
    crate::model::cpu::team::parallel_for(work.len(), &|i| run(&work[i]));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu::matmul::tests::assert_batch_invariant_and_accurate;
    use crate::model::cpu::quant::tests::BLOCK_FORMATS;
    use crate::model::cpu::quant::WeightFormat;
    use crate::model::cpu::tiles::tests::{native, shape};
    use crate::testing::pseudo_random;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// The tile products equal the dequantize-then-multiply reference (in f64) to within the
    /// 16-bit rounding of activations, and each token's row of a batched product is
    /// bit-identical to the same token alone, for batches that fill chunks partly and wholly.
    #[test]
    fn tile_products_are_accurate_and_batch_invariant() {
        for dtype in BLOCK_FORMATS {
            let (rows, cols) = shape(dtype);
            let w = native(rows, cols, dtype).tiled();
            let m = 2 * CHUNK + 3;
            let x = pseudo_random(m * cols, 3, 1.0);
            for batch in [m, CHUNK, 5, 2] {
                assert_batch_invariant_and_accurate(&w, &x, batch, &format!("{dtype:?}"));
            }
        }
    }

    /// On a machine with tile units, their products are the portable arithmetic's bit for bit
    /// (stacked parts of different formats, and an f32 part, included).
    #[test]
    fn tile_units_compute_the_portable_arithmetic_exactly() {
        if isa() != Isa::Amx {
            eprintln!("no tile units here: nothing to compare");
            return;
        }
        let cols = 512;
        let mut parts: Vec<WeightMatrix> =
            BLOCK_FORMATS.iter().map(|&d| native(19, cols, d)).collect();
        let dense =
            Tensor::from_vec(pseudo_random(5 * cols, 4, 1.0), (5, cols), &Device::Cpu).unwrap();
        parts.push(
            WeightMatrix::from_qtensor(
                &QTensor::quantize(&dense, GgmlDType::F32).unwrap(),
                WeightFormat::Native,
            )
            .unwrap(),
        );
        let w = WeightMatrix::stack(parts).unwrap().tiled();
        for m in [1, 2, 3, 4, 7, CHUNK, CHUNK + 1, 3 * CHUNK + 5] {
            let x = pseudo_random(m * cols, 5 + m as u32, 2.0);
            let (mut tiles, mut portable) = (vec![0f32; m * w.rows], vec![0f32; m * w.rows]);
            matmul_on(&x, m, &w, &mut tiles, true);
            matmul_on(&x, m, &w, &mut portable, false);
            assert_eq!(tiles, portable, "batch {m}");
        }
    }
}
