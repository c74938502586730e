//! The tracing subscriber: human-readable by default, JSON when configured; `RUST_LOG` overrides the level.
//! Logs go to stderr; stdout carries only the start-up lines meant for people and scripts.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Changes the level filter of the subscriber [`init`] installed: `log.level` on reload.
pub struct LogLevel(Box<SetLevel>);

/// The subscriber's reload handle, whose type depends on the log format.
type SetLevel = dyn Fn(&str) -> Result<(), String> + Send + Sync;

impl LogLevel {
    /// Applies `level`, unless `RUST_LOG` is set (it wins, as at start-up); says whether it was applied.
    pub fn set(&self, level: &str) -> Result<bool, String> {
        if std::env::var_os(EnvFilter::DEFAULT_ENV).is_some() {
            return Ok(false);
        }
        (self.0)(level).map(|()| true)
    }
}

/// Installs the subscriber; `None` if one was installed already (tests start several gateways in one process).
pub fn init(config: &LogConfig) -> Option<LogLevel> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: escape codes in collected logs are noise.
        .with_ansi(std::io::stderr().is_terminal());
    macro_rules! install {
        ($builder:expr) => {{
            // Last, once the subscriber's type is settled.
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().ok()?;
            LogLevel(Box::new(move |level| {
                let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
                handle.reload(filter).map_err(|e| e.to_string())
            }))
        }};
    }
    Some(match config.format {
        LogFormat::Json => install!(builder.json().flatten_event(true)),
        LogFormat::Text => install!(builder),
    })
}
