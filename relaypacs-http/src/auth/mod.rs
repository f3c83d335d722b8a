//! Users, passwords, tokens, TOTP and login throttling.

pub mod limiter;
pub mod password;
pub mod sql_users;
pub mod tokens;
pub mod totp;
pub mod users;

pub use limiter::{LimiterConfig, LoginLimiter, RetryAfter};
pub use password::{HashBudget, HashBusy, Hasher, PolicyError, check_policy};
pub use sql_users::SqlUserStore;
pub use tokens::{Claims, RefreshError, TokenPair, TokenSettings, Tokens};
pub use totp::TotpBox;
pub use users::{Role, UserRecord, UserStore};
