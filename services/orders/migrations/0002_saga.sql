-- Orders become a saga with durable states: pending (written before stock
-- is reserved) → confirmed | failed; confirmed → cancelling → cancelled.
-- `status` has no CHECK, so the existing column takes the new values.
ALTER TABLE orders ADD COLUMN failure_reason TEXT;
ALTER TABLE orders ADD COLUMN updated_at TEXT;
CREATE INDEX orders_status ON orders (status, created_at);
-- A failed order whose reservation may still hold stock: recovery releases
-- it (retrying while product-service is away) and sets this to 1.
ALTER TABLE orders ADD COLUMN stock_released INTEGER NOT NULL DEFAULT 1;
