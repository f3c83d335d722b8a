//! PACS sinks.
