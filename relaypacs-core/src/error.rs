//! The one error hierarchy of RelayPACS.
//!
//! Every adapter maps its failures into [`Error`]; the HTTP layer maps
//! [`Error::kind`] to a status and [`Error::code`] to a stable machine code.
//! Variants are semantic (what went wrong for the caller), the underlying
//! cause is reachable through [`std::error::Error::source`].

use std::borrow::Cow;

use crate::dicom::DicomError;

/// Result alias used throughout RelayPACS.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Boxed cause of a storage or PACS error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Coarse classification of an [`Error`], used to pick an HTTP status and
/// to decide whether to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request is malformed or breaks a rule (client's fault).
    Invalid,
    /// A size, count or rate limit was exceeded (client's fault).
    LimitExceeded,
    /// Bytes do not match their declared length or checksum.
    Integrity,
    /// The request conflicts with stored state (same chunk, other bytes).
    Conflict,
    /// Another request holds the resource right now; retry later.
    Busy,
    /// The resource does not exist (or is not visible to this actor).
    NotFound,
    /// The resource existed but has expired.
    Gone,
    /// Authentication or authorisation failed.
    Auth,
    /// The storage backend failed.
    Storage,
    /// The storage backend is out of space.
    InsufficientStorage,
    /// The PACS failed or refused.
    Pacs,
    /// The audit trail could not be written, so the action was refused.
    Audit,
}

/// Kinds of storage failure that adapters distinguish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageErrorKind {
    /// An I/O error (EIO, broken connection, …).
    Io,
    /// No space left on the device or quota exceeded.
    Full,
    /// The backend is unreachable right now; retrying may help.
    Unavailable,
    /// Stored data is unreadable or inconsistent.
    Corrupt,
}

/// Reasons an integrity check fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IntegrityError {
    /// A chunk's bytes do not hash to its declared SHA-256.
    #[error("chunk at offset {offset}: SHA-256 mismatch (declared {expected}, received {actual})")]
    ChunkHash {
        /// Byte offset of the chunk.
        offset: u64,
        /// Declared digest (hex).
        expected: String,
        /// Computed digest (hex).
        actual: String,
    },
    /// A chunk carried more or fewer bytes than declared.
    #[error("chunk at offset {offset}: declared {expected} bytes, received {actual}")]
    ChunkLength {
        /// Byte offset of the chunk.
        offset: u64,
        /// Declared length.
        expected: u64,
        /// Bytes actually received (may stop counting once over).
        actual: u64,
    },
    /// The whole file does not hash to its declared SHA-256.
    #[error("file SHA-256 mismatch (declared {expected}, computed {actual})")]
    FileHash {
        /// Declared digest (hex).
        expected: String,
        /// Computed digest (hex).
        actual: String,
    },
    /// A stored chunk no longer hashes to the digest recorded when it was acknowledged.
    #[error("stored chunk at offset {offset} is corrupt (recorded {expected}, now {actual})")]
    StoredChunkCorrupt {
        /// Byte offset of the chunk.
        offset: u64,
        /// Digest recorded at acknowledgement (hex).
        expected: String,
        /// Digest of the bytes read back (hex).
        actual: String,
    },
    /// A chunk's bytes do not match a checksum declared by a transport
    /// (e.g. tus `Upload-Checksum` with SHA-1).
    #[error(
        "chunk at offset {offset}: {algorithm} checksum mismatch (declared {expected}, received {actual})"
    )]
    ChunkChecksum {
        /// Byte offset of the chunk.
        offset: u64,
        /// Checksum algorithm name (e.g. "sha1").
        algorithm: &'static str,
        /// Declared checksum (hex).
        expected: String,
        /// Computed checksum (hex).
        actual: String,
    },
    /// The stored file has a different size than declared.
    #[error("stored file has {actual} bytes, {expected} declared")]
    StoredSize {
        /// Declared size.
        expected: u64,
        /// Size read back.
        actual: u64,
    },
}

