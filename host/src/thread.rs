//! A runtime on a thread of its own: the one way every runtime crate, the daemon and the test
//! rig run a driver they do not poll themselves.

use std::io;

/// A driver serving on a thread of its own, until [`stop`](Self::stop).
pub struct DriverThread<D> {
    stop_and_join: Box<dyn FnOnce() -> io::Result<D> + Send>,
    tid: Option<u32>,
}

/// The kernel's id of the calling thread (what `/proc/PID/task/` lists), from
/// `/proc/thread-self`.
fn current_tid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

impl<D: Send + 'static> DriverThread<D> {
    /// Runs `body` on a new thread named `name`. `stop` tells `body` to finish (it wakes the
    /// loop, which then resets the guest's connections and returns its driver).
    ///
    /// # Errors
    ///
    /// The thread could not be started.
    pub fn spawn(
        name: &str,
        body: impl FnOnce() -> io::Result<D> + Send + 'static,
        stop: impl FnOnce() + Send + 'static,
    ) -> io::Result<Self> {
        let (tell, told) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _ = tell.send(current_tid());
                body()
            })?;
        let tid = told.recv().ok().flatten();
        Ok(DriverThread {
            stop_and_join: Box::new(move || {
                stop();
                handle
                    .join()
                    .map_err(|_| io::Error::other("the vsock loop panicked"))?
            }),
            tid,
        })
    }

    /// The kernel's id of the loop's thread (its `/proc/PID/task/TID`), for per-thread CPU
    /// accounting; `None` where `/proc` cannot tell.
    pub fn tid(&self) -> Option<u32> {
        self.tid
    }

    /// Stops the loop: the guest's connections are reset (the RSTs delivered if it has rx
    /// buffers) and every socket closed. Returns the driver, for its counters; dropping it
    /// unlinks the listener.
    ///
    /// # Errors
    ///
    /// The loop's own failure, if it stopped on one, or its panic.
    pub fn stop(self) -> io::Result<D> {
        (self.stop_and_join)()
    }

    /// Maps the driver the loop returns when stopped, so that loops of different runtimes can
    /// be held as one type.
    pub fn map<E: Send + 'static>(
        self,
        f: impl FnOnce(D) -> E + Send + 'static,
    ) -> DriverThread<E> {
        let inner = self.stop_and_join;
        DriverThread {
            stop_and_join: Box::new(move || inner().map(f)),
            tid: self.tid,
        }
    }
}
