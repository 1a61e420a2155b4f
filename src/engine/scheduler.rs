//! Continuous batching: the state the engine thread keeps between forward passes, as plain
//! synchronous code. Each step packs the pending tokens of every active sequence (one token for
//! a sequence that is decoding, a chunk of its prompt for one that is prefilling) into one
//! forward pass, with every sequence's own steering plan applied to its own rows; sequences
//! join and leave between steps.

use super::sampling::{log_softmax, top_n, Sampler};
use super::stop::StopMatcher;
use super::{
    FinishReason, Finished, GenerationEvent, GenerationRequest, TokenEvent, TokenLogprob,
    TopLogprob,
};
use crate::model::tokenizer::DetokenizeStream;
use crate::model::Model;
use crate::model::{KvCache, Logits, Segment};
use crate::steering::intervention::{BatchSteering, ConditionTrace};
use std::time::Instant;

/// Batch limits.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences in one forward pass.
    pub max_batch_size: usize,
    /// Tokens (rows) in one forward pass.
    pub max_batch_tokens: usize,
    /// Most prompt tokens one sequence prefills in one step, so a long prompt does not stall
    /// the sequences that are decoding.
    pub prefill_chunk: usize,
    /// Most prompt tokens, all sequences together, in a step that also decodes: a burst of new
    /// prompts cannot stall the running sequences' next tokens by more than this many rows. A
    /// step with nothing to decode takes prompts up to `max_batch_tokens`.
    pub prefill_while_decoding: usize,
}

struct Sequence {
    req: GenerationRequest,
    cache: KvCache,
    /// Prompt then generated tokens; `cache.len()` of them have been run.
    tokens: Vec<u32>,
    prompt_len: usize,
    sampler: Sampler,
    detok: DetokenizeStream,
    stop: StopMatcher,
    text: String,
    admitted: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    /// What the plan's conditions have read so far.
    conditions: ConditionTrace,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }
}

/// What one step did, for metrics.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    pub sequences: usize,
    pub rows: usize,
    pub prefill_tokens: usize,
    pub generated_tokens: usize,
    pub finished: Vec<Finished>,
    /// Seconds from admission to the first token, for sequences that got theirs this step.
    pub first_token_latencies: Vec<f64>,
    /// Seconds between a sequence's previous token and the one it got this step.
    pub inter_token_latencies: Vec<f64>,
    pub interventions: std::collections::BTreeMap<&'static str, u64>,
    /// Wall time of the step.
    pub seconds: f64,
    /// The final events of the sequences that ended, held back until [`StepReport::deliver`]
    /// so that whoever records the step does so before any client sees its answer complete.
    done_events: Vec<(
        tokio::sync::mpsc::UnboundedSender<GenerationEvent>,
        Finished,
    )>,
}

impl StepReport {
    /// Sends the held-back final events. Call once the step is recorded.
    pub fn deliver(&mut self) {
        for (events, f) in self.done_events.drain(..) {
            let _ = events.send(GenerationEvent::Done(f));
        }
    }
}

/// A report dropped undelivered (a failed step after a timeout) still ends its sequences.
impl Drop for StepReport {
    fn drop(&mut self) {
        self.deliver();
    }
}

