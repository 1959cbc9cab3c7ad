//! `aichat-api`: reads its settings, starts its telemetry and runs the command they name.
use clap::Parser;

use aichat_api::Settings;
use aichat_shared::{config, db, telemetry};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    config::load_dotenv();
    let settings = Settings::parse();
    telemetry::init(&settings.log);
    let database = settings.database.clone();
    match aichat_api::run(settings).await {
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
