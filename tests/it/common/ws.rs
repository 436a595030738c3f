//! A WebSocket connection to `/ws`, speaking JSON (or protobuf in binary
//! messages).

use chatd::codec::decode_envelope;
use chatd::proto::Envelope;
use tokio::net::TcpStream;

use super::WAIT;

/// A WebSocket client speaking JSON (or protobuf in binary messages).
pub struct Ws {
    pub ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
}

/// A data message as a test sees it.
#[derive(Debug)]
// A test helper matched by pattern; boxing would only make the matches longer.
#[allow(clippy::large_enum_variant)]
pub enum Received {
    Json(serde_json::Value),
    Binary(Envelope),
    Closed(Option<u16>),
    Failed,
}

impl Ws {
    pub async fn connect(http: &str) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws")).await.expect("websocket upgrade");
        Ws { ws }
    }

    /// Over a socket with a small receive buffer (for slow-reader tests).
    pub async fn connect_small(http: &str) -> Ws {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let tcp = sock.connect(http.parse().unwrap()).await.unwrap();
        let (ws, _) =
            tokio_tungstenite::client_async(format!("ws://{http}/ws"), tokio_tungstenite::MaybeTlsStream::Plain(tcp))
                .await
                .expect("websocket upgrade");
        Ws { ws }
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        use futures_util::SinkExt;
        self.ws.send(tokio_tungstenite::tungstenite::Message::Text(text.into().into())).await.unwrap();
    }

    pub async fn send_json(&mut self, v: serde_json::Value) {
        self.send_text(v.to_string()).await
    }

    pub async fn send_binary(&mut self, env: &Envelope) {
        use futures_util::SinkExt;
        use prost::Message as _;
        self.ws.send(tokio_tungstenite::tungstenite::Message::Binary(env.encode_to_vec().into())).await.unwrap();
    }

    /// The next data message: JSON text as a Value, or binary decoded and
    /// re-expressed as JSON (so tests can compare both the same way).
    pub async fn recv(&mut self) -> Received {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next()).await.expect("message in time");
            match m {
                Some(Ok(Message::Text(t))) => return Received::Json(serde_json::from_str(t.as_str()).unwrap()),
                Some(Ok(Message::Binary(b))) => return Received::Binary(decode_envelope(&b).unwrap()),
                Some(Ok(Message::Close(f))) => return Received::Closed(f.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) => return Received::Failed,
                None => return Received::Closed(None),
            }
        }
    }

    /// The next message, which must be JSON.
    pub async fn json(&mut self) -> serde_json::Value {
        match self.recv().await {
            Received::Json(v) => v,
            other => panic!("expected a JSON message, got {other:?}"),
        }
    }

    /// The next JSON message that has the field `key` (`"message"`,
    /// `"error"`, …), skipping the others.
    pub async fn next_with(&mut self, key: &str) -> serde_json::Value {
        loop {
            let v = self.json().await;
            if v.get(key).is_some() {
                return v;
            }
        }
    }

    /// Hello with a token; returns the welcome.
    pub async fn hello(&mut self, token: &str) -> serde_json::Value {
        self.send_json(
            serde_json::json!({"id": "1", "hello": {"protocolVersion": 1, "token": token, "device": "ws-test"}}),
        )
        .await;
        let w = self.json().await;
        assert!(w.get("welcome").is_some(), "{w}");
        w
    }

    /// The reply (JSON) to request `id`, skipping pushes.
    pub async fn call(&mut self, id: u64, body: serde_json::Value) -> serde_json::Value {
        let mut req = body;
        req["id"] = serde_json::Value::String(id.to_string());
        self.send_json(req).await;
        loop {
            let v = self.json().await;
            if v["id"] == serde_json::Value::String(id.to_string()) {
                return v;
            }
        }
    }

    /// Joins `room` (request id 2); panics unless the reply is `joined`.
    /// Returns the reply.
    pub async fn join(&mut self, room: &str) -> serde_json::Value {
        let v = self.call(2, serde_json::json!({"join": {"room": room}})).await;
        assert!(v.get("joined").is_some(), "joining {room}: {v}");
        v
    }
}
