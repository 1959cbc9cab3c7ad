//! The `aichat-api` subcommands: `serve` (the default), `migrate`, `create-admin` and
//! `revoke-sessions`.
use anyhow::Context;
use secrecy::ExposeSecret;

use aichat_shared::signals::shutdown_signal;
use aichat_shared::{db, redis_conn};

use crate::Application;
use crate::settings::{Command, Settings, admin_password};
use crate::{hashing, revocation, validate};

/// Runs the command `settings` name.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    match settings.command.clone() {
        None | Some(Command::Serve) => {
            let app = Application::build(settings).await?;
            app.run_until(shutdown_signal()).await
        }
        Some(Command::Migrate) => {
            let pool = db::pool(
                &settings.database,
                db::Planning::Default,
                settings.database.database_max_connections,
            )?;
            db::migrate(&pool).await.context("applying migrations")?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Some(Command::CreateAdmin {
            username,
            email,
            promote_existing,
        }) => create_admin(&settings, &username, &email, promote_existing).await,
        Some(Command::RevokeSessions { username }) => revoke_sessions(&settings, &username).await,
    }
}

/// Creates a staff account with `ADMIN_PASSWORD`, or (with `promote_existing`) makes an
/// existing user staff.
async fn create_admin(
    settings: &Settings,
    username: &str,
    email: &str,
    promote_existing: bool,
) -> anyhow::Result<()> {
    let pool =
        sqlx::postgres::PgPool::connect(settings.database.database_url.expose_secret()).await?;
    db::migrate(&pool).await?;
    let username = validate::normalize_username(username);
    match db::users::staff_status(&pool, &username).await? {
        Some(true) => tracing::info!(%username, "already staff"),
        Some(false) if promote_existing => {
            db::users::set_staff(&pool, &username, true).await?;
            tracing::info!(%username, "existing user is now staff");
        }
        Some(false) => anyhow::bail!(
            "{username} already exists and is not staff; pass --promote-existing to make them staff"
        ),
        None => {
            let password =
                admin_password().context("set ADMIN_PASSWORD to the new staff user's password")?;
            let hash = hashing::hash_password(password.expose_secret())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            db::users::insert_user(&pool, &username, email, &hash, true).await?;
            tracing::info!(%username, "staff user created");
        }
    }
    Ok(())
}

/// Ends every session of `username` (see `revocation::end_user_sessions`).
async fn revoke_sessions(settings: &Settings, username: &str) -> anyhow::Result<()> {
    let pool =
        sqlx::postgres::PgPool::connect(settings.database.database_url.expose_secret()).await?;
    let username = validate::normalize_username(username);
    let user_id = db::users::ids_by_usernames(&pool, std::slice::from_ref(&username))
        .await?
        .first()
        .copied()
        .with_context(|| format!("no user named {username}"))?;
    let redis = redis_conn::connect(settings.redis.redis_url.expose_secret())
        .await
        .context("connecting to Redis")?;
    let ended =
        revocation::end_user_sessions(&pool, &redis, &settings.redis.namespace(), user_id).await?;
    tracing::info!(%username, ended, "sessions revoked");
    Ok(())
}
