//! Free-space watermark for the data volume.

use std::path::{Path, PathBuf};

/// Free and total bytes of the volume holding `path`.
pub fn space(path: &Path) -> std::io::Result<(u64, u64)> {
    let s = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    Ok((
        s.f_bavail.saturating_mul(s.f_frsize),
        s.f_blocks.saturating_mul(s.f_frsize),
    ))
}

/// Decides whether new data may be admitted.
#[derive(Debug, Clone)]
pub struct Watermark {
    /// Data folder.
    pub path: PathBuf,
    /// Configured minimum (None: computed from the volume size).
    pub configured: Option<u64>,
    /// Largest upload (for the default rule).
    pub max_upload: u64,
}

impl Watermark {
    /// The free bytes that must remain.
    pub fn minimum(&self, total: u64) -> u64 {
        self.configured
            .unwrap_or_else(|| (total / 10).max(self.max_upload.saturating_mul(2)))
    }

    /// Whether `incoming` more bytes fit above the watermark: `Ok(free)` or
    /// `Err((free, minimum))`.
    pub fn admit(&self, incoming: u64) -> std::io::Result<Result<u64, (u64, u64)>> {
        let (free, total) = space(&self.path)?;
        let min = self.minimum(total);
        Ok(if free >= min.saturating_add(incoming) {
            Ok(free)
        } else {
            Err((free, min))
        })
    }
}
