//! Activation rows rounded and split for the tile products: 16 bits per 32 values
//! (`x ≈ d_x q_x`, `|q_x| ≤ 32639`) split into two signed bytes `q_x = 256 hi + lo`, so an
//! 8-bit tile product sums them exactly, with each block's exact sum for the minimums.

use super::{ABLOCK, CHUNK};
use crate::model::cpu::matmul::{isa, Isa, ROUNDER};

/// The largest rounded activation: `127 · 256 + 127`, so both bytes are signed.
pub(crate) const QX_MAX: f32 = 32639.0;

/// Activation rows rounded and split for the tile products: in chunks of [`CHUNK`] tokens
/// (the last padded with zeros), each 32-value block one tile operand of 16 rows of 32
/// bytes (token `t`'s high bytes in row `2t`, its low bytes in row `2t + 1`), with the
/// tokens' scales and exact sums.
pub struct TileActivations {
    pub m: usize,
    pub blocks: usize,
    /// `[chunk][block][2 * CHUNK][ABLOCK]`.
    pub(crate) bytes: Vec<i8>,
    /// `[chunk][block][CHUNK]`.
    pub(crate) scales: Vec<f32>,
    /// `[chunk][block][CHUNK]`.
    pub(crate) sums: Vec<f32>,
}

impl TileActivations {
    pub fn new(x: &[f32], m: usize, cols: usize) -> Self {
        let blocks = cols / ABLOCK;
        let chunks = m.div_ceil(CHUNK);
        let tile = 2 * CHUNK * ABLOCK;
        let mut a = TileActivations {
            m,
            blocks,
            bytes: vec![0; chunks * blocks * tile],
            scales: vec![0.0; chunks * blocks * CHUNK],
            sums: vec![0.0; chunks * blocks * CHUNK],
        };
        let chunk = |(((bytes, scales), sums), x): &mut ChunkParts| {
            #[cfg(target_arch = "x86_64")]
            if isa() == Isa::Amx {
                // SAFETY: `isa()` found AVX-512; the slices are one chunk's.
                return unsafe {
                    crate::model::cpu::amx::round_chunk(x, cols, bytes, scales, sums)
                };
            }
            for (t, row) in x.chunks_exact(cols).enumerate() {
                for (b, v) in row.chunks_exact(ABLOCK).enumerate() {
                    let (at, tile) = (b * CHUNK + t, &mut bytes[b * tile..(b + 1) * tile]);
                    (scales[at], sums[at]) = round_block(v, tile, t);
                }
            }
        };
        let mut parts: Vec<ChunkParts> = a
            .bytes
            .chunks_mut(blocks * tile)
            .zip(a.scales.chunks_mut(blocks * CHUNK))
            .zip(a.sums.chunks_mut(blocks * CHUNK))
            .zip(x[..m * cols].chunks(CHUNK * cols))
            .collect();
        crate::model::cpu::team::for_each_mut(&mut parts, &|_, p| chunk(p));
        a
    }

    pub fn chunks(&self) -> usize {
        self.m.div_ceil(CHUNK)
    }

    /// The tile operand of block `b` of chunk `c`.
    pub(crate) fn tile(&self, c: usize, b: usize) -> &[i8] {
        let n = 2 * CHUNK * ABLOCK;
        &self.bytes[(c * self.blocks + b) * n..][..n]
    }

    /// Scales (or sums) of block `b` of chunk `c`, one per token.
    pub(crate) fn per_token<'a>(&self, v: &'a [f32], c: usize, b: usize) -> &'a [f32] {
        &v[(c * self.blocks + b) * CHUNK..][..CHUNK]
    }
}

/// One chunk's activation bytes, scales, sums and input rows.
type ChunkParts<'a> = (((&'a mut [i8], &'a mut [f32]), &'a mut [f32]), &'a [f32]);

