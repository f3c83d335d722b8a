//! Placeholder replaced by the pre-scan implementation.
use super::DicomError;

/// Limits of the pre-scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrescanLimits {
    /// Deepest sequence nesting.
    pub max_depth: u32,
}

/// What the pre-scan found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrescanReport {
    /// Transfer syntax.
    pub transfer_syntax: String,
}

/// Pre-scan.
pub fn prescan(_bytes: &[u8], _total_len: u64, _limits: &PrescanLimits) -> Result<PrescanReport, DicomError> {
    Err(DicomError::Malformed { offset: 0, reason: "pre-scan not built yet".into() })
}
