//! A roofline of the CPU matrix products (`tiller bench --roofline`): each product of a
//! model's blocks (weights stacked and stored as the server loads them) and its output head,
//! timed at several batch sizes against two bounds measured on this machine in the same run:
//! the weights' bytes at the memory read bandwidth, and the multiply-adds at the peak rate of
//! the integer instruction the kernels sum with: the tile product `tdpbssd` in the kernels'
//! shapes on a machine with AMX (two byte rows a 16-bit activation), else the 16-bit dot
//! `vpdpwssd` (AVX-512 VNNI) or `vpmaddwd`. Each product is timed over the matrices of every block in turn, as a forward
//! pass meets them, so the weights come from memory rather than from a cache. A product near
//! the first bound is limited by memory; one far from both spends its time unpacking weights
//! and scaling sums.

use super::matmul::{isa, matmul, Isa};
use super::quant::{WeightFormat, WeightMatrix};
use crate::model::checkpoint::Checkpoint;
use crate::model::weights::{names, At, Loader, TensorName};
use crate::model::LoadOptions;
use anyhow::{bail, Result};
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
    /// Multiply-adds per second of the kernels' integer product instruction alone, on every
    /// thread.
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

/// The bounds, then every product at every batch size.
#[derive(Debug, Clone, Serialize)]
pub struct Roofline {
    pub model: String,
    pub layers: usize,
    pub bounds: Bounds,
    pub products: Vec<ProductTiming>,
}

/// Times the products of the checkpoint at `path` (a GGUF file or a Hugging Face folder), its
/// weights stored as `format`, at each batch size, on `threads` (0: one per core).
pub fn measure(
    path: &Path,
    format: WeightFormat,
    batches: &[usize],
    threads: usize,
) -> Result<Roofline> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let (layers, products) = block_products(path, format)?;
    pool.install(|| {
        let bounds = Bounds {
            threads: rayon::current_num_threads(),
            kernels: isa().name(),
            read_gb_s: read_bandwidth() / 1e9,
            peak_g_macs: peak_dot_rate() / 1e9,
        };
        let mut timings = Vec::new();
        for (name, ws) in &products {
            for &m in batches {
                timings.push(time_product(name, ws, m, &bounds));
            }
        }
        Ok(Roofline {
            model: path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            layers,
            bounds,
            products: timings,
        })
    })
}

/// A product's name and its matrix in each block (one for the head).
type Product = (String, Vec<WeightMatrix>);

/// The products of every block as the forward pass multiplies them (q, k, v stacked; gate
/// and up stacked), one matrix per block, then the output head (the token embedding when
/// tied); the number of blocks.
fn block_products(path: &Path, format: WeightFormat) -> Result<(usize, Vec<Product>)> {
    let mut ckpt = Checkpoint::open(path)?;
    let opts = LoadOptions {
        weight_format: format,
        ..LoadOptions::default()
    };
    let mut loader = Loader {
        ckpt: &mut ckpt,
        opts: &opts,
    };
    let layers = (0..)
        .take_while(|&l| loader.has(names::Q, At::Layer(l)))
        .count();
    let shapes: [(&str, &[TensorName]); 4] = [
        ("attn_qkv", &[names::Q, names::K, names::V]),
        ("attn_output", &[names::O]),
        ("ffn_gate_up", &[names::GATE, names::UP]),
        ("ffn_down", &[names::DOWN]),
    ];
    let mut out = Vec::new();
    for (label, parts) in shapes {
        if layers == 0 || !parts.iter().all(|&p| loader.has(p, At::Layer(0))) {
            bail!(
                "{}: no `{label}` weights in the first block (not a model tiller runs)",
                path.display()
            );
        }
        let ws = (0..layers)
            .map(|l| loader.kernel_stack(parts, At::Layer(l)))
            .collect::<Result<Vec<_>>>()?;
        out.push((label.to_string(), ws));
    }
    let (label, head) = if loader.has(names::LM_HEAD, At::Global) {
        ("output", names::LM_HEAD)
    } else {
        ("token_embd (tied head)", names::EMBED)
    };
    out.push((
        label.to_string(),
        vec![loader.kernel_stack(&[head], At::Global)?],
    ));
    Ok((layers, out))
}

