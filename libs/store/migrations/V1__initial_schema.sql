-- One row per customer the CRM confirmed: the newest version (highest ingest sequence) wins.
CREATE TABLE customers (
    id           text PRIMARY KEY,
    first_name   text NOT NULL,
    last_name    text NOT NULL,
    email        text NOT NULL,
    phone        text,
    attributes   jsonb NOT NULL DEFAULT '{}'::jsonb,
    content_hash text NOT NULL,
    ingest_seq   bigint NOT NULL,
    crm_id       text,
    synced_at    timestamptz NOT NULL,
    source_file  text,
    source_line  bigint
);

-- CSV rows that are not customers, with where they were and why.
CREATE TABLE rejected_rows (
    source_file text NOT NULL,
    line        bigint NOT NULL,
    kind        text NOT NULL,
    reason      text NOT NULL,
    raw         text NOT NULL,
    rejected_at timestamptz NOT NULL,
    PRIMARY KEY (source_file, line)
);

-- Records the CRM refused for good, or whose retries were spent.
CREATE TABLE dead_letters (
    customer_id  text NOT NULL,
    content_hash text NOT NULL,
    ingest_seq   bigint NOT NULL,
    reason       text NOT NULL,
    crm_status   integer,
    crm_body     text,
    attempts     bigint NOT NULL,
    record       jsonb,
    source_file  text,
    source_line  bigint,
    dead_at      timestamptz NOT NULL,
    PRIMARY KEY (customer_id, content_hash)
);