/// The active sequences.
pub struct Scheduler {
    cfg: SchedulerConfig,
    active: Vec<Sequence>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            active: Vec::new(),
        }
    }

    pub fn is_idle(&self) -> bool {
        self.active.is_empty()
    }

    pub fn len(&self) -> usize {
        self.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    pub fn has_room(&self) -> bool {
        self.active.len() < self.cfg.max_batch_size
    }

    /// Adds a request; it starts prefilling at the next step.
    pub fn admit(&mut self, model: &Model, req: GenerationRequest) {
        if req.events.is_closed() {
            return;
        }
        let prompt_len = req.prompt.len();
        let ctx = model.dims().context_length;
        if prompt_len == 0 || prompt_len >= ctx {
            let _ = req.events.send(GenerationEvent::Error(format!(
                "prompt of {prompt_len} tokens does not fit the context of {ctx}"
            )));
            return;
        }
        self.active.push(Sequence {
            cache: model.new_cache(),
            tokens: req.prompt.clone(),
            prompt_len,
            sampler: Sampler::new(req.sampling.clone()),
            detok: DetokenizeStream::default(),
            stop: StopMatcher::new(req.stop.clone()),
            text: String::new(),
            admitted: Instant::now(),
            first_token: None,
            last_token: None,
            conditions: ConditionTrace::default(),
            req,
        });
    }

    /// Ends every active sequence now with `reason`, sending each its final event.
    pub fn finish_all(&mut self, reason: FinishReason) -> Vec<Finished> {
        let mut report = StepReport::default();
        for mut s in self.active.drain(..) {
            finish(&mut s, reason, &mut report);
        }
        report.deliver();
        std::mem::take(&mut report.finished)
    }

    /// Fails every active sequence (after an unrecoverable error in a step).
    pub fn fail_all(&mut self, message: &str) {
        for s in self.active.drain(..) {
            let _ = s
                .req
                .events
                .send(GenerationEvent::Error(message.to_string()));
        }
    }

    /// Drops sequences whose client went away or whose deadline passed.
    fn reap(&mut self, report: &mut StepReport) {
        let now = Instant::now();
        self.active.retain_mut(|s| {
            if s.req.events.is_closed() {
                tracing::info!(request = %s.req.request_id, generated = s.generated(), "client went away; sequence dropped");
                return false;
            }
            if s.req.deadline.is_some_and(|d| now >= d) {
                finish(s, FinishReason::Timeout, report);
                return false;
            }
            true
        });
    }

    /// Runs one forward pass over every active sequence and hands out the sampled tokens.
    pub fn step(&mut self, model: &Model) -> anyhow::Result<StepReport> {
        let started = Instant::now();
        let mut report = StepReport::default();
        self.reap(&mut report);
        if self.active.is_empty() {
            return Ok(report);
        }
        // Decoding sequences first (one row each), then prompt chunks in admission order, at
        // most `prefill_while_decoding` of them when something decodes.
        let mut budget = self.cfg.max_batch_tokens.max(1);
        let mut takes = vec![0usize; self.active.len()];
        for pass in [true, false] {
            if !pass && takes.iter().any(|&t| t > 0) {
                budget = budget.min(self.cfg.prefill_while_decoding.max(1));
            }
            for (i, s) in self.active.iter().enumerate() {
                let pending = s.pending();
                if (pending == 1) != pass || budget == 0 {
                    continue;
                }
                let chunk = pending.min(self.cfg.prefill_chunk.max(1));
                // A prompt condition acts on the rows of the pass that decides it: its prompt
                // is cut only at whole prefill chunks, whatever else the step holds, so what
                // it steers does not depend on the load.
                let whole = s
                    .req
                    .steering
                    .as_ref()
                    .is_some_and(|p| p.has_prompt_conditions());
                let n = if whole { chunk } else { chunk.min(budget) };
                takes[i] = n;
                budget = budget.saturating_sub(n);
            }
        }
        let members: Vec<usize> = (0..self.active.len()).filter(|&i| takes[i] > 0).collect();
        let mut wants_logits = Vec::with_capacity(members.len());
        for &i in &members {
            let s = &self.active[i];
            let start = s.cache.len();
            wants_logits.push(start + takes[i] == s.tokens.len());
            report.prefill_tokens += (start + takes[i]).min(s.prompt_len) - start.min(s.prompt_len);
            report.rows += takes[i];
        }
        report.sequences = members.len();
        let plans: Vec<_> = members
            .iter()
            .map(|&i| {
                (
                    self.active[i].req.steering.clone(),
                    self.active[i].prompt_len,
                )
            })
            .collect();
        let traces = members
            .iter()
            .map(|&i| std::mem::take(&mut self.active[i].conditions))
            .collect();
        let mut hooks = BatchSteering::new(
            model.dims().n_layers,
            plans.iter().map(|(p, n)| (p.as_deref(), *n)).collect(),
        )
        .with_traces(traces);
        let logits = {
            let mut segments = Vec::with_capacity(members.len());
            let mut rest: &mut [Sequence] = &mut self.active;
            let mut offset = 0;
            for (&i, &last) in members.iter().zip(&wants_logits) {
                let (_, tail) = rest.split_at_mut(i - offset);
                let (head, tail) = tail.split_at_mut(1);
                let s = &mut head[0];
                let start = s.cache.len();
                segments.push(Segment {
                    tokens: &s.tokens[start..start + takes[i]],
                    cache: &mut s.cache,
                    logits: if last { Logits::Last } else { Logits::None },
                });
                rest = tail;
                offset = i + 1;
            }
            model.run(&mut segments, &mut hooks)?
        };
        report.interventions = std::mem::take(&mut hooks.applied);
        for (&i, trace) in members.iter().zip(hooks.into_traces()) {
            self.active[i].conditions = trace;
        }
        let mut done = vec![false; self.active.len()];
        for (&i, rows) in members.iter().zip(&logits) {
            let Some(logits) = rows.first() else { continue };
            let s = &mut self.active[i];
            if let Some(reason) = advance(model, s, logits, &mut report)? {
                finish(s, reason, &mut report);
                done[i] = true;
            }
        }
        let mut idx = 0;
        self.active.retain(|_| {
            let keep = !done[idx];
            idx += 1;
            keep
        });
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// Samples the next token of `s` and sends it; returns why the sequence ended, if it did.
fn advance(
    model: &Model,
    s: &mut Sequence,
    logits: &[f32],
    report: &mut StepReport,
) -> anyhow::Result<Option<FinishReason>> {
    let tok = &model.tokenizer;
    let id = s.sampler.sample(logits, &s.tokens[s.prompt_len..]);
    let now = Instant::now();
    if s.first_token.is_none() {
        s.first_token = Some(now);
        report
            .first_token_latencies
            .push((now - s.admitted).as_secs_f64());
    }
    if let Some(prev) = s.last_token.replace(now) {
        report
            .inter_token_latencies
            .push((now - prev).as_secs_f64());
    }
    if tok.is_eos(id) && !s.req.ignore_eos {
        return Ok(Some(FinishReason::Stop));
    }
    s.tokens.push(id);
    report.generated_tokens += 1;
    let logprob = s.req.logprobs.map(|n| {
        let lp = log_softmax(logits);
        TokenLogprob {
            token: tok.token_text(id),
            logprob: lp[id as usize],
            top: top_n(&lp, n)
                .into_iter()
                .map(|(t, l)| TopLogprob {
                    token: tok.token_text(t),
                    id: t,
                    logprob: l,
                })
                .collect(),
        }
    });
    let piece = s.detok.push(tok, id)?;
    let check = s.stop.push(&piece);
    s.text.push_str(&check.release);
    let index = s.generated() - 1;
    let _ = s.req.events.send(GenerationEvent::Token(TokenEvent {
        index,
        id,
        text: check.release,
        logprob,
    }));
    if check.stopped {
        return Ok(Some(FinishReason::Stop));
    }
    if s.generated() >= s.req.max_tokens || s.tokens.len() >= model.dims().context_length {
        return Ok(Some(FinishReason::Length));
    }
    Ok(None)
}

/// Ends a sequence: its summary goes into the report, its final event waits for
/// [`StepReport::deliver`].
fn finish(s: &mut Sequence, reason: FinishReason, report: &mut StepReport) {
    tracing::debug!(
        request = %s.req.request_id,
        prompt_tokens = s.prompt_len,
        generated = s.generated(),
        reason = reason.as_str(),
        ttft_ms = s.first_token.map(|t| (t - s.admitted).as_millis() as u64).unwrap_or(0),
        "sequence finished"
    );
    let tail = s.stop.flush();
    s.text.push_str(&tail);
    let conditions = match &s.req.steering {
        Some(plan) if plan.has_conditions() => {
            s.conditions.report(plan, s.prompt_len, s.generated())
        }
        _ => Vec::new(),
    };
    let f = Finished {
        reason,
        text: std::mem::take(&mut s.text),
        prompt_tokens: s.prompt_len,
        completion_tokens: s.generated(),
        tail,
        conditions,
    };
    report.finished.push(f.clone());
    report.done_events.push((s.req.events.clone(), f));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampling::SamplingParams;
    use crate::testing::{write_tiny_gguf, TinySpec};

    /// A request, and the receiver of its events (a closed one ends the sequence).
    fn request(
        prompt_len: usize,
    ) -> (
        GenerationRequest,
        tokio::sync::mpsc::UnboundedReceiver<GenerationEvent>,
    ) {
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let req = GenerationRequest {
            prompt: (0..prompt_len as u32).map(|t| 3 + t % 50).collect(),
            max_tokens: 8,
            sampling: SamplingParams::greedy(1),
            stop: Vec::new(),
            logprobs: None,
            steering: None,
            ignore_eos: true,
            deadline: None,
            events,
            request_id: "t".into(),
        };
        (req, rx)
    }

    /// A step that decodes takes at most `prefill_while_decoding` prompt rows, however many
    /// prompts wait; a step with nothing to decode takes them up to `max_batch_tokens`.
    #[test]
    fn prompts_arriving_cannot_stall_decoding_beyond_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec::default();
        let path = write_tiny_gguf(dir.path(), &spec, candle_core::quantized::GgmlDType::Q8_0);
        let model = Model::load(&path.unwrap(), Some("tiny"), &Default::default()).unwrap();
        let mut sched = Scheduler::new(SchedulerConfig {
            max_batch_size: 8,
            max_batch_tokens: 100,
            prefill_chunk: 40,
            prefill_while_decoding: 6,
        });
        let mut receivers = Vec::new();
        let (req, rx) = request(30);
        receivers.push(rx);
        sched.admit(&model, req);
        let first = sched.step(&model).unwrap();
        assert_eq!((first.rows, first.prefill_tokens), (30, 30));
        // Now one sequence decodes; three prompts of 40 tokens arrive at once.
        for _ in 0..3 {
            let (req, rx) = request(40);
            receivers.push(rx);
            sched.admit(&model, req);
        }
        let mut prompt_rows = 0;
        for _ in 0..4 {
            let r = sched.step(&model).unwrap();
            assert_eq!(
                r.rows - r.prefill_tokens,
                1,
                "the decoding sequence gets its row"
            );
            assert_eq!(r.prefill_tokens, 6, "at most the budget of prompt rows");
            prompt_rows += r.prefill_tokens;
        }
        assert_eq!(prompt_rows, 24);
    }
}
