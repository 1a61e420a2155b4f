//! AVX2 kernels (and the same with AVX-512 VNNI's `vpdpwssd` on 256-bit registers) for every
//! block format. Each weight block is unpacked once into two registers of sixteen 16-bit
//! integers and multiplied against every activation row of the group with `vpmaddwd` (exact
//! `i32` sums), then scaled once per 32-value block (per 16 for `Q6_K`) into f32
//! accumulators: even and odd blocks apart, two dependency chains, as [`super::portable`]
//! defines. Unpacking and accumulating are macros, so that they are inlined in every build
//! profile and the accumulators stay in registers.

use super::hsum;
use std::arch::x86_64::*;

/// The two f16 at `p` and `p + 2` as f32 (every block format stores its scale next to its
/// minimum or to other bytes, so four bytes are always readable).
///
/// One 32-bit load (`vmovd`): loading a single f16 compiles to `vpinsrw`, which merges into
/// whatever the register held and so chains every block of the loop to the one before
/// (about 1.6x slower kernels).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn halves(p: *const u8) -> (f32, f32) {
    let bits = std::ptr::read_unaligned(p as *const i32);
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// Inner product of two float vectors (f32 weights).
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

/// The sixteen 16-bit masks `1 << j`.
macro_rules! bit_masks {
    () => {
        _mm256_setr_epi16(
            1,
            2,
            4,
            8,
            16,
            32,
            64,
            128,
            256,
            512,
            1024,
            2048,
            4096,
            8192,
            16384,
            i16::MIN,
        )
    };
}

/// 16 when bit `j` of the 16-bit `bits` is set, else 0, in lane `j`.
macro_rules! fifth_bits {
    ($bits:expr) => {{
        let m = bit_masks!();
        let set = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16($bits as i16), m), m);
        _mm256_and_si256(set, _mm256_set1_epi16(16))
    }};
}

/// The low and high nibbles of 16 bytes at `$p`, as two registers of sixteen `i16`.
macro_rules! nibbles16 {
    ($p:expr) => {{
        let w16 = _mm256_cvtepu8_epi16(_mm_loadu_si128($p as *const __m128i));
        (
            _mm256_and_si256(w16, _mm256_set1_epi16(0x0F)),
            _mm256_srli_epi16(w16, 4),
        )
    }};
}

/// 32 bytes of a register as two registers of sixteen `i16` (zero- or sign-extended).
macro_rules! widen_u8 {
    ($v:expr) => {{
        let v = $v;
        (
            _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v)),
            _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v, 1)),
        )
    }};
}
macro_rules! widen_i8 {
    ($v:expr) => {{
        let v = $v;
        (
            _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)),
            _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1)),
        )
    }};
}

/// The activation rows of a group as raw pointers (16-bit values, scales, sums), hoisted out
/// of the block loops so that nothing is reloaded per block.
macro_rules! rows {
    ($g:ident, $r:ident) => {
        (
            std::array::from_fn::<*const i16, $r, _>(|k| $g.q[k].as_ptr()),
            std::array::from_fn::<*const f32, $r, _>(|k| $g.d[k].as_ptr()),
            std::array::from_fn::<*const f32, $r, _>(|k| $g.s[k].as_ptr()),
        )
    };
}

/// Adds block `$i` (weights `$lo`, `$hi`, scale `$dw`, minimum `$mw`) times every activation
/// row to the accumulators `$acc`, and the minimum term to `$macc` when `$min` (a literal, so
/// the formats without one carry no dead arithmetic).
macro_rules! add_block {
    ($dot2:ident, $x:ident, $i:expr, $v:expr, $dw:expr, $mw:expr, $min:literal, $acc:ident, $macc:ident) => {{
        let ((lo, hi), dw, mw, i): ((__m256i, __m256i), f32, f32, usize) = ($v, $dw, $mw, $i);
        let (q, d, s) = &$x;
        for k in 0..$acc.len() {
            let x = q[k].add(i * QK) as *const __m256i;
            let p = $dot2(lo, _mm256_loadu_si256(x), hi, _mm256_loadu_si256(x.add(1)));
            let scale = _mm256_set1_ps(dw * *d[k].add(i));
            $acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, $acc[k]);
            if $min {
                $macc[k] += mw * *s[k].add(i);
            }
        }
    }};
}

/// The same for a block whose halves have their own scales (`Q6_K`).
macro_rules! add_halves {
    ($x:ident, $i:expr, $v:expr, $ds:expr, $acc:ident) => {{
        let ((lo, hi), (d0, d1), i): ((__m256i, __m256i), (f32, f32), usize) = ($v, $ds, $i);
        let (q, d, _) = &$x;
        for k in 0..$acc.len() {
            let x = q[k].add(i * QK) as *const __m256i;
            let p0 = _mm256_madd_epi16(lo, _mm256_loadu_si256(x));
            let p1 = _mm256_madd_epi16(hi, _mm256_loadu_si256(x.add(1)));
            let dx = *d[k].add(i);
            $acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * dx), $acc[k]);
            $acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d1 * dx), $acc[k]);
        }
    }};
}

