//! What a forward pass runs over: a *packed batch* (the new tokens of several sequences
//! stacked as rows, so every matrix product serves all of them at once while attention stays
//! per sequence) and each sequence's KV cache. Both are the same for every architecture.

use super::cpu::attention::HostKv;
use super::hooks::BatchRows;
use candle_core::Tensor;

/// One sequence's share of a packed batch.
#[derive(Debug, Clone)]
pub struct SeqChunk {
    /// First row of this chunk in the batch.
    pub row: usize,
    /// Number of new tokens.
    pub len: usize,
    /// Position of the first new token (= tokens already in the sequence's cache).
    pub start_pos: usize,
    /// Whether to return next-token logits after the chunk's last token.
    pub logits: bool,
    /// Return logits after every token of the chunk instead (scoring a continuation).
    pub all_logits: bool,
    /// The sequence number hooks see for this chunk's rows ([`BatchRows::sequence`]); the
    /// chunk's index unless the caller numbers sequences across several passes.
    pub sequence: usize,
}

/// The new tokens of several sequences, stacked.
#[derive(Debug, Clone, Default)]
pub struct PackedBatch {
    pub tokens: Vec<u32>,
    pub chunks: Vec<SeqChunk>,
}

impl PackedBatch {
    /// Appends `tokens` of a sequence whose cache holds `start_pos` tokens.
    pub fn push(&mut self, tokens: &[u32], start_pos: usize, logits: bool) {
        let sequence = self.chunks.len();
        self.chunks.push(SeqChunk {
            row: self.tokens.len(),
            len: tokens.len(),
            start_pos,
            logits,
            all_logits: false,
            sequence,
        });
        self.tokens.extend_from_slice(tokens);
    }

    /// Appends `tokens` and asks for the logits after each of them.
    pub fn push_scored(&mut self, tokens: &[u32], start_pos: usize) {
        self.push(tokens, start_pos, true);
        if let Some(c) = self.chunks.last_mut() {
            c.all_logits = true;
        }
    }

    /// The sequence and position of every row, for hooks.
    pub fn rows(&self) -> BatchRows {
        let mut rows = BatchRows::default();
        for c in &self.chunks {
            for j in 0..c.len {
                rows.sequence.push(c.sequence);
                rows.position.push(c.start_pos + j);
            }
        }
        rows
    }

    /// The rows whose logits were asked for, in chunk order.
    pub fn logit_rows(&self) -> Vec<u32> {
        self.chunks
            .iter()
            .filter(|c| c.logits && c.len > 0)
            .flat_map(|c| {
                let first = if c.all_logits {
                    c.row
                } else {
                    c.row + c.len - 1
                };
                (first..c.row + c.len).map(|r| r as u32)
            })
            .collect()
    }
}

/// The cached keys and values of one sequence, every layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) len: usize,
    pub(crate) layers: Vec<LayerKv>,
    /// Bytes per cached token (all layers, keys and values; f16 on the host, f32 on a device).
    bytes_per_token: usize,
}

/// One layer's cache, in the form its backend keeps.
#[derive(Debug, Clone)]
pub(crate) enum LayerKv {
    Host(HostKv),
    /// `[n_kv_heads, len, head_dim]` each.
    Device(Option<(Tensor, Tensor)>),
}

impl KvCache {
    /// An empty cache of `n_layers` layers, on the host or on a device.
    pub(crate) fn new(n_layers: usize, host: bool, kv_dim: usize) -> Self {
        let layer = if host {
            LayerKv::Host(HostKv::default())
        } else {
            LayerKv::Device(None)
        };
        Self {
            len: 0,
            layers: vec![layer; n_layers],
            bytes_per_token: n_layers * kv_dim * 2 * if host { 2 } else { 4 },
        }
    }

    /// Number of tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held for the cached keys and values.
    pub fn size_in_bytes(&self) -> usize {
        self.len * self.bytes_per_token
    }

    /// A copy holding only the first `len` tokens: the cache of a prefix, from which a run
    /// that differs only at later positions can go on.
    pub fn prefix(&self, len: usize) -> candle_core::Result<KvCache> {
        let len = len.min(self.len);
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                Ok(match layer {
                    LayerKv::Host(kv) => {
                        let per_token = kv.k.len().checked_div(self.len).unwrap_or(0);
                        LayerKv::Host(HostKv {
                            k: kv.k[..len * per_token].to_vec(),
                            v: kv.v[..len * per_token].to_vec(),
                        })
                    }
                    LayerKv::Device(None) => LayerKv::Device(None),
                    LayerKv::Device(Some(_)) if len == 0 => LayerKv::Device(None),
                    LayerKv::Device(Some((k, v))) => LayerKv::Device(Some((
                        k.narrow(1, 0, len)?.contiguous()?,
                        v.narrow(1, 0, len)?.contiguous()?,
                    ))),
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(KvCache {
            len,
            layers,
            bytes_per_token: self.bytes_per_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_logit_rows_follow_the_chunks() {
        let mut b = PackedBatch::default();
        b.push(&[1, 2, 3], 0, true);
        b.push(&[4], 7, false);
        b.push_scored(&[5, 6], 2);
        let rows = b.rows();
        assert_eq!(rows.sequence, vec![0, 0, 0, 1, 2, 2]);
        assert_eq!(rows.position, vec![0, 1, 2, 7, 2, 3]);
        assert_eq!(b.logit_rows(), vec![2, 4, 5]);
    }
}
