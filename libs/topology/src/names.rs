/// Every name a pipeline uses, derived from its namespace so that several pipelines (and parallel
/// tests) share one NATS server without seeing each other's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    namespace: String,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "invalid namespace {0:?}: use 1-64 characters from a-z, 0-9 and '_', starting with a letter \
     (it becomes part of subject, stream and bucket names)"
)]
pub struct InvalidNamespace(pub String);

impl Names {
    pub const DEFAULT_NAMESPACE: &'static str = "customers";

    pub fn new(namespace: &str) -> Result<Self, InvalidNamespace> {
        let valid = (1..=64).contains(&namespace.len())
            && namespace.starts_with(|c: char| c.is_ascii_lowercase())
            && namespace
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid {
            Ok(Names {
                namespace: namespace.to_owned(),
            })
        } else {
            Err(InvalidNamespace(namespace.to_owned()))
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `CUSTOMERS`: one message per valid CSV row.
    pub fn ingest_stream(&self) -> String {
        self.namespace.to_uppercase()
    }

    /// `CUSTOMERS_RESULTS`: synced, rejected and dead outcomes.
    pub fn results_stream(&self) -> String {
        format!("{}_RESULTS", self.namespace.to_uppercase())
    }

    pub fn ingest_subject(&self) -> String {
        format!("{}.ingest", self.namespace)
    }

    pub fn synced_subject(&self) -> String {
        format!("{}.synced", self.namespace)
    }

    /// Outcomes of versions that were never sent because a newer version of the customer is known.
    pub fn superseded_subject(&self) -> String {
        format!("{}.superseded", self.namespace)
    }

    pub fn rejected_subject(&self) -> String {
        format!("{}.rejected", self.namespace)
    }

    pub fn dead_subject(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    /// Consumers live inside their (namespaced) stream, so their names need no prefix.
    pub fn integrators_consumer(&self) -> &'static str {
        "integrators"
    }

    pub fn persister_consumer(&self) -> &'static str {
        "persister"
    }

    pub fn ledger_bucket(&self) -> String {
        format!("{}_ledger", self.namespace)
    }

    pub fn checkpoints_bucket(&self) -> String {
        format!("{}_checkpoints", self.namespace)
    }

    /// Fleet-wide control state, such as a CRM-requested pause every integrator obeys.
    pub fn control_bucket(&self) -> String {
        format!("{}_control", self.namespace)
    }
}

impl Default for Names {
    fn default() -> Self {
        Names {
            namespace: Self::DEFAULT_NAMESPACE.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_match_the_design() {
        let n = Names::default();
        assert_eq!(n.ingest_stream(), "CUSTOMERS");
        assert_eq!(n.results_stream(), "CUSTOMERS_RESULTS");
        assert_eq!(n.ingest_subject(), "customers.ingest");
        assert_eq!(n.synced_subject(), "customers.synced");
        assert_eq!(n.superseded_subject(), "customers.superseded");
        assert_eq!(n.rejected_subject(), "customers.rejected");
        assert_eq!(n.dead_subject(), "customers.dead");
        assert_eq!(n.ledger_bucket(), "customers_ledger");
        assert_eq!(n.checkpoints_bucket(), "customers_checkpoints");
    }

    #[test]
    fn namespaces_that_would_break_subjects_are_refused() {
        for bad in ["", "a.b", "A", "1x", "a b", "a>", "a*"] {
            assert!(Names::new(bad).is_err(), "{bad}");
        }
        assert!(Names::new("test_42").is_ok());
    }
}
