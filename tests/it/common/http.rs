//! The HTTP listener: bare HTTP/1.1 requests, the admin API with its bearer
//! token, and `/metrics` scraped into a map.

use std::collections::HashMap;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::WAIT;

/// A bare HTTP/1.1 GET; returns the status code and body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).await
}

/// A bare HTTP/1.1 POST without a body.
pub async fn http_post(addr: &str, path: &str) -> (u16, String) {
    http_request(addr, "POST", path).await
}

async fn http_request(addr: &str, method: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_raw(addr, method, path, &format!("Host: {addr}\r\n")).await;
    (status, body)
}

/// A bare HTTP/1.1 request without a body; `headers` are whole lines, each
/// ending in CRLF, and must include `Host`. Returns the status, the header
/// block (names as sent, one `name: value` per line) and the body.
pub async fn http_raw(addr: &str, method: &str, path: &str, headers: &str) -> (u16, String, String) {
    use tokio::io::AsyncReadExt;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out)).await.unwrap().unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_string(), body.to_string())
}

/// One HTTP/1.1 request to the API with `key`; returns the status, the
/// header block and the JSON body (`Null` if it is not JSON).
pub async fn api_call(
    http: &str,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String, serde_json::Value) {
    use tokio::io::AsyncReadExt;
    let mut s = TcpStream::connect(http).await.unwrap();
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {http}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&out).to_string();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_string(), serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

/// An admin GET with `token` as the bearer (none: no Authorization header);
/// returns the status and the JSON body (`Null` if it is not JSON).
pub async fn admin_get(http: &str, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    admin_request(http, "GET", path, token).await
}

/// An admin POST without a body; as [`admin_get`].
pub async fn admin_post(http: &str, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    admin_request(http, "POST", path, token).await
}

async fn admin_request(http: &str, method: &str, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let (status, _, body) = http_raw(http, method, path, &format!("Host: {http}\r\n{auth}")).await;
    (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
}

/// `/metrics` as `name{labels}` → value (the text as exported, labels and
/// all, as the key); asserts that the scrape succeeds.
pub async fn scrape_metrics(http: &str) -> HashMap<String, f64> {
    let (status, body) = http_get(http, "/metrics").await;
    assert_eq!(status, 200, "/metrics: {body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The value of series `key` (`name` or `name{labels}`) in a scrape; 0 when
/// it is not there (a series that is created lazily).
pub fn metric(scrape: &HashMap<String, f64>, key: &str) -> f64 {
    scrape.get(key).copied().unwrap_or(0.0)
}
