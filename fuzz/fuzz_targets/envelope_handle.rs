//! Arbitrary frames into an authenticated session (in-memory store): decode,
//! dispatch and reply never panic, whatever the fields hold. The input is
//! cut into frames by a one-byte length before each.
#![no_main]

use std::sync::{Arc, OnceLock};

use chatd::auth::Auth;
use chatd::config::Config;
use chatd::proto::{Body, Envelope, Hello};
use chatd::server::Server;
use chatd::session::{Flow, Session};
use chatd::store::memory::MemoryStore;
use libfuzzer_sys::fuzz_target;

struct Setup {
    rt: tokio::runtime::Runtime,
    server: Server,
    token: String,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let auth = Auth::new(&[7u8; 32]);
        let token = auth.mint("fuzzer", std::time::Duration::from_secs(86400 * 365), chatd::auth::unix_now());
        let config = Config {
            tcp: "127.0.0.1:0".parse().unwrap(),
            http: "127.0.0.1:0".parse().unwrap(),
            publish_rate: 0,
            ..Config::default()
        };
        let server = rt.block_on(Server::start_with_store(&config, Arc::new(MemoryStore::new()), auth)).unwrap();
        Setup { rt, server, token }
    })
}

fuzz_target!(|input: &[u8]| {
    let s = setup();
    s.rt.block_on(async {
        let mut session = Session::new(s.server.hub().clone(), "tcp", "fuzz".into());
        let hello = Hello { protocol_version: 1, token: s.token.clone(), ..Default::default() };
        assert_eq!(session.on_envelope(Envelope::new(1, Body::Hello(hello))).await, Flow::Continue);
        let mut rest = input;
        for _ in 0..32 {
            let Some((&n, tail)) = rest.split_first() else { break };
            let n = usize::from(n).min(tail.len());
            let (frame, tail) = tail.split_at(n);
            rest = tail;
            if session.on_frame(frame).await == Flow::Close {
                break;
            }
        }
        session.close();
    });
});
