//! Turns a request body into a customer, or into an answer that names the offending field.
//! Checked by hand rather than through serde's derive so the error can say which field is wrong.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use customer_record::{CustomerRecord, is_plausible_email};
use serde_json::{Map, Value};

/// Why a body is not a customer: 400 when it is not JSON at all, 422 when a field is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidBody {
    pub status: StatusCode,
    pub field: String,
    pub error: String,
}

impl InvalidBody {
    fn field(field: &str, error: impl Into<String>) -> Self {
        InvalidBody {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: field.to_owned(),
            error: error.into(),
        }
    }
}

pub fn parse_customer(body: &[u8]) -> Result<CustomerRecord, InvalidBody> {
    // Fast path for the common, well-formed body; the slow path below only runs to explain a
    // refusal (or to accept what serde's derive is stricter about, such as `"attributes": null`).
    if let Ok(record) = serde_json::from_slice::<CustomerRecord>(body) {
        check_values(&record)?;
        return Ok(record);
    }
    diagnose(body)
}

fn check_values(record: &CustomerRecord) -> Result<(), InvalidBody> {
    if record.id.trim().is_empty() {
        return Err(InvalidBody::field("id", "field `id` must not be empty"));
    }
    if !is_plausible_email(&record.email) {
        return Err(InvalidBody::field(
            "email",
            format!(
                "field `email` is not a plausible address: {:?}",
                record.email
            ),
        ));
    }
    Ok(())
}

fn diagnose(body: &[u8]) -> Result<CustomerRecord, InvalidBody> {
    let value: Value = serde_json::from_slice(body).map_err(|err| InvalidBody {
        status: StatusCode::BAD_REQUEST,
        field: "body".to_owned(),
        error: format!("body is not valid JSON: {err}"),
    })?;
    let Value::Object(object) = value else {
        return Err(InvalidBody::field(
            "body",
            "body must be a JSON object (a customer)",
        ));
    };
    let id = required_string(&object, "id")?;
    let first_name = required_string(&object, "first_name")?;
    let last_name = required_string(&object, "last_name")?;
    let email = required_string(&object, "email")?;
    let phone = match object.get("phone") {
        None | Some(Value::Null) => None,
        Some(Value::String(phone)) => Some(phone.clone()),
        Some(other) => return Err(wrong_type("phone", "a string", other)),
    };
    let attributes = match object.get("attributes") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(map)) => string_map(map)?,
        Some(other) => return Err(wrong_type("attributes", "an object of strings", other)),
    };
    let record = CustomerRecord {
        id,
        first_name,
        last_name,
        email,
        phone,
        attributes,
    };
    check_values(&record)?;
    Ok(record)
}

fn required_string(object: &Map<String, Value>, field: &str) -> Result<String, InvalidBody> {
    match object.get(field) {
        Some(Value::String(text)) => Ok(text.clone()),
        None | Some(Value::Null) => Err(InvalidBody::field(
            field,
            format!("field `{field}` is missing"),
        )),
        Some(other) => Err(wrong_type(field, "a string", other)),
    }
}

fn string_map(map: &Map<String, Value>) -> Result<BTreeMap<String, String>, InvalidBody> {
    map.iter()
        .map(|(key, value)| match value {
            Value::String(text) => Ok((key.clone(), text.clone())),
            other => Err(wrong_type(&format!("attributes.{key}"), "a string", other)),
        })
        .collect()
}

fn wrong_type(field: &str, expected: &str, found: &Value) -> InvalidBody {
    let found = match found {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    InvalidBody::field(
        field,
        format!("field `{field}` must be {expected}, found {found}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> (u16, String) {
        let invalid = parse_customer(body.as_bytes()).expect_err("body should be refused");
        (invalid.status.as_u16(), invalid.field)
    }

    #[test]
    fn accepts_the_json_form_of_a_customer_record() {
        let record = CustomerRecord {
            id: "c-1".into(),
            first_name: "Ada".into(),
            last_name: "Lovelace".into(),
            email: "ada@example.com".into(),
            phone: Some("+44 1".into()),
            attributes: BTreeMap::from([("tier".into(), "gold".into())]),
        };
        let body = serde_json::to_vec(&record).expect("a record serialises");
        assert_eq!(parse_customer(&body), Ok(record));
        let minimal =
            r#"{"id":"2","first_name":"B","last_name":"C","email":"b@c.io","phone":null}"#;
        let parsed = parse_customer(minimal.as_bytes()).expect("minimal customer is valid");
        assert_eq!(parsed.phone, None);
        assert!(parsed.attributes.is_empty());
        let null_attributes =
            r#"{"id":"3","first_name":"B","last_name":"C","email":"b@c.io","attributes":null}"#;
        assert!(parse_customer(null_attributes.as_bytes()).is_ok());
    }

    #[test]
    fn names_the_wrong_field() {
        assert_eq!(field_of("not json"), (400, "body".into()));
        assert_eq!(field_of("[1,2]"), (422, "body".into()));
        assert_eq!(
            field_of(r#"{"first_name":"a","last_name":"b","email":"a@b.io"}"#),
            (422, "id".into())
        );
        assert_eq!(
            field_of(r#"{"id":" ","first_name":"a","last_name":"b","email":"a@b.io"}"#),
            (422, "id".into())
        );
        assert_eq!(
            field_of(r#"{"id":"1","first_name":7,"last_name":"b","email":"a@b.io"}"#),
            (422, "first_name".into())
        );
        assert_eq!(
            field_of(r#"{"id":"1","first_name":"a","last_name":"b","email":"nope"}"#),
            (422, "email".into())
        );
        assert_eq!(
            field_of(r#"{"id":"1","first_name":"a","last_name":"b","email":"a@b.io","phone":1}"#),
            (422, "phone".into())
        );
        assert_eq!(
            field_of(
                r#"{"id":"1","first_name":"a","last_name":"b","email":"a@b.io","attributes":{"x":1}}"#
            ),
            (422, "attributes.x".into())
        );
    }
}
