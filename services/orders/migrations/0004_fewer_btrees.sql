-- Fewer b-trees written per order: each one a transaction touches is one
-- more 4 KiB page in the WAL at its commit. An order's lines are stored in
-- their primary key (WITHOUT ROWID: one b-tree, not a table and its
-- index). Same columns, same checks. Nothing references order_items.
CREATE TABLE order_items_v4 (
    order_id    INTEGER NOT NULL REFERENCES orders (id),
    product_id  INTEGER NOT NULL,
    quantity    INTEGER NOT NULL CHECK (quantity > 0),
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    PRIMARY KEY (order_id, product_id)
) WITHOUT ROWID;
INSERT INTO order_items_v4 (order_id, product_id, quantity, price_cents)
    SELECT order_id, product_id, quantity, price_cents FROM order_items;
DROP TABLE order_items;
ALTER TABLE order_items_v4 RENAME TO order_items;
