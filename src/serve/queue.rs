//! The bounded request queue and the batching worker (a dedicated OS thread).

use super::metrics::Metrics;
use crate::cli::Task;
use crate::exit::MuePolicy;
use crate::generate::SearchConfig;
use crate::pipeline::{CaptionOutput, Engine, EntailOutput, EntailRequest};
use image::DynamicImage;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

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
    pub reply: oneshot::Sender<JobDone>,
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

/// The worker loop: runs until the queue is closed and drained.
pub fn worker(
    engine: Arc<Engine>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    max_batch: usize,
    max_wait: Duration,
    search: SearchConfig,
) {
    while let Some(batch) = queue.next_batch(max_batch.max(1), max_wait) {
        // Requests whose caller gave up (timeout, disconnect) are not computed.
        let batch: Vec<Job> = batch.into_iter().filter(|j| !j.reply.is_closed()).collect();
        if batch.is_empty() {
            continue;
        }
        let started = Instant::now();
        let results = run_group(&engine, &batch, &search);
        let compute_ms = started.elapsed().as_secs_f64() * 1e3;
        metrics.observe_batch(batch.len());
        let n = batch.len();
        for (job, output) in batch.into_iter().zip(results) {
            if let Ok(out) = &output {
                metrics.observe_exits(match out {
                    JobOutput::Caption(c) => &c.exits,
                    JobOutput::Entail(e) => &e.exits,
                });
            }
            let queue_ms = started.duration_since(job.enqueued).as_secs_f64() * 1e3;
            let _ = job.reply.send(JobDone {
                output,
                queue_ms,
                compute_ms,
                batch_size: n,
            });
        }
    }
}
