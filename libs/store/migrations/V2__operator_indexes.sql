-- Operators look customers up by e-mail and list recent dead letters first.
CREATE INDEX IF NOT EXISTS customers_email_idx ON customers (email);
CREATE INDEX IF NOT EXISTS dead_letters_dead_at_idx ON dead_letters (dead_at DESC);
