//! The bounded request queue and the batching worker (a dedicated OS thread).

use super::metrics::Metrics;
use crate::exit::MuePolicy;
use crate::generate::SearchConfig;
use crate::pipeline::{CaptionOutput, Engine, EntailOutput, EntailRequest};
use crate::task::Task;
use image::DynamicImage;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Admission control: a request takes a slot before its body is read and keeps it until
/// it is answered or dropped, so at most `capacity` requests hold a body, a decoded image
/// or a queue entry at once. A request is also refused when its estimated wait (batches
/// ahead of it times the recent batch time) exceeds the timeout: overload becomes an
/// immediate 503 instead of a 504 after the full timeout.
pub struct Admission {
    capacity: usize,
    max_batch: usize,
    decoders: usize,
    admitted: AtomicUsize,
    /// Exponentially weighted mean of the engine time per batch, f64 bits (0 = none yet).
    batch_secs: AtomicU64,
    /// The same for parsing + decoding one request.
    decode_secs: AtomicU64,
}

/// Why a request was refused at admission.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// Every slot is taken.
    Full,
    /// The estimated wait (seconds) is over the timeout.
    Wait(f64),
}

/// A held admission slot; released on drop.
pub struct Ticket(Arc<Admission>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    pub fn new(capacity: usize, max_batch: usize, decoders: usize) -> Self {
        Admission {
            capacity,
            max_batch: max_batch.max(1),
            decoders: decoders.max(1),
            admitted: AtomicUsize::new(0),
            batch_secs: AtomicU64::new(0f64.to_bits()),
            decode_secs: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Requests holding a slot.
    pub fn admitted(&self) -> usize {
        self.admitted.load(Ordering::SeqCst)
    }

    /// Seconds until a request admitted behind `ahead` others is answered: its batch and
    /// the batches ahead, plus its decode and those ahead of it (conservative: every
    /// request ahead is counted as still to decode).
    pub fn estimate(&self, ahead: usize) -> f64 {
        let batches = (ahead / self.max_batch + 1) as f64;
        let decodes = (ahead / self.decoders + 1) as f64;
        batches * f64::from_bits(self.batch_secs.load(Ordering::SeqCst))
            + decodes * f64::from_bits(self.decode_secs.load(Ordering::SeqCst))
    }

    /// Take a slot unless the queue is full or the wait would exceed `timeout`.
    pub fn try_admit(self: &Arc<Self>, timeout: Duration) -> Result<Ticket, Refusal> {
        let mut n = self.admitted.load(Ordering::SeqCst);
        loop {
            if n >= self.capacity {
                return Err(Refusal::Full);
            }
            let wait = self.estimate(n);
            if wait > timeout.as_secs_f64() {
                return Err(Refusal::Wait(wait));
            }
            match self
                .admitted
                .compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Ok(Ticket(self.clone())),
                Err(now) => n = now,
            }
        }
    }

    /// Record the engine time of one batch (weight 0.2 on the newest).
    pub fn observe_batch(&self, secs: f64) {
        ewma(&self.batch_secs, secs);
    }

    /// Record the parse + decode time of one request.
    pub fn observe_decode(&self, secs: f64) {
        ewma(&self.decode_secs, secs);
    }
}

fn ewma(cell: &AtomicU64, secs: f64) {
    let old = f64::from_bits(cell.load(Ordering::SeqCst));
    let new = if old == 0.0 {
        secs
    } else {
        0.8 * old + 0.2 * secs
    };
    cell.store(new.to_bits(), Ordering::SeqCst);
}

/// Fault injection for the tests of the server's supervision and expiry (never set in
/// production: `mue serve` leaves them at zero).
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Hooks {
    /// Panic in the worker this many times (once per batch).
    pub panics: AtomicUsize,
    /// Sleep this long before each batch (outside the measured engine time).
    pub stall_ms: AtomicU64,
    /// Sleep this long inside each batch's measured engine time.
    pub slow_ms: AtomicU64,
}

/// The input of one request.
pub enum JobInput {
    Caption(DynamicImage),
    Entail(EntailRequest),
}

impl JobInput {
    pub fn task(&self) -> Task {
        match self {
            JobInput::Caption(_) => Task::Caption,
            JobInput::Entail(_) => Task::Entail,
        }
    }
}

/// What the engine produced for one request.
#[derive(Debug, Clone)]
pub enum JobOutput {
    Caption(CaptionOutput),
    Entail(EntailOutput),
}

/// A finished request: the output plus where its time went.
#[derive(Debug, Clone)]
pub struct JobDone {
    pub output: Result<JobOutput, String>,
    pub queue_ms: f64,
    pub compute_ms: f64,
    pub batch_size: usize,
}

pub struct Job {
    pub input: JobInput,
    pub policy: MuePolicy,
    pub enqueued: Instant,
    /// After this the caller has been answered 504: the worker drops the job uncomputed.
    pub deadline: Instant,
    pub reply: oneshot::Sender<JobDone>,
    /// The admission slot, released when the job is answered or dropped.
    pub ticket: Ticket,
}

impl Job {
    /// Jobs batch together when they have the same task and identical exit settings.
    fn groups_with(&self, other: &Job) -> bool {
        self.input.task() == other.input.task() && self.policy == other.policy
    }
}

struct State {
    items: VecDeque<Job>,
    closed: bool,
}

/// Why a job was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    Full,
    Closed,
}

