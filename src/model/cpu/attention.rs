//! Causal self-attention with rotary position embeddings over a host-memory KV cache.
//!
//! One call handles the new tokens of one sequence: it rotates their queries and keys, appends
//! keys and values to the cache, and attends each query to every cached key at or before its
//! position (grouped-query attention: query head `h` reads KV head `h / (n_heads / n_kv)`),
//! or only to the last `window` of them on a local (sliding-window) layer, optionally
//! soft-capping the scores (Gemma 2). Each output row is computed in a fixed order that depends only on its own position, so
//! results do not change with how a prompt is chunked or batched.

use super::matmul::{isa, Isa};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Which coordinates a rotary embedding rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeLayout {
    /// Pairs `(2i, 2i+1)`: llama.cpp's "normal" rope, for GGUF Llama weights (whose q/k rows
    /// the converter permuted).
    Interleaved,
    /// Pairs `(i, i + d/2)`: Hugging Face's `rotate_half` (NeoX), for safetensors weights.
    HalfSplit,
}

/// A rotary embedding: the inverse frequency of each rotated pair, computed in f64 once;
/// the angles of a position are computed when it is rotated (no per-position tables, so a
/// long context costs no memory).
#[derive(Debug, Clone)]
pub struct Rope {
    pub layout: RopeLayout,
    inv_freq: Vec<f64>,
}

impl Rope {
    /// `inv_freq[i] = 1 / base^(2i/d)`, divided by per-frequency factors (Llama 3's
    /// `rope_freqs`) and by a linear position-scaling factor, if given.
    pub fn new(
        layout: RopeLayout,
        head_dim: usize,
        base: f64,
        freq_factors: Option<&[f32]>,
        linear_scale: f64,
    ) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| {
                let f = 1.0 / base.powf(2.0 * i as f64 / head_dim as f64);
                let factor = freq_factors
                    .and_then(|ff| ff.get(i))
                    .map_or(1.0, |&x| x as f64);
                f / factor / linear_scale
            })
            .collect();
        Self { layout, inv_freq }
    }

    /// Rotated pairs per head.
    pub fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// `cos` and `sin` of position `pos`'s angles, `half` each.
    pub fn angles(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let a = pos as f64 * f;
            *c = a.cos() as f32;
            *s = a.sin() as f32;
        }
    }

    /// `[len, half]` cos and sin tables for positions `start..start + len`.
    pub fn tables(&self, start: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.half();
        let (mut cos, mut sin) = (vec![0f32; len * half], vec![0f32; len * half]);
        for i in 0..len {
            let r = i * half..(i + 1) * half;
            self.angles(start + i, &mut cos[r.clone()], &mut sin[r]);
        }
        (cos, sin)
    }

    /// Rotates one head vector `x` (`2 * half` long) by the angles `(c, s)` of its position.
    pub fn rotate(&self, x: &mut [f32], c: &[f32], s: &[f32]) {
        let half = self.half();
        match self.layout {
            RopeLayout::Interleaved => {
                for i in 0..half {
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    x[2 * i] = a * c[i] - b * s[i];
                    x[2 * i + 1] = a * s[i] + b * c[i];
                }
            }
            RopeLayout::HalfSplit => {
                for i in 0..half {
                    let (a, b) = (x[i], x[i + half]);
                    x[i] = a * c[i] - b * s[i];
                    x[i + half] = a * s[i] + b * c[i];
                }
            }
        }
    }
}

/// Head counts of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl HeadShape {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// How one layer attends: its heads, rotary embedding, score scale, optional sliding window
/// and optional soft-capping of the scores.
#[derive(Debug, Clone)]
pub struct AttentionSpec {
    pub shape: HeadShape,
    pub rope: std::sync::Arc<Rope>,
    /// Multiplies `q · k` (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
    /// A query at position `p` sees keys at `p - window + 1 ..= p` only (local layers).
    pub window: Option<usize>,
    /// Scores become `cap * tanh(score / cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
}

impl AttentionSpec {
    /// The first key position a query at `pos` attends to.
    pub fn first_key(&self, pos: usize) -> usize {
        match self.window {
            Some(w) => (pos + 1).saturating_sub(w.max(1)),
            None => 0,
        }
    }
}

