//! ggml's block formats, exactly as GGUF files store them (`ggml-common.h`), each with its
//! reference dequantisation: the plain definition the kernels are tested against.
//!
//! Blocks of 32 values: `Q4_0` (`d·(q−8)`), `Q4_1` (`d·q + m`), `Q5_0` (`d·(q−16)`, 5-bit),
//! `Q5_1` (`d·q + m`, 5-bit), `Q8_0` (`d·q`). Super-blocks of 256 values (the K-quants,
//! Kawrakow 2023): `Q4_K` and `Q5_K` (eight sub-blocks of 32, each with a 6-bit scale and
//! minimum: `d·sc·q − dmin·m`), `Q6_K` (sixteen sub-blocks of 16 with 8-bit scales:
//! `d·sc·(q−32)`).

use half::f16;

/// Values per block of the 32-value formats (and per activation block of the kernels).
pub const QK: usize = 32;
/// Values per super-block of the K-quants.
pub const QK_K: usize = 256;

/// ggml's `block_q4_0`: element `j < 16` is the low nibble of `qs[j]`, `j + 16` its high one.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// ggml's `block_q4_1`: `x = d·q + m`, nibbles as in `Q4_0`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// ggml's `block_q5_0`: nibbles as in `Q4_0`, bit `j` of `qh` (little-endian) the fifth bit
/// of element `j`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// ggml's `block_q5_1`: `Q5_0`'s bits with `x = d·q + m`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// ggml's `block_q8_0`: `x = d·q`, `q` in −127..=127.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// ggml's `block_q4_K`: 64 values per 32 bytes of `qs`, the low nibbles sub-block `2c`, the
/// high ones sub-block `2c + 1`; scales and minimums packed in 12 bytes
/// ([`scale_min_k4`]).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// ggml's `block_q5_K`: `Q4_K` plus a fifth bit: bit `2c` of `qh[l]` for value `l` of
/// sub-block `2c`, bit `2c + 1` for sub-block `2c + 1`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// ggml's `block_q6_K`: two halves of 128 values; in each, value `l` (0..32) is the low
/// nibble of `ql[l]` with bits 0-1 of `qh[l]`, `l + 32` the low nibble of `ql[l + 32]` with
/// bits 2-3, `l + 64` the high nibble of `ql[l]` with bits 4-5, `l + 96` the high nibble of
/// `ql[l + 32]` with bits 6-7; one signed scale per 16 values.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

const _: () = {
    assert!(std::mem::size_of::<BlockQ4_0>() == 18);
    assert!(std::mem::size_of::<BlockQ4_1>() == 20);
    assert!(std::mem::size_of::<BlockQ5_0>() == 22);
    assert!(std::mem::size_of::<BlockQ5_1>() == 24);
    assert!(std::mem::size_of::<BlockQ8_0>() == 34);
    assert!(std::mem::size_of::<BlockQ4K>() == 144);
    assert!(std::mem::size_of::<BlockQ5K>() == 176);
    assert!(std::mem::size_of::<BlockQ6K>() == 210);
};

/// The scale and minimum of sub-block `j` (0..8) of a `Q4_K`/`Q5_K` super-block: six bits
/// each, the first four in the low bits of bytes 0-7, the last four split between the
/// nibbles of bytes 8-11 and the top bits of bytes 0-7 (ggml's `get_scale_min_k4`).
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The eight scales and eight minimums of a `Q4_K`/`Q5_K` super-block.
pub fn scales_mins_k4(q: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        (sc[j], m[j]) = scale_min_k4(j, q);
    }
    (sc, m)
}

/// The quantized value of element `j` of a 32-value block with nibbles `qs` and fifth bits
/// `qh` (zero for the 4-bit formats).
fn nibble5(qs: &[u8; 16], qh: u32, j: usize) -> i32 {
    let low = if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    };
    (low as i32) | ((((qh >> j) & 1) as i32) << 4)
}

/// Writes the 32 (or 256) values of one block into `out`.
pub trait Dequantize {
    /// Values per block.
    const ELEMS: usize;
    fn dequantize(&self, out: &mut [f32]);
}

impl Dequantize for BlockQ4_0 {
    const ELEMS: usize = QK;
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (j, o) in out.iter_mut().enumerate().take(QK) {
            *o = d * (nibble5(&self.qs, 0, j) - 8) as f32;
        }
    }
}

impl Dequantize for BlockQ4_1 {
    const ELEMS: usize = QK;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        for (j, o) in out.iter_mut().enumerate().take(QK) {
            *o = d * nibble5(&self.qs, 0, j) as f32 + m;
        }
    }
}

impl Dequantize for BlockQ5_0 {
    const ELEMS: usize = QK;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, qh) = (self.d.to_f32(), u32::from_le_bytes(self.qh));
        for (j, o) in out.iter_mut().enumerate().take(QK) {
            *o = d * (nibble5(&self.qs, qh, j) - 16) as f32;
        }
    }
}

impl Dequantize for BlockQ5_1 {
    const ELEMS: usize = QK;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, m, qh) = (
            self.d.to_f32(),
            self.m.to_f32(),
            u32::from_le_bytes(self.qh),
        );
        for (j, o) in out.iter_mut().enumerate().take(QK) {
            *o = d * nibble5(&self.qs, qh, j) as f32 + m;
        }
    }
}

impl Dequantize for BlockQ8_0 {
    const ELEMS: usize = QK;
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = d * q as f32;
        }
    }
}

impl Dequantize for BlockQ4K {
    const ELEMS: usize = QK_K;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &self.scales);
            let (scale, min) = (d * sc as f32, dmin * m as f32);
            for l in 0..32 {
                out[32 * j + l] = scale * self.value(j, l) as f32 - min;
            }
        }
    }
}

impl BlockQ4K {
    /// The 4-bit value of element `l` of sub-block `j` (eight sub-blocks of 32 values).
    pub fn value(&self, j: usize, l: usize) -> u8 {
        (self.qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0F
    }
}

impl BlockQ5K {
    /// The 5-bit value of element `l` of sub-block `j` (eight sub-blocks of 32 values).
    pub fn value(&self, j: usize, l: usize) -> u8 {
        let low = (self.qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0F;
        low | (((self.qh[l] >> j) & 1) << 4)
    }
}

impl Dequantize for BlockQ5K {
    const ELEMS: usize = QK_K;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (self.d.to_f32(), self.dmin.to_f32());
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, &self.scales);
            let (scale, min) = (d * sc as f32, dmin * m as f32);
            for l in 0..32 {
                out[32 * j + l] = scale * self.value(j, l) as f32 - min;
            }
        }
    }
}

impl BlockQ6K {
    /// The signed 6-bit value of element `e` (0..256).
    pub fn value(&self, e: usize) -> i32 {
        let (half, i) = (e / 128, e % 128);
        let (quarter, l) = (i / 32, i % 32);
        let ql = &self.ql[64 * half..64 * half + 64];
        let qh = self.qh[32 * half + l];
        let low = match quarter {
            0 => ql[l] & 0x0F,
            1 => ql[l + 32] & 0x0F,
            2 => ql[l] >> 4,
            _ => ql[l + 32] >> 4,
        };
        let high = (qh >> (2 * quarter)) & 3;
        (low | (high << 4)) as i32 - 32
    }
}

impl Dequantize for BlockQ6K {
    const ELEMS: usize = QK_K;
    fn dequantize(&self, out: &mut [f32]) {
        let d = self.d.to_f32();
        for (e, o) in out.iter_mut().enumerate().take(QK_K) {
            *o = d * self.scales[e / 16] as f32 * self.value(e) as f32;
        }
    }
}
