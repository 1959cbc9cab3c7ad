//! The deployment files say only what the binaries understand: every variable that
//! docker-compose.yml or .env.example sets is a real setting of the binary it goes to.
use std::collections::{BTreeMap, BTreeSet};

use clap::CommandFactory;
use yaml_rust2::{Yaml, YamlLoader};

fn settings_of(command: clap::Command) -> BTreeSet<String> {
    fn walk(command: &clap::Command, out: &mut BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                out.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = BTreeSet::new();
    walk(&command, &mut out);
    out
}

fn binaries() -> BTreeMap<&'static str, BTreeSet<String>> {
    BTreeMap::from([
        ("aichat-api", settings_of(aichat_api::Settings::command())),
        (
            "aichat-worker",
            settings_of(aichat_worker::Settings::command()),
        ),
        (
            "aichat-fake-llm",
            settings_of(aichat_fake_llm::cli::Cli::command()),
        ),
    ])
}

fn repo_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A service's environment, with `<<:` merges resolved.
fn environment(service: &Yaml) -> BTreeSet<String> {
    fn collect(map: &Yaml, out: &mut BTreeSet<String>) {
        let Some(hash) = map.as_hash() else { return };
        for (key, value) in hash {
            match key.as_str() {
                Some("<<") => collect(value, out),
                Some(name) => {
                    out.insert(name.to_owned());
                }
                None => {}
            }
        }
    }
    let mut out = BTreeSet::new();
    collect(&service["environment"], &mut out);
    out
}

#[test]
fn every_variable_compose_sets_is_a_setting_of_the_binary_it_runs() {
    let docs = YamlLoader::load_from_str(&repo_file("docker-compose.yml")).expect("valid YAML");
    let compose = &docs[0];
    let known = binaries();
    let services = compose["services"].as_hash().expect("services");
    let mut checked = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if service["build"].is_badvalue() {
            continue; // postgres and redis: images of their own
        }
        let binary = service["command"][0]
            .as_str()
            .unwrap_or_else(|| panic!("{name} names its binary"));
        let settings = known
            .get(binary)
            .unwrap_or_else(|| panic!("{name} runs unknown {binary}"));
        let env = environment(service);
        assert!(!env.is_empty(), "{name} sets no environment");
        for var in env {
            assert!(
                settings.contains(&var),
                "{name} ({binary}) sets {var}, which is not one of its settings"
            );
        }
        if binary != "aichat-fake-llm" {
            assert!(
                service["healthcheck"].as_hash().is_some(),
                "{name} has a healthcheck"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 3, "api, worker and fake-llm");
    let worker = &compose["services"]["worker"];
    assert!(
        worker["container_name"].is_badvalue() && worker["ports"].is_badvalue(),
        "worker scales"
    );
    assert_eq!(
        compose["services"]["api"]["depends_on"]["postgres"]["condition"].as_str(),
        Some("service_healthy")
    );
    assert_eq!(
        compose["services"]["fake-llm"]["profiles"][0].as_str(),
        Some("offline")
    );
}

#[test]
fn env_example_lists_every_setting_and_nothing_else() {
    let listed: BTreeSet<String> = repo_file(".env.example")
        .lines()
        .map(|l| l.trim().trim_start_matches('#').trim())
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    let all: BTreeSet<String> = binaries()
        .into_values()
        .flatten()
        .filter(|v| v != "ADMIN_PASSWORD")
        .collect();
    let missing: Vec<_> = all.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&all).collect();
    assert!(missing.is_empty(), ".env.example lacks {missing:?}");
    assert!(unknown.is_empty(), ".env.example lists unknown {unknown:?}");
}

/// Runs the API binary with `args` against a database that does not exist; its exit status and
/// what it wrote to stderr.
async fn against_a_missing_database(args: &[&str]) -> (Option<i32>, String, String) {
    let name = aichat_testkit::unique_name("aichat_missing");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_aichat-api"))
        .args(args)
        .env(
            "DATABASE_URL",
            format!("{}/{name}", aichat_testkit::pg_base()),
        )
        .env("ADMIN_PASSWORD", "correct horse battery")
        .env("API_ADDR", "127.0.0.1:0")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(30), output)
        .await
        .expect("the API exits at once")
        .expect("run the API binary");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        name,
    )
}

#[tokio::test]
async fn a_missing_database_is_named_with_the_command_that_creates_it() {
    for args in [
        &["create-admin", "--username", "root"][..],
        &["migrate"][..],
        &[][..],
    ] {
        let (code, stderr, name) = against_a_missing_database(args).await;
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "The database \"{name}\" named by DATABASE_URL does not exist"
            )),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("-c 'create database \"{name}\"'")),
            "{args:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn a_session_lifetime_out_of_its_range_is_refused_at_startup() {
    // 0 would log users in with sessions already expired; ten billion hours would overflow the
    // expiry date at each login.
    for hours in ["0", "-1", "87601", "9999999999"] {
        let flag = format!("--session-ttl-hours={hours}");
        let (code, stderr, _) = against_a_missing_database(&[&flag]).await;
        assert_eq!(code, Some(2), "{hours}: {stderr}");
        assert!(stderr.contains("--session-ttl-hours"), "{hours}: {stderr}");
    }
    let (code, stderr, _) = against_a_missing_database(&["--session-ttl-hours", "87600"]).await;
    assert_eq!(code, Some(1), "{stderr}");
}
