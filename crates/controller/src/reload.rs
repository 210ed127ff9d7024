//! Files the controller re-reads when they change (TLS certificates and
//! keys, the tokens file), so that a rotation needs no restart.
//!
//! Polling, not inotify: Kubernetes updates a mounted Secret by swapping a
//! symlink to a new directory, which file watchers miss or see twice; a
//! comparison of the bytes every few seconds sees it once. A file that
//! turns bad is logged and the last good value stays in force: a half
//! written certificate must not take the API down.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::ConfigError;

/// A file with the config key that names it, for errors.
#[derive(Clone, Debug)]
pub struct KeyedFile {
    pub key: &'static str,
    pub path: PathBuf,
}

impl KeyedFile {
    pub fn new(key: &'static str, path: PathBuf) -> KeyedFile {
        KeyedFile { key, path }
    }

    fn read(&self) -> Result<Vec<u8>, ConfigError> {
        std::fs::read(&self.path).map_err(|e| ConfigError::Invalid {
            key: self.key.into(),
            reason: format!("cannot read {}: {e}", self.path.display()),
        })
    }
}

/// Builds a value from the contents of `files` (in order); its error names
/// the config key at fault.
pub type Build<T> = dyn Fn(&[Vec<u8>]) -> Result<T, ConfigError> + Send + Sync;

/// Reads and builds once (an error stops the start), then re-reads every
/// `interval` until `stop`, publishing each new good value.
pub fn watch_files<T: Send + Sync + 'static>(
    files: Vec<KeyedFile>,
    interval: Duration,
    build: Box<Build<T>>,
    stop: CancellationToken,
) -> Result<watch::Receiver<Arc<T>>, ConfigError> {
    let read_all = |files: &[KeyedFile]| -> Result<Vec<Vec<u8>>, ConfigError> {
        files.iter().map(KeyedFile::read).collect()
    };
    let mut contents = read_all(&files)?;
    let (tx, rx) = watch::channel(Arc::new(build(&contents)?));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let fresh = match read_all(&files) {
                Ok(fresh) if fresh != contents => fresh,
                Ok(_) => continue,
                Err(e) => {
                    error!(error = %e, "keeping the last good version");
                    continue;
                }
            };
            match build(&fresh) {
                Ok(value) => {
                    let paths: Vec<_> =
                        files.iter().map(|f| f.path.display().to_string()).collect();
                    info!(files = ?paths, "re-read after a change");
                    tx.send_replace(Arc::new(value));
                }
                Err(e) => error!(error = %e, "keeping the last good version"),
            }
            // Also after a failed build: the same bad bytes are not worth a
            // log line every tick.
            contents = fresh;
        }
    });
    Ok(rx)
}
