//! Tile products on Intel AMX (Advanced Matrix Extensions: `tdpbssd`, a 16 x 64-byte by
//! 16 x 64-byte signed-byte product into 16 x 16 `i32` per instruction) over weights in the
//! layout of [`super::tiles`], with the arithmetic defined there.
//!
//! One product per span and chunk of up to eight tokens: the chunk's activation bytes (two
//! rows a token) times the span's unpacked weights (16 rows) give every token's exact integer
//! sum against 16 weight rows at once. The sums are stored from the tile and scaled in
//! AVX-512 registers, one accumulator of 16 weight rows per token, while the tile unit works
//! on the next span (two sets of tile registers alternate). A panel's weights are unpacked
//! once into signed bytes and then serve every chunk of tokens, so a batch reads each weight
//! from memory once per product.
//!
//! The tile registers are configured per product (`ldtilecfg`) and released when it ends
//! (`tilerelease`), so a thread that is switched out between products has no tile state to
//! save. Linux hands the tile state to a process only when asked (`arch_prctl`), which
//! [`available`] does once.

use super::tiles::activations::{block_scale, QX_MAX};
use super::tiles::{Codec, ScaleCodec, TileActivations, TiledWeights, ABLOCK, CHUNK, PANEL};
use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;

/// Whether this CPU has AMX-INT8 and AVX-512BW, and the kernel lets this process use the tile
/// registers (asked for once, here).
pub fn available() -> bool {
    // CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU.
    let leaf = unsafe { __cpuid_count(7, 0) };
    let amx = leaf.edx & (3 << 24) == 3 << 24;
    amx && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && request_tile_data()
}

#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The operand of `ldtilecfg` (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Tiles 0, 1, 6 and 7 hold sums (`rows` x 16 `i32`), 2 and 3 activations (`rows` x `span`
/// bytes), 4 and 5 weights (`span / 4` x 64 bytes); the kernels alternate between the pairs
/// from one span to the next.
#[target_feature(enable = "avx512f")]
unsafe fn configure(rows: usize, span: usize) {
    let mut c = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..2 {
        (c.rows[t], c.colsb[t]) = (rows as u8, 64);
        (c.rows[6 + t], c.colsb[6 + t]) = (rows as u8, 64);
        (c.rows[2 + t], c.colsb[2 + t]) = (rows as u8, span as u16);
        (c.rows[4 + t], c.colsb[4 + t]) = ((span / 4) as u8, 64);
    }
    asm!("ldtilecfg [{}]", in(reg) &c, options(nostack, readonly));
}

/// Where a product writes: `[m, stride]` floats, this part's rows from column `col0`.
pub struct Out {
    pub ptr: *mut f32,
    pub stride: usize,
    pub col0: usize,
}

/// 64-byte aligned storage for tile loads and stores.
#[repr(C, align(64))]
struct Sums([[i32; PANEL * 2 * CHUNK]; 4]);

/// Panels `panels` of `w` against every token of `a`, written to `out`.
///
/// # Safety
/// [`available`] returned true; `out` has room for `a.m` rows of `col0 + w.rows` columns, and
/// no other thread writes the columns of these panels.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn panels(w: &TiledWeights, panels: Range<usize>, a: &TileActivations, out: &Out) {
    debug_assert_eq!(a.blocks * ABLOCK, w.cols);
    // Tokens per chunk, rounded up to a kernel size; padded tokens are zeros.
    let tokens = match a.m.min(CHUNK) {
        1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    };
    configure(2 * tokens, w.layout.span);
    match tokens {
        1 => run::<1>(w, panels, a, out),
        2 => run::<2>(w, panels, a, out),
        4 => run::<4>(w, panels, a, out),
        _ => run::<8>(w, panels, a, out),
    }
    asm!("tilerelease", options(nostack, nomem));
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn run<const T: usize>(
    w: &TiledWeights,
    panels: Range<usize>,
    a: &TileActivations,
    out: &Out,
) {
    let (spans, tb) = (w.spans(), 64 * w.layout.tile_rows());
    let mut stage = match w.layout.codec {
        Codec::Bytes => Vec::new(),
        Codec::Nibbles { .. } => vec![Aligned([0; 64]); spans * tb / 64],
    };
    let mut scales = vec![Aligned([0; 64]); 2 * spans];
    let mut sums = Sums([[0; PANEL * 2 * CHUNK]; 4]);
    for p in panels {
        let weights = match w.layout.codec {
            Codec::Bytes => w.values.as_ptr().add(p * spans * tb),
            Codec::Nibbles { .. } => {
                unpack_panel(w, p, stage.as_mut_ptr() as *mut i8);
                stage.as_ptr() as *const u8
            }
        };
        let scales = scales.as_mut_ptr() as *mut f32;
        stage_scales(w, p, scales);
        let valid = (w.rows - p * PANEL).min(PANEL);
        let mask: __mmask16 = ((1u32 << valid) - 1) as u16;
        for c in 0..a.chunks() {
            // The last chunk asks for the next panel's weights, a span at a time.
            let next = (c + 1 == a.chunks() && p + 1 < w.panels()).then_some(p + 1);
            let acc = chunk_products::<T>(w, weights, scales, a, c, next, &mut sums);
            let base = out.ptr.add(c * CHUNK * out.stride + out.col0 + p * PANEL);
            for (t, v) in acc.iter().enumerate().take(a.m - c * CHUNK) {
                _mm512_mask_storeu_ps(base.add(t * out.stride), mask, *v);
            }
        }
    }
}

