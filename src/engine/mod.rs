//! The engine: one dedicated OS thread owns the forward passes; everything else talks to it
//! through a cloneable [`EngineHandle`] over a bounded channel. Each request carries its own
//! event sender; when the client goes away the receiver drops and the sequence is freed at
//! the next step. Tokio workers never run a forward pass.

pub mod sampling;
pub mod scheduler;
pub mod stop;

use crate::model::hooks::{ChainHooks, Hooks};
use crate::model::{KvCache, Logits, Model, Segment};
use crate::steering::intervention::BatchSteering;
use crate::steering::spec::SteeringPlan;
use sampling::SamplingParams;
use scheduler::{Scheduler, SchedulerConfig, StepReport};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// A validated generation request.
#[derive(Debug)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Report the top-n log-probabilities of each generated token.
    pub logprobs: Option<usize>,
    pub steering: Option<Arc<SteeringPlan>>,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    pub deadline: Option<Instant>,
    pub events: mpsc::UnboundedSender<GenerationEvent>,
    /// The HTTP request id, for the engine's log lines.
    pub request_id: String,
}

/// What the engine tells a request's owner.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    Token(TokenEvent),
    Done(Finished),
    Error(String),
}

#[derive(Debug, Clone)]
pub struct TokenEvent {
    /// 0-based index among the generated tokens.
    pub index: usize,
    pub id: u32,
    /// Text released with this token (may be empty while a character or a possible stop
    /// sequence is incomplete).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TokenLogprob {
    #[schema(example = " Paris")]
    /// The token's text.
    pub token: String,
    #[schema(example = -0.02)]
    /// Its log-probability under the model (before temperature).
    pub logprob: f32,
    /// The most likely tokens at this step.
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TopLogprob {
    /// An alternative token as text.
    #[schema(example = " Paris")]
    pub token: String,
    /// Its id.
    #[schema(example = 7042)]
    pub id: u32,
    /// Its log-probability.
    #[schema(example = -0.02)]
    pub logprob: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` or the context length reached.
    Length,
    /// The request's time limit passed.
    Timeout,
    /// The server is shutting down and its grace period ended.
    Shutdown,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Timeout => "timeout",
            FinishReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub reason: FinishReason,
    /// The whole generated text (stop sequence excluded).
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Text released only now (held back while it might have begun a stop sequence).
    pub tail: String,
    /// Whether each conditional intervention acted.
    pub conditions: Vec<crate::steering::intervention::ConditionReport>,
}

/// What [`EngineHandle::run_chunked`] hands back.
pub struct Chunked<H> {
    pub hooks: H,
    /// The sequence's KV cache after the pass (for scoring continuations).
    pub cache: KvCache,
    /// The logits after the last token (empty for an empty sequence).
    pub last_logits: Vec<f32>,
    /// With `score_top`: tokens 1.. of the sequence, each scored after the ones before it.
    pub scored: Vec<ScoredToken>,
    /// What the plan's conditions read over the pass.
    pub conditions: crate::steering::intervention::ConditionTrace,
}

/// A token's log-probability where it stands, and the likeliest tokens there.
#[derive(Debug, Clone)]
pub struct ScoredToken {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Work for the engine thread.
pub enum Command {
    Generate(GenerationRequest),
    /// Runs on the engine thread between steps, with the model to itself (extraction,
    /// inspection).
    Job(Box<dyn FnOnce(&Model) + Send>),
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    Stopped,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Requests waiting for a place in the batch before new ones are refused.
    pub max_queue: usize,
    /// Chunked passes (inspection, scoring) in progress at once; more are refused (429).
    pub max_chunked_passes: usize,
}

/// Receives a report after every step (metrics).
pub type StepObserver = Arc<dyn Fn(&StepReport, &Scheduler) + Send + Sync>;

/// Live counters the engine thread keeps up to date.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences in the running batch.
    pub active: AtomicUsize,
    /// Forward passes run.
    pub steps: AtomicU64,
    /// Tokens generated since start.
    pub generated_tokens: AtomicU64,
    /// Set when the server's shutdown grace period is over: running sequences end at once
    /// (finish reason `shutdown`) and new ones are refused.
    pub stopping: AtomicBool,
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    pub model: Arc<Model>,
    pub stats: Arc<EngineStats>,
    tx: mpsc::Sender<Command>,
    /// Chunked passes in progress, each holding a KV cache between its jobs.
    chunked: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("model", &self.model.id)
            .finish()
    }
}

impl EngineHandle {
    /// Starts the engine thread.
    pub fn spawn(
        model: Arc<Model>,
        cfg: EngineConfig,
        observer: Option<StepObserver>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(cfg.max_queue.max(1));
        let m = model.clone();
        let stats = Arc::new(EngineStats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("tiller-engine".into())
            .spawn(move || run(m, rx, cfg.scheduler, observer, st))?;
        let chunked = Arc::new(tokio::sync::Semaphore::new(cfg.max_chunked_passes.max(1)));
        Ok(Self {
            model,
            stats,
            tx,
            chunked,
        })
    }

    /// Queues a generation; fails at once when the queue is full.
    pub fn submit(&self, req: GenerationRequest) -> Result<(), SubmitError> {
        self.tx
            .try_send(Command::Generate(req))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
            })
    }

    /// Runs `f` on the engine thread between decode steps and returns its result. Waits for
    /// a place in the queue (jobs belong to requests already accepted); a job whose caller
    /// has gone away before it starts is skipped.
    pub async fn run_job<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Model) -> R + Send + 'static,
    ) -> Result<R, SubmitError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Command::Job(Box::new(move |m: &Model| {
            if !tx.is_closed() {
                let _ = tx.send(f(m));
            }
        }));
        self.tx.send(job).await.map_err(|_| SubmitError::Stopped)?;
        rx.await.map_err(|_| SubmitError::Stopped)
    }

    /// Runs one sequence through the model as a series of engine jobs of at most `chunk`
    /// tokens each, like a prefill: the KV cache and `hooks` (which record what the caller
    /// inspects) travel from one job to the next, and the running generations take a step
    /// between any two, so a long inspection never holds the engine for more than about one
    /// step. `plan` steers the pass (`prompt_len` tokens count as the prompt). Returns the
    /// hooks, the cache, and the last token's logits; with `score_top: Some(n)`, also every
    /// token's log-probability after the ones before it, with the `n` likeliest there.
    /// Dropping the future (the client went away) stops it before the next chunk.
    pub async fn run_chunked<H: Hooks + Send + 'static>(
        &self,
        tokens: Arc<[u32]>,
        chunk: usize,
        plan: Option<Arc<SteeringPlan>>,
        prompt_len: usize,
        hooks: H,
        score_top: Option<usize>,
    ) -> Result<anyhow::Result<Chunked<H>>, SubmitError> {
        let Ok(_pass) = self.chunked.clone().try_acquire_owned() else {
            return Err(SubmitError::QueueFull);
        };
        let chunk = chunk.max(1);
        let mut done = Chunked {
            hooks,
            cache: self.model.new_cache(),
            last_logits: Vec::new(),
            scored: Vec::new(),
            conditions: Default::default(),
        };
        let mut start = 0;
        while start < tokens.len() {
            let end = (start + chunk).min(tokens.len());
            let (toks, plan) = (tokens.clone(), plan.clone());
            let mut state = done;
            let ran = self
                .run_job(move |m| {
                    let mut steer =
                        BatchSteering::new(m.dims().n_layers, vec![(plan.as_deref(), prompt_len)])
                            .with_traces(vec![std::mem::take(&mut state.conditions)]);
                    let logits = match (score_top, end == toks.len()) {
                        (Some(_), _) => Logits::Every,
                        (None, true) => Logits::Last,
                        (None, false) => Logits::None,
                    };
                    let mut segment = [Segment {
                        tokens: &toks[start..end],
                        cache: &mut state.cache,
                        logits,
                    }];
                    let mut chain = ChainHooks {
                        first: &mut steer,
                        second: &mut state.hooks,
                    };
                    let mut rows = m.run(&mut segment, &mut chain)?.into_iter().next();
                    state.conditions = steer.into_traces().pop().unwrap_or_default();
                    let rows = rows.get_or_insert_with(Vec::new);
                    if let Some(n) = score_top {
                        // Row i predicts the token at start + i + 1.
                        for (i, row) in rows.iter().enumerate() {
                            let Some(&next) = toks.get(start + i + 1) else {
                                break;
                            };
                            let lp = sampling::log_softmax(row);
                            state.scored.push(ScoredToken {
                                logprob: lp
                                    .get(next as usize)
                                    .copied()
                                    .unwrap_or(f32::NEG_INFINITY),
                                top: sampling::top_n(&lp, n),
                            });
                        }
                    }
                    if let Some(last) = rows.pop() {
                        state.last_logits = last;
                    }
                    Ok(state)
                })
                .await?;
            done = match ran {
                Ok(s) => s,
                Err(e) => return Ok(Err(e)),
            };
            start = end;
        }
        Ok(Ok(done))
    }

    /// Ends every running sequence cleanly (their clients get a final event) and refuses new
    /// ones: the last step of a graceful shutdown.
    pub fn stop(&self) {
        self.stats.stopping.store(true, Ordering::SeqCst);
        // Wake the engine if it is idle.
        let _ = self.tx.try_send(Command::Job(Box::new(|_| {})));
    }

    /// Requests waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

fn run(
    model: Arc<Model>,
    mut rx: mpsc::Receiver<Command>,
    cfg: SchedulerConfig,
    observer: Option<StepObserver>,
    stats: Arc<EngineStats>,
) {
    let mut sched = Scheduler::new(cfg);
    let mut open = true;
    loop {
        stats.active.store(sched.len(), Ordering::Relaxed);
        if stats.stopping.load(Ordering::Relaxed) {
            let finished = sched.finish_all(FinishReason::Shutdown);
            if !finished.is_empty() {
                tracing::info!(
                    sequences = finished.len(),
                    "shutdown: ended running sequences"
                );
            }
            // Refuse whatever is still queued.
            while let Ok(cmd) = rx.try_recv() {
                if let Command::Generate(req) = cmd {
                    let _ = req
                        .events
                        .send(GenerationEvent::Error("the server is shutting down".into()));
                }
            }
            stats.active.store(0, Ordering::Relaxed);
            match rx.blocking_recv() {
                Some(Command::Generate(req)) => {
                    let _ = req
                        .events
                        .send(GenerationEvent::Error("the server is shutting down".into()));
                    continue;
                }
                Some(Command::Job(_)) => continue,
                None => break,
            }
        }
        if sched.is_idle() {
            if !open {
                break;
            }
            match rx.blocking_recv() {
                Some(cmd) => handle(&model, &mut sched, cmd),
                None => break,
            }
        }
        while open && sched.has_room() {
            match rx.try_recv() {
                Ok(cmd) => {
                    // After a job, the running sequences take a step before the next one.
                    let job = matches!(cmd, Command::Job(_));
                    handle(&model, &mut sched, cmd);
                    if job {
                        break;
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        if sched.is_idle() {
            continue;
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| sched.step(&model))) {
            Ok(Ok(mut report)) => {
                stats.steps.fetch_add(1, Ordering::Relaxed);
                stats
                    .generated_tokens
                    .fetch_add(report.generated_tokens as u64, Ordering::Relaxed);
                if let Some(obs) = &observer {
                    obs(&report, &sched);
                }
                // Only now may a client see its request end (and read metrics that count it).
                report.deliver();
            }
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "forward pass failed");
                sched.fail_all(&format!("internal error in the forward pass: {e:#}"));
            }
            Err(_) => {
                tracing::error!("forward pass panicked");
                sched.fail_all("internal error: the forward pass panicked");
            }
        }
    }
    tracing::info!("engine thread stopped");
}

fn handle(model: &Model, sched: &mut Scheduler, cmd: Command) {
    match cmd {
        Command::Generate(req) => sched.admit(model, req),
        Command::Job(f) => {
            if std::panic::catch_unwind(AssertUnwindSafe(|| f(model))).is_err() {
                tracing::error!("engine job panicked");
            }
        }
    }
}
