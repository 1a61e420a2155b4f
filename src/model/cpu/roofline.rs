//! A roofline of the CPU matrix products (`tiller bench --roofline`): every weight matrix of
//! one block of a GGUF model, stacked as the forward pass stacks them, and its output head,
//! each timed at several batch sizes against two bounds measured on this machine in the same
//! run: its weights' bytes at the memory read bandwidth, and its multiply-adds at the peak
//! rate of the 16-bit integer dot instruction the kernels sum with (`vpdpwssd` with AVX-512
//! VNNI, else `vpmaddwd`). A product near the first bound is limited by memory; one far from
//! both spends its time unpacking weights and scaling sums.

use super::matmul::{isa, matmul};
use super::quant::{WeightFormat, WeightMatrix};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::Device;
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// The machine's two bounds.
#[derive(Debug, Clone, Serialize)]
pub struct Bounds {
    pub threads: usize,
    pub kernels: &'static str,
    /// Memory read bandwidth, all threads summing one buffer far larger than the caches.
    pub read_gb_s: f64,
    /// Multiply-adds per second of the 16-bit dot instruction alone, on every thread.
    pub peak_g_macs: f64,
}

/// One product: a weight matrix against `batch` activation rows.
#[derive(Debug, Clone, Serialize)]
pub struct ProductTiming {
    pub matrix: String,
    pub rows: usize,
    pub cols: usize,
    pub formats: String,
    pub batch: usize,
    pub micros: f64,
    pub g_macs: f64,
    /// Weight bytes read per second.
    pub weight_gb_s: f64,
    /// The product's time at the memory bound, then at the compute bound.
    pub memory_bound_micros: f64,
    pub compute_bound_micros: f64,
    /// The larger bound over the measured time: 1.0 is at the roofline.
    pub of_roofline: f64,
}

/// The bounds, then every product at every batch size; `layers` blocks of the model share
/// the timed block's shapes.
#[derive(Debug, Clone, Serialize)]
pub struct Roofline {
    pub model: String,
    pub layers: usize,
    pub bounds: Bounds,
    pub products: Vec<ProductTiming>,
}

/// Times the products of `gguf`'s first block and head at each batch size, on `threads`
/// (0: one per core).
pub fn measure(gguf: &Path, batches: &[usize], threads: usize) -> Result<Roofline> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let (layers, matrices) = first_block(gguf)?;
    pool.install(|| {
        let bounds = Bounds {
            threads: rayon::current_num_threads(),
            kernels: isa().name(),
            read_gb_s: read_bandwidth() / 1e9,
            peak_g_macs: peak_dot_rate() / 1e9,
        };
        let mut products = Vec::new();
        for (name, w) in &matrices {
            for &m in batches {
                products.push(time_product(name, w, m, &bounds));
            }
        }
        Ok(Roofline {
            model: gguf
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            layers,
            bounds,
            products,
        })
    })
}

/// The first block's matrices as the forward pass multiplies them (q, k, v stacked; gate and
/// up stacked), and the output head (the token embedding when tied); the number of blocks.
fn first_block(gguf: &Path) -> Result<(usize, Vec<(String, WeightMatrix)>)> {
    let mut file =
        std::fs::File::open(gguf).with_context(|| format!("opening {}", gguf.display()))?;
    let content = gguf_file::Content::read(&mut file)?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let layers = content
        .metadata
        .get(&format!("{arch}.block_count"))
        .and_then(|v| v.to_u32().ok())
        .unwrap_or(0) as usize;
    let mut load = |name: &str| -> Result<Option<WeightMatrix>> {
        if !content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let t = content.tensor(&mut file, name, &Device::Cpu)?;
        Ok(Some(WeightMatrix::from_qtensor(&t, WeightFormat::Native)?))
    };
    let mut stacked = |names: &[&str]| -> Result<Option<WeightMatrix>> {
        let mut parts = Vec::new();
        for n in names {
            let Some(w) = load(&format!("blk.0.{n}.weight"))? else {
                return Ok(None);
            };
            parts.push(w);
        }
        Ok(Some(WeightMatrix::stack(parts)?))
    };
    let mut out = Vec::new();
    for (label, names) in [
        ("attn_qkv", &["attn_q", "attn_k", "attn_v"][..]),
        ("attn_output", &["attn_output"]),
        ("ffn_gate_up", &["ffn_gate", "ffn_up"]),
        ("ffn_down", &["ffn_down"]),
    ] {
        if let Some(w) = stacked(names)? {
            out.push((label.to_string(), w));
        }
    }
    let head = match load("output.weight")? {
        Some(w) => Some(("output".to_string(), w)),
        None => load("token_embd.weight")?.map(|w| ("token_embd (tied head)".to_string(), w)),
    };
    out.extend(head);
    if out.len() < 5 || layers == 0 {
        bail!(
            "{} is not a GGUF model with the block matrices expected",
            gguf.display()
        );
    }
    Ok((layers, out))
}

