//! AVX2 kernels (and the same with AVX-512 VNNI's `vpdpwssd` on 256-bit registers) for every
//! block format, with the arithmetic [`super::portable`] defines. Each weight block is
//! unpacked once into registers of sixteen 16-bit integers and multiplied against every
//! activation row of the group with `vpmaddwd` (exact `i32` sums). The 32-value formats are
//! scaled once per block into f32 accumulators (even and odd blocks apart, two dependency
//! chains); the K-quants fold their integer sub-block scales into the weights and are scaled
//! once per super-block (per half for `Q6_K`). Unpacking and accumulating are macros, so that
//! they are inlined in every build profile and the accumulators stay in registers.

use super::hsum;
use std::arch::x86_64::*;

/// The two f16 at `p` and `p + 2` as f32 (every block format stores its scale next to its
/// minimum or to other bytes, so four bytes are always readable).
///
/// The load is `vmovd` in inline assembly: when only one of the halves is used, the compiler
/// narrows a plain load to `vpinsrw`, which merges into whatever the register held and so
/// chains every block of a kernel's loop to the one before (1.6x slower kernels).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn halves(p: *const u8) -> (f32, f32) {
    let bits: __m128i;
    std::arch::asm!(
        "vmovd {v}, dword ptr [{p}]",
        p = in(reg) p,
        v = out(xmm_reg) bits,
        options(pure, readonly, nostack, preserves_flags),
    );
    let v = _mm_cvtph_ps(bits);
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

/// The tiled activations of a group (see `matmul::Tiled`) as raw pointers: values, scales,
/// sums. Checks that the group is tiled for `$r` rows of `$blocks` weight blocks of `$block`
/// values (one activation scale per weight block, one sum per 32 values).
macro_rules! tiled {
    ($g:ident, $r:ident, $blocks:expr, $block:expr) => {{
        let (t, cols) = (&$g.tiled, $blocks * $block);
        let ok = t.0.len() == $r * cols && t.1.len() == $r * $blocks && t.2.len() == $r * cols / QK;
        assert!($g.len == $r && ok, "untiled group");
        (t.0.as_ptr(), t.1.as_ptr(), t.2.as_ptr())
    }};
}

/// Adds block `$i` (weights `$v`, scale `$dw`, minimum `$mw`) times every activation row of
/// the tiled group `$x` (values, scales, sums; see `matmul::Tiled`) to the accumulators
/// `$acc`, and the minimum term to `$macc` when `$min` (a literal, so the formats without one
/// carry no dead arithmetic). The integer sums are scaled by the row's `d_x` (a broadcast
/// load) and then by `d_w`, shared by the rows. The block's activations for all rows are one
/// contiguous run, and their scales and sums adjacent, so only three pointers stay live.
macro_rules! add_block {
    ($dot2:ident, $x:ident, $i:expr, $v:expr, $dw:expr, $mw:expr, $min:literal, $acc:ident, $macc:ident) => {{
        let ((lo, hi), dw, mw, i): ((__m256i, __m256i), f32, f32, usize) = ($v, $dw, $mw, $i);
        let (q, d, s) = $x;
        let r = $acc.len();
        let (q, d, s) = (q.add(i * r * QK), d.add(i * r), s.add(i * r));
        let dw = _mm256_set1_ps(dw);
        for k in 0..r {
            let x = q.add(k * QK) as *const __m256i;
            let p = $dot2(lo, _mm256_loadu_si256(x), hi, _mm256_loadu_si256(x.add(1)));
            let t = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(*d.add(k)));
            $acc[k] = _mm256_fmadd_ps(t, dw, $acc[k]);
        }
        if $min {
            for k in 0..r {
                $macc[k] += mw * *s.add(k);
            }
        }
    }};
}

/// Adds the products of 32 weights (`$v`: two registers of sixteen `i16`, sub-block scale
/// folded in) with the 32 activations at element `$e` of every row's super-block, whose tiles
/// start at `$x`, to the rows' `i32` sums.
macro_rules! add_ints {
    ($dot:ident, $x:expr, $e:expr, $v:expr, $isum:ident) => {{
        let ((lo, hi), e, x): ((__m256i, __m256i), usize, *const i16) = ($v, $e, $x);
        for k in 0..$isum.len() {
            let x = x.add(k * QK_K + e) as *const __m256i;
            $isum[k] = $dot($isum[k], lo, _mm256_loadu_si256(x));
            $isum[k] = $dot($isum[k], hi, _mm256_loadu_si256(x.add(1)));
        }
    }};
}