/// One layer's cached keys (rotated) and values, `[len, kv_dim]` each, in f16 as
/// llama.cpp keeps them: attention reads every cached row of every sequence at each step, so
/// half the bytes is half its memory traffic.
#[derive(Debug, Clone, Default)]
pub struct HostKv {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
}

/// Attends the `n_new` query rows in `qkv` (`[n_new, q_dim + 2 kv_dim]`, positions
/// `start..start + n_new`) after appending their keys and values to `cache`. Writes
/// `[n_new, q_dim]` into `out`.
pub fn attend(
    qkv: &[f32],
    n_new: usize,
    start: usize,
    cache: &mut HostKv,
    spec: &AttentionSpec,
    out: &mut [f32],
) {
    let shape = spec.shape;
    let (q_dim, kv_dim, hd) = (shape.q_dim(), shape.kv_dim(), shape.head_dim);
    let width = q_dim + 2 * kv_dim;
    debug_assert_eq!(qkv.len(), n_new * width);
    debug_assert_eq!(cache.k.len(), start * kv_dim);
    let rope = &spec.rope;
    let half = rope.half();
    let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
    let mut q = vec![0f32; n_new * q_dim];
    let mut key = vec![0f32; kv_dim];
    for i in 0..n_new {
        let row = &qkv[i * width..(i + 1) * width];
        rope.angles(start + i, &mut cos, &mut sin);
        let qi = &mut q[i * q_dim..(i + 1) * q_dim];
        qi.copy_from_slice(&row[..q_dim]);
        for h in qi.chunks_mut(hd) {
            rope.rotate(h, &cos, &sin);
        }
        key.copy_from_slice(&row[q_dim..q_dim + kv_dim]);
        for h in key.chunks_mut(hd) {
            rope.rotate(h, &cos, &sin);
        }
        append_f16(&mut cache.k, &key);
        append_f16(&mut cache.v, &row[q_dim + kv_dim..]);
    }
    let group = shape.n_heads / shape.n_kv_heads;
    let (k, v) = (&cache.k[..], &cache.v[..]);
    // One task per new row and KV head: the query heads sharing that KV head one after
    // another, so its keys and values come from memory once for all of them.
    let one = |(i, g): (usize, usize), dst: &mut [f32]| {
        let pos = start + i;
        let first = spec.first_key(pos);
        let kv = g * hd;
        let mut scores = vec![0f32; pos + 1 - first];
        for (h, dst) in dst.chunks_mut(hd).enumerate() {
            let qh = (g * group + h) * hd;
            let qh = &q[i * q_dim + qh..i * q_dim + qh + hd];
            key_scores(
                qh,
                &k[first * kv_dim + kv..],
                kv_dim,
                spec.scale,
                &mut scores,
            );
            if let Some(cap) = spec.softcap {
                for s in scores.iter_mut() {
                    *s = cap * (*s / cap).tanh();
                }
            }
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            for s in scores.iter_mut() {
                *s *= inv;
            }
            weighted_sum(&scores, &v[first * kv_dim + kv..], kv_dim, dst);
        }
    };
    let work = n_new * shape.n_heads * (start + n_new);
    let out = &mut out[..n_new * q_dim];
    let kv_heads = shape.n_kv_heads;
    let mut tasks: Vec<&mut [f32]> = out.chunks_mut(group * hd).collect();
    if work < 2048 {
        for (idx, dst) in tasks.into_iter().enumerate() {
            one((idx / kv_heads, idx % kv_heads), dst);
        }
    } else {
        super::team::for_each_mut(&mut tasks, &|idx, dst| {
            one((idx / kv_heads, idx % kv_heads), dst)
        });
    }
}

/// Appends `x` rounded to f16 (to nearest, ties to even).
fn append_f16(cache: &mut Vec<f16>, x: &[f32]) {
    let at = cache.len();
    cache.resize(at + x.len(), f16::ZERO);
    cache[at..].convert_from_f32_slice(x);
}

