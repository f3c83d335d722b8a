//! The server's integration tests, one test binary: each module is one
//! feature's tests against a real server on loopback (and the real peers
//! it needs). One binary instead of one per file keeps a clean build's
//! disk footprint small (every test binary links the whole server); tests
//! that measure timing stay in binaries of their own (`slow_body`), as
//! does the browser test (`browser`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

mod common;

mod admin_users;
mod analytics;
mod audit_cli;
mod audit_findings;
mod auth;
mod bad_input;
mod caps;
mod cli_upload;
mod cookie_auth;
mod cstore_verification;
mod delivery;
mod denied_access;
mod denied_notifications;
mod edges;
mod kill9_delivery;
mod login_memory;
mod logs;
mod metrics_bounds;
mod multi_gateway;
mod notification_repair;
mod pagination;
mod proxy_cap;
mod real_clients;
mod refused_uploads;
mod reports_view;
mod route_layers;
mod s3_chunks;
mod shared_guards;
mod sql_audit_server;
mod sql_auth;
mod sql_user_races;
mod standard_corpus;
mod stow;
mod stow_part_headers;
mod stow_spool;
mod three_gateways;
mod tls;
mod tus_protocol;
mod web_app;
