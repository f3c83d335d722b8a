//! The RelayPACS reference HTTP server (built in the next milestone; see issue 3).
