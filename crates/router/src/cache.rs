//! The cache file: the last snapshot the router applied from the
//! controller, so that a router started while the controller is away can
//! still route. Its format is a snapshot line of the push protocol.

use std::path::{Path, PathBuf};

use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Applied, Source};
use signpost_protocol::{Message, Mirror, WireError};

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("cache file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache file {path}: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: WireError,
    },
}

/// Writes the mirror atomically: a reader (or a crash) sees the old file or
/// the new one, never half of one.
pub async fn store(path: &Path, mirror: &Mirror) -> Result<(), CacheError> {
    let Some(message) = mirror.to_snapshot() else {
        return Ok(());
    };
    let io = |source| CacheError::Io {
        path: path.to_owned(),
        source,
    };
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".tmp.{}", std::process::id()));
    let temp = PathBuf::from(temp);
    let mut file = tokio::fs::File::create(&temp).await.map_err(io)?;
    file.write_all(&message.to_line()).await.map_err(io)?;
    file.sync_all().await.map_err(io)?;
    drop(file);
    tokio::fs::rename(&temp, path).await.map_err(io)
}

pub async fn load(path: &Path) -> Result<Mirror, CacheError> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|source| CacheError::Io {
            path: path.to_owned(),
            source,
        })?;
    let corrupt = |source| CacheError::Corrupt {
        path: path.to_owned(),
        source,
    };
    let line = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let message = Message::from_line(line).map_err(corrupt)?;
    if !matches!(message, Message::Snapshot { .. }) {
        return Err(corrupt(WireError::Malformed {
            reason: "not a snapshot".into(),
            line: String::new(),
        }));
    }
    let mut mirror = Mirror::default();
    mirror.apply(message).map_err(corrupt)?;
    Ok(mirror)
}

/// Writes every revision applied from the controller. Revisions that arrive
/// while a write is under way coalesce into the next write.
pub async fn keep(path: PathBuf, mut applied: watch::Receiver<Applied>) {
    while applied.changed().await.is_ok() {
        let latest = applied.borrow_and_update().clone();
        if latest.source != Some(Source::Controller) {
            continue;
        }
        match store(&path, &latest.mirror).await {
            Ok(()) => {
                info!(path = %path.display(), revision = ?latest.mirror.revision, "cache written")
            }
            Err(e) => warn!(error = %e, "cannot write the cache; routing is unaffected"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_protocol::PROTOCOL;

    #[tokio::test]
    async fn a_stored_mirror_loads_back_and_garbage_is_refused() {
        let dir = std::env::temp_dir().join(format!("signpost-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("routes.json");
        let mut mirror = Mirror::default();
        let line = format!(
            r#"{{"type":"snapshot","protocol":{PROTOCOL},"epoch":3,"revision":9,"services":[{{"name":"users","route":"/users","endpoints":[{{"instance":"i-1","address":"127.0.0.1","port":80,"zone":"a","state":"healthy"}}]}}]}}"#
        );
        mirror
            .apply(Message::from_line(line.as_bytes()).unwrap())
            .unwrap();
        store(&path, &mirror).await.unwrap();
        assert_eq!(load(&path).await.unwrap(), mirror);
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");

        std::fs::write(&path, "{\"type\":\"ping\",\"revision\":1}\n").unwrap();
        assert!(matches!(load(&path).await, Err(CacheError::Corrupt { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
