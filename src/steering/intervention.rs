//! Applying steering plans inside the forward pass: [`BatchSteering`] implements the model's
//! [`Hooks`] for a packed batch in which every sequence may carry its own plan (or none).
//!
//! At each hook point the activations `[rows, width]` are rewritten row by row: a row is
//! touched only by the plan of its own sequence, and only at the positions that plan selects.
//! The arithmetic of each op is in [`apply_op`], kept free of tensors so it can be checked
//! exactly.

use super::spec::{ConditionScope, HeadAction, HookPoint, NeuronAction, Op, SteeringPlan};
use crate::model::hooks::{BatchRows, HookSite, Hooks};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Rewrites one activation row `h` (the point's span of it, for a head) for one intervention
/// at one hook point; `strength` (1 for full, less where a schedule fades) scales what `add`
/// adds.
pub fn apply_op(op: &Op, point: &HookPoint, h: &mut [f32], strength: f32) {
    match op {
        Op::Add => {
            if let Some(delta) = &point.vector {
                if strength == 1.0 {
                    for (x, d) in h.iter_mut().zip(delta.iter()) {
                        *x += d;
                    }
                } else {
                    for (x, d) in h.iter_mut().zip(delta.iter()) {
                        *x += strength * d;
                    }
                }
            }
        }
        Op::Ablate | Op::Clamp { .. } => {
            let Some(u) = &point.vector else { return };
            let proj: f64 = h
                .iter()
                .zip(u.iter())
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            let shift = match op {
                Op::Clamp { value } => *value as f64 - proj,
                _ => -proj,
            };
            for (x, d) in h.iter_mut().zip(u.iter()) {
                *x = (*x as f64 + shift * *d as f64) as f32;
            }
        }
        Op::FeatureClamp { sae, index, value } => {
            let shift = value - sae.feature_activation(h, *index);
            for (x, d) in h.iter_mut().zip(sae.decoder_row(*index)) {
                *x += shift * d;
            }
        }
        Op::Head(action) => match action {
            HeadAction::Zero => h.fill(0.0),
            HeadAction::Scale(c) => h.iter_mut().for_each(|x| *x *= c),
            HeadAction::Mean => {
                if let Some(mean) = &point.vector {
                    h.iter_mut().zip(mean.iter()).for_each(|(x, m)| *x = *m);
                }
            }
        },
        Op::Neuron { index, action } => {
            if let Some(x) = h.get_mut(*index) {
                *x = match *action {
                    NeuronAction::Zero => 0.0,
                    NeuronAction::Scale(c) => *x * c,
                    NeuronAction::Set(c) => c,
                };
            }
        }
    }
}

/// What the conditions of one sequence's plan have read so far; it travels with the sequence
/// from pass to pass (`scope: prompt` sums over the prompt's chunks).
#[derive(Debug, Clone, Default)]
pub struct ConditionTrace {
    /// Per intervention of the plan, by index.
    pub conditions: Vec<ConditionState>,
}

#[derive(Debug, Clone, Default)]
pub struct ConditionState {
    sum: f64,
    count: usize,
    /// `scope: prompt`: the decision and the mean it was made on, once the prompt is read.
    pub decided: Option<(bool, f32)>,
    /// `scope: token`: the positions at which it held.
    pub fired_positions: Vec<usize>,
}

/// Whether and where a conditional intervention acted, for the response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConditionReport {
    /// The intervention's index in the request's `steering`.
    #[schema(example = 0)]
    pub intervention: usize,
    /// `prompt` or `token`, as the condition was given.
    pub scope: ConditionScope,
    /// `prompt`: whether the condition held; `token`: whether it held on any generated
    /// token's pass.
    #[schema(example = true)]
    pub fired: bool,
    /// `prompt`: the mean reading it was decided on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 0.21)]
    pub value: Option<f32>,
    /// `token`: the generated tokens (0-based) whose passes it held on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = json!([0, 1, 4]))]
    pub tokens: Option<Vec<usize>>,
    /// `token`: how many prompt tokens it held on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 3)]
    pub prompt_tokens: Option<usize>,
}

