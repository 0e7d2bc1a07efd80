//! Who may do what on NATS: one user per service, each allowed exactly its job on one namespace,
//! and the nats-server configuration (an account with JetStream holding the four users) that
//! grants it. The subjects follow from [`Names`] and from the JetStream API async-nats speaks;
//! every service receives its replies on an inbox of its own ([`crate::inbox_prefix`]), so no user
//! can read another's answers (ledger entries, pulled messages).

use crate::{Names, inbox_prefix};

/// Connection and user name of `csv-reader`.
pub const READER: &str = "csv-reader";
/// Connection and user name of every `crm-integrator` replica.
pub const INTEGRATOR: &str = "crm-integrator";
/// Connection and user name of `persister`.
pub const PERSISTER: &str = "persister";
/// Connection and user name of `syncctl`, the operator's (admin) user.
pub const ADMIN: &str = "syncctl";

/// The NATS account the pipeline's users belong to.
pub const ACCOUNT: &str = "SYNC";

/// One service's user: what it may publish and subscribe to. Everything else is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUser {
    pub user: &'static str,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// JetStream API subjects that read one stream's messages, as a KV get does: direct get (both
/// forms) and the older message get.
fn read_messages(stream: &str) -> [String; 3] {
    [
        format!("$JS.API.DIRECT.GET.{stream}"),
        format!("$JS.API.DIRECT.GET.{stream}.>"),
        format!("$JS.API.STREAM.MSG.GET.{stream}"),
    ]
}

/// Everything a KV bucket's user needs: open it (stream info), read keys, write keys.
fn use_bucket(bucket: &str) -> Vec<String> {
    let stream = format!("KV_{bucket}");
    let mut subjects = vec![
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$KV.{bucket}.>"),
    ];
    subjects.extend(read_messages(&stream));
    subjects
}

/// Pulling from a durable consumer and acknowledging what it delivered (the server's reply
/// subjects come in two forms, with and without domain and account hash).
fn consume(stream: &str, consumer: &str) -> Vec<String> {
    vec![
        format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
        format!("$JS.ACK.{stream}.{consumer}.>"),
        format!("$JS.ACK.*.*.{stream}.{consumer}.>"),
    ]
}

/// Watching one key of a bucket, as an ordered consumer does: create (and replace) it, answer the
/// server's flow control.
fn watch_bucket(bucket: &str) -> Vec<String> {
    let stream = format!("KV_{bucket}");
    vec![
        format!("$JS.API.CONSUMER.CREATE.{stream}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
        format!("$JS.API.CONSUMER.DELETE.{stream}.*"),
        format!("$JS.FC.{stream}.>"),
    ]
}

fn own_inbox(client: &str) -> Vec<String> {
    vec![format!("{}.>", inbox_prefix(client))]
}

/// The four users of a namespace and what each may do:
///
/// - `csv-reader`: publish ingest messages and rejected rows; its checkpoints bucket (load counter
///   included).
/// - `crm-integrator`: pull from and acknowledge the `integrators` consumer; the ledger and control
///   buckets (watching the pause); publish synced, superseded and dead outcomes.
/// - `persister`: pull from and acknowledge the `persister` consumer; read single ingest messages
///   (to check an outcome that claims a version from the future against its ingest message).
/// - `syncctl`: everything (setup, replay, prune and repairs need the whole API).
pub fn service_users(names: &Names) -> Vec<ServiceUser> {
    let ingest = names.ingest_stream();
    let results = names.results_stream();

    let mut reader = vec![names.ingest_subject(), names.rejected_subject()];
    reader.extend(use_bucket(&names.checkpoints_bucket()));

    let mut integrator = vec![
        names.synced_subject(),
        names.superseded_subject(),
        names.dead_subject(),
    ];
    integrator.extend(consume(&ingest, names.integrators_consumer()));
    integrator.extend(use_bucket(&names.ledger_bucket()));
    integrator.extend(use_bucket(&names.control_bucket()));
    integrator.extend(watch_bucket(&names.control_bucket()));

    let mut persister = consume(&results, names.persister_consumer());
    persister.push(format!("$JS.API.STREAM.INFO.{ingest}"));
    persister.extend(read_messages(&ingest));

    vec![
        ServiceUser {
            user: READER,
            publish: reader,
            subscribe: own_inbox(READER),
        },
        ServiceUser {
            user: INTEGRATOR,
            publish: integrator,
            subscribe: own_inbox(INTEGRATOR),
        },
        ServiceUser {
            user: PERSISTER,
            publish: persister,
            subscribe: own_inbox(PERSISTER),
        },
        ServiceUser {
            user: ADMIN,
            publish: vec![">".to_owned()],
            subscribe: vec![">".to_owned()],
        },
    ]
}

/// The environment variable the reference configuration reads a user's password from, e.g.
/// `NATS_PASSWORD_CRM_INTEGRATOR`.
pub fn password_variable(user: &str) -> String {
    format!(
        "NATS_PASSWORD_{}",
        user.to_ascii_uppercase().replace('-', "_")
    )
}

/// How a user's password appears in the configuration.
#[derive(Clone, Copy)]
pub enum Passwords<'a> {
    /// `$NATS_PASSWORD_…`: nats-server reads each from its environment (or a bcrypt hash put
    /// there, see `nats server passwd`).
    FromEnvironment,
    /// Literal values, by user (tests).
    Literal(&'a dyn Fn(&str) -> String),
}

// By hand: literal passwords stay out of Debug output.
impl std::fmt::Debug for Passwords<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Passwords::FromEnvironment => "FromEnvironment",
            Passwords::Literal(_) => "Literal(<redacted>)",
        })
    }
}