/// Scales the rows' integer sums of a super-block by their `d_x` (from `$d`, the rows' scales
/// side by side) and by `$dw` into `$acc`.
macro_rules! scale_ints {
    ($d:expr, $dw:expr, $isum:ident, $acc:ident) => {{
        let (d, dw): (*const f32, __m256) = ($d, $dw);
        for k in 0..$isum.len() {
            let t = _mm256_mul_ps(_mm256_cvtepi32_ps($isum[k]), _mm256_set1_ps(*d.add(k)));
            $acc[k] = _mm256_fmadd_ps(t, dw, $acc[k]);
        }
    }};
}

/// Two registers of sixteen `i16` times a sub-block scale.
macro_rules! times {
    ($v:expr, $sc:expr) => {{
        let ((lo, hi), sc): ((__m256i, __m256i), i16) = ($v, $sc);
        let sc = _mm256_set1_epi16(sc);
        (_mm256_mullo_epi16(lo, sc), _mm256_mullo_epi16(hi, sc))
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
            let x = tiled!(g, R, w.len(), QK);
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
/// `2c + 1`), with fifth bits from `$fifth` (with the block as `$wb`), if any; the whole
/// super-block summed in `i32` (sub-block scales folded into the weights), its minimums
/// against the rows' exact sums of each 32 activations.
macro_rules! kquant45_kernel {
    ($features:literal, $dot:ident, $name:ident, $block:ty, |$wb:ident| $fifth:expr) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(w: &[$block], g: &Group, out: &mut [f32; ROW_GROUP]) {
            let (mut acc, mut mins) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
            let (xq, xd, xs) = tiled!(g, R, w.len(), QK_K);
            let (low4, one) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(1));
            for (b, $wb) in w.iter().enumerate() {
                let xb = xq.add(b * R * QK_K);
                let (d, dmin) = halves($wb as *const _ as *const u8);
                let (sc, m) = scales_mins_k4(&$wb.scales);
                let fifth: Option<__m256i> = $fifth;
                let mut isum = [_mm256_setzero_si256(); R];
                for c in 0..4 {
                    let v = _mm256_loadu_si256($wb.qs.as_ptr().add(32 * c) as *const __m256i);
                    let mut lo = _mm256_and_si256(v, low4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    if let Some(qh) = fifth {
                        lo = _mm256_or_si256(lo, bits_to_4!(qh, 2 * c as i32, one));
                        hi = _mm256_or_si256(hi, bits_to_4!(qh, 2 * c as i32 + 1, one));
                    }
                    let e = 64 * c;
                    let lo = times!(widen_u8!(lo), sc[2 * c] as i16);
                    let hi = times!(widen_u8!(hi), sc[2 * c + 1] as i16);
                    add_ints!($dot, xb, e, lo, isum);
                    add_ints!($dot, xb, e + QK, hi, isum);
                }
                scale_ints!(xd.add(b * R), _mm256_set1_ps(d), isum, acc);
                let m8 = _mm_loadl_epi64(m.as_ptr() as *const __m128i);
                let mv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m8));
                let mv = _mm256_mul_ps(mv, _mm256_set1_ps(-dmin));
                let sb = xs.add(b * R * 8);
                for k in 0..R {
                    mins[k] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(sb.add(8 * k)), mins[k]);
                }
            }
            for k in 0..R {
                out[k] = hsum(acc[k]) + hsum(mins[k]);
            }
        }
    };
}

