//! Events through a transactional outbox, relayed to NATS JetStream.
//!
//! A service records an event in the **same SQLite transaction** as the
//! state change it describes ([`record`]): the change and its event are
//! committed together or not at all. A [`Relay`] then publishes the
//! unpublished rows in order to JetStream, each with `Nats-Msg-Id` = the
//! event id (JetStream drops a duplicate within its window, so a relay that
//! dies between publishing and marking republishes harmlessly), marks them
//! published, and retries with back-off while the broker is away: events
//! are never lost and never reordered. Without a broker the rows wait in
//! the outbox.
//!
//! Rows are published in `seq` order and only ever after every row before
//! them, so what is published is always a prefix of the outbox: one number
//! says how far (`outbox_published.seq`), and an event costs one b-tree
//! insert when it is recorded and nothing per row when it is published.
//!
//! A consumer ([`consume`]) reads a durable JetStream consumer, at least
//! once; its handler applies an event exactly once by recording the event
//! id in the `inbox` table in the same transaction as its effect
//! ([`first_delivery`]).
//!
//! The tables (`outbox`, `outbox_published`, `inbox`) are created by each
//! service's own migrations, [`OUTBOX_SQL`], [`OUTBOX_V2_SQL`] then
//! [`OUTBOX_V3_SQL`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use futures_util::StreamExt;
use rusqlite::Connection;
use serde::Serialize;
use serde_json::Value;

use crate::db::Db;
use tokio::sync::Notify;

