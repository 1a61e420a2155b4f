//! Hook sites: the places inside a forward pass where an intervention may read or rewrite
//! activations.
//!
//! The model defines the sites and calls [`Hooks`] at each of them; it knows nothing about
//! what a hook does. The steering plan (`crate::steering`) implements the trait to add, ablate
//! or clamp directions; extraction implements it to record residuals. A hook that is not
//! [`Hooks::is_active`] at a site costs one virtual call and nothing else.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// Where in block `L` a hook reads or writes (the table in docs/architecture.md).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum HookSite {
    /// Input of block L (for L = 0, the token embeddings).
    ResidPre,
    /// Each attention head's output before the output projection, the heads side by side
    /// (`n_heads * head_dim` wide; head `h` is `[h * head_dim, (h + 1) * head_dim)`).
    AttnHead,
    /// Output of the attention sub-layer, before it is added to the residual stream.
    AttnOut,
    /// The MLP hidden activation `act(gate) * up`: one value per neuron.
    MlpAct,
    /// Output of the MLP sub-layer, before it is added to the residual stream.
    MlpOut,
    /// Output of block L, after the MLP residual add. "Layer L" means this site.
    ResidPost,
}

impl HookSite {
    pub const ALL: [HookSite; 6] = [
        HookSite::ResidPre,
        HookSite::AttnHead,
        HookSite::AttnOut,
        HookSite::MlpAct,
        HookSite::MlpOut,
        HookSite::ResidPost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HookSite::ResidPre => "resid_pre",
            HookSite::AttnHead => "attn_head",
            HookSite::AttnOut => "attn_out",
            HookSite::MlpAct => "mlp_act",
            HookSite::MlpOut => "mlp_out",
            HookSite::ResidPost => "resid_post",
        }
    }

    pub fn parse(s: &str) -> Option<HookSite> {
        HookSite::ALL.into_iter().find(|site| site.as_str() == s)
    }

    /// Index used to address per-site tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The width of the activation at this site in a model of these sizes: the one table of
    /// site widths.
    pub fn width(self, d_model: usize, n_neurons: usize, n_heads: usize, head_dim: usize) -> usize {
        match self {
            HookSite::MlpAct => n_neurons,
            HookSite::AttnHead => n_heads * head_dim,
            _ => d_model,
        }
    }

    /// Whether the activation at this site lives in the residual stream (width `d_model`) rather
    /// than the MLP hidden layer or the attention heads.
    pub fn is_residual_width(self) -> bool {
        !matches!(self, HookSite::MlpAct | HookSite::AttnHead)
    }
}

impl std::fmt::Display for HookSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which sequence and position each row of a packed batch belongs to.
///
/// A forward pass runs over a packed batch: the new tokens of several sequences stacked as rows
/// of one `[rows, width]` matrix. Hooks use this map to act on some rows and not others.
#[derive(Debug, Clone, Default)]
pub struct BatchRows {
    /// For each row: the index of its sequence in the batch.
    pub sequence: Vec<usize>,
    /// For each row: the absolute position of its token in its sequence (0-based).
    pub position: Vec<usize>,
}

impl BatchRows {
    pub fn len(&self) -> usize {
        self.sequence.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sequence.is_empty()
    }
}

/// Callbacks the forward pass makes at every hook site.
pub trait Hooks: Send {
    /// Whether [`Hooks::apply`] needs to be called at this site. Must be cheap.
    fn is_active(&self, site: HookSite, layer: usize) -> bool;

    /// Reads and optionally replaces the activation `x` (`[rows, width]`). Returning `None`
    /// keeps `x` as it is.
    fn apply(
        &mut self,
        site: HookSite,
        layer: usize,
        x: &Tensor,
        rows: &BatchRows,
    ) -> Result<Option<Tensor>>;
}

/// No hooks: the plain forward pass.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl Hooks for NoHooks {
    fn is_active(&self, _site: HookSite, _layer: usize) -> bool {
        false
    }

    fn apply(
        &mut self,
        _site: HookSite,
        _layer: usize,
        _x: &Tensor,
        _rows: &BatchRows,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// Two sets of hooks at once: `first` acts, then `second` sees (and may change) the result.
/// Used to record what an intervention does inside a pass.
pub struct ChainHooks<'a> {
    pub first: &'a mut dyn Hooks,
    pub second: &'a mut dyn Hooks,
}

impl Hooks for ChainHooks<'_> {
    fn is_active(&self, site: HookSite, layer: usize) -> bool {
        self.first.is_active(site, layer) || self.second.is_active(site, layer)
    }

    fn apply(
        &mut self,
        site: HookSite,
        layer: usize,
        x: &Tensor,
        rows: &BatchRows,
    ) -> Result<Option<Tensor>> {
        let a = if self.first.is_active(site, layer) {
            self.first.apply(site, layer, x, rows)?
        } else {
            None
        };
        let x1 = a.as_ref().unwrap_or(x);
        let b = if self.second.is_active(site, layer) {
            self.second.apply(site, layer, x1, rows)?
        } else {
            None
        };
        Ok(b.or(a))
    }
}

/// Runs `x` through the hooks of one site, if any are active.
pub(crate) fn run_hook(
    hooks: &mut dyn Hooks,
    site: HookSite,
    layer: usize,
    x: Tensor,
    rows: &BatchRows,
) -> Result<Tensor> {
    if !hooks.is_active(site, layer) {
        return Ok(x);
    }
    Ok(hooks.apply(site, layer, &x, rows)?.unwrap_or(x))
}

/// Records every row that passes one site of one block, with its token position, across
/// however many forward passes it is used for.
#[derive(Debug, Clone)]
pub struct SiteRecorder {
    pub site: HookSite,
    pub layer: usize,
    pub rows: Vec<Vec<f32>>,
    /// The token position of each recorded row.
    pub positions: Vec<usize>,
    /// Rows at earlier positions are not kept.
    pub from_position: usize,
}

impl SiteRecorder {
    pub fn new(site: HookSite, layer: usize) -> Self {
        Self {
            site,
            layer,
            rows: Vec::new(),
            positions: Vec::new(),
            from_position: 0,
        }
    }
}

impl Hooks for SiteRecorder {
    fn is_active(&self, site: HookSite, layer: usize) -> bool {
        site == self.site && layer == self.layer
    }

    fn apply(
        &mut self,
        _: HookSite,
        _: usize,
        x: &Tensor,
        rows: &BatchRows,
    ) -> Result<Option<Tensor>> {
        for (row, &pos) in x.to_vec2::<f32>()?.into_iter().zip(&rows.position) {
            if pos >= self.from_position {
                self.rows.push(row);
                self.positions.push(pos);
            }
        }
        Ok(None)
    }
}
