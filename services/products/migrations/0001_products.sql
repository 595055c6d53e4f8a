CREATE TABLE products (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL,
    description TEXT,
    -- Money is exact: integer cents, never a float.
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    -- The last line of defence against overselling: no statement may leave
    -- stock negative, whatever the code above it does.
    stock       INTEGER NOT NULL CHECK (stock >= 0),
    category    TEXT    NOT NULL
);
CREATE INDEX products_category ON products (category COLLATE NOCASE);

-- A reservation holds stock for an order until it is released. Its id is
-- chosen by the caller, so a retried reserve or release is idempotent.
CREATE TABLE reservations (
    id         TEXT PRIMARY KEY,
    status     TEXT NOT NULL CHECK (status IN ('held', 'released')),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
CREATE TABLE reservation_items (
    reservation_id TEXT    NOT NULL REFERENCES reservations (id),
    product_id     INTEGER NOT NULL REFERENCES products (id),
    quantity       INTEGER NOT NULL CHECK (quantity > 0),
    price_cents    INTEGER NOT NULL,
    PRIMARY KEY (reservation_id, product_id)
);
