//! An app with a worker and the fake model: what a test of replies starts from.
use std::ops::Deref;

use aichat_fake_llm::{FakeConfig, FakeLlm};
use aichat_testkit::InProcessWorker;
use aichat_testkit::stack::start_worker as start_worker_with;

use super::{TestApp, spawn_app_with_flags};

/// A worker of this test's namespace and database, talking to `fake`; it stops when dropped.
pub async fn start_worker(app: &TestApp, fake: &FakeLlm, extra: &[&str]) -> InProcessWorker {
    start_worker_with(aichat_testkit::stack::worker_args(
        &app.db_url,
        &app.redis_url,
        &app.ns,
        &fake.base_url(),
        extra,
    ))
    .await
}

/// An app (it derefs to [`TestApp`]) whose messages a worker answers with the fake model.
pub struct Stack {
    pub app: TestApp,
    /// The fake model: a test changes its behaviour with `set_config`.
    pub fake: FakeLlm,
    pub worker: InProcessWorker,
}

impl Stack {
    /// The fake model answering as `config`, an app with `api_flags` and a worker with
    /// `worker_flags` besides the test defaults.
    pub async fn start(config: FakeConfig, api_flags: &[&str], worker_flags: &[&str]) -> Stack {
        let fake = FakeLlm::start(config).await.expect("fake model");
        let app = spawn_app_with_flags(api_flags).await;
        let worker = start_worker(&app, &fake, worker_flags).await;
        Stack { app, fake, worker }
    }

    /// A stack whose model fails every call and whose worker tries once: a message fails at
    /// once.
    pub async fn failing() -> Stack {
        let config = aichat_testkit::fake_always(aichat_fake_llm::Outcome::ServerError);
        Stack::start(config, &[], &["--llm-max-attempts", "1"]).await
    }

    /// Removes the app's database and namespace; the worker stops after that, as it would
    /// at the end of the test.
    pub async fn cleanup(self) {
        let Stack { app, fake, worker } = self;
        app.cleanup().await;
        drop(worker);
        drop(fake);
    }
}

impl Deref for Stack {
    type Target = TestApp;

    fn deref(&self) -> &TestApp {
        &self.app
    }
}
