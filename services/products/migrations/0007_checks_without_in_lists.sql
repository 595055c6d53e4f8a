-- A reservation's status is checked with comparisons, not an IN list:
-- SQLite evaluates `status IN (four constants)` through a temporary b-tree
-- it builds (and zeroes a page for) on every insert and every status
-- change, twice per order. Same columns, same allowed values.
--
-- SQLite cannot change a CHECK in place: both tables are rebuilt as in
-- 0005, the child first dropped, so no foreign key is ever left dangling.
CREATE TABLE reservations_v7 (
    id         TEXT PRIMARY KEY,
    status     TEXT NOT NULL CHECK (status = 'held' OR status = 'confirmed'
                                    OR status = 'released' OR status = 'expired'),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    -- Unix seconds after which a held reservation expires.
    expires_at INTEGER
) WITHOUT ROWID;
INSERT INTO reservations_v7 (id, status, created_at, expires_at)
    SELECT id, status, created_at, expires_at FROM reservations;
CREATE TABLE reservation_items_v7 (
    reservation_id TEXT    NOT NULL REFERENCES reservations_v7 (id),
    product_id     INTEGER NOT NULL REFERENCES products (id),
    quantity       INTEGER NOT NULL CHECK (quantity > 0),
    price_cents    INTEGER NOT NULL,
    PRIMARY KEY (reservation_id, product_id)
) WITHOUT ROWID;
INSERT INTO reservation_items_v7 (reservation_id, product_id, quantity, price_cents)
    SELECT reservation_id, product_id, quantity, price_cents FROM reservation_items;
DROP TABLE reservation_items;
DROP TABLE reservations;
ALTER TABLE reservations_v7 RENAME TO reservations;
ALTER TABLE reservation_items_v7 RENAME TO reservation_items;
CREATE INDEX reservations_expiring ON reservations (expires_at) WHERE status = 'held';
