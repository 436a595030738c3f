//! Waiting on what `chat-client` delivers, and reading through it.

use chat_client::{Client, Event, Events};
use chatd::proto;

use super::{WAIT, page_through};

/// The next event that `pick` takes, skipping the others; panics if none
/// comes within `WAIT` of the last, or the client closes. `what` names it
/// in the panic.
pub async fn next_event<T>(events: &mut Events, what: &str, mut pick: impl FnMut(Event) -> Option<T>) -> T {
    loop {
        let event = tokio::time::timeout(WAIT, events.recv()).await.unwrap_or_else(|_| panic!("{what} in time"));
        match event {
            Some(e) => {
                if let Some(t) = pick(e) {
                    return t;
                }
            }
            None => panic!("the client closed while waiting for {what}"),
        }
    }
}

/// The next `Message` event, skipping other events; panics after `WAIT`.
pub async fn next_message(events: &mut Events) -> proto::Message {
    next_event(events, "message", |e| if let Event::Message(m) = e { Some(m) } else { None }).await
}

/// Collects `n` messages from `events`.
pub async fn collect_messages(events: &mut Events, n: usize) -> Vec<proto::Message> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        v.push(next_message(events).await);
    }
    v
}

/// Every message of `room`, oldest first, read through `client` forward
/// page by page.
pub async fn client_history_all(client: &Client, room: &str) -> Vec<proto::Message> {
    page_through(async |after_seq| {
        let req = proto::History { room: room.into(), after_seq, forward: true, limit: 1000, before_seq: 0 };
        client.history(req).await.unwrap()
    })
    .await
}

/// Publishes `batch` through `client` pipelined: each publish in a task of
/// its own, at most `inflight` of them awaiting their acks at once. Returns
/// the acks, in the batch's order, once every one has come.
pub async fn publish_pipelined(
    client: &Client,
    batch: impl IntoIterator<Item = proto::Publish>,
    inflight: usize,
) -> Vec<proto::PublishAck> {
    let mut pending = std::collections::VecDeque::new();
    let mut acks = Vec::new();
    for p in batch {
        let c = client.clone();
        pending.push_back(tokio::spawn(async move { c.publish_message(p).await.unwrap() }));
        if pending.len() >= inflight {
            acks.push(pending.pop_front().unwrap().await.unwrap());
        }
    }
    for t in pending {
        acks.push(t.await.unwrap());
    }
    acks
}