/// The accumulators of `R` rows: even and odd blocks, and their minimum terms.
macro_rules! accumulators {
    ($r:ident) => {
        (
            [_mm256_setzero_ps(); $r],
            [_mm256_setzero_ps(); $r],
            [0f32; $r],
            [0f32; $r],
        )
    };
}

/// Folds the accumulators into `out`.
macro_rules! store {
    ($out:ident, $r:ident, $even:ident, $odd:ident, $meven:ident, $modd:ident) => {
        for k in 0..$r {
            $out[k] = hsum(_mm256_add_ps($even[k], $odd[k])) + ($meven[k] + $modd[k]);
        }
    };
}

/// Bits `$shift..$shift + width` of each byte of `$v` (`$mask` = the width's ones), at bit 4.
macro_rules! bits_to_4 {
    ($v:expr, $shift:expr, $mask:expr) => {
        _mm256_slli_epi16(
            _mm256_and_si256(_mm256_srl_epi16($v, _mm_cvtsi32_si128($shift)), $mask),
            4,
        )
    };
}

/// A kernel over 32-value blocks: `$unpack` (with the block as `$wb`) gives
/// `((lo, hi), d, m)`.
macro_rules! blocks32_kernel {
    ($features:literal, $dot2:ident, $name:ident, $block:ty, $min:literal, |$wb:ident| $unpack:expr) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(w: &[$block], g: &Group, out: &mut [f32; ROW_GROUP]) {
            let (mut even, mut odd, mut meven, mut modd) = accumulators!(R);
            let x = rows!(g, R);
            let mut pairs = w.chunks_exact(2);
            let mut i = 0;
            for pair in &mut pairs {
                let $wb = &pair[0];
                let (v, d, m) = $unpack;
                add_block!($dot2, x, i, v, d, m, $min, even, meven);
                let $wb = &pair[1];
                let (v, d, m) = $unpack;
                add_block!($dot2, x, i + 1, v, d, m, $min, odd, modd);
                i += 2;
            }
            if let [$wb] = pairs.remainder() {
                let (v, d, m) = $unpack;
                add_block!($dot2, x, i, v, d, m, $min, even, meven);
            }
            store!(out, R, even, odd, meven, modd);
        }
    };
}

/// A `Q4_K` / `Q5_K` kernel: per 64 values, 32 bytes of nibbles (sub-blocks `2c` and
/// `2c + 1`), with fifth bits from `$fifth` (with the block as `$wb`), if any.
macro_rules! kquant45_kernel {
    ($features:literal, $dot2:ident, $name:ident, $block:ty, |$wb:ident| $fifth:expr) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(w: &[$block], g: &Group, out: &mut [f32; ROW_GROUP]) {
            let (mut even, mut odd, mut meven, mut modd) = accumulators!(R);
            let x = rows!(g, R);
            let (low4, one) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(1));
            for (b, $wb) in w.iter().enumerate() {
                let p = $wb as *const _ as *const u8;
                let (d, dmin) = halves(p);
                let (sc, m) = scales_mins_k4(&$wb.scales);
                let fifth: Option<__m256i> = $fifth;
                for c in 0..4 {
                    let v = _mm256_loadu_si256($wb.qs.as_ptr().add(32 * c) as *const __m256i);
                    let mut lo = _mm256_and_si256(v, low4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    if let Some(qh) = fifth {
                        lo = _mm256_or_si256(lo, bits_to_4!(qh, 2 * c as i32, one));
                        hi = _mm256_or_si256(hi, bits_to_4!(qh, 2 * c as i32 + 1, one));
                    }
                    let (j0, j1) = (2 * c, 2 * c + 1);
                    let i = b * 8 + j0;
                    let (d0, m0) = (d * sc[j0] as f32, -(dmin * m[j0] as f32));
                    let (d1, m1) = (d * sc[j1] as f32, -(dmin * m[j1] as f32));
                    add_block!($dot2, x, i, widen_u8!(lo), d0, m0, true, even, meven);
                    add_block!($dot2, x, i + 1, widen_u8!(hi), d1, m1, true, odd, modd);
                }
            }
            store!(out, R, even, odd, meven, modd);
        }
    };
}

