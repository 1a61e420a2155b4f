//! Training a sparse autoencoder on one hook site of the served model (`tiller sae train`).
//!
//! TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): each token keeps its
//! `k` largest pre-activations. Chosen over ReLU with an L1 penalty because L0 is set directly
//! (no sparsity coefficient to tune on a 2-core machine's budget of runs), there is no L1
//! shrinkage of the kept activations, and it is known to leave fewer dead features. Inputs are
//! scaled to a mean norm of `sqrt(d_in)` while training and the scale is folded back into the
//! weights, so the saved SAE reads raw activations. Decoder rows are kept at unit norm (in the
//! scaled space). Adam on the mean squared reconstruction error, seeded shuffles and
//! initialization: the same data and seed give the same SAE.

use super::sae::{Sae, SaeArchitecture, SaeParts};
use crate::model::hooks::{HookSite, SiteRecorder};
use crate::model::Logits;
use crate::model::Model;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Training settings.
#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    pub d_sae: usize,
    pub k: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
}

/// What training achieved, on held-out tokens.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub train_tokens: usize,
    pub heldout_tokens: usize,
    pub steps: usize,
    pub seconds: f64,
    /// Mean active features per held-out token.
    pub l0: f64,
    /// Fraction of variance unexplained on held-out tokens.
    pub fvu: f64,
    /// FVU of the initial SAE (before training), for comparison.
    pub initial_fvu: f64,
    /// Features never active on the held-out tokens.
    pub dead_features: usize,
    pub dead_fraction: f64,
    /// `(step, mean loss over the last steps)` every few steps.
    pub loss_curve: Vec<(usize, f64)>,
}

/// The activations at `(site, layer)` of every token but the first of each sequence, run in
/// packed passes of about `budget` tokens. Returns `[n, width]` flattened and `n`.
pub fn collect_rows(
    model: &Model,
    sequences: &[Vec<u32>],
    site: HookSite,
    layer: usize,
    budget: usize,
) -> Result<(Vec<f32>, usize)> {
    // Each sequence's first token (an attention sink with an outsized norm) is left out.
    let mut rec = SiteRecorder {
        from_position: 1,
        ..SiteRecorder::new(site, layer)
    };
    let seqs: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
    model.run_fresh(&seqs, Logits::None, budget, &mut rec)?;
    let count = rec.rows.len();
    Ok((rec.rows.into_iter().flatten().collect(), count))
}

struct Params {
    w_enc: Var,
    b_enc: Var,
    w_dec: Var,
    b_dec: Var,
}

impl Params {
    fn features(&self, x: &Tensor, k: usize) -> candle_core::Result<Tensor> {
        let pre = x
            .broadcast_sub(self.b_dec.as_tensor())?
            .matmul(self.w_enc.as_tensor())?
            .broadcast_add(self.b_enc.as_tensor())?;
        let detached = pre.detach();
        let (sorted, _) = detached.sort_last_dim(false)?;
        let kth = sorted.narrow(1, k - 1, 1)?;
        let mask = detached.broadcast_ge(&kth)?.to_dtype(DType::F32)?;
        pre.relu()? * mask
    }

    fn reconstruct(&self, f: &Tensor) -> candle_core::Result<Tensor> {
        f.matmul(self.w_dec.as_tensor())?
            .broadcast_add(self.b_dec.as_tensor())
    }

    /// Scales every decoder row to unit norm.
    fn normalize_decoder(&self) -> candle_core::Result<()> {
        let w = self.w_dec.as_tensor();
        let norms = w.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-8, f64::MAX)?;
        self.w_dec.set(&w.broadcast_div(&norms)?)
    }
}

/// FVU, mean L0 and per-feature activity of `params` on rows `x` (scaled space).
fn evaluate(p: &Params, x: &Tensor, k: usize) -> Result<(f64, f64, Vec<bool>)> {
    let f = p.features(x, k)?;
    let xh = p.reconstruct(&f)?;
    let err = (xh - x)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let mean = x.mean_keepdim(0)?;
    let var = x
        .broadcast_sub(&mean)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    let n = x.dim(0)?;
    let active = f.gt(0f32)?.to_dtype(DType::F32)?;
    let l0 = active.sum_all()?.to_scalar::<f32>()? as f64 / n.max(1) as f64;
    let used: Vec<f32> = active.sum(0)?.to_vec1()?;
    Ok((
        if var > 0.0 { err / var } else { 0.0 },
        l0,
        used.iter().map(|&u| u > 0.0).collect(),
    ))
}

