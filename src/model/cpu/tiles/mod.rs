//! Weight matrices repacked for tile products (Intel AMX's `tdpbssd`, see `super::amx`),
//! with the arithmetic those products perform, written plainly ([`product`]).
//!
//! **Layout.** The rows of a matrix are cut into *panels* of [`PANEL`] (the last padded with
//! zero rows) and the columns into *spans* of 32 values (16 for `Q6_K`, whose scales change
//! every 16). A span of a panel is one tile operand: its 16 x span integer weights in the
//! order `tdpbssd` reads its second source (`B[k / 4][4 n + k % 4]` for row `n`, column `k`),
//! stored as nibbles (two tile rows per 64 bytes) with one bit plane per extra bit (`Q5_*`:
//! one, `Q6_K`: two), or as bytes (`Q8_0`). Scales keep their file precision: the 32-value
//! formats' f16 scale (and minimum) per row and span; the K-quants' f16 scale (and minimum)
//! per row and super-block with an 8-bit sub-block scale (and minimum) per row and span. So a
//! matrix takes no more memory than its GGUF blocks (the K-quants' 6-bit sub-block scales
//! take a byte each: 1/36 more for `Q4_K`), and every weight is `scale · q + min` with `q`
//! the block's own integer and `scale`, `min` the f32 values ggml's dequantisation computes
//! (`d · sc` is exact: an f16 times a 6- or 8-bit integer), so a row dequantizes to the same
//! floats as its blocks.
//!
//! **Arithmetic.** Activations are rounded to 16 bits per 32 values and split into two signed
//! bytes ([`activations`]). Per span the exact `i32` sum `I = Σ q_w q_x` is scaled once:
//! `acc ← fma(f32(I) · d_x, d_w, acc)`, span after span; the minimums add
//! `macc ← fma(m_w, Σx, macc)` and the result is `acc + macc`. Every output element goes
//! through these operations in this order however many tokens share the product and
//! whichever kernel runs it, so a sequence's results are bit-identical alone or batched, on
//! the tile units or in the portable code.

// Index loops over tile rows and columns read more clearly than zipped iterators here.
#![allow(clippy::needless_range_loop)]

pub mod activations;
pub mod product;

pub use activations::TileActivations;
pub(crate) use product::matmul;

use super::portable::Blocks32;
use super::quant::*;
use half::f16;
use rayon::prelude::*;

/// Weight rows per panel (the columns of a tile product's result).
pub const PANEL: usize = 16;
/// Tokens per tile product: each takes two rows (its high and low bytes) of the 16 a tile has.
pub const CHUNK: usize = 8;
/// Activation values sharing one 16-bit scale.
pub const ABLOCK: usize = 32;

/// How a span's integers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Two tile rows per 64 bytes, the first in the low nibbles, the second in the high ones;
    /// then `planes` bit planes (the codes' bits 4, 5, ...), one 64-bit word per tile row
    /// each.
    Nibbles { planes: usize },
    /// The tile rows as they are.
    Bytes,
}

/// How a span's scales (and minimums) are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleCodec {
    /// An f16 per row and span (the 32-value formats' own).
    Half,
    /// An f16 per row and super-block of 256 times an unsigned byte per row and span, and the
    /// same for minimums, negated (`Q4_K`, `Q5_K`).
    SubBlock,
    /// An f16 per row and super-block times a signed byte per row and span (`Q6_K`).
    SignedSubBlock,
}

/// The packing of one block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Columns per span: 32, or 16 for `Q6_K`.
    pub span: usize,
    pub codec: Codec,
    /// Subtracted from the stored (unsigned) code to give the weight's integer.
    pub offset: i8,
    /// Whether the rows have minimums.
    pub mins: bool,
    pub scales: ScaleCodec,
}