/// The `Q6_K` kernel: per half of 128 values, 64 bytes of nibbles and 32 of high bit pairs,
/// summed in `i32` (the 16-value scales folded into the weights) and scaled once.
macro_rules! q6k_kernel {
    ($features:literal, $dot:ident, $name:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(w: &[BlockQ6K], g: &Group, out: &mut [f32; ROW_GROUP]) {
            let mut acc = [_mm256_setzero_ps(); R];
            let (xq, xd, _) = tiled!(g, R, w.len(), QK_K);
            let (low4, three, bias) = (
                _mm256_set1_epi8(0x0F),
                _mm256_set1_epi8(3),
                _mm256_set1_epi8(32),
            );
            for (b, wb) in w.iter().enumerate() {
                let xb = xq.add(b * R * QK_K);
                // `d` is the last field: read it with the two bytes before it.
                let d = _mm256_set1_ps(halves((&wb.d as *const _ as *const u8).sub(2)).1);
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
                    let mut isum = [_mm256_setzero_si256(); R];
                    for (t, q) in quarters.into_iter().enumerate() {
                        let (lo, hi) = widen_i8!(_mm256_sub_epi8(q, bias));
                        let s = 8 * h + 2 * t;
                        let lo = _mm256_mullo_epi16(lo, _mm256_set1_epi16(wb.scales[s] as i16));
                        let hi = _mm256_mullo_epi16(hi, _mm256_set1_epi16(wb.scales[s + 1] as i16));
                        add_ints!($dot, xb, 128 * h + 32 * t, (lo, hi), isum);
                    }
                    scale_ints!(xd.add(b * R), d, isum, acc);
                }
            }
            for k in 0..R {
                out[k] = hsum(acc[k]);
            }
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
                4 => $rows::<4>(w, g, out),
                5 => $rows::<5>(w, g, out),
                6 => $rows::<6>(w, g, out),
                7 => $rows::<7>(w, g, out),
                _ => $rows::<8>(w, g, out),
            }
        }
    )*};
}

/// Defines the kernels for one instruction set; `$dot2` adds `a·x + b·y` (16-bit lanes,
/// pairwise) into eight `i32`.
macro_rules! kernels {
    ($module:ident, $features:literal, $dot2:ident, $dot:ident) => {
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

            kquant45_kernel!($features, $dot, q4k_rows, BlockQ4K, |_wb| None);
            kquant45_kernel!($features, $dot, q5k_rows, BlockQ5K, |wb| Some(
                _mm256_loadu_si256(wb.qh.as_ptr() as *const __m256i)
            ));
            q6k_kernel!($features, $dot, q6k_rows);

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

/// `acc + a·x` (16-bit lanes, pairwise, into eight `i32`).
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(acc: __m256i, a: __m256i, x: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(a, x))
}

#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
unsafe fn dot_vnni(acc: __m256i, a: __m256i, x: __m256i) -> __m256i {
    _mm256_dpwssd_epi32(acc, a, x)
}

kernels!(avx2, "avx2,fma,f16c", dot2_avx2, dot_avx2);
kernels!(
    vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    dot2_vnni,
    dot_vnni
);

/// `iters` rounds of twelve independent 16-bit dot instructions (`vpdpwssd` when `vnni`, else
/// `vpmaddwd` and an add; each on its own inputs, so none can be shared), for the roofline's
/// compute bound; the multiply-adds done.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot16_rounds(iters: usize, vnni: bool) -> u64 {
    let a: [__m256i; 12] = std::array::from_fn(|j| _mm256_set1_epi16(3 + j as i16));
    let acc = if vnni {
        dot16_vnni(iters, a)
    } else {
        let mut acc = [_mm256_setzero_si256(); 12];
        for _ in 0..iters {
            let b = std::hint::black_box(_mm256_set1_epi16(5));
            for (v, &a) in acc.iter_mut().zip(&a) {
                *v = dot_avx2(*v, a, b);
            }
        }
        acc
    };
    std::hint::black_box(acc);
    (iters * 12 * 16) as u64
}

#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
unsafe fn dot16_vnni(iters: usize, a: [__m256i; 12]) -> [__m256i; 12] {
    let mut acc = [_mm256_setzero_si256(); 12];
    for _ in 0..iters {
        let b = std::hint::black_box(_mm256_set1_epi16(5));
        for (v, &a) in acc.iter_mut().zip(&a) {
            *v = dot_vnni(*v, a, b);
        }
    }
    acc
}
