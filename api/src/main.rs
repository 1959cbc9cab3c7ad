use anyhow::Context;
use clap::Parser;

use aichat_api::settings::Command;
use aichat_api::{Application, Settings, shutdown_signal};
use aichat_shared::{config, db, redis_conn, telemetry};
use secrecy::ExposeSecret;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    config::load_dotenv();
    let settings = Settings::parse();
    telemetry::init(&settings.log);
    let database = settings.database.clone();
    match run(settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("Error: {err:#}");
            if let Some(hint) = db::missing_database_hint(&database, err.as_ref()) {
                eprintln!("{hint}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    match settings.command.clone() {
        None | Some(Command::Serve) => {
            let app = Application::build(settings).await?;
            app.run_until(shutdown_signal()).await
        }
        Some(Command::Migrate) => {
            let pool = db::pool(&settings.database)?;
            db::migrate(&pool).await.context("applying migrations")?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Some(Command::CreateAdmin {
            username,
            email,
            promote_existing,
        }) => {
            let pool =
                sqlx::postgres::PgPool::connect(settings.database.database_url.expose_secret())
                    .await?;
            db::migrate(&pool).await?;
            let username = aichat_api::validate::normalize_username(&username);
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
                    let password = aichat_api::settings::admin_password()
                        .context("set ADMIN_PASSWORD to the new staff user's password")?;
                    let hash = aichat_api::hashing::hash_password(password.expose_secret())
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    db::users::insert_user(&pool, &username, &email, &hash, true).await?;
                    tracing::info!(%username, "staff user created");
                }
            }
            Ok(())
        }
        Some(Command::RevokeSessions { username }) => {
            let pool =
                sqlx::postgres::PgPool::connect(settings.database.database_url.expose_secret())
                    .await?;
            let username = aichat_api::validate::normalize_username(&username);
            let user_id = db::users::ids_by_usernames(&pool, std::slice::from_ref(&username))
                .await?
                .first()
                .copied()
                .with_context(|| format!("no user named {username}"))?;
            let redis = redis_conn::connect(settings.redis.redis_url.expose_secret())
                .await
                .context("connecting to Redis")?;
            let ended = aichat_api::revocation::end_user_sessions(
                &pool,
                &redis,
                &settings.redis.namespace(),
                user_id,
            )
            .await?;
            tracing::info!(%username, ended, "sessions revoked");
            Ok(())
        }
    }
}