impl Layout {
    pub fn of(format: BlockFormat) -> Option<Self> {
        use ScaleCodec::*;
        let nib = |planes| Codec::Nibbles { planes };
        let l = |span, codec, offset, mins, scales| Self {
            span,
            codec,
            offset,
            mins,
            scales,
        };
        Some(match format {
            BlockFormat::F32 => return None,
            BlockFormat::Q4_0 => l(32, nib(0), 8, false, Half),
            BlockFormat::Q4_1 => l(32, nib(0), 0, true, Half),
            BlockFormat::Q5_0 => l(32, nib(1), 16, false, Half),
            BlockFormat::Q5_1 => l(32, nib(1), 0, true, Half),
            BlockFormat::Q8_0 => l(32, Codec::Bytes, 0, false, Half),
            BlockFormat::Q4K => l(32, nib(0), 0, true, SubBlock),
            BlockFormat::Q5K => l(32, nib(1), 0, true, SubBlock),
            BlockFormat::Q6K => l(16, nib(2), 32, false, SignedSubBlock),
        })
    }

    /// Rows of the tile operand: four columns per 64-byte row.
    pub fn tile_rows(&self) -> usize {
        self.span / 4
    }

    /// Stored bytes of one span of one panel.
    pub fn tile_bytes(&self) -> usize {
        match self.codec {
            Codec::Nibbles { planes } => self.span * 8 + planes * self.tile_rows() * 8,
            Codec::Bytes => self.span * 16,
        }
    }

    /// Spans per super-block (its f16 scales are shared by these; 1 without super-blocks).
    pub fn spans_per_super(&self) -> usize {
        match self.scales {
            ScaleCodec::Half => 1,
            _ => QK_K / self.span,
        }
    }
}

/// A weight matrix (or one part of a stacked one) in tile layout.
#[derive(Debug, Clone)]
pub struct TiledWeights {
    /// The block format the values came from.
    pub format: BlockFormat,
    pub layout: Layout,
    pub rows: usize,
    pub cols: usize,
    /// `[panel][span][tile_bytes]`.
    pub(crate) values: Vec<u8>,
    /// `[panel][span or super-block][PANEL]`: scales, then minimums (empty without).
    pub(crate) half: [Vec<f16>; 2],
    /// `[panel][span][PANEL]`: the K-quants' sub-block scales, then minimums (else empty).
    pub(crate) sub: [Vec<u8>; 2],
}

/// One row's span as the file stores it: integers, and the f16 scale and minimum with the
/// sub-block's integer ones (1 and 0 for the 32-value formats).
struct Span {
    q: [i32; 32],
    half: [f16; 2],
    sub: [u8; 2],
}

impl TiledWeights {
    /// Repacks `rows` rows of `cols` in a block format; `None` for f32 (or already tiled)
    /// data.
    pub fn pack(data: &WeightData, rows: usize, cols: usize) -> Option<Self> {
        if matches!(data, WeightData::Tiled(_)) {
            return None;
        }
        let mut t = Self::zeroed(data.format(), rows, cols)?;
        t.fill(0, data, rows);
        Some(t)
    }

    /// Reads `rows` rows of `cols` stored as `format` blocks from `r` straight into the tile
    /// layout, a few panels at a time, so loading holds no second copy of the matrix.
    pub fn read(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        r: &mut impl std::io::Read,
    ) -> candle_core::Result<Self> {
        const PANELS_PER_READ: usize = 64;
        let Some(mut t) = Self::zeroed(format, rows, cols) else {
            candle_core::bail!("{} cannot be tiled", format.name())
        };
        let per_row = cols / format.block_elems();
        for first in (0..t.panels()).step_by(PANELS_PER_READ) {
            let n = ((first + PANELS_PER_READ) * PANEL).min(rows) - first * PANEL;
            let data = WeightData::read(format, n * per_row, r)?;
            t.fill(first, &data, n);
        }
        Ok(t)
    }

    /// A matrix of zeros in `format`'s tile layout; `None` for f32 or when `cols` is not a
    /// whole number of the format's blocks.
    fn zeroed(format: BlockFormat, rows: usize, cols: usize) -> Option<Self> {
        let l = Layout::of(format)?;
        if !cols.is_multiple_of(format.block_elems()) {
            return None;
        }
        let (panels, spans) = (rows.div_ceil(PANEL), cols / l.span);
        let halves = panels * spans / l.spans_per_super() * PANEL;
        let subs = (l.scales != ScaleCodec::Half) as usize * panels * spans * PANEL;
        let mins = l.mins as usize;
        Some(TiledWeights {
            format,
            layout: l,
            rows,
            cols,
            values: vec![0; panels * spans * l.tile_bytes()],
            half: [vec![f16::ZERO; halves], vec![f16::ZERO; mins * halves]],
            sub: [vec![0; subs], vec![0; mins * subs]],
        })
    }

