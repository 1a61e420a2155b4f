//! Portable kernels: the arithmetic every SIMD kernel performs, written plainly.
//!
//! A weight row is a run of *spans*, each summed exactly in integers against the 16-bit
//! activations and then scaled once in f32:
//! - the 32-value formats (`Q4_0` … `Q8_0`): a span is a block; its sum `Σ q_w q_x` is scaled
//!   by `d_w · d_x`, plus `m_w · Σx` for the formats with a minimum (`Σx` the exact f32 sum of
//!   the block's activations). Even and odd blocks accumulate apart, as in the SIMD kernels'
//!   two dependency chains.
//! - the K-quants: the integer sub-block scales are folded into the weights
//!   (`q_w · sc_j`), so a whole `Q4_K`/`Q5_K` super-block of 256 values (a 128-value half of
//!   `Q6_K`, whose larger scales would overflow `i32` over 256) is one integer sum, scaled by
//!   `d · d_x` with one activation scale per 256 values; the sub-block minimums add
//!   `-dmin · m_j · Σx_j`. Bounds: `|q_w sc_j| ≤ 31·63` (`Q5_K`) over 32 products per `i32`
//!   lane gives at most 2.05·10⁹, and `32·128` (`Q6_K`) over 16 products 2.147418·10⁹, both
//!   below 2³¹.

// Index loops over the rows of a group read more clearly than zipped iterators here.
#![allow(clippy::needless_range_loop)]

use super::matmul::{Group, ROW_GROUP};
use super::quant::*;

/// One 32-value block as the kernels use it: integer values and scales.
pub(crate) struct Unpacked {
    pub q: [i32; QK],
    /// The block's scale.
    pub d: f32,
    /// The block's minimum (0 for the formats without one).
    pub m: f32,
}

/// A 32-value block format.
pub(crate) trait Blocks32 {
    fn unpack(&self) -> Unpacked;
}

/// A K-quant super-block of 256 values.
pub(crate) trait SuperBlock {
    /// Values summed in integers before one float scaling (256, or 128 for `Q6_K`).
    const SPAN: usize;
    /// The integer weight of element `e` with its sub-block scale folded in.
    fn weight(&self, e: usize) -> i32;
    /// The scale of the integer sums.
    fn scale(&self) -> f32;
    /// The minimum of 32-value sub-block `j` (already negated; 0 for `Q6_K`).
    fn min(&self, j: usize) -> f32;
}

fn unpacked(q: impl Fn(usize) -> i32, d: f32, m: f32) -> Unpacked {
    Unpacked {
        q: std::array::from_fn(q),
        d,
        m,
    }
}

fn nibble(qs: &[u8; 16], j: usize) -> i32 {
    (if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    }) as i32
}

fn fifth_bit(qh: &[u8; 4], j: usize) -> i32 {
    (((u32::from_le_bytes(*qh) >> j) & 1) << 4) as i32
}

impl Blocks32 for BlockQ4_0 {
    fn unpack(&self) -> Unpacked {
        unpacked(|j| nibble(&self.qs, j) - 8, self.d.to_f32(), 0.0)
    }
}

impl Blocks32 for BlockQ4_1 {
    fn unpack(&self) -> Unpacked {
        unpacked(|j| nibble(&self.qs, j), self.d.to_f32(), self.m.to_f32())
    }
}

impl Blocks32 for BlockQ5_0 {
    fn unpack(&self) -> Unpacked {
        let q = |j| (nibble(&self.qs, j) | fifth_bit(&self.qh, j)) - 16;
        unpacked(q, self.d.to_f32(), 0.0)
    }
}

impl Blocks32 for BlockQ5_1 {
    fn unpack(&self) -> Unpacked {
        let q = |j| nibble(&self.qs, j) | fifth_bit(&self.qh, j);
        unpacked(q, self.d.to_f32(), self.m.to_f32())
    }
}

impl Blocks32 for BlockQ8_0 {
    fn unpack(&self) -> Unpacked {
        unpacked(|j| self.qs[j] as i32, self.d.to_f32(), 0.0)
    }
}

impl SuperBlock for BlockQ4K {
    const SPAN: usize = QK_K;
    fn weight(&self, e: usize) -> i32 {
        let (j, l) = (e / QK, e % QK);
        self.value(j, l) as i32 * scale_min_k4(j, &self.scales).0 as i32
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    fn min(&self, j: usize) -> f32 {
        -(self.dmin.to_f32() * scale_min_k4(j, &self.scales).1 as f32)
    }
}

impl SuperBlock for BlockQ5K {
    const SPAN: usize = QK_K;
    fn weight(&self, e: usize) -> i32 {
        let (j, l) = (e / QK, e % QK);
        self.value(j, l) as i32 * scale_min_k4(j, &self.scales).0 as i32
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    fn min(&self, j: usize) -> f32 {
        -(self.dmin.to_f32() * scale_min_k4(j, &self.scales).1 as f32)
    }
}

impl SuperBlock for BlockQ6K {
    const SPAN: usize = QK_K / 2;
    fn weight(&self, e: usize) -> i32 {
        self.value(e) * self.scales[e / 16] as i32
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    fn min(&self, _: usize) -> f32 {
        0.0
    }
}

/// The dot products of a 32-value-block weight row with every activation row of `g`.
pub(crate) fn dot<B: Blocks32>(w: &[B], g: &Group, out: &mut [f32; ROW_GROUP]) {
    for k in 0..g.len {
        let (mut acc, mut macc) = ([0f32; 2], [0f32; 2]);
        for (i, wb) in w.iter().enumerate() {
            let u = wb.unpack();
            let qx = &g.q[k][i * QK..(i + 1) * QK];
            let isum: i32 = (0..QK).map(|l| u.q[l] * qx[l] as i32).sum();
            acc[i & 1] += (isum as f32 * g.d[k][i]) * u.d;
            macc[i & 1] += u.m * g.s[k][i];
        }
        out[k] = (acc[0] + acc[1]) + (macc[0] + macc[1]);
    }
}

/// The same for a K-quant weight row (`g` rounded with one scale per 256 values).
pub(crate) fn dot_k<B: SuperBlock>(w: &[B], g: &Group, out: &mut [f32; ROW_GROUP]) {
    for k in 0..g.len {
        let (mut acc, mut macc) = (0f32, 0f32);
        for (b, wb) in w.iter().enumerate() {
            let qx = &g.q[k][b * QK_K..(b + 1) * QK_K];
            for span in (0..QK_K).step_by(B::SPAN) {
                // The SIMD kernels keep eight `i32` lanes (each within the bounds above); the
                // whole span's sum needs more.
                let isum: i64 = (span..span + B::SPAN)
                    .map(|e| (wb.weight(e) * qx[e] as i32) as i64)
                    .sum();
                acc += (isum as f32 * g.d[k][b]) * wb.scale();
            }
            for j in 0..QK_K / QK {
                macc += wb.min(j) * g.s[k][b * (QK_K / QK) + j];
            }
        }
        out[k] = acc + macc;
    }
}
