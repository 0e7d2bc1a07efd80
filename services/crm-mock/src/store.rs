//! The CRM's memory: customers by id and the answers remembered per idempotency key. Checking the
//! key, applying the change and remembering the answer happen under one lock, so two concurrent
//! requests with the same key can never both apply. The lock is never held across an await.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::http::StatusCode;
use customer_record::CustomerRecord;
use parking_lot::Mutex;
use serde::Serialize;

/// A status and JSON body, as sent and as remembered for replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    pub fn json(status: StatusCode, value: &impl Serialize) -> Self {
        // Our bodies are plain structs and strings; serialising them cannot fail, but a mock that
        // panics mid-benchmark would hide the real figures, so fall back to a fixed error body.
        let body = serde_json::to_vec(value)
            .map(Bytes::from)
            .unwrap_or_else(|_| {
                Bytes::from_static(br#"{"error":"crm-mock could not serialise its answer"}"#)
            });
        Answer { status, body }
    }

    pub fn error(status: StatusCode, message: &str) -> Self {
        Answer::json(status, &serde_json::json!({ "error": message }))
    }
}

/// The write a request asks for; together with the body it identifies the request an
/// idempotency key was first used with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Create,
    Update { path_id: String },
}

/// What a write did, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Created {
        duplicate: bool,
    },
    Updated {
        duplicate: bool,
    },
    Replayed,
    /// Nothing applied (unknown id, idempotency key reused for another request).
    Refused,
}

#[derive(Debug)]
pub struct Written {
    pub answer: Answer,
    pub effect: Effect,
}

#[derive(Serialize)]
struct CustomerAnswer<'a> {
    crm_id: &'a str,
    customer: &'a CustomerRecord,
}

struct Held {
    crm_id: String,
    record: CustomerRecord,
}

struct Remembered {
    write: Write,
    body: Bytes,
    answer: Answer,
}

#[derive(Default)]
struct Memory {
    customers: HashMap<String, Held>,
    remembered: HashMap<String, Remembered>,
    crm_ids_issued: u64,
}

#[derive(Default)]
pub struct Store {
    memory: Mutex<Memory>,
}

impl Store {
    /// Applies `write` with `record` (parsed from `body`). With a key, a request seen before is
    /// answered from memory; only answers that changed something (2xx) are remembered, so a
    /// refused request can be retried once its cause is gone.
    pub fn write(
        &self,
        write: Write,
        idempotency_key: Option<&str>,
        body: Bytes,
        record: CustomerRecord,
    ) -> Written {
        let mut memory = self.memory.lock();
        if let Some(key) = idempotency_key
            && let Some(seen) = memory.remembered.get(key)
        {
            return if seen.write == write && seen.body == body {
                Written {
                    answer: seen.answer.clone(),
                    effect: Effect::Replayed,
                }
            } else {
                Written {
                    answer: Answer::error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "idempotency key reused with a different request",
                    ),
                    effect: Effect::Refused,
                }
            };
        }
        let written = match &write {
            Write::Create => memory.create(record),
            Write::Update { path_id } => memory.update(path_id, record),
        };
        if let Some(key) = idempotency_key
            && written.answer.status.is_success()
        {
            let answer = written.answer.clone();
            memory.remembered.insert(
                key.to_owned(),
                Remembered {
                    write,
                    body,
                    answer,
                },
            );
        }
        written
    }

    pub fn get(&self, id: &str) -> Answer {
        let memory = self.memory.lock();
        match memory.customers.get(id) {
            Some(held) => Answer::json(
                StatusCode::OK,
                &CustomerAnswer {
                    crm_id: &held.crm_id,
                    customer: &held.record,
                },
            ),
            None => not_found(id),
        }
    }

    pub fn customer_count(&self) -> u64 {
        self.memory.lock().customers.len() as u64
    }

    pub fn clear(&self) {
        *self.memory.lock() = Memory::default();
    }
}

impl Memory {
    fn create(&mut self, record: CustomerRecord) -> Written {
        self.crm_ids_issued += 1;
        let crm_id = format!("crm-{}", self.crm_ids_issued);
        let answer = Answer::json(
            StatusCode::CREATED,
            &CustomerAnswer {
                crm_id: &crm_id,
                customer: &record,
            },
        );
        // Like a real CRM, a second create makes a second customer; we keep the latest under the
        // id and count the first as the duplicate it is.
        let previous = self
            .customers
            .insert(record.id.clone(), Held { crm_id, record });
        Written {
            answer,
            effect: Effect::Created {
                duplicate: previous.is_some(),
            },
        }
    }

