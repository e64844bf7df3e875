//! A node whose long-running task dies says so: `NodeHandle::stopped`
//! returns an error naming the task, and health turns NOT_SERVING (the
//! `caroni-node` binary then exits with that error).

use std::time::Duration;

use caroni_node::{Config, Node};
use caroni_tests::caroni;

fn config(dir: &std::path::Path) -> Config {
    Config {
        slots: 1,
        ..Config::embedded(dir.join("node"))
    }
}

fn health(url: &str) -> (bool, String) {
    let out = caroni(url, &["health"]).expect("caroni health");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_dies_is_named_and_health_says_not_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::start(config(dir.path())).await.expect("node");
    let url = format!("http://{}", node.api_addr);
    let u = url.clone();
    let before = tokio::task::spawn_blocking(move || health(&u))
        .await
        .expect("join");
    assert_eq!(before, (true, "SERVING".to_string()));

    node.supervise("probe", async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        panic!("the probe broke");
    });
    let err = tokio::time::timeout(Duration::from_secs(10), node.stopped())
        .await
        .expect("the node notices within 10 s")
        .expect_err("a dead task is an error");
    let text = format!("{err:#}");
    assert!(
        text.contains("probe") && text.contains("the probe broke"),
        "{text}"
    );

    let u = url.clone();
    let after = tokio::task::spawn_blocking(move || health(&u))
        .await
        .expect("join");
    assert_eq!(after, (false, "NOT_SERVING".to_string()));

    node.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(10), node.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_returns_early_is_an_error_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::start(config(dir.path())).await.expect("node");
    node.supervise("quitter", async { Ok(()) });
    let err = tokio::time::timeout(Duration::from_secs(10), node.stopped())
        .await
        .expect("in time")
        .expect_err("an early return is an error");
    assert!(format!("{err:#}").contains("quitter"), "{err:#}");
    node.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(10), node.wait()).await;
}
