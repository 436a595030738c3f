//! Authentication: HS256 JSON Web Tokens (proto/README.md, §3 "Handshake and
//! authentication").
//!
//! An application backend mints tokens with any JWT library, using the
//! text in `DATA/secret` (64 hex characters, without the newline) as the
//! HMAC key, exactly as written. The verifier pins the algorithm to HS256
//! (a token naming any other algorithm, `none` included, is refused before
//! its signature is looked at), compares signatures in constant time
//! (`ring::hmac::verify`), and requires `sub` and `exp`; `nbf` is honoured
//! when present, with a small leeway for the issuer's clock running ahead.
//!
//! `exp` has no leeway: an open session is closed with
//! `GoAway{AUTH_EXPIRED}` at `exp`, so a `Hello` must be refused from that
//! same moment on. With a leeway here, a client whose session had just been
//! expired would be let in again at once, and a client that reconnects on
//! every close would storm the server for the length of the leeway.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;

/// Clock skew tolerated on `nbf` (never on `exp`: see the module docs).
pub const LEEWAY_SECS: u64 = 30;
/// Tokens longer than this are refused unread.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Name of the secret file in the data directory.
pub const SECRET_FILE: &str = "secret";

/// Why a token was refused. The text goes to the client in `Error.message`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// Not three base64url parts, bad JSON, or too long.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// The header names another algorithm than HS256.
    #[error("token algorithm must be HS256")]
    WrongAlgorithm,
    /// HMAC mismatch.
    #[error("token signature is invalid")]
    BadSignature,
    /// `exp` has passed.
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token is not valid yet")]
    NotYetValid,
    /// `sub` or `exp` missing, or `sub` not a valid user id.
    #[error("token claims are invalid: {0}")]
    Claims(&'static str),
}

/// The verified identity in a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Expiry (Unix seconds).
    pub exp: u64,
    /// Issued at (Unix seconds), if the token says: a user's revocation
    /// refuses tokens issued before it (all of them without `iat`).
    pub iat: Option<u64>,
}

/// Verifies and mints tokens with one HMAC key.
#[derive(Clone)]
pub struct Auth {
    key: hmac::Key,
}

pub use crate::time::unix_now;

/// User ids are the `sub` of a token: 1–62 characters of `[A-Za-z0-9_.-]`,
/// so that `dm:<a>:<b>` is always a valid room name (proto/README.md, §4) and ids
/// never contain the NUL byte that separates keys in the store.
pub fn valid_user_id(s: &str) -> bool {
    (1..=62).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Auth {
    /// A verifier whose HMAC key is `secret`'s bytes.
    pub fn new(secret: &[u8]) -> Self {
        Auth { key: hmac::Key::new(hmac::HMAC_SHA256, secret) }
    }

    /// Checks `token` at time `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed("longer than 4096 bytes"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(AuthError::Malformed("expected header.payload.signature"));
        };
        let header: serde_json::Value = decode_json(h, "header is not base64url JSON")?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            return Err(AuthError::WrongAlgorithm);
        }
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| AuthError::Malformed("signature is not base64url"))?;
        let signed = &token[..h.len() + 1 + p.len()];
        hmac::verify(&self.key, signed.as_bytes(), &sig).map_err(|_| AuthError::BadSignature)?;

        let claims: serde_json::Value = decode_json(p, "payload is not base64url JSON")?;
        let sub = claims.get("sub").and_then(|v| v.as_str()).ok_or(AuthError::Claims("sub is required"))?;
        if !valid_user_id(sub) {
            return Err(AuthError::Claims("sub must be 1-62 characters of A-Z a-z 0-9 _ . -"));
        }
        let exp = claims.get("exp").and_then(numeric_date).ok_or(AuthError::Claims("exp is required"))?;
        if now >= exp {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = numeric_date(nbf).ok_or(AuthError::Claims("nbf must be a number"))?;
            if nbf > now.saturating_add(LEEWAY_SECS) {
                return Err(AuthError::NotYetValid);
            }
        }
        let iat = match claims.get("iat") {
            Some(v) => Some(numeric_date(v).ok_or(AuthError::Claims("iat must be a number"))?),
            None => None,
        };
        Ok(Claims { sub: sub.to_string(), exp, iat })
    }

    /// Mints a token for `user` valid for `ttl` from `now`.
    pub fn mint(&self, user: &str, ttl: Duration, now: u64) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = serde_json::json!({ "sub": user, "iat": now, "exp": now + ttl.as_secs() });
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{header}.{payload}");
        let sig = hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