    /// Packs `n` rows of block data (`data`), the rows of panels `first..`, in place; the
    /// panels in parallel.
    fn fill(&mut self, first: usize, data: &WeightData, n: usize) {
        let (l, spans, cols) = (self.layout, self.spans(), self.cols);
        let count = n.div_ceil(PANEL);
        let per_super = l.spans_per_super();
        // Each array cut into its panels' runs (none for an empty array).
        fn runs<T>(v: &mut [T], first: usize, count: usize, panels: usize) -> Vec<&mut [T]> {
            let len = v.len() / panels.max(1);
            if len == 0 {
                return (0..count).map(|_| &mut [][..]).collect();
            }
            v[first * len..(first + count) * len]
                .chunks_mut(len)
                .collect()
        }
        let panels = self.panels();
        let values = runs(&mut self.values, first, count, panels);
        let [h0, h1] = &mut self.half;
        let [s0, s1] = &mut self.sub;
        let (h0, h1) = (
            runs(h0, first, count, panels),
            runs(h1, first, count, panels),
        );
        let (s0, s1) = (
            runs(s0, first, count, panels),
            runs(s1, first, count, panels),
        );
        let tb = l.tile_bytes();
        values
            .into_par_iter()
            .zip(h0)
            .zip(h1)
            .zip(s0)
            .zip(s1)
            .enumerate()
            .for_each(|(i, ((((values, h0), h1), s0), s1))| {
                let half = [h0, h1];
                let sub = [s0, s1];
                let mut codes = vec![0u8; 64 * l.tile_rows()];
                for s in 0..spans {
                    codes.fill(l.offset as u8);
                    for row in i * PANEL..n.min((i + 1) * PANEL) {
                        let n = row % PANEL;
                        let span = row_span(data, cols, row, s, l.span);
                        for k in 0..l.span {
                            codes[64 * (k / 4) + 4 * n + k % 4] =
                                (span.q[k] + l.offset as i32) as u8;
                        }
                        for j in 0..2 {
                            if let Some(h) = half[j].get_mut((s / per_super) * PANEL + n) {
                                *h = span.half[j];
                            }
                            if let Some(v) = sub[j].get_mut(s * PANEL + n) {
                                *v = span.sub[j];
                            }
                        }
                    }
                    encode(&l, &codes, &mut values[s * tb..(s + 1) * tb]);
                }
            });
    }

    pub fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    pub fn spans(&self) -> usize {
        self.cols / self.layout.span
    }

    pub fn size_in_bytes(&self) -> usize {
        let halves: usize = self.half.iter().map(|h| 2 * h.len()).sum();
        self.values.len() + halves + self.sub.iter().map(Vec::len).sum::<usize>()
    }

    /// The stored bytes of span `s` of panel `p`.
    pub(crate) fn tile(&self, p: usize, s: usize) -> &[u8] {
        let n = self.layout.tile_bytes();
        &self.values[(p * self.spans() + s) * n..][..n]
    }

    /// The integer of row `n`, column `k` of span `s` of panel `p`.
    pub(crate) fn value(&self, p: usize, s: usize, n: usize, k: usize) -> i32 {
        let (l, tile) = (self.layout, self.tile(p, s));
        let (row, byte) = (k / 4, 4 * n + k % 4);
        let code = match l.codec {
            Codec::Bytes => return tile[64 * row + byte] as i8 as i32,
            Codec::Nibbles { planes } => {
                let mut code = (tile[64 * (row / 2) + byte] >> (4 * (row % 2))) & 0x0F;
                for plane in 0..planes {
                    let word = l.span * 8 + 8 * (plane * l.tile_rows() + row);
                    code |= ((tile[word + byte / 8] >> (byte % 8)) & 1) << (4 + plane);
                }
                code as i32
            }
        };
        code - l.offset as i32
    }

