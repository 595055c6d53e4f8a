CREATE TABLE orders (
    -- Ids come from the database: unique under any concurrency.
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id        INTEGER NOT NULL,
    total_cents    INTEGER NOT NULL CHECK (total_cents >= 0),
    status         TEXT    NOT NULL,
    -- The product-service reservation that holds this order's stock.
    reservation_id TEXT    NOT NULL UNIQUE,
    created_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
CREATE INDEX orders_user ON orders (user_id);

CREATE TABLE order_items (
    order_id    INTEGER NOT NULL REFERENCES orders (id),
    product_id  INTEGER NOT NULL,
    quantity    INTEGER NOT NULL CHECK (quantity > 0),
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    PRIMARY KEY (order_id, product_id)
);
