//! The operational files in `deploy/`: the alert rules pass their promtool
//! unit tests, and every rule and dashboard panel uses only metrics that
//! chatd exports. promtool (Debian `prometheus`) is installed by `.ci/run`;
//! elsewhere the test skips loudly, and under `CI=true` a skip is a failure.

use std::path::Path;
use std::process::Command;

use crate::common::assert_success;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

fn skip_or_fail(what: &str) {
    let msg = format!("SKIPPED: {what} is not installed (apt-get install prometheus); the alert rules were NOT tested");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg} — under CI=true this is a failure");
    eprintln!("\n!!!!!!!!!! {msg} !!!!!!!!!!\n");
}

#[test]
fn alert_rules_pass_their_promtool_tests() {
    if !have("promtool") {
        return skip_or_fail("promtool");
    }
    let check = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(root().join("deploy/prometheus/alerts.yml"))
        .output()
        .unwrap();
    assert_success(&check, "promtool check rules");
    let test = Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg("deploy/prometheus/alerts.test.yml")
        .current_dir(root())
        .output()
        .unwrap();
    assert_success(&test, "promtool test rules");
}

#[test]
fn rules_and_dashboard_use_only_exported_metrics() {
    let out =
        Command::new("python3").arg(root().join("deploy/check_metric_names.py")).current_dir(root()).output().unwrap();
    assert_success(&out, "check_metric_names.py");
}
