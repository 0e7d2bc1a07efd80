//! The per-customer ledger entry kept in the ledger KV bucket, and the pure decision of what an
//! ingest message should do given that entry. All writes are compare-and-set on the key's revision
//! (see `process.rs`), so two replicas can never both believe they own a customer.

use customer_record::ContentHash;
use serde::{Deserialize, Serialize};

/// The ledger's memory of one customer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The version the CRM is known to hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<Confirmed>,
    /// A version some replica is sending, or sent without learning the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmed {
    pub hash: ContentHash,
    /// Ingest stream sequence of the confirmed version: the customer's version order.
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crm_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub hash: ContentHash,
    pub seq: u64,
    /// Replica that holds (or held) the claim; for operators reading the bucket.
    pub owner: String,
    /// Unix milliseconds until which the claim is live. A released claim has 0; a claim of a
    /// replica that died expires by itself.
    pub lease_until_ms: i64,
    /// A request for this claim may have reached the CRM without us learning the answer (timeout,
    /// lost connection, replica death): whoever sends next looks the customer up first.
    #[serde(default)]
    pub in_doubt: bool,
}

impl Claim {
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.lease_until_ms > now_ms
    }
}

/// What one ingest message (stream sequence `seq`, content `hash`) should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The ledger already confirmed exactly this content.
    SkipConfirmed { crm_id: Option<String> },
    /// A newer version is confirmed or being sent: this one must never overwrite it.
    SkipSuperseded { crm_id: Option<String> },
    /// Another delivery holds a live claim on an older or the same version: come back later.
    Wait { claim_seq: u64, remaining_ms: i64 },
    /// Claim the customer and send. `look_up_first`: an earlier send may have landed unseen.
    /// `create`: no version is confirmed, so the CRM is believed not to know the customer.
    Send { look_up_first: bool, create: bool },
}

/// The ordering and dedup rules, in one place so they can be tested without NATS.
pub fn decide(
    entry: Option<&LedgerEntry>,
    seq: u64,
    hash: &ContentHash,
    force_resend: bool,
    now_ms: i64,
) -> Decision {
    let Some(entry) = entry else {
        return Decision::Send {
            look_up_first: false,
            create: true,
        };
    };
    let crm_id = entry.confirmed.as_ref().and_then(|c| c.crm_id.clone());
    if let Some(confirmed) = &entry.confirmed {
        if confirmed.hash == *hash && !force_resend {
            return Decision::SkipConfirmed { crm_id };
        }
        if confirmed.seq > seq {
            return Decision::SkipSuperseded { crm_id };
        }
    }
    if let Some(claim) = entry.claim.as_ref().filter(|c| c.is_live(now_ms)) {
        if claim.seq > seq {
            return Decision::SkipSuperseded { crm_id };
        }
        return Decision::Wait {
            claim_seq: claim.seq,
            remaining_ms: claim.lease_until_ms - now_ms,
        };
    }
    // A claim that is still here but not live either expired (its replica died mid-send) or was
    // released in doubt; both may have reached the CRM.
    let look_up_first = entry
        .claim
        .as_ref()
        .is_some_and(|c| c.in_doubt || c.lease_until_ms > 0);
    Decision::Send {
        look_up_first,
        create: entry.confirmed.is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    fn hash(n: u8) -> ContentHash {
        ContentHash::from_hex(&format!("{n:032x}")).expect("valid hex")
    }

    fn confirmed(n: u8, seq: u64) -> Option<Confirmed> {
        Some(Confirmed {
            hash: hash(n),
            seq,
            crm_id: Some("crm-1".into()),
        })
    }

    fn claim(n: u8, seq: u64, lease_until_ms: i64, in_doubt: bool) -> Option<Claim> {
        Some(Claim {
            hash: hash(n),
            seq,
            owner: "r1".into(),
            lease_until_ms,
            in_doubt,
        })
    }

    #[test]
    fn unknown_customer_is_created() {
        assert_eq!(
            decide(None, 5, &hash(1), false, NOW),
            Decision::Send {
                look_up_first: false,
                create: true
            }
        );
    }

    #[test]
    fn same_confirmed_content_is_skipped_unless_forced() {
        let entry = LedgerEntry {
            confirmed: confirmed(1, 5),
            claim: None,
        };
        assert!(matches!(
            decide(Some(&entry), 9, &hash(1), false, NOW),
            Decision::SkipConfirmed { .. }
        ));
        assert_eq!(
            decide(Some(&entry), 9, &hash(1), true, NOW),
            Decision::Send {
                look_up_first: false,
                create: false
            }
        );
    }

    #[test]
    fn older_versions_never_overwrite_newer_ones() {
        let entry = LedgerEntry {
            confirmed: confirmed(2, 10),
            claim: None,
        };
        assert!(matches!(
            decide(Some(&entry), 7, &hash(1), false, NOW),
            Decision::SkipSuperseded { .. }
        ));
        assert!(matches!(
            decide(Some(&entry), 7, &hash(1), true, NOW),
            Decision::SkipSuperseded { .. }
        ));
        let in_flight = LedgerEntry {
            confirmed: None,
            claim: claim(2, 10, NOW + 5_000, false),
        };
        assert!(matches!(
            decide(Some(&in_flight), 7, &hash(1), false, NOW),
            Decision::SkipSuperseded { .. }
        ));
    }

    #[test]
    fn a_newer_version_waits_for_a_live_older_claim() {
        let entry = LedgerEntry {
            confirmed: None,
            claim: claim(1, 3, NOW + 2_000, false),
        };
        assert_eq!(
            decide(Some(&entry), 8, &hash(2), false, NOW),
            Decision::Wait {
                claim_seq: 3,
                remaining_ms: 2_000
            }
        );
        // The same message delivered twice (ack wait passed while a replica still works on it).
        assert!(matches!(
            decide(Some(&entry), 3, &hash(1), false, NOW),
            Decision::Wait { .. }
        ));
    }

    #[test]
    fn expired_or_doubtful_claims_are_looked_up_before_sending() {
        let expired = LedgerEntry {
            confirmed: None,
            claim: claim(1, 3, NOW - 1, false),
        };
        assert_eq!(
            decide(Some(&expired), 3, &hash(1), false, NOW),
            Decision::Send {
                look_up_first: true,
                create: true
            }
        );
        let released_in_doubt = LedgerEntry {
            confirmed: confirmed(1, 2),
            claim: claim(2, 3, 0, true),
        };
        assert_eq!(
            decide(Some(&released_in_doubt), 4, &hash(3), false, NOW),
            Decision::Send {
                look_up_first: true,
                create: false
            }
        );
        let released_cleanly = LedgerEntry {
            confirmed: confirmed(1, 2),
            claim: claim(2, 3, 0, false),
        };
        assert_eq!(
            decide(Some(&released_cleanly), 3, &hash(2), false, NOW),
            Decision::Send {
                look_up_first: false,
                create: false
            }
        );
    }

    #[test]
    fn entry_json_round_trips_and_omits_empty_parts() {
        let entry = LedgerEntry {
            confirmed: confirmed(1, 2),
            claim: None,
        };
        let json = serde_json::to_string(&entry).expect("serialise");
        assert!(!json.contains("claim"), "{json}");
        let back: LedgerEntry = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, entry);
    }
}
