-- Reservations gain states (held → confirmed | released | expired;
-- confirmed → released when an order is cancelled) and an expiry: a held
-- reservation that is not confirmed in time gives its stock back, so a
-- caller that never comes back cannot hold stock forever.
--
-- SQLite cannot change a CHECK in place: both tables are rebuilt, the child
-- first dropped so no foreign key is ever left dangling.
CREATE TABLE reservations_v3 (
    id         TEXT PRIMARY KEY,
    status     TEXT NOT NULL CHECK (status IN ('held', 'confirmed', 'released', 'expired')),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    -- Unix seconds after which a held reservation expires.
    expires_at INTEGER
);
INSERT INTO reservations_v3 (id, status, created_at, expires_at)
    SELECT id, status, created_at,
           CASE status WHEN 'held' THEN CAST(strftime('%s', 'now') AS INTEGER) + 300 END
    FROM reservations;
CREATE TABLE reservation_items_v3 (
    reservation_id TEXT    NOT NULL REFERENCES reservations_v3 (id),
    product_id     INTEGER NOT NULL REFERENCES products (id),
    quantity       INTEGER NOT NULL CHECK (quantity > 0),
    price_cents    INTEGER NOT NULL,
    PRIMARY KEY (reservation_id, product_id)
);
INSERT INTO reservation_items_v3 SELECT * FROM reservation_items;
DROP TABLE reservation_items;
DROP TABLE reservations;
ALTER TABLE reservations_v3 RENAME TO reservations;
ALTER TABLE reservation_items_v3 RENAME TO reservation_items;
CREATE INDEX reservations_expiring ON reservations (expires_at) WHERE status = 'held';
