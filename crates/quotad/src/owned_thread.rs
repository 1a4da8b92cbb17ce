//! A thread that belongs to one owner: the actor system, the WAL writer and
//! the snapshot thread each run on one. It is told to stop and joined when
//! its owner stops it or is dropped, so it never outlives what it works for;
//! a panic inside it is logged rather than passed on to the owner.

use std::thread::JoinHandle;

pub struct OwnedThread {
    name: &'static str,
    /// Asks the thread to end; without one, the thread ends by itself. Sync,
    /// so that its owners stay Sync (the benches share an engine across tasks).
    stop: Option<Box<dyn FnOnce() + Send + Sync>>,
    handle: Option<JoinHandle<()>>,
}

impl OwnedThread {
    /// Starts `body` on a thread named `name`.
    pub fn spawn(
        name: &'static str,
        body: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Self> {
        let handle = std::thread::Builder::new().name(name.into()).spawn(body)?;
        Ok(Self {
            name,
            stop: None,
            handle: Some(handle),
        })
    }

    /// How to ask the thread to end, called once before it is joined.
    pub fn stopped_by(mut self, stop: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.stop = Some(Box::new(stop));
        self
    }

    /// Asks the thread to end and waits until it has. Later calls do nothing.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                tracing::error!(thread = self.name, "the thread panicked");
            }
        }
    }

    /// Lets the thread run on by itself: dropping the owner then neither
    /// stops it nor waits for it.
    pub fn detach(&mut self) {
        self.stop = None;
        self.handle = None;
    }
}

impl Drop for OwnedThread {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::OwnedThread;

    #[test]
    fn dropping_the_owner_stops_the_thread_and_waits_for_it() {
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let ended = Arc::new(AtomicBool::new(false));
        let thread = {
            let ended = ended.clone();
            OwnedThread::spawn("test-owned", move || {
                let _ = stop_rx.recv();
                ended.store(true, Ordering::SeqCst);
            })
            .unwrap()
            .stopped_by(move || {
                let _ = stop_tx.send(());
            })
        };
        drop(thread);
        assert!(
            ended.load(Ordering::SeqCst),
            "the drop returned before the thread ended"
        );
    }

    #[test]
    fn a_detached_thread_is_not_waited_for() {
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (ended_tx, ended_rx) = std::sync::mpsc::channel::<()>();
        let mut thread = OwnedThread::spawn("test-detached", move || {
            let _ = go_rx.recv();
            let _ = ended_tx.send(());
        })
        .unwrap();
        thread.detach();
        drop(thread);
        // The drop returned while the thread still waited; it ends once told.
        go_tx.send(()).unwrap();
        ended_rx.recv().unwrap();
    }

    #[test]
    fn a_panic_in_the_thread_is_logged_not_passed_on() {
        let mut thread = OwnedThread::spawn("test-panics", || panic!("inside the thread")).unwrap();
        thread.stop();
        thread.stop();
    }
}
