use anyhow::Context;
use clap::Parser;

use aichat_api::settings::Command;
use aichat_api::{Application, Settings, shutdown_signal};
use aichat_shared::{config, db, telemetry};
use secrecy::ExposeSecret;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    config::load_dotenv();
    let settings = Settings::parse();
    telemetry::init(&settings.log);
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
            password,
        }) => {
            let pool =
                sqlx::postgres::PgPool::connect(settings.database.database_url.expose_secret())
                    .await?;
            db::migrate(&pool).await?;
            if db::users::set_staff(&pool, &username, true).await? {
                tracing::info!(%username, "existing user is now staff");
            } else {
                let hash = aichat_api::hashing::hash_password(password.expose_secret())
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                db::users::insert_user(&pool, &username, &email, &hash, true).await?;
                tracing::info!(%username, "staff user created");
            }
            Ok(())
        }
    }
}