    /// The tile operand of span `s` of panel `p` as signed bytes (`span / 4` rows of 64).
    pub(crate) fn unpack_tile(&self, p: usize, s: usize, out: &mut [i8]) {
        for n in 0..PANEL {
            for k in 0..self.layout.span {
                out[64 * (k / 4) + 4 * n + k % 4] = self.value(p, s, n, k) as i8;
            }
        }
    }

    /// Panel `p`'s f32 scales `[span][PANEL]`, then its minimums (empty without), as ggml's
    /// dequantisation computes them: `d`, or `d · sc`, and `m`, or `-(dmin · m)`.
    pub(crate) fn panel_scales(&self, p: usize) -> (Vec<f32>, Vec<f32>) {
        let (l, spans) = (self.layout, self.spans());
        let per_super = l.spans_per_super();
        let mut scales = vec![0f32; spans * PANEL];
        let mut mins = vec![0f32; if l.mins { spans * PANEL } else { 0 }];
        for s in 0..spans {
            for n in 0..PANEL {
                let h = (p * spans / per_super + s / per_super) * PANEL + n;
                let i = (p * spans + s) * PANEL + n;
                let (d, sub) = (self.half[0][h].to_f32(), self.sub[0].get(i).copied());
                scales[s * PANEL + n] = match (l.scales, sub) {
                    (ScaleCodec::SubBlock, Some(sc)) => d * sc as f32,
                    (ScaleCodec::SignedSubBlock, Some(sc)) => d * sc as i8 as f32,
                    _ => d,
                };
                if l.mins {
                    let m = self.half[1][h].to_f32();
                    mins[s * PANEL + n] = match self.sub[1].get(i) {
                        Some(&sub) => -(m * sub as f32),
                        None => m,
                    };
                }
            }
        }
        (scales, mins)
    }

    /// Writes row `r` as floats into `out` (`cols` long): `scale · q (+ min)` as the block's
    /// own dequantisation computes it.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (p, n, span) = (r / PANEL, r % PANEL, self.layout.span);
        let (scales, mins) = self.panel_scales(p);
        for s in 0..self.spans() {
            let scale = scales[s * PANEL + n];
            for k in 0..span {
                let v = scale * self.value(p, s, n, k) as f32;
                out[s * span + k] = if self.layout.mins {
                    v + mins[s * PANEL + n]
                } else {
                    v
                };
            }
        }
    }
}

/// Stores a span's tile of unsigned codes (`span / 4` rows of 64 bytes: integer plus the
/// layout's offset) in the layout's codec.
fn encode(l: &Layout, codes: &[u8], tile: &mut [u8]) {
    match l.codec {
        // Signed bytes: the offset is 0, so the codes are the integers' bits.
        Codec::Bytes => tile.copy_from_slice(codes),
        Codec::Nibbles { planes } => {
            let rows = l.tile_rows();
            for pair in 0..rows / 2 {
                let (r0, r1) = (&codes[128 * pair..][..64], &codes[128 * pair + 64..][..64]);
                for (j, t) in tile[64 * pair..64 * (pair + 1)].iter_mut().enumerate() {
                    *t = (r0[j] & 0x0F) | (r1[j] << 4);
                }
            }
            for plane in 0..planes {
                for row in 0..rows {
                    let bits = codes[64 * row..64 * (row + 1)]
                        .iter()
                        .enumerate()
                        .fold(0u64, |w, (j, &c)| {
                            w | ((((c >> (4 + plane)) & 1) as u64) << j)
                        });
                    let at = l.span * 8 + 8 * (plane * rows + row);
                    tile[at..at + 8].copy_from_slice(&bits.to_le_bytes());
                }
            }
        }
    }
}