/// One product at batch `m`, timed over the blocks' matrices in turn (the same shape each).
fn time_product(name: &str, ws: &[WeightMatrix], m: usize, bounds: &Bounds) -> ProductTiming {
    let (rows, cols) = (ws[0].rows, ws[0].cols);
    let x = crate::testing::pseudo_random(m * cols, 11, 1.0);
    let mut out = vec![0f32; m * rows];
    // On the kernel threads' team, as a forward pass runs them.
    let pass = |out: &mut [f32]| {
        super::team::with_team(|| ws.iter().for_each(|w| matmul(&x, m, w, &mut *out)))
    };
    pass(&mut out);
    let (started, mut reps) = (Instant::now(), 0usize);
    while reps < 3 || started.elapsed().as_secs_f64() < 0.3 {
        pass(&mut out);
        reps += 1;
    }
    let secs = started.elapsed().as_secs_f64() / (reps * ws.len()) as f64;
    let bytes = ws.iter().map(|w| w.size_in_bytes()).sum::<usize>() as f64 / ws.len() as f64;
    let macs = (m * rows * cols) as f64;
    let memory = bytes / (bounds.read_gb_s * 1e9);
    let compute = macs / (bounds.peak_g_macs * 1e9);
    let mut formats: Vec<&str> = ws
        .iter()
        .flat_map(|w| w.formats())
        .map(|(f, _)| f.name())
        .collect();
    formats.sort_unstable();
    formats.dedup();
    let round = |v: f64, digits: i32| (v * 10f64.powi(digits)).round() / 10f64.powi(digits);
    ProductTiming {
        matrix: name.to_string(),
        rows,
        cols,
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

/// Multiply-adds per second of the kernels' integer product instruction on every thread
/// (independent accumulators, so neither latency nor memory limits it; best of three).
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

/// Runs `iters` rounds of the kernels' integer product instruction on independent
/// accumulators; the multiply-adds of 16-bit activations done.
fn dot16_macs(iters: usize) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Amx {
        // SAFETY: `isa()` found the tile units. A tile product is far more work than a dot
        // instruction: fewer rounds take as long.
        return unsafe { super::amx::tile_rounds(iters / 16) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Scalar {
        // SAFETY: `isa()` checked the features each variant is compiled for.
        return unsafe {
            super::x86::dot16_rounds(iters, matches!(isa(), Isa::Avx2Vnni | Isa::Amx))
        };
    }
    let mut acc = [0i32; 8];
    for _ in 0..iters {
        let (a, b) = std::hint::black_box((3i16, 5i16));
        for v in acc.iter_mut() {
            *v = v.wrapping_add(a as i32 * b as i32);
        }
        acc = std::hint::black_box(acc);
    }
    (iters * 8) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{write_tiny_gguf, TinyArch, TinySpec};
    use candle_core::quantized::GgmlDType;

    /// Every block's matrices are stacked as the forward pass stacks them, in the format
    /// asked for, and each product is timed and set against the bounds it is given.
    #[test]
    fn every_block_is_timed_against_both_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec::of(TinyArch::Llama);
        let path = write_tiny_gguf(dir.path(), &spec, GgmlDType::Q4_1).unwrap();
        let (layers, products) = block_products(&path, WeightFormat::Native).unwrap();
        assert_eq!(layers, spec.n_layers);
        let shapes: Vec<(&str, usize, usize, usize)> = products
            .iter()
            .map(|(n, ws)| (n.as_str(), ws.len(), ws[0].rows, ws[0].cols))
            .collect();
        let (d, hd, l) = (spec.d_model, spec.head_dim, spec.n_layers);
        let qkv = (spec.n_heads + 2 * spec.n_kv_heads) * hd;
        assert_eq!(shapes[0], ("attn_qkv", l, qkv, d));
        assert_eq!(shapes[1], ("attn_output", l, d, spec.n_heads * hd));
        assert_eq!(shapes[2], ("ffn_gate_up", l, 2 * spec.ffn, d));
        assert_eq!(shapes[3], ("ffn_down", l, d, spec.ffn));
        assert_eq!(
            (shapes[4].1, shapes[4].3),
            (1, d),
            "one head of d_model inputs"
        );

        let bounds = Bounds {
            threads: 1,
            kernels: isa().name(),
            read_gb_s: 10.0,
            peak_g_macs: 50.0,
        };
        let (name, ws) = &products[2];
        let t = time_product(name, ws, 4, &bounds);
        assert_eq!((t.batch, t.formats.as_str()), (4, "q4_1"));
        let macs = (4 * ws[0].rows * ws[0].cols) as f64;
        assert!(
            (t.compute_bound_micros - macs / 50e9 * 1e6).abs() < 0.1,
            "{t:?}"
        );
        let memory = ws[0].size_in_bytes() as f64 / 10e9 * 1e6;
        assert!((t.memory_bound_micros - memory).abs() < 0.1, "{t:?}");
        assert!(t.micros > 0.0 && t.g_macs > 0.0, "{t:?}");

        // Stored as asked: Q8_0 instead of the file's Q4_1.
        let (_, q8) = block_products(&path, WeightFormat::Q8_0).unwrap();
        assert_eq!(time_product("down", &q8[3].1, 1, &bounds).formats, "q8_0");
        assert!(block_products(dir.path(), WeightFormat::Native).is_err());
    }

    /// The product instruction's measured rate is real work: more rounds take longer, and the
    /// rate is below what the instruction could do at 5 GHz (a 256-bit dot: 16 multiply-adds
    /// a cycle, on up to two ports; a tile product: 512 multiply-adds of 16-bit activations a
    /// cycle).
    #[test]
    fn the_dot_peak_counts_work_the_machine_does() {
        let time = |iters| {
            let t = Instant::now();
            let macs = dot16_macs(iters);
            (macs, t.elapsed().as_secs_f64())
        };
        // The least of several short runs: preemption only ever lengthens a run, so the
        // comparison below cannot fail by the machine being busy.
        let (few, t_few) = (0..5)
            .map(|_| time(1_000_000))
            .fold((0, f64::MAX), |a, b| (b.0, a.1.min(b.1)));
        let (many, t_many) = time(8_000_000);
        assert_eq!(many, 8 * few);
        assert!(
            t_many > 2.0 * t_few,
            "{t_few} s vs {t_many} s: the loop was folded away"
        );
        let per_cycle = if isa() == Isa::Amx { 512.0 } else { 32.0 };
        assert!(
            (many as f64 / t_many) < per_cycle * 5e9,
            "{many} in {t_many} s"
        );
    }
}
