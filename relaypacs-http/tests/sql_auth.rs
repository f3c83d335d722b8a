//! Accounts, TOTP steps and refresh-token families in the state database,
//! shared by two gateways: two `SqlUserStore`s and two `Tokens` on two
//! connection pools to one database, on SQLite (a file) and on PostgreSQL
//! (a throwaway cluster). Races run as stress tests of 100 rounds.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use relaypacs_core::Error;
use relaypacs_http::auth::{
    RefreshError, Role, SqlUserStore, TokenSettings, Tokens, UserRecord, UserStore,
};
use relaypacs_http::routes::auth::new_record;
use relaypacs_storage::{SqlOptions, SqlState};
use std::sync::Arc;

const ROUNDS: usize = 100;

/// What keeps the shared database alive.
#[allow(dead_code)] // held for its Drop only
enum Guard {
    Dir(tempfile::TempDir),
    Pg(relaypacs_test_peers::Postgres),
}

/// Two gateways on one database: their own pools, their own stores.
struct Gateway {
    users: SqlUserStore,
    tokens: Tokens,
}

fn secret() -> secrecy::SecretString {
    secrecy::SecretString::from("a shared server secret, the same on every gateway")
}

fn gateway(db: SqlState) -> Gateway {
    let settings = TokenSettings {
        access_ttl_secs: 900,
        refresh_idle_secs: 3600,
        refresh_absolute_secs: 86_400,
        issuer: "relaypacs-test".into(),
        audience: "relaypacs-test".into(),
    };
    Gateway {
        users: SqlUserStore::new(db.clone()),
        tokens: Tokens::new(&secret(), settings, db).unwrap(),
    }
}

async fn pair_on(url: &str) -> (G, G) {
    let options = SqlOptions::default();
    let a = SqlState::connect(url, None, &options).await.unwrap();
    let b = SqlState::connect(url, None, &options).await.unwrap();
    (Arc::new(gateway(a)), Arc::new(gateway(b)))
}

type G = Arc<Gateway>;

/// Run `f` on both gateways at once, each on its own task (threads of the
/// multi-threaded runtime).
async fn both<T, F, Fut>(a: &G, b: &G, f: F) -> (T, T)
where
    T: Send + 'static,
    F: Fn(G) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let x = tokio::spawn(f(a.clone()));
    let y = tokio::spawn(f(b.clone()));
    (x.await.unwrap(), y.await.unwrap())
}

async fn sqlite() -> (G, G, Guard) {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let (a, b) = pair_on(&url).await;
    (a, b, Guard::Dir(dir))
}

async fn postgres() -> (G, G, Guard) {
    let pg = tokio::task::spawn_blocking(relaypacs_test_peers::Postgres::start)
        .await
        .unwrap();
    let url = pg.create_database("relay");
    let (a, b) = pair_on(&url).await;
    (a, b, Guard::Pg(pg))
}

fn record(name: &str) -> UserRecord {
    new_record(
        name,
        Role::Uploader,
        "$argon2id$v=19$m=19456,t=2,p=1$x$y".into(),
    )
}

/// Two gateways create one username (differing in case) at once: exactly
/// one wins, the other gets AlreadyExists, and both see the winner.
async fn duplicate_username(a: G, b: G) {
    for i in 0..ROUNDS {
        let ra = record(&format!("Dup{i}"));
        let rb = record(&format!("dUP{i}"));
        let (ida, idb) = (ra.id.clone(), rb.id.clone());
        let (ga, gb) = (a.clone(), b.clone());
        let x = tokio::spawn(async move { ga.users.create(ra).await });
        let y = tokio::spawn(async move { gb.users.create(rb).await });
        let (x, y) = (x.await.unwrap(), y.await.unwrap());
        let winner = match (&x, &y) {
            (Ok(()), Err(Error::AlreadyExists { what: "user" })) => ida,
            (Err(Error::AlreadyExists { what: "user" }), Ok(())) => idb,
            other => panic!("round {i}: {other:?}"),
        };
        for g in [&a, &b] {
            let found = g.users.by_name(&format!("DUP{i}")).await.unwrap().unwrap();
            assert_eq!(found.id, winner, "round {i}");
        }
    }
    assert_eq!(a.users.list().await.unwrap().len(), ROUNDS);
    // Renaming onto a taken name is refused too.
    let mut r = a.users.by_name("dup1").await.unwrap().unwrap();
    r.username = "DUP0".into();
    assert!(matches!(
        b.users.update(r).await,
        Err(Error::AlreadyExists { .. })
    ));
}