fn time_product(name: &str, w: &WeightMatrix, m: usize, bounds: &Bounds) -> ProductTiming {
    let x = crate::testing::pseudo_random(m * w.cols, 11, 1.0);
    let mut out = vec![0f32; m * w.rows];
    matmul(&x, m, w, &mut out);
    let (started, mut reps) = (Instant::now(), 0u32);
    while reps < 3 || started.elapsed().as_secs_f64() < 0.3 {
        matmul(&x, m, w, &mut out);
        reps += 1;
    }
    let secs = started.elapsed().as_secs_f64() / reps as f64;
    let (macs, bytes) = ((m * w.rows * w.cols) as f64, w.size_in_bytes() as f64);
    let memory = bytes / (bounds.read_gb_s * 1e9);
    let compute = macs / (bounds.peak_g_macs * 1e9);
    let mut formats: Vec<&str> = w.formats().iter().map(|(f, _)| f.name()).collect();
    formats.dedup();
    let round = |v: f64, digits: i32| (v * 10f64.powi(digits)).round() / 10f64.powi(digits);
    ProductTiming {
        matrix: name.to_string(),
        rows: w.rows,
        cols: w.cols,
        formats: formats.join("+"),
        batch: m,
        micros: round(secs * 1e6, 1),
        g_macs: round(macs / secs / 1e9, 2),
        weight_gb_s: round(bytes / secs / 1e9, 2),
        memory_bound_micros: round(memory * 1e6, 1),
        compute_bound_micros: round(compute * 1e6, 1),
        of_roofline: round(memory.max(compute) / secs, 3),
    }
}

/// Bytes per second all threads read summing a 512 MiB buffer (best of three).
fn read_bandwidth() -> f64 {
    let buf = vec![1u64; 64 << 20];
    let chunk = buf.len() / (rayon::current_num_threads() * 8);
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let s: u64 = buf
                .par_chunks(chunk)
                .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
                .sum();
            std::hint::black_box(s);
            (buf.len() * 8) as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// Multiply-adds per second of the kernels' 16-bit dot instruction on every thread (eight
/// independent accumulators, so neither latency nor memory limits it; best of three).
fn peak_dot_rate() -> f64 {
    const ITERS: usize = 20_000_000;
    let threads = rayon::current_num_threads();
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let macs: u64 = (0..threads)
                .into_par_iter()
                .map(|_| dot16_macs(std::hint::black_box(ITERS)))
                .sum();
            macs as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// Runs `iters` rounds of eight 16-bit dot instructions; the multiply-adds done.
fn dot16_macs(iters: usize) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if isa() != super::matmul::Isa::Scalar {
        // SAFETY: `isa()` checked the features each variant is compiled for.
        return unsafe { super::x86::dot16_rounds(iters, isa() == super::matmul::Isa::Avx2Vnni) };
    }
    let (mut acc, a, b) = (
        [0i32; 8],
        std::hint::black_box(3i16),
        std::hint::black_box(5i16),
    );
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = v.wrapping_add(a as i32 * b as i32);
        }
    }
    std::hint::black_box(acc);
    (iters * 8) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{write_tiny_gguf, TinyArch, TinySpec};
    use candle_core::quantized::GgmlDType;

    /// The block's matrices are stacked as the forward pass stacks them, and each product is
    /// timed and set against the bounds it is given.
    #[test]
    fn a_block_is_timed_against_both_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec::of(TinyArch::Llama);
        let path = write_tiny_gguf(dir.path(), &spec, GgmlDType::Q8_0).unwrap();
        let (layers, matrices) = first_block(&path).unwrap();
        assert_eq!(layers, spec.n_layers);
        let shapes: Vec<(&str, usize, usize)> = matrices
            .iter()
            .map(|(n, w)| (n.as_str(), w.rows, w.cols))
            .collect();
        let (d, hd) = (spec.d_model, spec.head_dim);
        let qkv = (spec.n_heads + 2 * spec.n_kv_heads) * hd;
        assert_eq!(shapes[0], ("attn_qkv", qkv, d));
        assert_eq!(shapes[1], ("attn_output", d, spec.n_heads * hd));
        assert_eq!(shapes[2], ("ffn_gate_up", 2 * spec.ffn, d));
        assert_eq!(shapes[3], ("ffn_down", d, spec.ffn));
        assert_eq!(shapes[4].2, d, "the head reads d_model columns");

        let bounds = Bounds {
            threads: 1,
            kernels: isa().name(),
            read_gb_s: 10.0,
            peak_g_macs: 50.0,
        };
        let (name, w) = &matrices[2];
        let t = time_product(name, w, 4, &bounds);
        assert_eq!((t.batch, t.formats.as_str()), (4, "q8_0"));
        let macs = (4 * w.rows * w.cols) as f64;
        assert!(
            (t.compute_bound_micros - macs / 50e9 * 1e6).abs() < 0.1,
            "{t:?}"
        );
        let memory = w.size_in_bytes() as f64 / 10e9 * 1e6;
        assert!((t.memory_bound_micros - memory).abs() < 0.1, "{t:?}");
        assert!(t.micros > 0.0 && t.g_macs > 0.0, "{t:?}");
        assert!(
            first_block(dir.path()).is_err(),
            "a folder is not a GGUF file"
        );
    }
}
