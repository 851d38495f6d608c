//! The one thread that builds and frees snapshots. mimalloc hands a page back to the OS only
//! from the heap of the thread that allocated it: a 100,000-key store built on a short-lived
//! blocking thread and freed by whichever worker let go of it last stayed resident, tens of
//! MiB, after every reload.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// Runs the initial load, every reload pass and state flushes, one at a time, on a thread of
/// its own; clones share the thread.
#[derive(Clone)]
pub struct ReloadThread {
    jobs: mpsc::Sender<Job>,
}

impl ReloadThread {
    /// Starts the thread; it ends once every handle is dropped and its last job is done.
    pub fn start() -> std::io::Result<ReloadThread> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("keygate-reload".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    // A panicking pass must not end reloads for good: its caller sees `None`.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                }
            })?;
        Ok(ReloadThread { jobs })
    }

    /// Runs `f` on the thread without blocking the caller's runtime; `None` if it panicked.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_one_named_thread_and_a_panic_does_not_end_it() {
        let t = ReloadThread::start().unwrap();
        let name = || std::thread::current().name().map(str::to_owned);
        let first = t.run(move || (name(), std::thread::current().id())).await;
        let (n, id) = first.unwrap();
        assert_eq!(n.as_deref(), Some("keygate-reload"));
        assert_eq!(t.run(|| -> u8 { panic!("bad pass") }).await, None);
        assert_eq!(t.run(move || std::thread::current().id()).await, Some(id));
    }
}