impl ConditionTrace {
    /// One report per conditional intervention of `plan`, for a sequence that kept
    /// `generated` tokens (the pass that chose an end-of-sequence token is left out).
    pub fn report(
        &self,
        plan: &SteeringPlan,
        prompt_len: usize,
        generated: usize,
    ) -> Vec<ConditionReport> {
        plan.interventions
            .iter()
            .enumerate()
            .filter_map(|(i, iv)| {
                let c = iv.when.as_ref()?;
                let state = self.conditions.get(i).cloned().unwrap_or_default();
                Some(match c.scope {
                    ConditionScope::Prompt => ConditionReport {
                        intervention: i,
                        scope: c.scope,
                        fired: state.decided.is_some_and(|(f, _)| f),
                        value: state.decided.map(|(_, v)| v),
                        tokens: None,
                        prompt_tokens: None,
                    },
                    ConditionScope::Token => {
                        let (kept, prompt): (Vec<usize>, Vec<usize>) = state
                            .fired_positions
                            .iter()
                            .partition(|&&p| p + 1 >= prompt_len);
                        let tokens: Vec<usize> = kept
                            .iter()
                            .map(|p| p + 1 - prompt_len)
                            .filter(|&t| t < generated)
                            .collect();
                        ConditionReport {
                            intervention: i,
                            scope: c.scope,
                            fired: !tokens.is_empty(),
                            value: None,
                            tokens: Some(tokens),
                            prompt_tokens: Some(prompt.len()),
                        }
                    }
                })
            })
            .collect()
    }
}

