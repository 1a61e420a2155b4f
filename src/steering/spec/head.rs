//! Attention-head interventions: the `head` an intervention names at the `attn_head` site,
//! and the head ops (`zero`, `mean`, `scale`: head ablation and mean ablation, as in
//! Michel et al. 2019 and Wang et al. 2022's circuit work) that act on one head alone.

use super::validate::{name_of_means, Validator, HEAD_OPS};
use super::*;

impl Validator<'_> {
    /// The attention head named, checked against the model and the site.
    pub(super) fn head(&self, s: &InterventionSpec) -> Result<Option<usize>, SpecError> {
        let Some(h) = s.head else { return Ok(None) };
        if s.site.is_some_and(|site| site != HookSite::AttnHead) {
            return Err(self.err(
                "head",
                "invalid_site",
                "`head` addresses the `attn_head` site",
            ));
        }
        let n = self.ctx.n_heads;
        if h < 0 || h as usize >= n {
            return Err(self.err(
                "head",
                "invalid_head",
                format!(
                    "head {h} is out of range: attention layers have {n} heads (0-{})",
                    n - 1
                ),
            ));
        }
        Ok(Some(h as usize))
    }

    /// `(start, len)` of head `h` in the `attn_head` activation.
    pub(super) fn head_span(&self, h: usize) -> (usize, usize) {
        (h * self.ctx.head_dim, self.ctx.head_dim)
    }

    /// `zero`, `mean` or `scale` of one attention head.
    pub(super) fn head_op(
        &self,
        s: &InterventionSpec,
        head: usize,
        coefficient: Option<f64>,
        positions: Positions,
    ) -> Result<Intervention, SpecError> {
        let layers = self.layers(s)?.ok_or_else(|| {
            self.err(
                "layer",
                "missing_layer",
                "a head op needs `layer` or `layers`",
            )
        })?;
        let op = s.op.unwrap_or(OpName::Zero);
        let (action, coef) = match op {
            OpName::Zero => (HeadAction::Zero, None),
            OpName::Mean => (HeadAction::Mean, None),
            OpName::Scale => {
                let c = coefficient.ok_or_else(|| {
                    self.err(
                        "coefficient",
                        "missing_coefficient",
                        "`scale` needs a coefficient (the factor)",
                    )
                })?;
                (HeadAction::Scale(c as f32), Some(c))
            }
            other => {
                return Err(self.err(
                    "op",
                    "invalid_op",
                    format!(
                        "`{other}` does not act on a head alone; use {} (or give `vector` or \
                         `values` for a direction in the head)",
                        OpName::list(&HEAD_OPS)
                    ),
                ))
            }
        };
        let span = self.head_span(head);
        let mut points = Vec::with_capacity(layers.len());
        for &layer in &layers {
            let vector = match action {
                HeadAction::Mean => {
                    let means = self.stored_means(s, VectorKind::HeadMeans, layer)?;
                    Some(means[span.0..span.0 + span.1].into())
                }
                _ => None,
            };
            points.push(HookPoint {
                site: HookSite::AttnHead,
                layer,
                vector,
                span: Some(span),
            });
        }
        Ok(Intervention {
            op: Op::Head(action),
            positions,
            schedule: None,
            when: None,
            points,
            applied: AppliedIntervention {
                op,
                vector: (op == OpName::Mean).then(|| name_of_means(s, VectorKind::HeadMeans)),
                vector_version: None,
                neuron: None,
                head: Some(head),
                feature: None,
                coefficient: coef,
                layers,
                site: Some(HookSite::AttnHead),
                positions,
                normalize: false,
                vector_norm: None,
                all_writes: false,
                values: None,
                schedule: None,
                when: None,
            },
        })
    }
}