/// The `Q6_K` kernel: per half of 128 values, 64 bytes of nibbles and 32 of high bit pairs.
macro_rules! q6k_kernel {
    ($features:literal, $name:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(w: &[BlockQ6K], g: &Group, out: &mut [f32; ROW_GROUP]) {
            let (mut even, mut odd, meven, modd) = accumulators!(R);
            let x = rows!(g, R);
            let (low4, three, bias) = (
                _mm256_set1_epi8(0x0F),
                _mm256_set1_epi8(3),
                _mm256_set1_epi8(32),
            );
            for (b, wb) in w.iter().enumerate() {
                // `d` is the last field: read it with the two bytes before it.
                let d = halves((&wb.d as *const _ as *const u8).sub(2)).1;
                for h in 0..2 {
                    let ql = wb.ql.as_ptr().add(64 * h) as *const __m256i;
                    let (ql0, ql1) = (_mm256_loadu_si256(ql), _mm256_loadu_si256(ql.add(1)));
                    let qh = _mm256_loadu_si256(wb.qh.as_ptr().add(32 * h) as *const __m256i);
                    let quarters = [
                        _mm256_or_si256(_mm256_and_si256(ql0, low4), bits_to_4!(qh, 0, three)),
                        _mm256_or_si256(_mm256_and_si256(ql1, low4), bits_to_4!(qh, 2, three)),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                            bits_to_4!(qh, 4, three),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                            bits_to_4!(qh, 6, three),
                        ),
                    ];
                    for (t, q) in quarters.into_iter().enumerate() {
                        let v = widen_i8!(_mm256_sub_epi8(q, bias));
                        let i = b * 8 + 4 * h + t;
                        let s = 8 * h + 2 * t;
                        let ds = (d * wb.scales[s] as f32, d * wb.scales[s + 1] as f32);
                        if t.is_multiple_of(2) {
                            add_halves!(x, i, v, ds, even);
                        } else {
                            add_halves!(x, i, v, ds, odd);
                        }
                    }
                }
            }
            store!(out, R, even, odd, meven, modd);
        }
    };
}

/// Public entry points: the group size is a constant in each instance, so the accumulators
/// stay in registers.
macro_rules! entries {
    ($features:literal, $($name:ident => $rows:ident, $block:ty;)*) => {$(
        #[target_feature(enable = $features)]
        pub unsafe fn $name(w: &[$block], g: &Group, out: &mut [f32; ROW_GROUP]) {
            match g.len {
                1 => $rows::<1>(w, g, out),
                2 => $rows::<2>(w, g, out),
                3 => $rows::<3>(w, g, out),
                _ => $rows::<4>(w, g, out),
            }
        }
    )*};
}

/// Defines the kernels for one instruction set; `$dot2` adds `a·x + b·y` (16-bit lanes,
/// pairwise) into eight `i32`.
macro_rules! kernels {
    ($module:ident, $features:literal, $dot2:ident) => {
        pub(super) mod $module {
            use super::super::matmul::{Group, ROW_GROUP};
            use super::super::quant::*;
            use super::*;

            blocks32_kernel!($features, $dot2, q4_0_rows, BlockQ4_0, false, |wb| {
                let (lo, hi) = nibbles16!(wb.qs.as_ptr());
                let eight = _mm256_set1_epi16(8);
                let v = (_mm256_sub_epi16(lo, eight), _mm256_sub_epi16(hi, eight));
                (v, halves(wb as *const _ as *const u8).0, 0.0)
            });

            blocks32_kernel!($features, $dot2, q4_1_rows, BlockQ4_1, true, |wb| {
                let p = wb as *const _ as *const u8;
                let (d, m) = halves(p);
                (nibbles16!(wb.qs.as_ptr()), d, m)
            });

            blocks32_kernel!($features, $dot2, q5_0_rows, BlockQ5_0, false, |wb| {
                let (lo, hi) = nibbles16!(wb.qs.as_ptr());
                let qh = u32::from_le_bytes(wb.qh);
                let sixteen = _mm256_set1_epi16(16);
                let lo = _mm256_sub_epi16(_mm256_or_si256(lo, fifth_bits!(qh as u16)), sixteen);
                let hi = _mm256_or_si256(hi, fifth_bits!((qh >> 16) as u16));
                let hi = _mm256_sub_epi16(hi, sixteen);
                ((lo, hi), halves(wb as *const _ as *const u8).0, 0.0)
            });

            blocks32_kernel!($features, $dot2, q5_1_rows, BlockQ5_1, true, |wb| {
                let p = wb as *const _ as *const u8;
                let (lo, hi) = nibbles16!(wb.qs.as_ptr());
                let qh = u32::from_le_bytes(wb.qh);
                let lo = _mm256_or_si256(lo, fifth_bits!(qh as u16));
                let hi = _mm256_or_si256(hi, fifth_bits!((qh >> 16) as u16));
                let (d, m) = halves(p);
                ((lo, hi), d, m)
            });

            blocks32_kernel!($features, $dot2, q8_0_rows, BlockQ8_0, false, |wb| {
                let qs = wb.qs.as_ptr() as *const __m128i;
                let v = (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(qs)),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(qs.add(1))),
                );
                (v, halves(wb as *const _ as *const u8).0, 0.0)
            });

            kquant45_kernel!($features, $dot2, q4k_rows, BlockQ4K, |_wb| None);
            kquant45_kernel!($features, $dot2, q5k_rows, BlockQ5K, |wb| Some(
                _mm256_loadu_si256(wb.qh.as_ptr() as *const __m256i)
            ));
            q6k_kernel!($features, q6k_rows);

            entries! {
                $features,
                q4_0 => q4_0_rows, BlockQ4_0;
                q4_1 => q4_1_rows, BlockQ4_1;
                q5_0 => q5_0_rows, BlockQ5_0;
                q5_1 => q5_1_rows, BlockQ5_1;
                q8_0 => q8_0_rows, BlockQ8_0;
                q4k => q4k_rows, BlockQ4K;
                q5k => q5k_rows, BlockQ5K;
                q6k => q6k_rows, BlockQ6K;
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
