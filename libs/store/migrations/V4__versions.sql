-- Versions assigned at the source (a load number and a line, see the contract in docs/) order a
-- customer's records instead of ingest stream sequences, which a NATS restart can reorder and a
-- recreated stream hands out again. Rows written before keep their ingest sequence as a "legacy"
-- version (stamp 0, load 0, line = sequence), older than any load.
ALTER TABLE customers
    ADD COLUMN version_stamp bigint NOT NULL DEFAULT 0,
    ADD COLUMN version_load  bigint NOT NULL DEFAULT 0,
    ADD COLUMN version_line  bigint NOT NULL DEFAULT 0;
UPDATE customers SET version_line = ingest_seq;
ALTER TABLE customers
    ALTER COLUMN version_stamp DROP DEFAULT,
    ALTER COLUMN version_load DROP DEFAULT,
    ALTER COLUMN version_line DROP DEFAULT;

ALTER TABLE dead_letters
    ADD COLUMN version_stamp bigint NOT NULL DEFAULT 0,
    ADD COLUMN version_load  bigint NOT NULL DEFAULT 0,
    ADD COLUMN version_line  bigint NOT NULL DEFAULT 0;
UPDATE dead_letters SET version_line = ingest_seq;
ALTER TABLE dead_letters
    ALTER COLUMN version_stamp DROP DEFAULT,
    ALTER COLUMN version_load DROP DEFAULT,
    ALTER COLUMN version_line DROP DEFAULT;