/// Panel `p`'s f32 scales (`[span][PANEL]`) into `out`, then its minimums, as
/// `TiledWeights::panel_scales` computes them.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn stage_scales(w: &TiledWeights, p: usize, out: *mut f32) {
    let (l, spans) = (w.layout, w.spans());
    let per_super = l.spans_per_super();
    let sign = _mm512_set1_epi32(i32::MIN);
    for s in 0..spans {
        let h = (p * spans / per_super + s / per_super) * PANEL;
        let i = (p * spans + s) * PANEL;
        let half =
            |v: &[half::f16]| _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(h) as *const _));
        let bytes = |v: &[u8]| _mm_loadu_si128(v.as_ptr().add(i) as *const _);
        let d = half(&w.half[0]);
        let scale = match l.scales {
            ScaleCodec::Half => d,
            ScaleCodec::SubBlock => _mm512_mul_ps(
                d,
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes(&w.sub[0]))),
            ),
            ScaleCodec::SignedSubBlock => _mm512_mul_ps(
                d,
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes(&w.sub[0]))),
            ),
        };
        _mm512_storeu_ps(out.add(s * PANEL), scale);
        if l.mins {
            let m = half(&w.half[1]);
            let min = match l.scales {
                ScaleCodec::Half => m,
                _ => {
                    let v = _mm512_mul_ps(
                        m,
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes(&w.sub[1]))),
                    );
                    _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign))
                }
            };
            _mm512_storeu_ps(out.add((spans + s) * PANEL), min);
        }
    }
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Aligned([u8; 64]);

/// Asks for span `s` of panel `p` (its weights, scales and minimums) to be brought into the
/// L2 cache, so that the next panel streams in while this one is multiplied.
#[target_feature(enable = "avx512f")]
unsafe fn prefetch_span(w: &TiledWeights, p: usize, s: usize) {
    let (spans, tb) = (w.spans(), w.layout.tile_bytes());
    let tile = w.values.as_ptr().add((p * spans + s) * tb);
    for line in (0..tb).step_by(64) {
        _mm_prefetch::<_MM_HINT_T1>(tile.add(line) as *const i8);
    }
    // Scales are far smaller: one line covers several spans.
    let per_super = w.layout.spans_per_super();
    let h = (p * spans / per_super + s / per_super) * PANEL;
    for half in &w.half {
        if !half.is_empty() && s.is_multiple_of(per_super) && h.is_multiple_of(32) {
            _mm_prefetch::<_MM_HINT_T1>(half.as_ptr().add(h) as *const i8);
        }
    }
    let at = (p * spans + s) * PANEL;
    for sub in &w.sub {
        if !sub.is_empty() && at.is_multiple_of(64) {
            _mm_prefetch::<_MM_HINT_T1>(sub.as_ptr().add(at) as *const i8);
        }
    }
}

