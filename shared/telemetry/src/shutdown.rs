//! Shutdown: one signal shared by every task of a process.

use tokio::sync::watch;

/// A cloneable shutdown trigger and waiter. Dropping every clone does not trigger it.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A shutdown that has not been triggered.
    pub fn new() -> Self {
        Self { tx: watch::channel(false).0 }
    }

    /// Starts the shutdown; every [`Shutdown::wait`] returns.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether the shutdown has started.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once [`Shutdown::trigger`] has been called (at once if it already was).
    /// The future borrows nothing, so it can be held across spawns and selects.
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            // A closed channel means every trigger is gone: nothing can stop us any more, so wait forever.
            if rx.wait_for(|triggered| *triggered).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Resolves on the first SIGTERM or Ctrl-C (SIGINT). The handlers are in
/// place when this returns, before the future is first polled: a signal that
/// comes between this call and the first poll is not lost (nor does it kill
/// the process, as it would before any handler). Call it within the runtime.
///
/// A second signal, while the first one's graceful stop waits for in-flight
/// calls, ends the process at once, saying so, with 128 + the signal's number
/// as a shell reports it (130 for Ctrl-C, 143 for SIGTERM): what a second
/// Ctrl-C means to whoever presses it.
pub fn signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    tokio::spawn(async move {
                        let code = tokio::select! {
                            _ = term.recv() => 128 + 15,
                            _ = int.recv() => 128 + 2,
                        };
                        // Said from a thread of its own, and not waited for long: a
                        // stderr that nobody reads must not hold the exit back.
                        let (said, told) = std::sync::mpsc::channel();
                        std::thread::spawn(move || {
                            crate::errln!(
                                "second stop signal: exiting now, without waiting for in-flight calls"
                            );
                            let _ = said.send(());
                        });
                        let _ = told.recv_timeout(std::time::Duration::from_millis(200));
                        std::process::exit(code);
                    });
                }
                // No handler could be installed (no signal driver): Ctrl-C alone, as tokio offers it.
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async move {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
