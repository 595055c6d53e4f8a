#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use std::time::{Duration, Instant};

use super::*;
use crate::testing::Etcd;

#[test]
fn registry_urls() {
    assert_eq!(
        parse_url("etcd://127.0.0.1:2379").unwrap(),
        vec!["http://127.0.0.1:2379"]
    );
    assert_eq!(
        parse_url("etcd://a:1, b:2/").unwrap(),
        vec!["http://a:1", "http://b:2"]
    );
    for bad in [
        "http://a:1",
        "etcd://",
        "etcd://a",
        "etcd://a:x",
        "etcd://:1",
        "etcd://a:1,",
    ] {
        assert!(parse_url(bad).is_err(), "{bad}");
    }
}

#[test]
fn ids_are_the_last_segment_only() {
    let prefix = service_prefix("/p/", "svc");
    assert_eq!(prefix, "/p/svc/");
    assert_eq!(id_of(&prefix, b"/p/svc/a:1"), Some("a:1".to_owned()));
    assert_eq!(id_of(&prefix, b"/p/svc/"), None);
    assert_eq!(id_of(&prefix, b"/p/svc/a/b"), None);
    assert_eq!(id_of(&prefix, b"/p/other/a"), None);
}

fn entry(address: &str) -> Entry {
    Entry {
        address: address.to_owned(),
        version: "1.0.0".to_owned(),
        metadata: serde_json::Map::new(),
    }
}

async fn wait_for(view: &mut watch::Receiver<View>, what: &str, test: impl Fn(&View) -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(20), view.wait_for(|v| test(v)))
        .await
        .map(|r| r.is_ok());
    assert!(
        waited == Ok(true),
        "timed out waiting for {what}: {:?}",
        *view.borrow()
    );
}

fn ids(view: &View) -> Vec<&str> {
    view.members.iter().map(|m| m.id.as_str()).collect()
}

#[tokio::test]
async fn members_join_and_leave_with_their_leases() {
    let etcd = Etcd::start().await.unwrap();
    let endpoints = vec![etcd.endpoint()];
    let follower = Follower::start(endpoints.clone(), DEFAULT_PREFIX, "svc");
    let mut view = follower.view();
    wait_for(&mut view, "the first read", |v| v.state == State::Live).await;
    assert!(view.borrow().members.is_empty());

    let a = Registration::start(
        endpoints.clone(),
        DEFAULT_PREFIX,
        "svc",
        "a",
        &entry("127.0.0.1:1"),
        Duration::from_secs(2),
    );
    let b = Registration::start(
        endpoints.clone(),
        DEFAULT_PREFIX,
        "svc",
        "b",
        &entry("127.0.0.1:2"),
        Duration::from_secs(2),
    );
    // Another service's instance is not a member.
    let other = Registration::start(
        endpoints.clone(),
        DEFAULT_PREFIX,
        "other",
        "c",
        &entry("127.0.0.1:3"),
        Duration::from_secs(2),
    );
    wait_for(&mut view, "two members", |v| ids(v) == ["a", "b"]).await;
    assert_eq!(view.borrow().members[1].entry, entry("127.0.0.1:2"));
    // The value is the contract's JSON.
    let mut client = etcd.client().await;
    let stored = client
        .get(key(DEFAULT_PREFIX, "svc", "a"), None)
        .await
        .unwrap();
    let stored: serde_json::Value = serde_json::from_slice(stored.kvs()[0].value()).unwrap();
    assert_eq!(
        stored,
        serde_json::json!({"address": "127.0.0.1:1", "version": "1.0.0", "metadata": {}})
    );

    // Kept alive past several TTLs.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(ids(&view.borrow()), ["a", "b"]);

    // A graceful stop removes the key at once.
    let started = Instant::now();
    a.deregister().await;
    wait_for(&mut view, "a gone", |v| ids(v) == ["b"]).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // A crash (no revoke): the key goes when the lease expires.
    b.registered().await;
    let crashed = Instant::now();
    drop(b);
    wait_for(&mut view, "b expired", |v| v.members.is_empty()).await;
    let took = crashed.elapsed();
    assert!(
        took <= Duration::from_secs(4),
        "expired after {took:?} (TTL 2 s)"
    );
    drop(other);
}