/// The products of a panel (its tiles at `weights`, `64 · span / 4` bytes apart; its f32
/// scales at `scales`, then its minimums) with chunk `c` of `a`: one register of 16 weight
/// rows per token. Prefetches panel `next`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn chunk_products<const T: usize>(
    w: &TiledWeights,
    weights: *const u8,
    scales: *const f32,
    a: &TileActivations,
    c: usize,
    next: Option<usize>,
    sums: &mut Sums,
) -> [__m512; T] {
    let (span, spans, tb) = (w.layout.span, w.spans(), 64 * w.layout.tile_rows());
    let mut acc = [_mm512_setzero_ps(); T];
    // Scales a span's sums (in `sums.0[$buf]`) into the accumulators.
    macro_rules! scale_sums {
        ($buf:expr, $s:expr) => {{
            let (buf, s): (usize, usize) = ($buf, $s);
            let dx = a.per_token(&a.scales, c, s * span / ABLOCK).as_ptr();
            let dw = _mm512_loadu_ps(scales.add(s * PANEL));
            let rows = sums.0[buf].as_ptr();
            for t in 0..T {
                let hi = _mm512_load_si512(rows.add(2 * t * PANEL) as *const _);
                let lo = _mm512_load_si512(rows.add((2 * t + 1) * PANEL) as *const _);
                let i = _mm512_add_epi32(_mm512_slli_epi32::<8>(hi), lo);
                let f = _mm512_mul_ps(_mm512_cvtepi32_ps(i), _mm512_set1_ps(*dx.add(t)));
                acc[t] = _mm512_fmadd_ps(f, dw, acc[t]);
            }
        }};
    }
    // One tile product of span `$s` into sums buffer `$buf`, with tile registers: sums `$c`,
    // activations `$a`, weights `$b`.
    macro_rules! product {
        ($s:expr, $buf:expr, $c:literal, $a:literal, $b:literal) => {{
            let (s, buf): (usize, usize) = ($s, $buf);
            let b = s * span;
            let x = a.tile(c, b / ABLOCK).as_ptr().add(b % ABLOCK);
            asm!(
                concat!("tileloadd tmm", $b, ", [{w} + {s64} * 1]"),
                concat!("tileloadd tmm", $a, ", [{x} + {s32} * 1]"),
                concat!("tilezero tmm", $c),
                concat!("tdpbssd tmm", $c, ", tmm", $a, ", tmm", $b),
                concat!("tilestored [{c} + {s64} * 1], tmm", $c),
                w = in(reg) weights.add(s * tb), x = in(reg) x, c = in(reg) sums.0[buf].as_mut_ptr(),
                s64 = in(reg) 64usize, s32 = in(reg) ABLOCK,
                options(nostack),
            );
        }};
    }
    // Four sets of sums in flight: a span's sums are scaled two spans after its product was
    // issued, while the tile unit works on the next ones.
    for s in 0..spans {
        match s % 4 {
            0 => product!(s, 0, "0", "2", "4"),
            1 => product!(s, 1, "1", "3", "5"),
            2 => product!(s, 2, "6", "2", "4"),
            _ => product!(s, 3, "7", "3", "5"),
        }
        if let Some(next) = next {
            prefetch_span(w, next, s);
        }
        if s >= 2 {
            scale_sums!((s - 2) % 4, s - 2);
        }
    }
    for s in spans.saturating_sub(2)..spans {
        scale_sums!(s % 4, s);
    }
    if w.layout.mins {
        let mins = scales.add(spans * PANEL);
        let mut macc = [_mm512_setzero_ps(); T];
        for s in 0..spans {
            let mw = _mm512_loadu_ps(mins.add(s * PANEL));
            let sx = a.per_token(&a.sums, c, s).as_ptr();
            for (t, m) in macc.iter_mut().enumerate() {
                *m = _mm512_fmadd_ps(mw, _mm512_set1_ps(*sx.add(t)), *m);
            }
        }
        for t in 0..T {
            acc[t] = _mm512_add_ps(acc[t], macc[t]);
        }
    }
    acc
}

/// Panel `p`'s spans as signed-byte tile operands into `stage`, one after another.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack_panel(w: &TiledWeights, p: usize, stage: *mut i8) {
    let l = w.layout;
    let Codec::Nibbles { planes } = l.codec else {
        return;
    };
    let (low4, offset) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(l.offset));
    let (bit4, bit5) = (_mm512_set1_epi8(16), _mm512_set1_epi8(32));
    let (rows, tb) = (l.tile_rows(), 64 * l.tile_rows());
    for s in 0..w.spans() {
        let src = w.tile(p, s).as_ptr();
        let dst = stage.add(s * tb);
        // Bit plane `k`'s word for tile row `r`.
        let word = |k: usize, r: usize| {
            (src.add(l.span * 8 + 8 * (k * rows + r)) as *const u64).read_unaligned()
        };
        for pair in 0..rows / 2 {
            let v = _mm512_loadu_si512(src.add(64 * pair) as *const _);
            let mut r = [
                _mm512_and_si512(v, low4),
                _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4),
            ];
            for (i, row) in r.iter_mut().enumerate() {
                if planes > 0 {
                    *row = _mm512_mask_add_epi8(*row, word(0, 2 * pair + i), *row, bit4);
                }
                if planes > 1 {
                    *row = _mm512_mask_add_epi8(*row, word(1, 2 * pair + i), *row, bit5);
                }
                _mm512_store_si512(
                    dst.add(128 * pair + 64 * i) as *mut _,
                    _mm512_sub_epi8(*row, offset),
                );
            }
        }
    }
}

