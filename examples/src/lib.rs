//! Examples of embedding RelayPACS; see `src/bin/`.
