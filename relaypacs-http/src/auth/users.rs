//! Users: the [`UserStore`] trait and its file-backed default.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use relaypacs_core::{Error, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What a user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Uploads studies and sees their own.
    Uploader,
    /// Reads reports and studies shared with them (issue 4); uploads too.
    Radiologist,
    /// Everything, including user management and other users' sessions.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "uploader" => Ok(Self::Uploader),
            "radiologist" => Ok(Self::Radiologist),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown role {other:?} (uploader, radiologist, admin)"
            )),
        }
    }
}

/// One account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Stable random id (what sessions and audit records name).
    pub id: String,
    /// Login name (unique, case-insensitive).
    pub username: String,
    /// Role.
    pub role: Role,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// Encrypted TOTP secret, once enrolled and confirmed.
    #[serde(default)]
    pub totp: Option<String>,
    /// Encrypted TOTP secret awaiting confirmation.
    #[serde(default)]
    pub totp_pending: Option<String>,
    /// Last TOTP time step accepted (a code is usable once).
    #[serde(default)]
    pub totp_last_step: u64,
    /// A disabled account cannot log in and its tokens stop working.
    #[serde(default)]
    pub disabled: bool,
    /// Tokens issued before this instant are refused (password change,
    /// logout everywhere).
    #[serde(with = "time::serde::rfc3339")]
    pub tokens_valid_after: OffsetDateTime,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// Durable user accounts.
///
/// # Contract
/// `create` fails with [`Error::AlreadyExists`] for a taken username
/// (case-insensitive); `update` replaces a record by id; both are durable
/// when they return `Ok`.
#[async_trait]
pub trait UserStore: Debug + Send + Sync + 'static {
    /// Add a user.
    async fn create(&self, user: UserRecord) -> Result<()>;
    /// Find by login name (case-insensitive).
    async fn by_name(&self, username: &str) -> Result<Option<UserRecord>>;
    /// Find by id.
    async fn by_id(&self, id: &str) -> Result<Option<UserRecord>>;
    /// Replace a user's record.
    async fn update(&self, user: UserRecord) -> Result<()>;
    /// Every user.
    async fn list(&self) -> Result<Vec<UserRecord>>;
}

/// The private folder for account data under `data_dir` (created, mode 0700).
pub fn auth_dir(data_dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = data_dir.join("auth");
    relaypacs_storage::fs::create_dir_durable(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("chmod auth folder", e))?;
    Ok(dir)
}

/// Users in one JSON file, replaced atomically on every change.
#[derive(Debug)]
pub struct FileUserStore {
    path: PathBuf,
    users: Mutex<BTreeMap<String, UserRecord>>,
}

use relaypacs_storage::fs::lock;

impl FileUserStore {
    /// Open (or start) the store at `path`.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let list: Vec<UserRecord> = crate::json_file::read(&path, "read users")?;
        let users = list.into_iter().map(|u| (u.id.clone(), u)).collect();
        Ok(Self {
            path,
            users: Mutex::new(users),
        })
    }

    /// Open the store in `data_dir/auth/users.json`, creating the folder
    /// with mode 0700 (it also holds the refresh-token digests).
    pub fn open_in(data_dir: &Path) -> Result<Self> {
        let dir = auth_dir(data_dir)?;
        Self::open(dir.join("users.json"))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn persist(&self, users: &BTreeMap<String, UserRecord>) -> Result<()> {
        let list: Vec<&UserRecord> = users.values().collect();
        crate::json_file::write(&self.path, &list, "write users")
    }

    fn change(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, UserRecord>) -> Result<()>,
    ) -> Result<()> {
        let mut g = lock(&self.users);
        let mut next = g.clone();
        f(&mut next)?;
        self.persist(&next)?;
        *g = next;
        Ok(())
    }
}

#[async_trait]
impl UserStore for FileUserStore {
    async fn create(&self, user: UserRecord) -> Result<()> {
        self.change(|m| {
            let name = user.username.to_lowercase();
            if m.values().any(|u| u.username.to_lowercase() == name) || m.contains_key(&user.id) {
                return Err(Error::AlreadyExists { what: "user" });
            }
            m.insert(user.id.clone(), user);
            Ok(())
        })
    }

    async fn by_name(&self, username: &str) -> Result<Option<UserRecord>> {
        let name = username.to_lowercase();
        Ok(lock(&self.users)
            .values()
            .find(|u| u.username.to_lowercase() == name)
            .cloned())
    }

    async fn by_id(&self, id: &str) -> Result<Option<UserRecord>> {
        Ok(lock(&self.users).get(id).cloned())
    }

    async fn update(&self, user: UserRecord) -> Result<()> {
        self.change(|m| {
            if !m.contains_key(&user.id) {
                return Err(Error::NotFound { what: "user" });
            }
            m.insert(user.id.clone(), user);
            Ok(())
        })
    }

    async fn list(&self) -> Result<Vec<UserRecord>> {
        Ok(lock(&self.users).values().cloned().collect())
    }
}