/// The `accounts { … }` block of nats-server's configuration: account [`ACCOUNT`] with JetStream
/// and the users of [`service_users`]. Nothing else may connect (no user outside it, no
/// `no_auth_user`).
pub fn accounts_config(names: &Names, passwords: Passwords<'_>) -> String {
    let list = |subjects: &[String]| {
        let items: String = subjects
            .iter()
            .map(|s| format!("            \"{s}\"\n"))
            .collect();
        format!("[\n{items}          ]")
    };
    let mut text = format!(
        "# NATS users of the customer-sync namespace `{ns}`: one per service, each allowed exactly\n\
         # its job (docs: README, section Security). Generated by sync_topology::auth.\n\
         accounts {{\n  {ACCOUNT}: {{\n    jetstream: enabled\n    users: [\n",
        ns = names.namespace()
    );
    for user in service_users(names) {
        let password = match passwords {
            Passwords::FromEnvironment => format!("${}", password_variable(user.user)),
            Passwords::Literal(value) => format!("\"{}\"", value(user.user)),
        };
        text.push_str(&format!(
            "      {{\n        user: \"{}\"\n        password: {password}\n        permissions: {{\n          \
             publish: {{ allow: {} }}\n          subscribe: {{ allow: {} }}\n        }}\n      }}\n",
            user.user,
            list(&user.publish),
            list(&user.subscribe),
        ));
    }
    text.push_str("    ]\n  }\n}\n");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_may_publish_only_its_own_outcomes() {
        let users = service_users(&Names::default());
        let user = |name: &str| {
            users
                .iter()
                .find(|u| u.user == name)
                .unwrap_or_else(|| panic!("user {name}"))
        };
        let reader = user(READER);
        assert!(reader.publish.contains(&"customers.ingest".to_owned()));
        assert!(!reader.publish.iter().any(|s| s.contains("synced")));
        assert!(!reader.publish.iter().any(|s| s.contains("ledger")));
        let integrator = user(INTEGRATOR);
        assert!(integrator.publish.contains(&"customers.synced".to_owned()));
        assert!(!integrator.publish.contains(&"customers.ingest".to_owned()));
        assert!(
            !integrator
                .publish
                .iter()
                .any(|s| s.contains("STREAM.DELETE"))
        );
        let persister = user(PERSISTER);
        assert!(!persister.publish.iter().any(|s| !s.starts_with('$')));
        for user in &users {
            if user.user != ADMIN {
                assert_eq!(user.subscribe, [format!("_INBOX.{}.>", user.user)]);
            }
        }
    }

    #[test]
    fn the_reference_configuration_is_what_this_module_makes() {
        let reference = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/nats/accounts.conf"
        ));
        assert_eq!(
            reference,
            accounts_config(&Names::default(), Passwords::FromEnvironment),
            "deploy/nats/accounts.conf is stale: regenerate it with `syncctl nats-accounts`"
        );
    }
}