/// The RelayPACS error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed or breaks a rule.
    #[error("{message}")]
    Invalid {
        /// Stable code such as `RELAY_BAD_RANGE`.
        code: &'static str,
        /// Human-readable explanation (never contains patient data).
        message: String,
    },
    /// A configured limit was exceeded.
    #[error("{what} exceeds the limit ({actual} > {limit})")]
    LimitExceeded {
        /// What was limited (e.g. "file size").
        what: &'static str,
        /// The limit.
        limit: u64,
        /// The requested or observed amount.
        actual: u64,
    },
    /// Bytes failed an integrity check; nothing was recorded.
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
    /// A per-user cap on things held at once (open sessions, …) is
    /// reached; retrying after one of them ends can succeed.
    #[error("too many {what} (at most {limit})")]
    TooMany {
        /// Stable code such as `RELAY_TOO_MANY_SESSIONS`.
        code: &'static str,
        /// What is capped (e.g. "open sessions").
        what: &'static str,
        /// The cap.
        limit: u64,
    },
    /// Not enough free storage to admit new work (the gateway's
    /// watermark), refused before anything was written.
    #[error("insufficient storage: {reason}")]
    InsufficientStorage {
        /// Bytes that were asked for (0: any new work).
        needed: u64,
        /// Explanation (free space, watermark).
        reason: String,
    },
    /// The request conflicts with what is stored.
    #[error("conflict: {reason}")]
    Conflict {
        /// Stable code such as `RELAY_CHUNK_CONFLICT`.
        code: &'static str,
        /// Explanation.
        reason: String,
    },
    /// Another request is using the resource; retry later.
    #[error("busy: {what}")]
    Busy {
        /// What is busy.
        what: String,
    },
    /// Not found, or not visible to the caller.
    #[error("{what} not found")]
    NotFound {
        /// What was looked up ("session", "file", "chunk", …).
        what: &'static str,
    },
    /// A compare-and-set precondition failed (stale version).
    #[error("precondition failed: {what}")]
    Precondition {
        /// What was compared.
        what: String,
    },
    /// An object that must be new already exists.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What already exists.
        what: &'static str,
    },
    /// The session expired.
    #[error("session expired")]
    Gone,
    /// The DICOM content is invalid or hostile.
    #[error("invalid DICOM: {0}")]
    Dicom(#[from] DicomError),
    /// The file belongs to another study than the session.
    #[error("file belongs to study {actual}, the session holds study {expected}")]
    StudyMismatch {
        /// The session's study.
        expected: String,
        /// The file's study.
        actual: String,
    },
    /// Authentication or authorisation failure.
    #[error("{reason}")]
    Auth {
        /// Stable code such as `RELAY_UNAUTHENTICATED`.
        code: &'static str,
        /// Explanation (never contains a credential).
        reason: String,
    },
    /// A storage backend failed.
    #[error("storage {kind:?} error during {op}")]
    Storage {
        /// Failure class.
        kind: StorageErrorKind,
        /// Operation that failed (e.g. "fsync chunk").
        op: Cow<'static, str>,
        /// Underlying cause.
        #[source]
        source: BoxError,
    },
    /// The PACS failed.
    #[error("PACS {} failure: {reason}", if *transient { "transient" } else { "permanent" })]
    Pacs {
        /// Whether retrying later may succeed.
        transient: bool,
        /// The PACS's reason, as reported.
        reason: String,
        /// How long the PACS asked us to wait (`Retry-After`), if it did.
        retry_after: Option<std::time::Duration>,
        /// Underlying cause, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// A file was refused for its content and removed from its session
    /// (see [`Pipeline::complete_file`](crate::Pipeline::complete_file)).
    /// Kind and code are those of `source`.
    #[error("{source}")]
    FileRefused {
        /// (0008,0016) of the file, when it could be read.
        sop_class_uid: Option<crate::Uid>,
        /// (0008,0018) of the file, when it could be read.
        sop_instance_uid: Option<crate::Uid>,
        /// Why it was refused.
        #[source]
        source: Box<Error>,
    },
    /// The audit trail could not be written; the action was refused (fail closed).
    #[error("audit trail unavailable")]
    Audit {
        /// Underlying cause.
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// A client-side validation error with a stable code.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            code,
            message: message.into(),
        }
    }

    /// A conflict with a stable code.
    pub fn conflict(code: &'static str, reason: impl Into<String>) -> Self {
        Self::Conflict {
            code,
            reason: reason.into(),
        }
    }

    /// A storage error from an I/O error; ENOSPC/EDQUOT become [`StorageErrorKind::Full`].
    pub fn io(op: impl Into<Cow<'static, str>>, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(28) | Some(122) => StorageErrorKind::Full, // ENOSPC, EDQUOT on Linux
            _ => match err.kind() {
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                    StorageErrorKind::Full
                }
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
                    StorageErrorKind::Corrupt
                }
                _ => StorageErrorKind::Io,
            },
        };
        Self::Storage {
            kind,
            op: op.into(),
            source: Box::new(err),
        }
    }

    /// A storage error of a given kind with any cause.
    pub fn storage(
        kind: StorageErrorKind,
        op: impl Into<Cow<'static, str>>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::Storage {
            kind,
            op: op.into(),
            source: source.into(),
        }
    }

    /// A PACS failure that a later retry may fix (unreachable, 5xx, timeout).
    pub fn pacs_transient(reason: impl Into<String>, source: Option<BoxError>) -> Self {
        Self::Pacs {
            transient: true,
            reason: reason.into(),
            retry_after: None,
            source,
        }
    }

    /// A PACS refusal that retrying unchanged will not fix (4xx, rejected
    /// association, refused instance).
    pub fn pacs_permanent(reason: impl Into<String>, source: Option<BoxError>) -> Self {
        Self::Pacs {
            transient: false,
            reason: reason.into(),
            retry_after: None,
            source,
        }
    }

    /// The coarse class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid { .. } | Self::Dicom(_) | Self::StudyMismatch { .. } => {
                ErrorKind::Invalid
            }
            Self::LimitExceeded { .. } | Self::TooMany { .. } => ErrorKind::LimitExceeded,
            Self::InsufficientStorage { .. } => ErrorKind::InsufficientStorage,
            Self::Integrity(_) => ErrorKind::Integrity,
            Self::Conflict { .. } | Self::Precondition { .. } | Self::AlreadyExists { .. } => {
                ErrorKind::Conflict
            }
            Self::Busy { .. } => ErrorKind::Busy,
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::Gone => ErrorKind::Gone,
            Self::Auth { .. } => ErrorKind::Auth,
            Self::Storage {
                kind: StorageErrorKind::Full,
                ..
            } => ErrorKind::InsufficientStorage,
            Self::Storage { .. } => ErrorKind::Storage,
            Self::Pacs { .. } => ErrorKind::Pacs,
            Self::Audit { .. } => ErrorKind::Audit,
            Self::FileRefused { source, .. } => source.kind(),
        }
    }

    /// The error itself, or what a [`FileRefused`](Self::FileRefused) wraps.
    pub fn root(&self) -> &Error {
        match self {
            Self::FileRefused { source, .. } => source.root(),
            e => e,
        }
    }

    /// Whether the same request may succeed if retried later unchanged.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Busy { .. } | Self::Precondition { .. } => true,
            Self::Storage { kind, .. } => {
                matches!(kind, StorageErrorKind::Io | StorageErrorKind::Unavailable)
            }
            Self::Pacs { transient, .. } => *transient,
            Self::Audit { source } => source.is_retryable(),
            _ => false,
        }
    }

    /// A stable machine-readable code, e.g. `RELAY_CHUNK_HASH_MISMATCH`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { code, .. }
            | Self::Conflict { code, .. }
            | Self::Auth { code, .. }
            | Self::TooMany { code, .. } => code,
            Self::InsufficientStorage { .. } => "RELAY_INSUFFICIENT_STORAGE",
            Self::LimitExceeded { .. } => "RELAY_LIMIT_EXCEEDED",
            Self::Integrity(i) => match i {
                IntegrityError::ChunkHash { .. } => "RELAY_CHUNK_HASH_MISMATCH",
                IntegrityError::ChunkLength { .. } => "RELAY_CHUNK_LENGTH_MISMATCH",
                IntegrityError::ChunkChecksum { .. } => "RELAY_CHUNK_CHECKSUM_MISMATCH",
                IntegrityError::FileHash { .. } => "RELAY_FILE_HASH_MISMATCH",
                IntegrityError::StoredChunkCorrupt { .. } => "RELAY_STORED_CHUNK_CORRUPT",
                IntegrityError::StoredSize { .. } => "RELAY_STORED_SIZE_MISMATCH",
            },
            Self::Busy { .. } => "RELAY_BUSY",
            Self::NotFound { .. } => "RELAY_NOT_FOUND",
            Self::Precondition { .. } => "RELAY_PRECONDITION_FAILED",
            Self::AlreadyExists { .. } => "RELAY_ALREADY_EXISTS",
            Self::Gone => "RELAY_SESSION_EXPIRED",
            Self::Dicom(d) => d.code(),
            Self::StudyMismatch { .. } => "RELAY_STUDY_MISMATCH",
            Self::Storage {
                kind: StorageErrorKind::Full,
                ..
            } => "RELAY_STORAGE_FULL",
            Self::Storage { .. } => "RELAY_STORAGE_ERROR",
            Self::Pacs {
                transient: true, ..
            } => "RELAY_PACS_TRANSIENT",
            Self::Pacs {
                transient: false, ..
            } => "RELAY_PACS_REJECTED",
            Self::Audit { .. } => "RELAY_AUDIT_UNAVAILABLE",
            Self::FileRefused { source, .. } => source.code(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_full() {
        let e = Error::io("write chunk", std::io::Error::from_raw_os_error(28));
        assert_eq!(e.kind(), ErrorKind::InsufficientStorage);
        assert_eq!(e.code(), "RELAY_STORAGE_FULL");
        assert!(!e.is_retryable());
        let e = Error::io("write chunk", std::io::Error::from_raw_os_error(5));
        assert_eq!(e.kind(), ErrorKind::Storage);
        assert!(e.is_retryable());
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn caps_and_storage_admission_have_stable_codes() {
        let e = Error::TooMany {
            code: "RELAY_TOO_MANY_SESSIONS",
            what: "open sessions",
            limit: 64,
        };
        assert_eq!(e.kind(), ErrorKind::LimitExceeded);
        assert_eq!(e.code(), "RELAY_TOO_MANY_SESSIONS");
        assert_eq!(e.to_string(), "too many open sessions (at most 64)");
        let e = Error::InsufficientStorage {
            needed: 0,
            reason: "free space below the watermark".into(),
        };
        assert_eq!(e.kind(), ErrorKind::InsufficientStorage);
        assert_eq!(e.code(), "RELAY_INSUFFICIENT_STORAGE");
        assert!(!e.is_retryable());
    }
}
