//! `events::Publisher` against a real Redis: what it is handed is published in that order.
use aichat_shared::events::{ChatEvent, Publisher};
use aichat_shared::keys::Namespace;
use futures::StreamExt;
use std::time::Duration;

#[tokio::test]
async fn a_chat_hears_what_the_publisher_was_handed_in_the_order_it_was_handed_over() {
    let url = aichat_testkit::redis_url();
    let ns = Namespace::new(aichat_testkit::unique_name("publishing"));
    let client = redis::Client::open(url.as_str()).expect("redis url");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub connection");
    pubsub
        .subscribe(ns.chat_channel(7))
        .await
        .expect("subscribe");
    let conn = redis::aio::ConnectionManager::new(client)
        .await
        .expect("redis connection");
    // A queue of 2: the hand-overs below overtake the publishing task, so most round trips
    // carry several of them.
    let publisher = Publisher::start(conn, ns.clone(), 2);
    let mut sent = Vec::new();
    for batch in 0..50i64 {
        let events: Vec<(i64, ChatEvent)> = (0..4)
            .map(|i| {
                let message_id = batch * 4 + i;
                sent.push(message_id);
                (7, ChatEvent::MessageCancelled { message_id })
            })
            .collect();
        publisher.publish(events).await;
    }
    publisher.publish(Vec::new()).await;

    let mut stream = pubsub.into_on_message();
    let mut heard = Vec::new();
    while heard.len() < sent.len() {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
        let Ok(Some(msg)) = next else {
            panic!("heard {} of {} events", heard.len(), sent.len());
        };
        let payload: String = msg.get_payload().expect("text payload");
        match serde_json::from_str::<ChatEvent>(&payload) {
            Ok(ChatEvent::MessageCancelled { message_id }) => heard.push(message_id),
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(heard, sent);
}