/// The compact form of condition reports, for the `X-Steering-Fired` header: `0:fired`,
/// `1:not_fired`, `2:tokens=0-3+7` (generated tokens, as layer lists are written).
pub fn format_fired(reports: &[ConditionReport]) -> String {
    reports
        .iter()
        .map(|r| match &r.tokens {
            None if r.fired => format!("{}:fired", r.intervention),
            None => format!("{}:not_fired", r.intervention),
            Some(t) if t.is_empty() => format!("{}:tokens=none", r.intervention),
            Some(t) => format!("{}:tokens={}", r.intervention, super::compact::runs(t)),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The plans of one packed batch, as model hooks.
pub struct BatchSteering<'a> {
    /// For each sequence of the batch: its plan (if steered) and prompt length.
    sequences: Vec<(Option<&'a SteeringPlan>, usize)>,
    /// `active[site * n_layers + layer]`: whether any plan acts or reads a condition there.
    active: Vec<bool>,
    n_layers: usize,
    /// For each sequence: what its conditions have read (empty when it has none).
    traces: Vec<ConditionTrace>,
    /// Whether any plan of the batch has a condition.
    conditional: bool,
    /// `scope: token` decisions of this pass: `(sequence, position, intervention)`.
    token_fired: HashMap<(usize, usize, usize), bool>,
    /// `scope: prompt` conditions decided during this pass: `(sequence, intervention)`; the
    /// rest of the pass (every row, at the later hook points) may act.
    decided_now: std::collections::HashSet<(usize, usize)>,
    /// Interventions applied to rows in this batch, by op name (for metrics).
    pub applied: std::collections::BTreeMap<&'static str, u64>,
}

impl<'a> BatchSteering<'a> {
    /// `sequences[i]` is the plan and prompt length of the batch's sequence `i`.
    pub fn new(n_layers: usize, sequences: Vec<(Option<&'a SteeringPlan>, usize)>) -> Self {
        let mut active = vec![false; HookSite::ALL.len() * n_layers];
        for (plan, _) in &sequences {
            for (site, layer) in plan.iter().flat_map(|p| p.hook_points()) {
                if layer < n_layers {
                    active[site.index() * n_layers + layer] = true;
                }
            }
        }
        let conditional = sequences
            .iter()
            .any(|(p, _)| p.is_some_and(|p| p.has_conditions()));
        Self {
            conditional,
            traces: vec![ConditionTrace::default(); sequences.len()],
            sequences,
            active,
            n_layers,
            token_fired: HashMap::new(),
            decided_now: Default::default(),
            applied: Default::default(),
        }
    }

    /// Carries on from what earlier passes' conditions read (one trace per sequence).
    pub fn with_traces(mut self, traces: Vec<ConditionTrace>) -> Self {
        for (slot, t) in self.traces.iter_mut().zip(traces) {
            *slot = t;
        }
        self
    }

    /// What the conditions have read, for the next pass (one trace per sequence).
    pub fn into_traces(self) -> Vec<ConditionTrace> {
        self.traces
    }

    /// Reads the conditions at this hook point on the rows (before anything acts there).
    /// Costs nothing when no plan of the batch has a condition.
    fn read_conditions(
        &mut self,
        site: HookSite,
        layer: usize,
        data: &[f32],
        width: usize,
        rows: &BatchRows,
    ) {
        if !self.conditional {
            return;
        }
        for (r, h) in data.chunks(width).enumerate() {
            let seq = rows.sequence[r];
            let Some(&(Some(plan), prompt_len)) = self.sequences.get(seq) else {
                continue;
            };
            let pos = rows.position[r];
            for &i in plan.conditions_at(site, layer) {
                let Some(c) = &plan.interventions[i].when else {
                    continue;
                };
                let trace = &mut self.traces[seq].conditions;
                if trace.len() < plan.interventions.len() {
                    trace.resize(plan.interventions.len(), ConditionState::default());
                }
                let state = &mut trace[i];
                match c.scope {
                    ConditionScope::Prompt => {
                        if pos >= prompt_len {
                            continue;
                        }
                        // The first token (an attention sink) is left out unless it is all.
                        if pos > 0 || prompt_len == 1 {
                            state.sum += c.read(h) as f64;
                            state.count += 1;
                        }
                        if pos + 1 == prompt_len {
                            let mean = (state.sum / state.count.max(1) as f64) as f32;
                            state.decided = Some((c.holds(mean), mean));
                            self.decided_now.insert((seq, i));
                        }
                    }
                    ConditionScope::Token => {
                        let holds = c.holds(c.read(h));
                        if holds {
                            state.fired_positions.push(pos);
                        }
                        self.token_fired.insert((seq, pos, i), holds);
                    }
                }
            }
        }
    }

    /// Whether intervention `i` of sequence `seq`'s plan may act on the row at `pos`.
    fn condition_allows(
        &self,
        seq: usize,
        i: usize,
        pos: usize,
        prompt_len: usize,
        scope: ConditionScope,
    ) -> bool {
        match scope {
            ConditionScope::Prompt => {
                (pos + 1 >= prompt_len || self.decided_now.contains(&(seq, i)))
                    && self.traces[seq]
                        .conditions
                        .get(i)
                        .and_then(|s| s.decided)
                        .is_some_and(|(fired, _)| fired)
            }
            ConditionScope::Token => self.token_fired.get(&(seq, pos, i)) == Some(&true),
        }
    }

    /// Whether any sequence is steered.
    pub fn any(&self) -> bool {
        self.active.iter().any(|&a| a)
    }
}

impl Hooks for BatchSteering<'_> {
    fn is_active(&self, site: HookSite, layer: usize) -> bool {
        layer < self.n_layers && self.active[site.index() * self.n_layers + layer]
    }

    fn apply(
        &mut self,
        site: HookSite,
        layer: usize,
        x: &Tensor,
        rows: &BatchRows,
    ) -> Result<Option<Tensor>> {
        let (n, width) = x.dims2()?;
        let mut data: Vec<f32> = x.flatten_all()?.to_vec1()?;
        self.read_conditions(site, layer, &data, width, rows);
        let mut touched = false;
        for (r, h) in data.chunks_mut(width).enumerate().take(n) {
            let seq = rows.sequence[r];
            let Some(&(Some(plan), prompt_len)) = self.sequences.get(seq) else {
                continue;
            };
            for (i, iv, point) in plan.at(site, layer) {
                let (pos, plen) = (rows.position[r], prompt_len);
                if let Some(c) = &iv.when {
                    if !self.condition_allows(seq, i, pos, plen, c.scope) {
                        continue;
                    }
                }
                let strength = match &iv.schedule {
                    Some(s) => s.factor(pos, plen),
                    None => iv.positions.contains(pos, plen).then_some(1.0),
                };
                if let Some(strength) = strength {
                    let part = match point.span {
                        Some((start, len)) => h.get_mut(start..start + len),
                        None => Some(&mut *h),
                    };
                    if let Some(part) = part {
                        apply_op(&iv.op, point, part, strength);
                    }
                    *self.applied.entry(iv.applied.op.as_str()).or_default() += 1;
                    touched = true;
                }
            }
        }
        if !touched {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(data, (n, width), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn point(v: Vec<f32>) -> HookPoint {
        HookPoint::whole(HookSite::ResidPost, 0, Some(Arc::from(v)))
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn add_shifts_by_exactly_the_delta() {
        let h0 = vec![1.5f32, -2.0, 0.25, 1e-3];
        let delta = vec![0.1f32, 0.2, -0.3, 4.0];
        let mut h = h0.clone();
        apply_op(&Op::Add, &point(delta.clone()), &mut h, 1.0);
        for i in 0..4 {
            assert_eq!(h[i], h0[i] + delta[i]);
        }
    }

    #[test]
    fn ablate_and_clamp_set_the_projection() {
        let u = unit(&[3.0, -1.0, 2.0, 0.5]);
        let h0 = vec![10.0f32, 4.0, -7.0, 2.0];
        let proj = |h: &[f32]| {
            h.iter()
                .zip(&u)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum::<f64>()
        };
        let mut h = h0.clone();
        apply_op(&Op::Ablate, &point(u.clone()), &mut h, 1.0);
        assert!(proj(&h).abs() < 1e-5, "{}", proj(&h));
        // The orthogonal part is untouched.
        let p0 = proj(&h0);
        for i in 0..4 {
            assert!((h[i] as f64 - (h0[i] as f64 - p0 * u[i] as f64)).abs() < 1e-5);
        }
        let mut h = h0.clone();
        apply_op(&Op::Clamp { value: 3.5 }, &point(u.clone()), &mut h, 1.0);
        assert!((proj(&h) - 3.5).abs() < 1e-5);
    }

    #[test]
    fn schedules_pick_the_passes_that_choose_their_tokens_and_fade() {
        use crate::steering::spec::{Decay, Schedule};
        let s = Schedule {
            from: 1,
            until: Some(5),
            decay: Some(Decay::Linear),
        };
        // Prompt of 4 tokens: the pass over position 3 chooses generated token 0.
        let at = |position| s.factor(position, 4);
        assert_eq!([at(0), at(2), at(3)], [None, None, None]);
        assert_eq!([at(4), at(5), at(7)], [Some(1.0), Some(0.75), Some(0.25)]);
        assert_eq!(at(8), None);
        let flat = Schedule { decay: None, ..s };
        assert_eq!(flat.factor(6, 4), Some(1.0));
        let mut h = vec![1.0f32, 1.0];
        apply_op(&Op::Add, &point(vec![2.0, -4.0]), &mut h, 0.25);
        assert_eq!(h, vec![1.5, 0.0]);
    }

    #[test]
    fn neuron_ops_change_only_their_neuron() {
        let h0 = vec![1.0f32, 2.0, 3.0];
        let p = HookPoint::whole(HookSite::MlpAct, 0, None);
        for (action, expect) in [
            (NeuronAction::Zero, 0.0),
            (NeuronAction::Scale(3.0), 6.0),
            (NeuronAction::Set(-1.5), -1.5),
        ] {
            let mut h = h0.clone();
            apply_op(&Op::Neuron { index: 1, action }, &p, &mut h, 1.0);
            assert_eq!(h, vec![1.0, expect, 3.0]);
        }
    }
}
