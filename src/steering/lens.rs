//! The logit lens (nostalgebraist 2020): the residual stream after block L read through the
//! model's own final norm and unembedding, as if the model stopped there. At the last layer
//! it is the model's next-token distribution exactly; at earlier ones it shows at which depth a
//! prediction (or a steering vector's effect on it) appears.

use crate::engine::sampling::{log_softmax, top_n};
use crate::model::hooks::{BatchRows, HookSite, Hooks};
use crate::model::Model;
use candle_core::Tensor;

/// Records `resid_post` at chosen layers and positions (carried between a pass's chunks).
pub struct LensHooks {
    layers: Vec<usize>,
    positions: Vec<usize>,
    /// `[layer index][position index]` residual rows.
    pub rows: Vec<Vec<Vec<f32>>>,
}

impl LensHooks {
    pub fn new(layers: Vec<usize>, positions: Vec<usize>) -> Self {
        let rows = vec![vec![Vec::new(); positions.len()]; layers.len()];
        Self {
            layers,
            positions,
            rows,
        }
    }
}

impl Hooks for LensHooks {
    fn is_active(&self, site: HookSite, layer: usize) -> bool {
        site == HookSite::ResidPost && self.layers.contains(&layer)
    }

    fn apply(
        &mut self,
        _: HookSite,
        layer: usize,
        x: &Tensor,
        rows: &BatchRows,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(li) = self.layers.iter().position(|&l| l == layer) else {
            return Ok(None);
        };
        let wanted: Vec<(usize, usize)> = (0..rows.len())
            .filter_map(|r| {
                let p = self.positions.binary_search(&rows.position[r]).ok()?;
                Some((r, p))
            })
            .collect();
        if wanted.is_empty() {
            return Ok(None);
        }
        let h: Vec<Vec<f32>> = x.to_vec2()?;
        for (r, p) in wanted {
            self.rows[li][p] = h[r].clone();
        }
        Ok(None)
    }
}

/// What the lens reads from one residual row.
#[derive(Debug, Clone)]
pub struct LensReading {
    /// The likeliest tokens with their log-probabilities.
    pub top: Vec<(u32, f32)>,
    /// For each target token: its rank (1 = likeliest) and log-probability.
    pub targets: Vec<(usize, f32)>,
}

/// Reads residual rows through the final norm and unembedding.
pub fn read(
    model: &Model,
    rows: &[Vec<f32>],
    top_k: usize,
    targets: &[u32],
) -> anyhow::Result<Vec<LensReading>> {
    let logits = model.unembed(rows)?;
    Ok(logits
        .iter()
        .map(|row| {
            let lp = log_softmax(row);
            let targets = targets
                .iter()
                .map(|&t| {
                    let v = row[t as usize];
                    let rank = 1 + row.iter().filter(|&&x| x > v).count();
                    (rank, lp[t as usize])
                })
                .collect();
            LensReading {
                top: top_n(&lp, top_k),
                targets,
            }
        })
        .collect())
}
