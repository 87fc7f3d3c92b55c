//! Tracing set-up for the binaries: `RUST_LOG` filter (default `info`), human or JSON output on stderr.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber; stdout stays free for machine-readable output (`--json`). `default_level`
/// applies when `RUST_LOG` is not set.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            // Colours only for a person at a terminal: in a file, a pipe or the journal they are escape codes in
            // every line, and they break a `grep round=` (https://no-color.org for NO_COLOR).
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            let _ = builder.with_ansi(colour).try_init();
        }
        LogFormat::Json => {
            let _ = builder.json().try_init();
        }
    }
}