fn decode_json(part: &str, what: &'static str) -> Result<serde_json::Value, AuthError> {
    let raw = URL_SAFE_NO_PAD.decode(part).map_err(|_| AuthError::Malformed(what))?;
    serde_json::from_slice(&raw).map_err(|_| AuthError::Malformed(what))
}

/// A JWT NumericDate: whole or fractional seconds; negative is invalid.
fn numeric_date(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_f64().filter(|f| *f >= 0.0 && f.is_finite()).map(|f| f as u64))
}

/// Parses durations like `30s`, `30m`, `24h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}: expected a number and a unit, e.g. 24h"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" | "" => 3600,
        "d" => 86400,
        _ => return Err(format!("invalid duration {s:?}: unit must be s, m, h or d")),
    };
    let secs = n.checked_mul(scale).ok_or_else(|| format!("invalid duration {s:?}: too long"))?;
    Ok(Duration::from_secs(secs))
}

/// Path of the secret file in `data_dir`.
pub fn secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SECRET_FILE)
}

/// Reads the secret in `data_dir`, creating it (64 random hex characters,
/// mode 0600) if there is none yet.
pub fn load_or_create_secret(data_dir: &Path) -> std::io::Result<String> {
    let path = secret_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(s) => return check_secret(s, &path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| std::io::Error::other("no system randomness"))?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
        Ok(mut f) => {
            f.write_all(format!("{secret}\n").as_bytes())?;
            f.sync_all()?;
            Ok(secret)
        }
        // Another process (a `chatd token` beside the server) won the race.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => check_secret(std::fs::read_to_string(&path)?, &path),
        Err(e) => Err(e),
    }
}