/// A bounded FIFO that the worker drains in groups.
pub struct Queue {
    state: Mutex<State>,
    cv: Condvar,
    capacity: usize,
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        Queue {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
            }),
            cv: Condvar::new(),
            capacity,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.state.lock().unwrap().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // The refused job goes back to the caller, which still has to answer it.
    #[allow(clippy::result_large_err)]
    pub fn push(&self, job: Job) -> Result<(), (PushError, Job)> {
        let mut st = self.state.lock().unwrap();
        if st.closed {
            return Err((PushError::Closed, job));
        }
        if st.items.len() >= self.capacity {
            return Err((PushError::Full, job));
        }
        st.items.push_back(job);
        drop(st);
        self.cv.notify_all();
        Ok(())
    }

    /// Stop accepting; the worker still drains what is queued.
    pub fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.cv.notify_all();
    }

    /// Block for the next group: the oldest job plus later jobs of its group, up to
    /// `max_batch`, waiting at most `max_wait` after the oldest job was queued.
    /// `None` once the queue is closed and empty.
    pub fn next_batch(&self, max_batch: usize, max_wait: Duration) -> Option<Vec<Job>> {
        let mut st = self.state.lock().unwrap();
        while st.items.is_empty() {
            if st.closed {
                return None;
            }
            st = self.cv.wait(st).unwrap();
        }
        let first = st.items.pop_front().expect("non-empty");
        let deadline = first.enqueued + max_wait;
        let mut batch = vec![first];
        loop {
            let mut i = 0;
            while i < st.items.len() && batch.len() < max_batch {
                if st.items[i].groups_with(&batch[0]) {
                    batch.push(st.items.remove(i).expect("index in range"));
                } else {
                    i += 1;
                }
            }
            if batch.len() >= max_batch || st.closed {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap().0;
        }
        Some(batch)
    }
}

/// Run one group through the engine. If the batched call fails, each request is retried
/// alone so that one bad row does not fail the others.
fn run_group(
    engine: &Engine,
    jobs: &[Job],
    search: &SearchConfig,
) -> Vec<Result<JobOutput, String>> {
    let policy = &jobs[0].policy;
    let batched = match jobs[0].input.task() {
        Task::Caption => {
            let images: Vec<DynamicImage> = jobs
                .iter()
                .map(|j| match &j.input {
                    JobInput::Caption(img) => img.clone(),
                    JobInput::Entail(r) => r.image.clone(),
                })
                .collect();
            engine
                .caption(&images, policy, search)
                .map(|v| v.into_iter().map(JobOutput::Caption).collect::<Vec<_>>())
        }
        Task::Entail => {
            let reqs: Vec<EntailRequest> = jobs
                .iter()
                .map(|j| match &j.input {
                    JobInput::Entail(r) => r.clone(),
                    JobInput::Caption(img) => EntailRequest {
                        image: img.clone(),
                        hypothesis: String::new(),
                        premise: None,
                    },
                })
                .collect();
            engine
                .entail(&reqs, policy)
                .map(|v| v.into_iter().map(JobOutput::Entail).collect::<Vec<_>>())
        }
    };
    match batched {
        Ok(v) if v.len() == jobs.len() => v.into_iter().map(Ok).collect(),
        Ok(v) => vec![
            Err(format!(
                "engine returned {} outputs for {} inputs",
                v.len(),
                jobs.len()
            ));
            jobs.len()
        ],
        Err(e) if jobs.len() == 1 => vec![Err(format!("{e:#}"))],
        Err(_) => jobs
            .iter()
            .flat_map(|j| run_group(engine, std::slice::from_ref(j), search))
            .collect(),
    }
}

