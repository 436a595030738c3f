//! `chat-bench` works: each scenario runs briefly against a test server,
//! verifies what it received, and writes the documented JSON.

use std::process::Command;

use crate::common::*;

/// Messages (or acks) seen over the whole run, warm-up and drain included:
/// whether the scenario worked, not how fast (that is the bench's job).
fn total(v: &serde_json::Value, timeline: &str) -> u64 {
    v[timeline].as_array().map_or(0, |a| a.iter().filter_map(|x| x.as_u64()).sum())
}

fn run(s: &TestServer, args: &[&str]) -> serde_json::Value {
    run_at(s, &s.addr, args)
}

fn run_at(s: &TestServer, addr: &str, args: &[&str]) -> serde_json::Value {
    let bench = workspace_bin("chat-client", "chat-bench");
    let out = tempfile::NamedTempFile::new().unwrap();
    let run = Command::new(bench)
        .args(["--server", addr, "--data"])
        .arg(&s.dir)
        // The test server runs in this process, so this is its PID.
        .args(["--server-pid", &std::process::id().to_string()])
        .args(if args.contains(&"--duration") {
            &["--warmup", "0.5"][..]
        } else {
            &["--duration", "1", "--warmup", "0.5"][..]
        })
        .arg("--json")
        .arg(out.path())
        .args(args)
        .output()
        .unwrap();
    assert_success(&run, &format!("chat-bench {args:?}"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path()).unwrap()).unwrap();
    for key in [
        "scenario",
        "duration_s",
        "delivered_per_sec",
        "acks_per_sec",
        "latency_us",
        "gaps",
        "duplicates",
        "out_of_order",
        "errors",
        "params",
    ] {
        assert!(v.get(key).is_some(), "{key} is in the JSON");
    }
    // With `--server-pid`, every scenario reports what the server used.
    for key in ["server_cpu_s", "server_rss_bytes", "loadavg_start", "loadavg_end"] {
        assert!(v[key].as_f64().is_some(), "{args:?}: {key} is reported: {v}");
    }
    assert_eq!(
        (v["gaps"].as_u64(), v["duplicates"].as_u64(), v["out_of_order"].as_u64()),
        (Some(0), Some(0), Some(0)),
        "{v}"
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_verifies() {
    let s = TestServer::start().await;
    let plot = s.dir.join("fanout.svg");
    let v = tokio::task::block_in_place(|| {
        run(&s, &["fanout", "--subscribers", "5", "--inflight", "16", "--plot", plot.to_str().unwrap()])
    });
    assert!(total(&v, "delivered_timeline") > 0, "{v}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("delivered/s") && svg.ends_with("</svg>\n"), "{svg}");
    let v = tokio::task::block_in_place(|| run(&s, &["rooms", "--rooms", "4", "--members", "2", "--publishers", "2"]));
    assert!(total(&v, "delivered_timeline") > 0, "{v}");
    let v =
        tokio::task::block_in_place(|| run(&s, &["durable", "--publishers", "2", "--inflight", "8", "--rooms", "2"]));
    assert!(total(&v, "ack_timeline") > 0, "{v}");
    let durable = ["durable", "--publishers", "2", "--inflight", "8", "--rooms", "2", "--changes", "10"];
    let v = tokio::task::block_in_place(|| run(&s, &durable));
    assert!(total(&v, "ack_timeline") > 0 && v["errors"] == 0, "{v}");
    assert_eq!(v["params"]["changes_percent"], 10);
    let history = ["history", "--messages", "120", "--reactions", "3", "--readers", "2", "--limit", "50"];
    let v = tokio::task::block_in_place(|| run(&s, &history));
    assert!(v["pages_per_sec"].as_f64().unwrap() > 0.0 && v["errors"] == 0, "{v}");
    let v = tokio::task::block_in_place(|| run(&s, &["connections", "--connections", "50"]));
    assert_eq!(v["params"]["connections"], 50);
    assert_eq!(v["errors"], 0);
    let v = tokio::task::block_in_place(|| {
        run(&s, &["--duration", "3", "resume", "--clients", "5", "--rate", "200", "--away", "0.3"])
    });
    assert!(v["rounds"].as_u64().unwrap() >= 1 && v["catch_up_ms"]["max"].as_u64().is_some(), "{v}");
}

#[test]
fn a_plot_not_named_svg_is_refused_before_the_run() {
    let bench = workspace_bin("chat-client", "chat-bench");
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("latency.png");
    // Nothing listens at this address: the refusal must come before connecting.
    let out = Command::new(bench)
        .args(["--server", "127.0.0.1:1", "--token", "unused", "--plot"])
        .arg(&png)
        .args(["fanout", "--subscribers", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("the plot is drawn as SVG; name the file .svg"), "{stderr}");
    assert!(!png.exists(), "no file is written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_runs_over_tls() {
    let s = TestServer::start_with(|c| {
        c.dev_tls = true;
        c.tls = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let ca = s.dir.join("tls/dev-cert.pem");
    let ca = ca.to_str().unwrap();
    let tls = s.tls.clone().unwrap();
    let v = tokio::task::block_in_place(|| {
        run_at(&s, &tls, &["--tls", "--ca", ca, "fanout", "--subscribers", "3", "--inflight", "8"])
    });
    assert_eq!(v["params"]["tls"], true);
    assert!(total(&v, "delivered_timeline") > 0, "{v}");
}
