//! The browser client in a real browser: runs `node --test tests/browser/`
//! (headless Debian Chromium driven by playwright-core) against this build's
//! `chatd` and `chat` binaries, with the web client built into the binary.
//! `.ci/run` installs Node's packages and Chromium; elsewhere the test skips
//! loudly when they are missing, and under `CI=true` a skip is a failure.

use std::path::Path;
use std::process::Command;

#[test]
fn the_web_client_works_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chatd = Path::new(env!("CARGO_BIN_EXE_chatd"));
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let chat = crate::common::workspace_bin("chat-client", "chat");
    let missing = [
        (Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success()), "node"),
        (
            root.join("tests/browser/node_modules/playwright-core").exists(),
            "playwright-core (npm ci --prefix tests/browser)",
        ),
        (
            Path::new("/usr/bin/chromium").exists() || std::env::var_os("CHROMIUM").is_some(),
            "chromium (apt-get install chromium)",
        ),
        (chat.exists(), "the chat binary (cargo build --workspace)"),
    ]
    .into_iter()
    .filter(|(ok, _)| !ok)
    .map(|(_, what)| what)
    .collect::<Vec<_>>();
    if !missing.is_empty() {
        let msg = format!("SKIPPED: browser tests need {}; the web client was NOT tested", missing.join(", "));
        assert!(!ci, "{msg} — under CI=true this is a failure");
        eprintln!("\n!!!!!!!!!! {msg} !!!!!!!!!!\n");
        return;
    }
    let out = Command::new("node")
        .args(["--test", "--test-reporter=spec", "tests/browser/"])
        .current_dir(root)
        .env("CHATD_BIN", chatd)
        .env("CHAT_BIN", &chat)
        .env("CHATD_WEB_EMBEDDED", "1")
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = stdout.lines().chain(stderr.lines()).rfind(|l| l.contains("browser:")).unwrap_or("");
    eprintln!("{summary}");
    assert!(out.status.success(), "browser tests failed:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("SKIPPED") || !ci, "browser tests skipped under CI:\n{stdout}");
}
