-- Outcome messages the persister could not store as what they claim to be: a body that does not
-- parse, an unknown subject, or values PostgreSQL refuses (a NUL byte, a sequence out of range).
-- Kept verbatim with the reason so nothing is lost silently, and keyed by their place in the
-- results stream so a redelivery or a replay writes the same row again, not a second one.
CREATE TABLE poison_messages (
    stream      text NOT NULL,
    stream_seq  bigint NOT NULL,
    subject     text NOT NULL,
    reason      text NOT NULL,
    body        bytea NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (stream, stream_seq)
);