/// Rounds 32 activations of token `t` into rows `2t` (high bytes) and `2t + 1` (low bytes)
/// of `tile`; their scale and exact sum ([`block_sum`]).
///
/// NaN values are left out of the scale and round to 0, as does a block whose largest value
/// is below [`TINY`] (its scale would be subnormal and its inverse infinite).
fn round_block(v: &[f32], tile: &mut [i8], t: usize) -> (f32, f32) {
    let amax = v.iter().fold(0f32, |a, &x| a.max(x.abs()));
    let (scale, inv) = block_scale(amax);
    let (hi, lo) = tile[2 * t * ABLOCK..(2 * t + 2) * ABLOCK].split_at_mut(ABLOCK);
    for ((h, l), &x) in hi.iter_mut().zip(lo.iter_mut()).zip(v) {
        // Round to nearest (even) by adding and removing 1.5 * 2^23.
        let q = (((x * inv).clamp(-QX_MAX, QX_MAX) + ROUNDER) - ROUNDER) as i32;
        let low = ((q + 128) & 0xFF) - 128;
        (*h, *l) = (((q - low) >> 8) as i8, low as i8);
    }
    (scale, block_sum(v))
}

/// The largest value of a block below which it rounds to zeros.
pub(crate) const TINY: f32 = f32::MIN_POSITIVE * QX_MAX;

/// A block's scale and its inverse from its largest absolute value (zeros for a block below
/// [`TINY`]).
pub(crate) fn block_scale(amax: f32) -> (f32, f32) {
    if amax >= TINY {
        let scale = amax / QX_MAX;
        (scale, 1.0 / scale)
    } else {
        (0.0, 0.0)
    }
}

/// The sum of 32 activations as a tree: halves added lane by lane down to one (the order a
/// vector unit adds them in, written out).
pub(crate) fn block_sum(v: &[f32]) -> f32 {
    let mut s: [f32; 16] = std::array::from_fn(|i| v[i] + v[i + 16]);
    for half in [8, 4, 2, 1] {
        for i in 0..half {
            s[i] += s[i + half];
        }
    }
    s[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::pseudo_random;

    /// Activations round to the nearest 16-bit value of their block's scale and split into two
    /// signed bytes that add back to it; the vector code rounds exactly as the portable code.
    #[test]
    fn activations_round_and_split_exactly() {
        let cols = 96;
        let mut x = pseudo_random(11 * cols, 9, 50.0);
        x[5 * cols..5 * cols + 32].fill(0.0);
        x[6 * cols + 3] = 1e30;
        // NaN, an infinity, a block below `TINY` and one just above it.
        x[7 * cols + 4] = f32::NAN;
        x[8 * cols + 40] = f32::NEG_INFINITY;
        x[9 * cols..9 * cols + 32].fill(1e-35);
        x[10 * cols + 64..10 * cols + 96].fill(-4e-34);
        let a = TileActivations::new(&x, 11, cols);
        for (i, row) in x.chunks(cols).enumerate() {
            let (c, t) = (i / CHUNK, i % CHUNK);
            for b in 0..cols / ABLOCK {
                let v = &row[b * ABLOCK..(b + 1) * ABLOCK];
                let mut tile = vec![0i8; 2 * CHUNK * ABLOCK];
                let (scale, sum) = round_block(v, &mut tile, t);
                let got = a.tile(c, b);
                let rows = 2 * t * ABLOCK..(2 * t + 2) * ABLOCK;
                assert_eq!(&got[rows.clone()], &tile[rows], "token {i} block {b}");
                assert_eq!(a.per_token(&a.scales, c, b)[t].to_bits(), scale.to_bits());
                assert_eq!(a.per_token(&a.sums, c, b)[t].to_bits(), sum.to_bits());
                for (k, &xv) in v.iter().enumerate() {
                    let q =
                        256 * got[2 * t * ABLOCK + k] as i32 + got[(2 * t + 1) * ABLOCK + k] as i32;
                    assert!(q.abs() <= QX_MAX as i32);
                    if !xv.is_finite() || !scale.is_finite() {
                        assert_eq!(q, 0, "{xv} in a block of scale {scale}");
                    } else if scale > 0.0 {
                        assert!((q as f32 * scale - xv).abs() <= 0.51 * scale, "{xv} vs {q}");
                    } else {
                        assert_eq!(q, 0);
                    }
                }
            }
        }
    }
}