/// `out[j] = scale · (q · k[j * stride .. j * stride + q.len()])` for every `j < out.len()`.
fn key_scores(q: &[f32], k: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
    let hd = q.len();
    assert!(out.is_empty() || (out.len() - 1) * stride + hd <= k.len());
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Scalar && hd.is_multiple_of(8) && hd <= x86::MAX_HEAD_DIM {
        // SAFETY: `isa()` checked for AVX2, FMA and F16C; the assertion bounds every key read.
        return unsafe { x86::key_scores(q, k, stride, scale, out) };
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = q
            .iter()
            .zip(&k[j * stride..])
            .map(|(a, b)| a * b.to_f32())
            .sum::<f32>()
            * scale;
    }
}

/// `out = Σ_j p[j] · v[j * stride .. j * stride + out.len()]`.
fn weighted_sum(p: &[f32], v: &[f16], stride: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Scalar && out.len().is_multiple_of(8) {
        // SAFETY: `isa()` checked for AVX2, FMA and F16C; every row read lies inside `v` because
        // the caller's cache holds `p.len()` rows of `stride` floats.
        return unsafe { x86::weighted_sum(p, v, stride, out) };
    }
    out.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        for (o, x) in out.iter_mut().zip(&v[j * stride..]) {
            *o += pj * x.to_f32();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// The widest head the vector kernels take (wider ones run the portable loops).
    pub const MAX_HEAD_DIM: usize = 512;

    /// Eight f16 at `p` as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// Eight keys at a time: one accumulator of eight lanes per key, summed across lanes for
    /// all eight at once. A last partial block runs the same operations with rows of zeros
    /// standing in for the missing keys, so every key's score is computed alike wherever it
    /// falls.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn key_scores(q: &[f32], k: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
        const ZEROS: [f16; MAX_HEAD_DIM] = [f16::ZERO; MAX_HEAD_DIM];
        let hd = q.len();
        assert!(hd <= MAX_HEAD_DIM, "head_dim {hd}");
        let scale = _mm256_set1_ps(scale);
        for (b, out) in out.chunks_mut(8).enumerate() {
            let rows: [*const f16; 8] = std::array::from_fn(|j| {
                if j < out.len() {
                    k.as_ptr().add((8 * b + j) * stride)
                } else {
                    ZEROS.as_ptr()
                }
            });
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..hd).step_by(8) {
                let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                for j in 0..8 {
                    acc[j] = _mm256_fmadd_ps(qv, load8(rows[j].add(c)), acc[j]);
                }
            }
            let sums = _mm256_mul_ps(lane_sums(acc), scale);
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
            out.copy_from_slice(&lanes[..out.len()]);
        }
    }

    /// Lane `j` of the result is the sum of the eight lanes of `a[j]`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lane_sums(a: [__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        let (u0, u1) = (_mm256_hadd_ps(t0, t1), _mm256_hadd_ps(t2, t3));
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u0, u1),
            _mm256_permute2f128_ps::<0x31>(u0, u1),
        )
    }

    /// Accumulates 64 output lanes at a time in registers across all rows (then 8 at a time
    /// for the rest of a head width that is not a multiple of 64).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum(p: &[f32], v: &[f16], stride: usize, out: &mut [f32]) {
        let hd = out.len();
        assert!(p.is_empty() || (p.len() - 1) * stride + hd <= v.len());
        let mut c0 = 0;
        while c0 + 64 <= hd {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, &pj) in p.iter().enumerate() {
                let pv = _mm256_set1_ps(pj);
                let row = v.as_ptr().add(j * stride + c0);
                for (c, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(pv, load8(row.add(8 * c)), *acc);
                }
            }
            for (c, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(c0 + 8 * c), *acc);
            }
            c0 += 64;
        }
        while c0 < hd {
            let mut acc = _mm256_setzero_ps();
            for (j, &pj) in p.iter().enumerate() {
                let row = v.as_ptr().add(j * stride + c0);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(pj), load8(row), acc);
            }
            _mm256_storeu_ps(out.as_mut_ptr().add(c0), acc);
            c0 += 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn rotated(rope: &Rope, v: &[f32], pos: usize) -> Vec<f32> {
        let (c, s) = rope.tables(pos, 1);
        let mut v = v.to_vec();
        rope.rotate(&mut v, &c, &s);
        v
    }

    /// Attention written out plainly in f64 (keys and values rounded to f16 as the cache
    /// holds them), with the window and soft-cap of `spec`.
    fn naive(qkv: &[f32], n: usize, spec: &AttentionSpec) -> Vec<f32> {
        let shape = spec.shape;
        let (q_dim, kv_dim, hd) = (shape.q_dim(), shape.kv_dim(), shape.head_dim);
        let width = q_dim + 2 * kv_dim;
        let mut out = vec![0f32; n * q_dim];
        for i in 0..n {
            for h in 0..shape.n_heads {
                let g = h / (shape.n_heads / shape.n_kv_heads);
                let q = rotated(
                    &spec.rope,
                    &qkv[i * width + h * hd..i * width + (h + 1) * hd],
                    i,
                );
                let keys: Vec<usize> = (spec.first_key(i)..=i).collect();
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let k0 = j * width + q_dim + g * hd;
                        let k: Vec<f32> = rotated(&spec.rope, &qkv[k0..k0 + hd], j)
                            .iter()
                            .map(|&x| f16::from_f32(x).to_f32())
                            .collect();
                        let dot = q.iter().zip(&k).map(|(a, b)| (*a * *b) as f64).sum::<f64>()
                            * spec.scale as f64;
                        match spec.softcap {
                            Some(cap) => cap as f64 * (dot / cap as f64).tanh(),
                            None => dot,
                        }
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (&j, sj) in keys.iter().zip(&s) {
                    let v0 = j * width + q_dim + kv_dim + g * hd;
                    for d in 0..hd {
                        let v = f16::from_f32(qkv[v0 + d]).to_f32();
                        out[i * q_dim + h * hd + d] += (((sj - m).exp() / z) * v as f64) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn chunked_attention_matches_naive_and_is_chunking_invariant() {
        let shape = HeadShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let width = shape.q_dim() + 2 * shape.kv_dim();
        let n = 9;
        let qkv: Vec<f32> = (0..n * width)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let variants = [
            (None, None),
            (Some(3), None),
            (None, Some(0.7)),
            (Some(4), Some(1.5)),
        ];
        for layout in [RopeLayout::Interleaved, RopeLayout::HalfSplit] {
            for (window, softcap) in variants {
                let spec = AttentionSpec {
                    shape,
                    rope: Arc::new(Rope::new(layout, 8, 10000.0, None, 1.0)),
                    scale: 1.0 / (8f32).sqrt(),
                    window,
                    softcap,
                };
                let expected = naive(&qkv, n, &spec);
                // All at once.
                let mut cache = HostKv::default();
                let mut all = vec![0f32; n * shape.q_dim()];
                attend(&qkv, n, 0, &mut cache, &spec, &mut all);
                for (a, b) in all.iter().zip(&expected) {
                    assert!((a - b).abs() < 1e-5, "{window:?} {softcap:?}: {a} vs {b}");
                }
                // In chunks of 4, 1, 4: bit-identical to all at once.
                let mut cache = HostKv::default();
                let mut chunked = vec![0f32; n * shape.q_dim()];
                let mut start = 0;
                for len in [4, 1, 4] {
                    let (a, b) = (start * width, (start + len) * width);
                    let (o0, o1) = (start * shape.q_dim(), (start + len) * shape.q_dim());
                    attend(
                        &qkv[a..b],
                        len,
                        start,
                        &mut cache,
                        &spec,
                        &mut chunked[o0..o1],
                    );
                    start += len;
                }
                assert_eq!(all, chunked);
            }
        }
    }

    #[test]
    fn a_window_of_one_attends_only_to_itself() {
        let shape = HeadShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let spec = AttentionSpec {
            shape,
            rope: Arc::new(Rope::new(RopeLayout::HalfSplit, 4, 10000.0, None, 1.0)),
            scale: 0.5,
            window: Some(1),
            softcap: None,
        };
        let qkv: Vec<f32> = (0..3 * 12).map(|i| i as f32 * 0.1).collect();
        let mut out = vec![0f32; 3 * 4];
        attend(&qkv, 3, 0, &mut HostKv::default(), &spec, &mut out);
        for i in 0..3 {
            // Its own value, as the f16 cache holds it.
            let v: Vec<f32> = qkv[i * 12 + 8..i * 12 + 12]
                .iter()
                .map(|&x| f16::from_f32(x).to_f32())
                .collect();
            assert_eq!(&out[i * 4..(i + 1) * 4], &v[..]);
        }
    }
}