fn check_secret(s: String, path: &Path) -> std::io::Result<String> {
    let s = s.strip_suffix('\n').unwrap_or(&s).to_string();
    if s.len() < 32 {
        return Err(std::io::Error::other(format!(
            "{} holds a secret of {} bytes; at least 32 are required",
            path.display(),
            s.len()
        )));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn forge(header: &str, claims: &str, key: &[u8]) -> String {
        let signed = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        let sig = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    #[test]
    fn minted_tokens_verify() {
        let a = Auth::new(b"0123456789abcdef0123456789abcdef");
        let t = a.mint("ann", Duration::from_secs(60), NOW);
        assert_eq!(a.verify(&t, NOW).unwrap(), Claims { sub: "ann".into(), exp: NOW + 60, iat: Some(NOW) });
    }

    #[test]
    fn a_token_is_refused_from_the_second_of_its_exp_with_no_leeway() {
        // An open session is closed at `exp`; a Hello must be refused from
        // the same moment, or a client reconnecting on every close loops.
        let a = Auth::new(b"0123456789abcdef0123456789abcdef");
        let t = a.mint("ann", Duration::from_secs(60), NOW);
        assert!(a.verify(&t, NOW + 59).is_ok());
        assert_eq!(a.verify(&t, NOW + 60), Err(AuthError::Expired));
        assert_eq!(a.verify(&t, NOW + 61), Err(AuthError::Expired));
        // `nbf` keeps its leeway: an issuer whose clock runs a little ahead.
        let key = b"0123456789abcdef0123456789abcdef";
        let early =
            forge(r#"{"alg":"HS256"}"#, &format!(r#"{{"sub":"ann","exp":{},"nbf":{}}}"#, NOW + 900, NOW + 10), key);
        assert!(a.verify(&early, NOW).is_ok());
    }

    #[test]
    fn a_token_minted_by_pyjwt_verifies() {
        // PyJWT 2.15.1: jwt.encode({"sub": "ann", "exp": 4102444800, "nbf": 1700000000}, "k" * 32, algorithm="HS256")
        let t = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbm4iLCJleHAiOjQxMDI0NDQ4MDAsIm5iZiI6MTcwMDAwMDAwMH0.hAw5oJ_DfcU9HBwKfAdO-rP1unjPoqyPGlfxkCNuE9E";
        let a = Auth::new(&[b'k'; 32]);
        assert_eq!(a.verify(t, NOW).unwrap(), Claims { sub: "ann".into(), exp: 4102444800, iat: None });
        assert_eq!(Auth::new(&[b'j'; 32]).verify(t, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn every_bad_token_is_refused() {
        let key = b"0123456789abcdef0123456789abcdef";
        let a = Auth::new(key);
        let good_claims = format!(r#"{{"sub":"ann","exp":{}}}"#, NOW + 60);
        let none = format!("{}.{}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#), URL_SAFE_NO_PAD.encode(&good_claims));
        assert_eq!(a.verify(&none, NOW), Err(AuthError::WrongAlgorithm));
        let hs512 = forge(r#"{"alg":"HS512"}"#, &good_claims, key);
        assert_eq!(a.verify(&hs512, NOW), Err(AuthError::WrongAlgorithm));
        let other_key = forge(r#"{"alg":"HS256"}"#, &good_claims, b"another key another key another!");
        assert_eq!(a.verify(&other_key, NOW), Err(AuthError::BadSignature));
        let expired = forge(r#"{"alg":"HS256"}"#, &format!(r#"{{"sub":"ann","exp":{}}}"#, NOW - 100), key);
        assert_eq!(a.verify(&expired, NOW), Err(AuthError::Expired));
        let nbf =
            forge(r#"{"alg":"HS256"}"#, &format!(r#"{{"sub":"ann","exp":{},"nbf":{}}}"#, NOW + 900, NOW + 600), key);
        assert_eq!(a.verify(&nbf, NOW), Err(AuthError::NotYetValid));
        let no_exp = forge(r#"{"alg":"HS256"}"#, r#"{"sub":"ann"}"#, key);
        assert!(matches!(a.verify(&no_exp, NOW), Err(AuthError::Claims(_))));
        let no_sub = forge(r#"{"alg":"HS256"}"#, &format!(r#"{{"exp":{}}}"#, NOW + 60), key);
        assert!(matches!(a.verify(&no_sub, NOW), Err(AuthError::Claims(_))));
        let bad_sub = forge(r#"{"alg":"HS256"}"#, &format!(r#"{{"sub":"a:b","exp":{}}}"#, NOW + 60), key);
        assert!(matches!(a.verify(&bad_sub, NOW), Err(AuthError::Claims(_))));
        let mut tampered = a.mint("ann", Duration::from_secs(60), NOW);
        tampered.insert(10, 'x');
        assert!(a.verify(&tampered, NOW).is_err());
        assert!(matches!(a.verify("abc", NOW), Err(AuthError::Malformed(_))));
        assert!(matches!(a.verify(&"a".repeat(5000), NOW), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(parse_duration("7w").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn the_secret_file_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s1 = load_or_create_secret(dir.path()).unwrap();
        assert_eq!(s1.len(), 64);
        assert!(s1.bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = std::fs::metadata(secret_path(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_secret(dir.path()).unwrap(), s1);
        assert_eq!(std::fs::read_to_string(secret_path(dir.path())).unwrap(), format!("{s1}\n"));
    }
}
