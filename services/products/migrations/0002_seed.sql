-- The catalogue the original example shipped with. Part of the migration
-- sequence, so it is inserted exactly once per database, even when two
-- instances start together on a new file.
INSERT INTO products (name, description, price_cents, stock, category) VALUES
    ('Laptop', 'High-performance laptop', 129999, 10, 'Electronics'),
    ('Coffee Mug', 'Ceramic coffee mug', 1299, 50, 'Kitchenware'),
    ('Book', 'Programming book', 3999, 25, 'Books');
