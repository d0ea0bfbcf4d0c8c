//! How `host serve` stops, as GitLab Runner does: SIGQUIT drains (no new jobs, running ones
//! finish), SIGTERM/SIGINT cancel the running jobs (after_script, final update, cleanup) within
//! `shutdown_timeout`, a second one cancels at once (cleanup still runs).

use std::sync::Arc;

use tokio::sync::watch;

/// Only ever moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shutdown {
    Running,
    /// Stop asking for jobs; let the running ones finish.
    Draining,
    /// Stop asking; cancel the running jobs gracefully.
    Cancelling,
    /// Cancel the running jobs at once.
    Forced,
}

#[derive(Clone)]
pub struct Controller {
    state: Arc<watch::Sender<Shutdown>>,
}

impl Default for Controller {
    fn default() -> Self {
        Controller { state: Arc::new(watch::channel(Shutdown::Running).0) }
    }
}

impl Controller {
    pub fn new() -> Controller {
        Controller::default()
    }

    /// SIGQUIT.
    pub fn drain(&self) {
        self.raise(Shutdown::Draining);
    }

    /// SIGTERM/SIGINT: the first cancels gracefully, the next at once.
    pub fn terminate(&self) {
        self.state.send_modify(|s| {
            *s = if *s >= Shutdown::Cancelling { Shutdown::Forced } else { Shutdown::Cancelling };
        });
    }

    pub fn force(&self) {
        self.raise(Shutdown::Forced);
    }

    fn raise(&self, to: Shutdown) {
        self.state.send_if_modified(|s| {
            let raise = to > *s;
            if raise {
                *s = to;
            }
            raise
        });
    }

    pub fn state(&self) -> Shutdown {
        *self.state.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Shutdown> {
        self.state.subscribe()
    }

    /// Resolves once the state is past `Running`.
    pub async fn stopping(&self) {
        let mut rx = self.subscribe();
        let _ = rx.wait_for(|s| *s > Shutdown::Running).await;
    }

    /// Installs the signal handlers, then returns the future that turns the process's signals
    /// into state changes (spawn it; it never ends). Installed before it returns, so no signal
    /// sent afterwards takes its default action. SIGHUP needs no reload: every job reads the
    /// config file again (`[runners.kubernetes]`, plugins); it is logged and says what does need
    /// a restart (the runners, their tokens, `concurrent`, `listen_address`).
    pub fn handle_signals(self) -> std::io::Result<impl std::future::Future<Output = ()> + Send> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut quit = signal(SignalKind::quit())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        Ok(async move {
            loop {
                tokio::select! {
                    _ = quit.recv() => {
                        tracing::info!(signal = "SIGQUIT", "serve.draining");
                        self.drain();
                    }
                    _ = term.recv() => self.on_terminate("SIGTERM"),
                    _ = int.recv() => self.on_terminate("SIGINT"),
                    _ = hup.recv() => tracing::info!(
                        signal = "SIGHUP",
                        "serve.config_read_per_job: new jobs use the config file as it is now; runners, tokens, concurrent and listen_address change only with a restart"
                    ),
                }
            }
        })
    }

    fn on_terminate(&self, signal: &str) {
        self.terminate();
        match self.state() {
            Shutdown::Forced => tracing::warn!(signal, "serve.cancelling_now"),
            _ => tracing::info!(signal, "serve.cancelling"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_moves_forward() {
        let c = Controller::new();
        c.drain();
        assert_eq!(c.state(), Shutdown::Draining);
        c.terminate();
        assert_eq!(c.state(), Shutdown::Cancelling);
        c.drain();
        assert_eq!(c.state(), Shutdown::Cancelling);
        c.terminate();
        assert_eq!(c.state(), Shutdown::Forced);
    }

    /// Real signals to this test process: the handlers are installed before any is sent, and
    /// once installed they replace the default actions (which would end the process).
    #[tokio::test(flavor = "current_thread")]
    async fn signals_drive_the_state() {
        let c = Controller::new();
        let handler = tokio::spawn(c.clone().handle_signals().unwrap());
        let mut states = c.subscribe();
        let pid = std::process::id().to_string();
        for (signal, expected) in [
            ("-HUP", Shutdown::Running),
            ("-QUIT", Shutdown::Draining),
            ("-TERM", Shutdown::Cancelling),
            ("-INT", Shutdown::Forced),
        ] {
            let status = std::process::Command::new("kill").args([signal, &pid]).status().unwrap();
            assert!(status.success());
            if expected == Shutdown::Running {
                // SIGHUP changes nothing; give the handler a moment to (not) act.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                assert_eq!(c.state(), Shutdown::Running);
            } else {
                states.wait_for(|s| *s == expected).await.unwrap();
            }
        }
        handler.abort();
    }
}