/// A token rotated on A and then replayed on B revokes the family on both:
/// the rotated token and every access token of the login stop working.
async fn replay_across_gateways(a: G, b: G) {
    let u = record("replay");
    a.users.create(u.clone()).await.unwrap();
    let first = a.tokens.login(&u.id, u.role).await.unwrap();
    let role_of = |_: &str| Some(Role::Uploader);
    let (second, who) = a
        .tokens
        .refresh(&first.refresh_token, role_of)
        .await
        .unwrap();
    assert_eq!(who, u.id);
    // B sees the login alive before the replay.
    assert!(
        b.tokens
            .verify(&second.access_token)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        b.tokens.refresh(&first.refresh_token, role_of).await.err(),
        Some(RefreshError::Reused { user: u.id.clone() })
    );
    for g in [&a, &b] {
        assert!(
            g.tokens
                .verify(&first.access_token)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            g.tokens
                .verify(&second.access_token)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            g.tokens.refresh(&second.refresh_token, role_of).await.err(),
            Some(RefreshError::Invalid)
        );
    }
    // A logout on B holds on A.
    let other = a.tokens.login(&u.id, u.role).await.unwrap();
    assert!(
        a.tokens
            .verify(&other.access_token)
            .await
            .unwrap()
            .is_some()
    );
    let sid = a
        .tokens
        .verify(&other.access_token)
        .await
        .unwrap()
        .unwrap()
        .sid;
    // The server's one-read check (signature, then the account in its
    // live login) agrees with `verify`, on both gateways.
    let claims = a.tokens.decode(&other.access_token).unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.sid.as_str()),
        (u.id.as_str(), sid.as_str())
    );
    for g in [&a, &b] {
        let found = g.users.by_id_in_live_family(&u.id, &sid).await.unwrap();
        assert_eq!(found.map(|r| r.id), Some(u.id.clone()));
        // Another user's id with this family, or an unknown family: none.
        assert!(
            g.users
                .by_id_in_live_family("someone-else", &sid)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            g.users
                .by_id_in_live_family(&u.id, "no-such-family")
                .await
                .unwrap()
                .is_none()
        );
    }
    b.tokens.revoke(&sid).await.unwrap();
    assert!(
        a.tokens
            .verify(&other.access_token)
            .await
            .unwrap()
            .is_none()
    );
    // The signature still checks out; the login is what is revoked.
    assert!(a.tokens.decode(&other.access_token).is_some());
    assert!(
        a.users
            .by_id_in_live_family(&u.id, &sid)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        a.tokens.refresh(&other.refresh_token, role_of).await.err(),
        Some(RefreshError::Invalid)
    );
}

/// One refresh token rotated on both gateways at once: exactly one
/// rotation succeeds; the other presented a token that is no longer
/// current, which revokes the family (as a second use does on one gateway).
async fn concurrent_rotations(a: G, b: G) {
    let u = record("rotor");
    a.users.create(u.clone()).await.unwrap();
    let role_of = |_: &str| Some(Role::Uploader);
    for i in 0..ROUNDS {
        let pair = a.tokens.login(&u.id, u.role).await.unwrap();
        let token = pair.refresh_token.clone();
        let (x, y) = both(&a, &b, move |g| {
            let token = token.clone();
            async move { g.tokens.refresh(&token, role_of).await }
        })
        .await;
        let won = match (x, y) {
            (Ok((p, _)), Err(RefreshError::Reused { .. }))
            | (Err(RefreshError::Reused { .. }), Ok((p, _))) => p,
            other => panic!("round {i}: {other:?}"),
        };
        assert_eq!(
            a.tokens.refresh(&won.refresh_token, role_of).await.err(),
            Some(RefreshError::Invalid),
            "round {i}"
        );
    }
}

/// A TOTP step accepted on A is refused on B; of two gateways taking one
/// step at once, exactly one gets it; a stale update never lowers it.
async fn totp_step_once(a: G, b: G) {
    let u = record("otp");
    a.users.create(u.clone()).await.unwrap();
    assert!(a.users.accept_totp_step(&u.id, 1000).await.unwrap());
    assert!(!b.users.accept_totp_step(&u.id, 1000).await.unwrap());
    assert!(!b.users.accept_totp_step(&u.id, 999).await.unwrap());
    // A stale record written back (last step 0) keeps the stored step.
    b.users.update(u.clone()).await.unwrap();
    assert_eq!(
        a.users.by_id(&u.id).await.unwrap().unwrap().totp_last_step,
        1000
    );
    assert!(!a.users.accept_totp_step(&u.id, 1000).await.unwrap());
    for i in 0..ROUNDS as u64 {
        let step = 2000 + i;
        let id = u.id.clone();
        let (x, y) = both(&a, &b, move |g| {
            let id = id.clone();
            async move { g.users.accept_totp_step(&id, step).await }
        })
        .await;
        assert!(x.unwrap() ^ y.unwrap(), "round {i}");
    }
    assert!(!a.users.accept_totp_step("no-such-user", 1).await.unwrap());
}

/// The rehash at login writes only the hash, and only over the hash it
/// read: an account disabled on B meanwhile stays disabled.
async fn rehash_keeps_changes(a: G, b: G) {
    let u = record("rehash");
    a.users.create(u.clone()).await.unwrap();
    let mut disabled = u.clone();
    disabled.disabled = true;
    b.users.update(disabled).await.unwrap();
    assert!(
        a.users
            .rehash_password(&u.id, &u.password_hash, "$argon2id$new")
            .await
            .unwrap()
    );
    let now = b.users.by_id(&u.id).await.unwrap().unwrap();
    assert!(now.disabled);
    assert_eq!(now.password_hash, "$argon2id$new");
    // A second rehash from the same stale copy changes nothing.
    assert!(
        !b.users
            .rehash_password(&u.id, &u.password_hash, "$argon2id$other")
            .await
            .unwrap()
    );
    let now = a.users.by_id(&u.id).await.unwrap().unwrap();
    assert_eq!(now.password_hash, "$argon2id$new");
}

macro_rules! on_both {
    ($($case:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let (a, b, _guard) = super::sqlite().await;
                    super::$case(a, b).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let (a, b, _guard) = super::postgres().await;
                    super::$case(a, b).await;
                }
            )*
        }
    };
}

on_both!(
    duplicate_username,
    replay_across_gateways,
    concurrent_rotations,
    totp_step_once,
    rehash_keeps_changes,
);
