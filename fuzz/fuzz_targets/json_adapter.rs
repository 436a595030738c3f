//! The WebSocket JSON adapter over arbitrary text: it never panics, and
//! whatever it accepts re-encodes to JSON that decodes to the same envelope.
#![no_main]

use chatd::http::ws::decode_json;
use chatd::session::driver::Incoming;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match decode_json(text) {
        Incoming::Json(env, _) => {
            let again = serde_json::to_string(&env).expect("an accepted envelope serializes");
            match decode_json(&again) {
                Incoming::Json(back, _) => assert_eq!(back, env),
                _ => panic!("re-encoded JSON was refused: {again}"),
            }
        }
        Incoming::Malformed { reason, .. } => assert!(!reason.is_empty()),
        _ => unreachable!("decode_json returns Json or Malformed"),
    }
});
