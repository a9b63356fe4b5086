//! What every QuckChat binary does first and last: logging, configuration
//! from the environment (one line and exit 64 when it is bad), the
//! configuration logged; and one line with exit 1 when the process fails.

use crate::config::{exit_on_config_error, ConfigError, ConfigReader, ProcessEnv};

/// Sets up logging and reads the process's configuration.
pub fn start<T>(
    process: &str,
    read: impl FnOnce(&mut ConfigReader<'_>) -> Result<T, ConfigError>,
) -> T {
    crate::telemetry::init();
    let mut reader = ConfigReader::new(&ProcessEnv);
    let config = read(&mut reader).unwrap_or_else(|e| exit_on_config_error(&e));
    reader.log(process);
    config
}

/// Ends the process: exit 1 with one line naming the failure.
pub fn finish(process: &str, result: anyhow::Result<()>) {
    if let Err(err) = result {
        eprintln!("{process}: {err:#}");
        std::process::exit(1);
    }
}
