//! Portable kernels: the arithmetic every SIMD kernel performs, written plainly. For each
//! 32-value block `i` of a weight row (a block, or a sub-block of a K-quant super-block): the
//! exact integer sum `Σ q_w q_x` against the 16-bit activations, scaled once by
//! `d_w · d_x[i]`, plus `m_w · Σx[i]` for the formats with a minimum; `Q6_K`'s two 16-value
//! halves of a block each have their own scale. Even and odd blocks accumulate apart, as in
//! the SIMD kernels' two dependency chains.

// Index loops over the rows of a group read more clearly than zipped iterators here.
#![allow(clippy::needless_range_loop)]

use super::matmul::{Group, ROW_GROUP};
use super::quant::*;

/// One 32-value block as the kernels use it: integer values and scales.
pub(crate) struct Unpacked {
    pub q: [i32; QK],
    /// The scale of values 0..16 and of 16..32 (equal but for `Q6_K`).
    pub d: [f32; 2],
    /// The block's minimum (0 for the formats without one).
    pub m: f32,
}

/// A weight format seen as a run of 32-value blocks.
pub(crate) trait Blocks32 {
    /// 32-value blocks per stored block (1, or 8 for a K-quant super-block).
    const PER: usize;
    /// Whether the two halves of a block have their own scales (`Q6_K`).
    const SPLIT: bool = false;
    fn unpack(&self, j: usize) -> Unpacked;
}

fn unpacked(q: impl Fn(usize) -> i32, d: f32, m: f32) -> Unpacked {
    Unpacked {
        q: std::array::from_fn(q),
        d: [d, d],
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
    const PER: usize = 1;
    fn unpack(&self, _: usize) -> Unpacked {
        unpacked(|j| nibble(&self.qs, j) - 8, self.d.to_f32(), 0.0)
    }
}

impl Blocks32 for BlockQ4_1 {
    const PER: usize = 1;
    fn unpack(&self, _: usize) -> Unpacked {
        unpacked(|j| nibble(&self.qs, j), self.d.to_f32(), self.m.to_f32())
    }
}

impl Blocks32 for BlockQ5_0 {
    const PER: usize = 1;
    fn unpack(&self, _: usize) -> Unpacked {
        let q = |j| (nibble(&self.qs, j) | fifth_bit(&self.qh, j)) - 16;
        unpacked(q, self.d.to_f32(), 0.0)
    }
}

impl Blocks32 for BlockQ5_1 {
    const PER: usize = 1;
    fn unpack(&self, _: usize) -> Unpacked {
        let q = |j| nibble(&self.qs, j) | fifth_bit(&self.qh, j);
        unpacked(q, self.d.to_f32(), self.m.to_f32())
    }
}

impl Blocks32 for BlockQ8_0 {
    const PER: usize = 1;
    fn unpack(&self, _: usize) -> Unpacked {
        unpacked(|j| self.qs[j] as i32, self.d.to_f32(), 0.0)
    }
}

impl Blocks32 for BlockQ4K {
    const PER: usize = 8;
    fn unpack(&self, j: usize) -> Unpacked {
        let (sc, m) = scale_min_k4(j, &self.scales);
        let bytes = &self.qs[32 * (j / 2)..];
        let q = |l: usize| {
            (if j.is_multiple_of(2) {
                bytes[l] & 0x0F
            } else {
                bytes[l] >> 4
            }) as i32
        };
        unpacked(
            q,
            self.d.to_f32() * sc as f32,
            -(self.dmin.to_f32() * m as f32),
        )
    }
}

impl Blocks32 for BlockQ5K {
    const PER: usize = 8;
    fn unpack(&self, j: usize) -> Unpacked {
        let (sc, m) = scale_min_k4(j, &self.scales);
        let bytes = &self.qs[32 * (j / 2)..];
        let q = |l: usize| {
            let low = if j.is_multiple_of(2) {
                bytes[l] & 0x0F
            } else {
                bytes[l] >> 4
            };
            (low | (((self.qh[l] >> j) & 1) << 4)) as i32
        };
        unpacked(
            q,
            self.d.to_f32() * sc as f32,
            -(self.dmin.to_f32() * m as f32),
        )
    }
}

impl Blocks32 for BlockQ6K {
    const PER: usize = 8;
    const SPLIT: bool = true;
    fn unpack(&self, j: usize) -> Unpacked {
        let d = self.d.to_f32();
        Unpacked {
            q: std::array::from_fn(|l| self.value(32 * j + l)),
            d: [
                d * self.scales[2 * j] as f32,
                d * self.scales[2 * j + 1] as f32,
            ],
            m: 0.0,
        }
    }
}

/// The dot products of weight row `w` with every activation row of `g`.
pub(crate) fn dot<B: Blocks32>(w: &[B], g: &Group, out: &mut [f32; ROW_GROUP]) {
    for k in 0..g.len {
        let (mut acc, mut macc) = ([0f32; 2], [0f32; 2]);
        for (b, wb) in w.iter().enumerate() {
            for j in 0..B::PER {
                let i = b * B::PER + j;
                let u = wb.unpack(j);
                let qx = &g.q[k][i * QK..(i + 1) * QK];
                let half = |h: usize| -> i32 {
                    (16 * h..16 * h + 16).map(|l| u.q[l] * qx[l] as i32).sum()
                };
                let dx = g.d[k][i];
                if !B::SPLIT {
                    acc[i & 1] += (half(0) + half(1)) as f32 * (u.d[0] * dx);
                } else {
                    acc[i & 1] += half(0) as f32 * (u.d[0] * dx);
                    acc[i & 1] += half(1) as f32 * (u.d[1] * dx);
                }
                macc[i & 1] += u.m * g.s[k][i];
            }
        }
        out[k] = (acc[0] + acc[1]) + (macc[0] + macc[1]);
    }
}