#[tokio::test]
async fn an_outage_keeps_the_members_and_both_sides_recover() {
    let mut etcd = Etcd::start().await.unwrap();
    let endpoints = vec![etcd.endpoint()];
    let registration = Registration::start(
        endpoints.clone(),
        "/t",
        "svc",
        "a",
        &entry("127.0.0.1:1"),
        Duration::from_secs(3),
    );
    let follower = Follower::start(endpoints.clone(), "/t", "svc");
    let mut view = follower.view();
    wait_for(&mut view, "a", |v| {
        ids(v) == ["a"] && v.state == State::Live
    })
    .await;

    etcd.stop().await;
    wait_for(&mut view, "unavailable", |v| {
        matches!(v.state, State::Unavailable { .. })
    })
    .await;
    let seen = view.borrow().clone();
    assert_eq!(ids(&seen), ["a"], "the last members stay");
    assert!(seen.synced.is_some());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(view.borrow().age().unwrap() >= Duration::from_secs(1));

    // The data survives the restart; the lease may not: either way the
    // registration writes its key again and the follower reads it.
    etcd.start_again().await.unwrap();
    wait_for(&mut view, "live again", |v| {
        v.state == State::Live && ids(v) == ["a"]
    })
    .await;
    tokio::time::timeout(Duration::from_secs(20), registration.registered())
        .await
        .unwrap();
    // And it stays: past the TTL of any lease from before the outage.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(ids(&view.borrow()), ["a"]);
    assert_eq!(view.borrow().age(), Some(Duration::ZERO));
}

#[tokio::test]
async fn a_compacted_watch_reads_again() {
    let etcd = Etcd::start().await.unwrap();
    let endpoints = vec![etcd.endpoint()];
    let mut client = etcd.client().await;
    let follower = Follower::start(endpoints.clone(), "/c", "svc");
    let mut view = follower.view();
    wait_for(&mut view, "live", |v| v.state == State::Live).await;
    let value = serde_json::to_string(&entry("127.0.0.1:9")).unwrap();
    // Garbage and deeper keys are ignored; a proper entry is not.
    client.put("/c/svc/bad", "not json", None).await.unwrap();
    client.put("/c/svc/x/y", value.clone(), None).await.unwrap();
    let put = client.put("/c/svc/good", value, None).await.unwrap();
    wait_for(&mut view, "good", |v| ids(v) == ["good"]).await;
    // A member overwritten with something that is not an entry is gone.
    let other = serde_json::to_string(&entry("127.0.0.1:8")).unwrap();
    client.put("/c/svc/worse", other, None).await.unwrap();
    wait_for(&mut view, "worse", |v| ids(v) == ["good", "worse"]).await;
    client.put("/c/svc/worse", "{}", None).await.unwrap();
    wait_for(&mut view, "worse gone", |v| ids(v) == ["good"]).await;
    // Compact past everything the watch has seen, then change: the
    // follower is either still watching or reads again; it ends current.
    client
        .compact(put.header().unwrap().revision(), None)
        .await
        .unwrap();
    client.delete("/c/svc/good", None).await.unwrap();
    wait_for(&mut view, "empty", |v| v.members.is_empty()).await;
}

#[tokio::test]
async fn round_robin_takes_every_member_in_turn() {
    let (sender, view) = watch::channel(View {
        members: Vec::new(),
        state: State::Live,
        synced: None,
    });
    let rr = RoundRobin::new(view);
    assert!(rr.candidates().is_empty());
    sender.send_modify(|v| {
        v.members = ["a", "b", "c"]
            .iter()
            .map(|id| Member {
                id: (*id).to_owned(),
                entry: entry(id),
            })
            .collect();
    });
    let firsts: Vec<String> = (0..6).map(|_| rr.candidates()[0].clone()).collect();
    assert_eq!(firsts, ["a", "b", "c", "a", "b", "c"]);
    assert_eq!(rr.candidates(), ["a", "b", "c"]);
    assert_eq!(rr.candidates(), ["b", "c", "a"]);
}