/// Marks the worker as stopped when its thread ends, whichever way it ends.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// What the worker shares with the server.
pub struct WorkerCtx {
    pub engine: Arc<Engine>,
    pub queue: Arc<Queue>,
    pub metrics: Arc<Metrics>,
    pub admission: Arc<Admission>,
    pub alive: Arc<AtomicBool>,
    pub hooks: Arc<Hooks>,
    pub max_batch: usize,
    pub max_wait: Duration,
    pub search: SearchConfig,
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// The worker loop: runs until the queue is closed and drained. A panic while computing a
/// batch is caught: that batch's requests get a 500, the panic is counted and logged, and
/// the loop goes on with the next batch (the engine holds no state between calls).
pub fn worker(ctx: WorkerCtx) {
    let _alive = AliveGuard(ctx.alive.clone());
    let WorkerCtx {
        engine,
        queue,
        metrics,
        admission,
        hooks,
        max_batch,
        max_wait,
        search,
        ..
    } = ctx;
    while let Some(batch) = queue.next_batch(max_batch.max(1), max_wait) {
        let stall = hooks.stall_ms.load(Ordering::SeqCst);
        if stall > 0 {
            std::thread::sleep(Duration::from_millis(stall));
        }
        // Requests past their deadline (already answered 504) or whose caller is gone are
        // dropped here, before any compute, and counted.
        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        for j in batch {
            if now >= j.deadline {
                metrics.observe_dropped("expired");
            } else if j.reply.is_closed() {
                metrics.observe_dropped("cancelled");
            } else {
                live.push(j);
            }
        }
        let batch = live;
        if batch.is_empty() {
            continue;
        }
        let started = Instant::now();
        let computed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let slow = hooks.slow_ms.load(Ordering::SeqCst);
            if slow > 0 {
                std::thread::sleep(Duration::from_millis(slow));
            }
            if hooks
                .panics
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                panic!("injected worker panic (test hook)");
            }
            run_group(&engine, &batch, &search)
        }));
        let results = match computed {
            Ok(r) => r,
            Err(p) => {
                metrics.observe_panic();
                let msg = format!("batching worker panicked: {}", panic_text(&*p));
                tracing::error!("{msg}; {} requests answered 500", batch.len());
                vec![Err(msg); batch.len()]
            }
        };
        let compute_secs = started.elapsed().as_secs_f64();
        admission.observe_batch(compute_secs);
        let compute_ms = compute_secs * 1e3;
        metrics.observe_batch(batch.len());
        let n = batch.len();
        for (job, output) in batch.into_iter().zip(results) {
            if let Ok(out) = &output {
                let (exits, cost, task) = match out {
                    JobOutput::Caption(c) => (&c.exits, &c.cost, "caption"),
                    JobOutput::Entail(e) => (&e.exits, &e.cost, "entail"),
                };
                metrics.observe_exits(exits);
                metrics.observe_macs(task, cost.macs_executed, cost.macs_full);
            }
            let queue_ms = started.duration_since(job.enqueued).as_secs_f64() * 1e3;
            // The slot frees before the answer: a client holding its answer sees it free.
            drop(job.ticket);
            let _ = job.reply.send(JobDone {
                output,
                queue_ms,
                compute_ms,
                batch_size: n,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_refuses_when_full_or_the_wait_is_over_the_timeout() {
        let a = Arc::new(Admission::new(3, 2, 1));
        let timeout = Duration::from_secs(1);
        // No batch timed yet: only the slot count limits.
        let t1 = a.try_admit(timeout).unwrap();
        let t2 = a.try_admit(timeout).unwrap();
        let t3 = a.try_admit(timeout).unwrap();
        assert_eq!(a.try_admit(timeout).err(), Some(Refusal::Full));
        drop((t1, t2, t3));
        assert_eq!(a.admitted(), 0);
        // 0.4 s a batch of 2: with 2 ahead the request is in the second batch (0.8 s).
        a.observe_batch(0.4);
        let _t1 = a.try_admit(timeout).unwrap();
        let _t2 = a.try_admit(timeout).unwrap();
        assert!((a.estimate(2) - 0.8).abs() < 1e-9);
        let _t3 = a.try_admit(timeout).unwrap();
        // 3 ahead: still the second batch; with decodes at 0.3 s one at a time, over 1 s.
        a.observe_decode(0.3);
        match a.try_admit(timeout) {
            Err(Refusal::Full) => {}
            other => panic!("{:?}", other.err()),
        }
        drop(_t3);
        match a.try_admit(timeout) {
            Err(Refusal::Wait(w)) => assert!((w - (0.8 + 0.9)).abs() < 1e-9, "{w}"),
            other => panic!("{:?}", other.err()),
        }
        // The average follows new batch times with weight 0.2.
        a.observe_batch(0.9);
        assert!((a.estimate(0) - (0.5 + 0.3)).abs() < 1e-9);
    }
}
