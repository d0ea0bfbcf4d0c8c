//! Logging to the host. Lines are tagged with the plugin's name and the job id by the host.
//! In native tests (no host) they go to stderr when `KEEL_SDK_LOG` is set.

#[doc(hidden)]
pub fn __write(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        use crate::bindings::keel::plugin::host::{LogLevel, log};
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        log(level, message);
    }
    // Natively (tests, benchmarks) there is no host; print only when asked, so a benchmark's
    // native baseline is not dominated by terminal writes the wasm build never does.
    #[cfg(not(target_arch = "wasm32"))]
    if std::env::var_os("KEEL_SDK_LOG").is_some() {
        eprintln!("[{level:?}] {message}");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log::__write($crate::log::Level::Debug, &format!($($arg)*)) } }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log::__write($crate::log::Level::Info, &format!($($arg)*)) } }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log::__write($crate::log::Level::Warn, &format!($($arg)*)) } }
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log::__write($crate::log::Level::Error, &format!($($arg)*)) } }