    fn update(&mut self, path_id: &str, record: CustomerRecord) -> Written {
        let Some(held) = self.customers.get_mut(path_id) else {
            return Written {
                answer: not_found(path_id),
                effect: Effect::Refused,
            };
        };
        let duplicate = held.record == record;
        held.record = record;
        Written {
            answer: Answer::json(
                StatusCode::OK,
                &CustomerAnswer {
                    crm_id: &held.crm_id,
                    customer: &held.record,
                },
            ),
            effect: Effect::Updated { duplicate },
        }
    }
}

fn not_found(id: &str) -> Answer {
    Answer::error(
        StatusCode::NOT_FOUND,
        &format!("no customer with id {id:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(id: &str, first_name: &str) -> (CustomerRecord, Bytes) {
        let record = CustomerRecord {
            id: id.into(),
            first_name: first_name.into(),
            last_name: "L".into(),
            email: "a@b.io".into(),
            phone: None,
            attributes: Default::default(),
        };
        let body = Bytes::from(serde_json::to_vec(&record).expect("record serialises"));
        (record, body)
    }

    fn create(store: &Store, key: Option<&str>, id: &str, first_name: &str) -> Written {
        let (record, body) = customer(id, first_name);
        store.write(Write::Create, key, body, record)
    }

    fn update(store: &Store, key: Option<&str>, id: &str, first_name: &str) -> Written {
        let (record, body) = customer(id, first_name);
        let write = Write::Update { path_id: id.into() };
        store.write(write, key, body, record)
    }

    #[test]
    fn create_then_second_create_is_a_duplicate_with_a_new_crm_id() {
        let store = Store::default();
        let first = create(&store, None, "1", "A");
        assert_eq!(first.effect, Effect::Created { duplicate: false });
        assert_eq!(first.answer.status, StatusCode::CREATED);
        let second = create(&store, None, "1", "A");
        assert_eq!(second.effect, Effect::Created { duplicate: true });
        assert_ne!(first.answer.body, second.answer.body, "a second crm_id");
        assert_eq!(store.customer_count(), 1);
    }

    #[test]
    fn update_of_identical_content_is_a_duplicate_and_unknown_id_is_404() {
        let store = Store::default();
        assert_eq!(
            update(&store, None, "1", "A").answer.status,
            StatusCode::NOT_FOUND
        );
        create(&store, None, "1", "A");
        assert_eq!(
            update(&store, None, "1", "B").effect,
            Effect::Updated { duplicate: false }
        );
        assert_eq!(
            update(&store, None, "1", "B").effect,
            Effect::Updated { duplicate: true }
        );
        let got = store.get("1");
        assert_eq!(got.status, StatusCode::OK);
        let text = String::from_utf8_lossy(&got.body);
        assert!(
            text.contains(r#""crm_id":"crm-1""#) && text.contains(r#""first_name":"B""#),
            "{text}"
        );
    }

    #[test]
    fn a_key_replays_its_first_answer_and_refuses_another_request() {
        let store = Store::default();
        let first = create(&store, Some("k"), "1", "A");
        let replay = create(&store, Some("k"), "1", "A");
        assert_eq!(replay.effect, Effect::Replayed);
        assert_eq!(replay.answer, first.answer);
        let reused = create(&store, Some("k"), "1", "B");
        assert_eq!(reused.effect, Effect::Refused);
        assert_eq!(reused.answer.status, StatusCode::UNPROCESSABLE_ENTITY);
        let other_method = update(&store, Some("k"), "1", "A");
        assert_eq!(other_method.answer.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(store.customer_count(), 1);
    }

    #[test]
    fn a_refused_answer_is_not_remembered() {
        let store = Store::default();
        assert_eq!(
            update(&store, Some("k"), "1", "A").answer.status,
            StatusCode::NOT_FOUND
        );
        create(&store, None, "1", "Z");
        assert_eq!(
            update(&store, Some("k"), "1", "A").effect,
            Effect::Updated { duplicate: false }
        );
    }

    #[test]
    fn clear_forgets_customers_and_keys() {
        let store = Store::default();
        create(&store, Some("k"), "1", "A");
        store.clear();
        assert_eq!(store.customer_count(), 0);
        assert_eq!(store.get("1").status, StatusCode::NOT_FOUND);
        let again = create(&store, Some("k"), "1", "A");
        assert_eq!(again.effect, Effect::Created { duplicate: false });
    }
}