/// The outbox and inbox tables, for a service's migrations.
pub const OUTBOX_SQL: &str = "
CREATE TABLE outbox (
    -- Publication order.
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL UNIQUE,
    subject      TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    published_at TEXT
);
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
-- Events this service has applied, by id: a redelivery changes nothing.
CREATE TABLE inbox (
    event_id   TEXT PRIMARY KEY,
    handled_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
";

/// The second step of the outbox and inbox tables, after [`OUTBOX_SQL`]:
/// fewer b-trees written per event. Each b-tree a transaction touches is
/// one more 4 KiB page in the WAL at its commit: the outbox's sequence is
/// now the plain rowid (`AUTOINCREMENT` updated a row of `sqlite_sequence`
/// on every insert; nothing deletes from the outbox, so the rowid grows
/// just the same), and the inbox is stored in its primary key (`WITHOUT
/// ROWID`: one b-tree, not a table and its index).
pub const OUTBOX_V2_SQL: &str = "
CREATE TABLE outbox_v2 (
    -- Publication order: the rowid, never reused (rows are never deleted).
    seq          INTEGER PRIMARY KEY,
    event_id     TEXT NOT NULL UNIQUE,
    subject      TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    published_at TEXT
);
INSERT INTO outbox_v2 (seq, event_id, subject, payload, created_at, published_at)
    SELECT seq, event_id, subject, payload, created_at, published_at FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_v2 RENAME TO outbox;
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
CREATE TABLE inbox_v2 (
    event_id   TEXT PRIMARY KEY,
    handled_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;
INSERT INTO inbox_v2 (event_id, handled_at) SELECT event_id, handled_at FROM inbox;
DROP TABLE inbox;
ALTER TABLE inbox_v2 RENAME TO inbox;
";

/// The third step, after [`OUTBOX_V2_SQL`]: one b-tree written per event.
/// The outbox kept two indexes besides its rows, each one more page in the
/// WAL per commit: `event_id`'s (UNIQUE; nothing looks events up by id,
/// and v7 ids made here do not collide) and the unpublished rows' (the
/// relay's queue). Since the published rows are always a prefix in `seq`
/// order, how far the relay got is one row (`outbox_published`) instead of
/// a `published_at` written on every event.
pub const OUTBOX_V3_SQL: &str = "
CREATE TABLE outbox_v3 (
    -- Publication order: the rowid, never reused (rows are never deleted).
    seq        INTEGER PRIMARY KEY,
    event_id   TEXT NOT NULL,
    subject    TEXT NOT NULL,
    payload    TEXT NOT NULL,
    created_at TEXT NOT NULL
);
INSERT INTO outbox_v3 (seq, event_id, subject, payload, created_at)
    SELECT seq, event_id, subject, payload, created_at FROM outbox;
-- Every event up to `seq` is published (acknowledged by JetStream).
CREATE TABLE outbox_published (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO outbox_published (id, seq)
    SELECT 1, coalesce(max(seq), 0) FROM outbox WHERE published_at IS NOT NULL;
DROP TABLE outbox;
ALTER TABLE outbox_v3 RENAME TO outbox;
";

/// Events published per round trip to the database.
const BATCH: i64 = 64;
/// Back-off while the broker is unreachable: from this ...
const BACKOFF_START: Duration = Duration::from_millis(100);
/// ... doubling up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The relay looks at the outbox at least this often, even unwoken.
const POLL: Duration = Duration::from_secs(1);
/// How long a publish may wait for JetStream's acknowledgement.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// An event as it travels: CloudEvents' field names; `data` is the
/// event's own (a struct of the service's, serialized straight into the
/// payload).
#[derive(Debug, Clone, Serialize)]
pub struct Event<'a, D> {
    pub specversion: &'static str,
    pub id: String,
    /// `order.confirmed`, `stock.released`, ...
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub source: &'a str,
    /// RFC 3339, UTC.
    pub time: String,
    /// What it is about, e.g. `order/42`.
    pub subject: String,
    pub data: D,
}

/// The JetStream subject of an event type: `order.confirmed` →
/// `orders.confirmed`, `stock.released` → `stock.released`.
pub fn subject_of(kind: &str) -> String {
    match kind.split_once('.') {
        Some(("order", rest)) => format!("orders.{rest}"),
        _ => kind.to_owned(),
    }
}

/// [`record`]'s statement (on the request path: no temporary b-tree, see
/// `db`'s module documentation).
pub const RECORD: &str =
    "INSERT INTO outbox (event_id, subject, payload, created_at) VALUES (?, ?, ?, ?)";

/// Records an event of type `kind` about `about` in the write `conn` is
/// doing ([`crate::db::Db::write`]): it is published once that commits.
/// Returns the event id.
pub fn record(
    conn: &Connection,
    source: &str,
    kind: &str,
    about: String,
    data: impl Serialize,
) -> Result<String, rusqlite::Error> {
    let event = Event {
        specversion: "1.0",
        // Time-ordered (v7): `outbox.event_id`'s index grows at its end.
        id: uuid::Uuid::now_v7().to_string(),
        kind,
        source,
        time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        subject: about,
        data,
    };
    let payload = serde_json::to_string(&event).unwrap_or_default();
    // `created_at` is the event's time, bound: the column's default would
    // format it again with `strftime`.
    conn.prepare_cached(RECORD)?
        .execute((&event.id, subject_of(kind), payload, &event.time))?;
    Ok(event.id)
}

/// Records that the event `event_id` is being applied in the write `conn`
/// is doing; `false` if it was applied before (the caller then changes
/// nothing).
pub fn first_delivery(conn: &Connection, event_id: &str) -> Result<bool, rusqlite::Error> {
    let inserted = conn
        .prepare_cached("INSERT INTO inbox (event_id) VALUES (?) ON CONFLICT DO NOTHING")?
        .execute([event_id])?;
    Ok(inserted == 1)
}

/// A connection to the broker, and the streams this system uses.
#[derive(Clone)]
pub struct Broker {
    jetstream: jetstream::Context,
}

/// The streams, created if missing: `ORDERS` on `orders.>`, `STOCK` on
/// `stock.>`.
pub const STREAMS: &[(&str, &str)] = &[("ORDERS", "orders.>"), ("STOCK", "stock.>")];

impl Broker {
    /// Connects to `url` (`nats://host:port`), in the background if the
    /// broker is not up yet: events wait in the outbox meanwhile.
    pub async fn connect(url: &str) -> Result<Broker, async_nats::ConnectError> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => tracing::warn!("broker: disconnected"),
                    async_nats::Event::Connected => tracing::info!("broker: connected"),
                    other => tracing::debug!(event = %other, "broker"),
                }
            })
            .connect(url)
            .await?;
        Ok(Broker {
            jetstream: jetstream::new(client),
        })
    }

    async fn ensure_streams(&self) -> Result<(), String> {
        for (name, subjects) in STREAMS {
            self.jetstream
                .get_or_create_stream(jetstream::stream::Config {
                    name: (*name).to_owned(),
                    subjects: vec![(*subjects).to_owned()],
                    ..Default::default()
                })
                .await
                .map_err(|err| format!("stream {name}: {err}"))?;
        }
        Ok(())
    }

    async fn publish(
        &self,
        subject: String,
        event_id: &str,
        payload: String,
    ) -> Result<(), String> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", event_id);
        let ack = self
            .jetstream
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|err| err.to_string())?;
        tokio::time::timeout(PUBLISH_TIMEOUT, ack)
            .await
            .map_err(|_| "no acknowledgement in time".to_owned())?
            .map_err(|err| err.to_string())?;
        Ok(())
    }
}