/// Span `s` (of `span` columns) of row `r` of `data`, a matrix of `cols` columns.
fn row_span(data: &WeightData, cols: usize, r: usize, s: usize, span: usize) -> Span {
    let from32 = |b: &dyn Blocks32| {
        let u = b.unpack();
        // The scales came from f16: converting back is exact.
        Span {
            q: u.q,
            half: [f16::from_f32(u.d), f16::from_f32(u.m)],
            sub: [1, 0],
        }
    };
    let (e, per32, per256) = (s * span, cols / QK, cols / QK_K);
    let (blk32, blk256, j) = (r * per32 + e / QK, r * per256 + e / QK_K, (e % QK_K) / QK);
    match data {
        WeightData::Q4_0(b) => from32(&b[blk32]),
        WeightData::Q4_1(b) => from32(&b[blk32]),
        WeightData::Q5_0(b) => from32(&b[blk32]),
        WeightData::Q5_1(b) => from32(&b[blk32]),
        WeightData::Q8_0(b) => from32(&b[blk32]),
        WeightData::Q4K(b) => {
            let b = &b[blk256];
            k4_span(b.d, b.dmin, &b.scales, j, |l| b.value(j, l))
        }
        WeightData::Q5K(b) => {
            let b = &b[blk256];
            k4_span(b.d, b.dmin, &b.scales, j, |l| b.value(j, l))
        }
        WeightData::Q6K(b) => {
            let (b, start) = (&b[blk256], e % QK_K);
            Span {
                q: std::array::from_fn(|k| if k < 16 { b.value(start + k) } else { 0 }),
                half: [b.d, f16::ZERO],
                sub: [b.scales[start / 16] as u8, 0],
            }
        }
        WeightData::F32(_) | WeightData::Tiled(_) => unreachable!("not a block format"),
    }
}

/// Sub-block `j` of a `Q4_K`/`Q5_K` super-block whose value `l` is `q(l)`.
fn k4_span(d: f16, dmin: f16, scales: &[u8; 12], j: usize, q: impl Fn(usize) -> u8) -> Span {
    let (sc, m) = scale_min_k4(j, scales);
    Span {
        q: std::array::from_fn(|l| q(l) as i32),
        half: [d, dmin],
        sub: [sc, m],
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::cpu::quant::tests::BLOCK_FORMATS;
    use candle_core::quantized::GgmlDType;

    /// Random weights with blocks far larger or smaller than the rest, and rows shifted so
    /// that the K-quants need their minimums, in `dtype` as the file stores it.
    pub(crate) fn native(rows: usize, cols: usize, dtype: GgmlDType) -> WeightMatrix {
        crate::model::cpu::matmul::tests::weights(rows, cols, dtype)
    }

    /// Rows that fill two panels and part of a third; an odd number of 32-value blocks.
    pub(crate) fn shape(dtype: GgmlDType) -> (usize, usize) {
        (37, if dtype.block_size() == 32 { 544 } else { 512 })
    }

    /// Repacking keeps every weight: a tiled row dequantizes to the same floats as its
    /// blocks, in every format, and takes no more memory (beyond the K-quants' sub-block
    /// scales, a byte each instead of six bits).
    #[test]
    fn tiled_rows_dequantize_to_their_blocks() {
        for dtype in BLOCK_FORMATS {
            let (rows, cols) = (48, shape(dtype).1);
            let w = native(rows, cols, dtype);
            let t = w.clone().tiled();
            assert!(matches!(t.parts[0].data, WeightData::Tiled(_)), "{dtype:?}");
            assert_eq!(t.formats()[0].0, w.formats()[0].0);
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            for r in 0..rows {
                w.dequantize_row(r, &mut a);
                t.dequantize_row(r, &mut b);
                assert_eq!(a, b, "{dtype:?} row {r}");
            }
            let allowance = match dtype {
                // Two bytes per 32 values instead of 12 per 256.
                GgmlDType::Q4K | GgmlDType::Q5K => rows * cols / 64,
                _ => 0,
            };
            assert!(
                t.size_in_bytes() <= w.size_in_bytes() + allowance,
                "{dtype:?}: {} bytes tiled, {} as blocks",
                t.size_in_bytes(),
                w.size_in_bytes()
            );
        }
        // A partial panel: its padding rows are not part of the matrix.
        let w = native(37, 64, GgmlDType::Q4_1);
        let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
        w.dequantize_row(36, &mut a);
        w.clone().tiled().dequantize_row(36, &mut b);
        assert_eq!(a, b);
    }
}
