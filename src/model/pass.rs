//! The context of one forward pass, threaded through every block of every architecture: the
//! packed batch, the sequences' caches, the hooks and where each row belongs. Blocks call
//! [`Pass::hook`] at every hook site and [`Pass::add_to_residual`] for each write into the
//! residual stream, so an architecture gets steering, recording and inspection by calling
//! these two, and the sites mean the same thing in every architecture.

use super::batch::{KvCache, PackedBatch};
use super::hooks::{run_hook, BatchRows, HookSite, Hooks};
use super::Backend;
use candle_core::{Device, Tensor};

/// One forward pass in progress.
pub struct Pass<'a, 'c> {
    pub batch: &'a PackedBatch,
    pub caches: &'a mut [&'c mut KvCache],
    pub rows: BatchRows,
    pub backend: Backend,
    pub device: &'a Device,
    hooks: &'a mut dyn Hooks,
}

impl<'a, 'c> Pass<'a, 'c> {
    pub fn new(
        batch: &'a PackedBatch,
        caches: &'a mut [&'c mut KvCache],
        hooks: &'a mut dyn Hooks,
        backend: Backend,
        device: &'a Device,
    ) -> Self {
        Self {
            rows: batch.rows(),
            batch,
            caches,
            backend,
            device,
            hooks,
        }
    }

    /// Passes activation `x` of `site` in block `layer` through the hooks.
    pub fn hook(&mut self, site: HookSite, layer: usize, x: Tensor) -> anyhow::Result<Tensor> {
        Ok(run_hook(self.hooks, site, layer, x, &self.rows)?)
    }

    /// `x + out`, where `out` (a sub-layer's output, after any post-norm: exactly what is
    /// added to the residual stream) first passes the hook of `site`.
    pub fn add_to_residual(
        &mut self,
        site: HookSite,
        layer: usize,
        x: &Tensor,
        out: Tensor,
    ) -> anyhow::Result<Tensor> {
        let out = self.hook(site, layer, out)?;
        Ok((x + out)?)
    }
}