/// One chunk of activation rows (`x`: up to [`CHUNK`] rows of `cols`) rounded into its tile
/// operands, scales and sums, as `tiles::round_block` does it.
///
/// # Safety
/// The CPU has AVX-512F; `bytes`, `scales` and `sums` are one chunk's (`cols / 32` blocks).
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn round_chunk(
    x: &[f32],
    cols: usize,
    bytes: &mut [i8],
    scales: &mut [f32],
    sums: &mut [f32],
) {
    let blocks = cols / ABLOCK;
    assert!(
        x.len() <= CHUNK * cols && bytes.len() == blocks * 2 * CHUNK * ABLOCK,
        "round_chunk: not one chunk"
    );
    assert!(scales.len() == blocks * CHUNK && sums.len() == blocks * CHUNK);
    let (lim, b128, b255) = (
        _mm512_set1_ps(QX_MAX),
        _mm512_set1_epi32(128),
        _mm512_set1_epi32(255),
    );
    for (t, row) in x.chunks_exact(cols).enumerate() {
        for b in 0..blocks {
            let p = row.as_ptr().add(b * ABLOCK);
            let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            // NaN lanes as zeros, as the portable rounding leaves them out and rounds them to 0.
            let clean = |v: __m512| {
                _mm512_mask_mov_ps(
                    v,
                    _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v),
                    _mm512_setzero_ps(),
                )
            };
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(
                _mm512_abs_ps(clean(v0)),
                _mm512_abs_ps(clean(v1)),
            ));
            let (scale, inv) = block_scale(amax);
            let inv = _mm512_set1_ps(inv);
            let tile = bytes
                .as_mut_ptr()
                .add(b * 2 * CHUNK * ABLOCK + 2 * t * ABLOCK);
            for (h, v) in [v0, v1].into_iter().enumerate() {
                let v = _mm512_min_ps(
                    _mm512_max_ps(
                        // An infinity times a zero inverse is NaN: 0 too.
                        clean(_mm512_mul_ps(v, inv)),
                        _mm512_sub_ps(_mm512_setzero_ps(), lim),
                    ),
                    lim,
                );
                // Nearest, ties to even (the default rounding mode).
                let q = _mm512_cvtps_epi32(v);
                let lo = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(q, b128), b255), b128);
                let hi = _mm512_srai_epi32::<8>(_mm512_sub_epi32(q, lo));
                _mm_storeu_si128(tile.add(16 * h) as *mut _, _mm512_cvtepi32_epi8(hi));
                _mm_storeu_si128(
                    tile.add(ABLOCK + 16 * h) as *mut _,
                    _mm512_cvtepi32_epi8(lo),
                );
            }
            // `tiles::block_sum`'s tree.
            let s16 = _mm512_add_ps(v0, v1);
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s16)));
            let s8 = _mm256_add_ps(_mm512_castps512_ps256(s16), high);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
            scales[b * CHUNK + t] = scale;
            sums[b * CHUNK + t] = _mm_cvtss_f32(s1);
        }
    }
}

/// `iters` rounds of four tile products into independent sums, with the shapes the kernels
/// use (16 rows, 32-byte spans); the multiply-adds of 16-bit activations they stand for (a
/// token is two rows).
///
/// # Safety
/// [`available`] returned true.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile_rounds(iters: usize) -> u64 {
    configure(16, ABLOCK);
    let x = [Aligned([1; 64]); 16];
    let p = x.as_ptr();
    asm!(
        "tileloadd tmm2, [{p} + {s32} * 1]",
        "tileloadd tmm3, [{p} + {s32} * 1]",
        "tileloadd tmm4, [{p} + {s64} * 1]",
        "tileloadd tmm5, [{p} + {s64} * 1]",
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm6",
        "tilezero tmm7",
        p = in(reg) p, s32 = in(reg) 32usize, s64 = in(reg) 64usize,
        options(nostack),
    );
    for _ in 0..iters {
        asm!(
            "tdpbssd tmm0, tmm2, tmm4",
            "tdpbssd tmm1, tmm3, tmm5",
            "tdpbssd tmm6, tmm3, tmm4",
            "tdpbssd tmm7, tmm2, tmm5",
            options(nostack, nomem),
        );
    }
    asm!("tilerelease", options(nostack, nomem));
    (iters * 4 * CHUNK * PANEL * ABLOCK) as u64
}
