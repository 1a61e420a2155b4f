//! The kernel threads as one team for a whole forward pass.
//!
//! A pass runs a few hundred parallel regions (every matrix product, every attention) with
//! short serial stretches between them (norms, hooks, residual adds). Rayon's idle workers go
//! to sleep after a few dozen yields, so with plain `par_iter`s each region first waited for a
//! sleeping thread to be woken, and on two cores a second thread sped a batch-8 decode step
//! up by 1.35x. [`with_team`] instead starts, for the length of one pass, a helper job on every
//! other thread of the pool that spins on the team's job slot; [`parallel_for`] publishes
//! each region there and works on it too, tasks claimed one at a time from a shared counter.
//! The helpers go back to the pool when the pass ends, so between requests nothing spins.
//!
//! Outside a pass (tests, tools) and inside a task (nested regions), [`parallel_for`] falls
//! back to rayon and to a plain loop.

use rayon::prelude::*;
use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// One parallel region: `n` tasks of `run`, claimed from `next`, counted in `done`.
struct Job {
    /// The region's closure, its lifetime erased: it is called only for claimed indices below
    /// `n`, and the region's caller does not return before all of those calls have.
    run: *const (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

// SAFETY: `run` is only dereferenced while the caller of `parallel_for` waits for it (see
// `Job::run`); everything else is atomics and a mutex.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs tasks until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            IN_TASK.with(|t| t.set(true));
            // SAFETY: `i < n`, so the caller is still waiting and `run` is alive.
            let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*self.run)(i) }));
            IN_TASK.with(|t| t.set(false));
            if let Err(e) = result {
                if let Ok(mut slot) = self.panic.lock() {
                    slot.get_or_insert(e);
                }
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// What the threads of one pass share.
struct Team {
    /// Bumped each time a region is published.
    generation: AtomicU64,
    job: Mutex<Option<Arc<Job>>>,
    stop: AtomicBool,
}

thread_local! {
    /// The team of the pass this thread runs, if any.
    static TEAM: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
    /// Whether this thread is inside a task of a region.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
    /// Whether this thread is a helper of some pass.
    static HELPING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `pass` (on a thread of a rayon pool) with the pool's other threads as its team until
/// it returns.
pub fn with_team<R: Send>(pass: impl FnOnce() -> R + Send) -> R {
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if helpers == 0 || !TEAM.with(|t| t.get().is_null()) || IN_TASK.with(Cell::get) {
        return pass();
    }
    let team = Team {
        generation: AtomicU64::new(0),
        job: Mutex::new(None),
        stop: AtomicBool::new(false),
    };
    rayon::scope(|s| {
        // The scope's body runs on a thread of the pool: the one running the pass, whose
        // `TEAM` is set before any helper job can reach it.
        TEAM.with(|t| t.set(&team));
        for _ in 0..helpers {
            s.spawn(|_| help(&team));
        }
        let result = catch_unwind(AssertUnwindSafe(pass));
        TEAM.with(|t| t.set(std::ptr::null()));
        team.stop.store(true, Ordering::Release);
        result.unwrap_or_else(|e| resume_unwind(e))
    })
}

/// A helper's loop: runs every region published until the pass ends. Spins while regions
/// follow each other closely, and yields its core to other threads after a while without one.
fn help(team: &Team) {
    // A thread that runs a pass, a task or another helper loop and picks this job up while
    // waiting inside rayon must not spin here: what it would wait for could not go on.
    let busy = !TEAM.with(|t| t.get()).is_null() || IN_TASK.with(Cell::get);
    if busy || HELPING.with(|h| h.replace(true)) {
        return;
    }
    const SPINS_BEFORE_YIELDING: u32 = 1 << 14;
    let (mut seen, mut idle) = (0, 0u32);
    while !team.stop.load(Ordering::Acquire) {
        let generation = team.generation.load(Ordering::Acquire);
        if generation == seen {
            idle = idle.saturating_add(1);
            if idle < SPINS_BEFORE_YIELDING {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
            continue;
        }
        (seen, idle) = (generation, 0);
        let job = team.job.lock().ok().and_then(|j| j.clone());
        if let Some(job) = job {
            job.work();
        }
    }
    HELPING.with(|h| h.set(false));
}

/// Runs `f(i)` for every `i < n`, in parallel: on the pass's team when this thread runs a
/// pass, on rayon's pool otherwise, in a plain loop inside another region's task. Returns
/// when every call has.
pub fn parallel_for(n: usize, f: &(dyn Fn(usize) + Sync)) {
    if n <= 1 || IN_TASK.with(|t| t.get()) {
        (0..n).for_each(f);
        return;
    }
    let team = TEAM.with(|t| t.get());
    if team.is_null() {
        (0..n).into_par_iter().for_each(f);
        return;
    }
    // SAFETY: the pointer was set by `with_team` on this thread, which is inside `pass` and so
    // keeps the team alive.
    let team = unsafe { &*team };
    // SAFETY: only the lifetime is erased; see `Job::run`.
    let run: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
    let job = Arc::new(Job {
        run,
        n,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panic: Mutex::new(None),
    });
    if let Ok(mut slot) = team.job.lock() {
        *slot = Some(job.clone());
    }
    team.generation.fetch_add(1, Ordering::Release);
    job.work();
    while job.done.load(Ordering::Acquire) < n {
        std::hint::spin_loop();
    }
    if let Ok(mut slot) = team.job.lock() {
        *slot = None;
    }
    let panic = job.panic.lock().ok().and_then(|mut p| p.take());
    if let Some(e) = panic {
        resume_unwind(e);
    }
}

/// Runs `f(i, &mut items[i])` for every item, in parallel as [`parallel_for`] does.
pub fn for_each_mut<T: Send>(items: &mut [T], f: &(dyn Fn(usize, &mut T) + Sync)) {
    let base = DisjointMut(items.as_mut_ptr());
    parallel_for(items.len(), &|i| {
        // SAFETY: `parallel_for` calls each index below `items.len()` exactly once, so no two
        // calls reach the same item, and `items` is borrowed for all of them.
        f(i, unsafe { &mut *base.get().add(i) })
    });
}

/// A pointer into a buffer whose tasks each write their own, disjoint elements (the items of
/// [`for_each_mut`], a product's output columns).
pub(crate) struct DisjointMut<T>(pub *mut T);
impl<T> DisjointMut<T> {
    pub fn get(&self) -> *mut T {
        self.0
    }
}
// SAFETY: shared only between tasks that touch disjoint elements, which are `Send`.
unsafe impl<T: Send> Send for DisjointMut<T> {}
unsafe impl<T: Send> Sync for DisjointMut<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Every index runs exactly once, in a pass and outside one, nested regions included.
    #[test]
    fn every_task_runs_once() {
        for threads in [1, 2, 3] {
            pool(threads).install(|| {
                let run = || {
                    let counts: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
                    for _ in 0..50 {
                        parallel_for(counts.len(), &|i| {
                            counts[i].fetch_add(1, Ordering::Relaxed);
                            parallel_for(3, &|_| {
                                counts[(i + 1) % 100].fetch_add(0, Ordering::Relaxed);
                            });
                        });
                    }
                    assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 50));
                    let mut items = vec![0usize; 37];
                    for_each_mut(&mut items, &|i, x| *x += i);
                    assert!(items.iter().enumerate().all(|(i, &x)| x == i));
                };
                run();
                with_team(run);
            });
        }
    }

    /// The helpers do share the work of a pass.
    #[test]
    fn helpers_take_tasks() {
        pool(2).install(|| {
            let main = std::thread::current().id();
            let elsewhere = AtomicUsize::new(0);
            with_team(|| {
                for _ in 0..20 {
                    parallel_for(64, &|_| {
                        // Real time, so that one thread cannot finish a region before the
                        // other has seen it.
                        let t = std::time::Instant::now();
                        while t.elapsed() < std::time::Duration::from_micros(20) {}
                        if std::thread::current().id() != main {
                            elsewhere.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            });
            assert!(elsewhere.load(Ordering::Relaxed) > 0);
        });
    }

    /// A panicking task reaches the pass's caller, and the team still ends.
    #[test]
    fn a_panic_in_a_task_reaches_the_caller() {
        pool(2).install(|| {
            let r = catch_unwind(|| {
                with_team(|| {
                    parallel_for(16, &|i| {
                        if i == 7 {
                            panic!("task 7");
                        }
                    })
                })
            });
            assert!(r.is_err());
            // The pool is still usable.
            with_team(|| parallel_for(4, &|_| ()));
        });
    }
}