/// Trains a TopK SAE on rows `x` (`[n, d_in]`); the last 5% of rows are held out.
pub fn train(
    name: &str,
    hook_name: &str,
    x: &[f32],
    n: usize,
    d_in: usize,
    cfg: &TrainConfig,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<(Sae, TrainReport)> {
    if n < 20 || cfg.k == 0 || cfg.k > cfg.d_sae || cfg.batch == 0 {
        bail!(
            "need at least 20 rows and 1 <= k <= d_sae (got {n} rows, k {}, d_sae {})",
            cfg.k,
            cfg.d_sae
        );
    }
    let started = std::time::Instant::now();
    let dev = Device::Cpu;
    // Scale so the mean row norm is sqrt(d_in).
    let mean_norm = x
        .chunks(d_in)
        .map(|r| r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt())
        .sum::<f64>()
        / n as f64;
    let scale = (mean_norm / (d_in as f64).sqrt()).max(1e-8);
    let xs: Vec<f32> = x.iter().map(|v| (*v as f64 / scale) as f32).collect();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let held = (n / 20).max(1);
    let (held_idx, train_idx) = order.split_at(held);
    let rows_of = |idx: &[usize]| -> Result<Tensor> {
        let mut v = Vec::with_capacity(idx.len() * d_in);
        for &i in idx {
            v.extend_from_slice(&xs[i * d_in..(i + 1) * d_in]);
        }
        Ok(Tensor::from_vec(v, (idx.len(), d_in), &dev)?)
    };
    let held_x = rows_of(held_idx)?;
    let train_x = rows_of(train_idx)?;
    let mean: Vec<f32> = train_x.mean(0)?.to_vec1()?;
    // Decoder rows: random unit vectors; encoder: their transpose.
    let w: Vec<f32> = (0..cfg.d_sae * d_in)
        .map(|_| {
            // Box-Muller from the seeded generator.
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect();
    let w_dec = Tensor::from_vec(w, (cfg.d_sae, d_in), &dev)?;
    let p = Params {
        w_enc: Var::from_tensor(&w_dec.t()?.contiguous()?)?,
        b_enc: Var::from_tensor(&Tensor::zeros(cfg.d_sae, DType::F32, &dev)?)?,
        w_dec: Var::from_tensor(&w_dec)?,
        b_dec: Var::from_tensor(&Tensor::from_vec(mean, d_in, &dev)?)?,
    };
    p.normalize_decoder()?;
    p.w_enc.set(&p.w_dec.as_tensor().t()?.contiguous()?)?;
    let (initial_fvu, _, _) = evaluate(&p, &held_x, cfg.k)?;
    let mut opt = AdamW::new(
        vec![
            p.w_enc.clone(),
            p.b_enc.clone(),
            p.w_dec.clone(),
            p.b_dec.clone(),
        ],
        ParamsAdamW {
            lr: cfg.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let n_train = train_idx.len();
    let steps_per_epoch = n_train.div_ceil(cfg.batch);
    let total = steps_per_epoch * cfg.epochs;
    let mut step = 0;
    let mut curve = Vec::new();
    let mut recent = Vec::new();
    let mut perm: Vec<u32> = (0..n_train as u32).collect();
    for _ in 0..cfg.epochs {
        perm.shuffle(&mut rng);
        for chunk in perm.chunks(cfg.batch) {
            let idx = Tensor::new(chunk, &dev)?;
            let xb = train_x.index_select(&idx, 0)?;
            let f = p.features(&xb, cfg.k)?;
            let loss = (p.reconstruct(&f)? - &xb)?.sqr()?.sum(1)?.mean_all()?;
            opt.backward_step(&loss)?;
            p.normalize_decoder()?;
            step += 1;
            recent.push(loss.to_scalar::<f32>()? as f64);
            if step % 10 == 0 || step == total {
                let m = recent.iter().sum::<f64>() / recent.len() as f64;
                curve.push((step, m));
                progress(step, total, m);
                recent.clear();
            }
        }
    }
    let (fvu, l0, used) = evaluate(&p, &held_x, cfg.k)?;
    let dead = used.iter().filter(|u| !**u).count();
    // Fold the input scale into the weights: the SAE reads raw activations.
    let s = scale as f32;
    let parts = SaeParts {
        w_enc: (p.w_enc.as_tensor() / scale)?.flatten_all()?.to_vec1()?,
        w_dec: (p.w_dec.as_tensor() * scale)?.flatten_all()?.to_vec1()?,
        b_enc: p.b_enc.as_tensor().to_vec1()?,
        b_dec: p
            .b_dec
            .as_tensor()
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| v * s)
            .collect(),
        threshold: None,
        d_in,
        d_sae: cfg.d_sae,
    };
    let sae = Sae::new(
        name,
        parts,
        SaeArchitecture::Topk { k: cfg.k },
        true,
        hook_name,
    )?;
    Ok((
        sae,
        TrainReport {
            train_tokens: n_train,
            heldout_tokens: held,
            steps: step,
            seconds: started.elapsed().as_secs_f64(),
            l0,
            fvu,
            initial_fvu,
            dead_features: dead,
            dead_fraction: dead as f64 / cfg.d_sae as f64,
            loss_curve: curve,
        },
    ))
}