/// Publishes a service's outbox; wake it after committing an event.
#[derive(Clone)]
pub struct Relay {
    wake: Arc<Notify>,
}

impl Relay {
    /// A relay that publishes nothing yet (no broker): rows wait.
    pub fn idle() -> Relay {
        Relay {
            wake: Arc::new(Notify::new()),
        }
    }

    /// Starts relaying `db`'s outbox to `broker` in a task.
    pub fn spawn(db: Db, broker: Broker) -> Relay {
        let relay = Relay::idle();
        let wake = Arc::clone(&relay.wake);
        tokio::spawn(async move { run_relay(db, broker, wake).await });
        relay
    }

    /// Says new events were committed.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

async fn run_relay(db: Db, broker: Broker, wake: Arc<Notify>) {
    let mut backoff = BACKOFF_START;
    let mut streams_ready = false;
    loop {
        let round = async {
            if !streams_ready {
                broker.ensure_streams().await?;
                streams_ready = true;
            }
            publish_pending(&db, &broker).await
        };
        match round.await {
            Ok(published) => {
                backoff = BACKOFF_START;
                if published < BATCH as usize {
                    // Caught up: wait for news (or the poll).
                    let _ = tokio::time::timeout(POLL, wake.notified()).await;
                }
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "event relay: cannot publish; events wait in the outbox");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Publishes one batch of unpublished events in order, marking each batch
/// published once JetStream acknowledged all of it.
async fn publish_pending(db: &Db, broker: &Broker) -> Result<usize, String> {
    let rows = db
        .read(|conn| unpublished(conn, BATCH).map_err(crate::db::Error::from))
        .map_err(|err| format!("outbox: {err}"))?;
    let mut last = None;
    let mut failure = None;
    for (seq, event_id, subject, payload) in &rows {
        if let Err(err) = broker
            .publish(subject.clone(), event_id, payload.clone())
            .await
        {
            failure = Some(err);
            break;
        }
        crate::fault::exit_after("published");
        last = Some(*seq);
    }
    if let Some(last) = last {
        db.write(move |conn| mark_published(conn, last).map_err(crate::db::Error::from))
            .await
            .map_err(|err| format!("outbox: {err}"))?;
    }
    match failure {
        Some(err) => Err(err),
        None => Ok(rows.len()),
    }
}

/// The first `limit` events not published yet, in order: `(seq, event id,
/// subject, payload)`.
fn unpublished(
    conn: &Connection,
    limit: i64,
) -> rusqlite::Result<Vec<(i64, String, String, String)>> {
    conn.prepare_cached(
        "SELECT seq, event_id, subject, payload FROM outbox
         WHERE seq > (SELECT seq FROM outbox_published) ORDER BY seq LIMIT ?",
    )?
    .query_map([limit], |row| {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
    })?
    .collect()
}

/// Every event up to `last` is published. Never backwards: two instances
/// sharing a file relay the same outbox.
fn mark_published(conn: &Connection, last: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE outbox_published SET seq = ?1 WHERE seq < ?1")?
        .execute([last])
        .map(drop)
}

/// One delivered event: its id, type and data.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Delivered {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Value,
}

/// Consumes `subject` of `stream` with the durable consumer `durable`
/// forever: each event is handed to `handle`; acknowledged when it returns
/// `Ok`, redelivered later when it returns `Err` (logged). A message that
/// is not an event is acknowledged and logged (redelivering it would not
/// help).
pub fn consume<F, Fut>(
    broker: Broker,
    stream: &'static str,
    durable: &'static str,
    subject: &'static str,
    handle: F,
) where
    F: Fn(Delivered) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    tokio::spawn(async move {
        let mut backoff = BACKOFF_START;
        loop {
            match consume_once(&broker, stream, durable, subject, &handle).await {
                Ok(()) => backoff = BACKOFF_START,
                Err(error) => {
                    tracing::warn!(%error, stream, durable, retry_in = ?backoff, "event consumer: cannot read");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    });
}

async fn consume_once<F, Fut>(
    broker: &Broker,
    stream: &str,
    durable: &str,
    subject: &str,
    handle: &F,
) -> Result<(), String>
where
    F: Fn(Delivered) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    broker.ensure_streams().await?;
    let stream = broker
        .jetstream
        .get_stream(stream)
        .await
        .map_err(|err| err.to_string())?;
    let consumer = stream
        .get_or_create_consumer(
            durable,
            jetstream::consumer::pull::Config {
                durable_name: Some(durable.to_owned()),
                filter_subject: subject.to_owned(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(10),
                ..Default::default()
            },
        )
        .await
        .map_err(|err| err.to_string())?;
    let mut messages = consumer.messages().await.map_err(|err| err.to_string())?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|err| err.to_string())?;
        match serde_json::from_slice::<Delivered>(&message.payload) {
            Ok(event) => {
                let id = event.id.clone();
                match handle(event).await {
                    Ok(()) => message.ack().await.map_err(|err| err.to_string())?,
                    Err(error) => {
                        tracing::warn!(event = %id, %error, "event not applied; it will come again");
                        let _ = message
                            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                    }
                }
            }
            Err(err) => {
                tracing::error!(error = %err, subject = %message.subject, "not an event: dropped");
                message.ack().await.map_err(|err| err.to_string())?;
            }
        }
    }
    Err("the message stream ended".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{self, Migration};

    const BEFORE: &[Migration] = &[
        Migration {
            version: 1,
            sql: OUTBOX_SQL,
        },
        Migration {
            version: 2,
            sql: OUTBOX_V2_SQL,
        },
    ];
    const AFTER: &[Migration] = &[
        BEFORE[0],
        BEFORE[1],
        Migration {
            version: 3,
            sql: OUTBOX_V3_SQL,
        },
    ];

    fn subjects(rows: &[(i64, String, String, String)]) -> Vec<(i64, &str)> {
        rows.iter()
            .map(|(seq, _, subject, _)| (*seq, subject.as_str()))
            .collect()
    }

    /// What the relay had published before the third step (a prefix,
    /// marked row by row) is where it goes on from after it; the rows and
    /// their order are kept, and the outbox has no index left.
    #[tokio::test]
    async fn the_one_btree_outbox_keeps_rows_and_how_far_they_went() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        let before = db::open(&path, BEFORE).await.unwrap();
        before
            .write(|conn| {
                conn.execute_batch(
                    "INSERT INTO outbox (event_id, subject, payload, published_at)
                         VALUES ('e-1', 'a.one', '{}', 'then'), ('e-2', 'a.two', '{}', 'then');
                     INSERT INTO outbox (event_id, subject, payload) VALUES ('e-3', 'a.three', '{}');",
                )
                .map_err(db::Error::from)
            })
            .await
            .unwrap();
        before.close().await;

        let after = db::open(&path, AFTER).await.unwrap();
        after
            .write(|conn| {
                record(conn, "test", "a.four", "x/1".into(), Value::Null).map_err(db::Error::from)
            })
            .await
            .unwrap();
        let pending = after
            .read(|conn| unpublished(conn, 10).map_err(db::Error::from))
            .unwrap();
        assert_eq!(subjects(&pending), [(3, "a.three"), (4, "a.four")]);
        after
            .write(|conn| mark_published(conn, 4).map_err(db::Error::from))
            .await
            .unwrap();
        // A relay that got less far (another instance) does not go back.
        after
            .write(|conn| mark_published(conn, 3).map_err(db::Error::from))
            .await
            .unwrap();
        let (pending, indexes) = after
            .read(|conn| {
                let indexes: i64 = conn.query_row(
                    "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'outbox'",
                    [],
                    |r| r.get(0),
                )?;
                Ok::<_, db::Error>((unpublished(conn, 10)?, indexes))
            })
            .unwrap();
        assert!(pending.is_empty(), "{pending:?}");
        assert_eq!(indexes, 0);
        let all = after
            .read(|conn| crate::testing::outbox_subjects(conn).map_err(db::Error::from))
            .unwrap();
        assert_eq!(
            all,
            [
                (1, "a.one".to_owned()),
                (2, "a.two".to_owned()),
                (3, "a.three".to_owned()),
                (4, "a.four".to_owned())
            ]
        );
    }

    #[tokio::test]
    async fn recording_an_event_opens_no_temporary_btree() {
        let dir = tempfile::tempdir().unwrap();
        let db = db::open(&dir.path().join("events.db"), AFTER)
            .await
            .unwrap();
        db.read(|conn| {
            assert_eq!(crate::testing::ephemeral_tables(conn, RECORD)?, 0);
            Ok::<_, db::Error>(())
        })
        .unwrap();
    }
}
