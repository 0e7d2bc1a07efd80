//! The ledger: per customer, in the ledger KV bucket, the version the CRM is known to hold, the
//! version some integrator is sending (a claim), and the version that keeps failing. Its rule,
//! [`decide`], says what an ingest message must do given that entry; the integrator applies it
//! with compare-and-set writes, and `syncctl replay`/`dlq redrive` use the same rule to leave out
//! what would take the CRM back to an older version.

use customer_record::ContentHash;
use serde::{Deserialize, Serialize};

use crate::Version;

/// Longest customer id the pipeline keys: ledger keys, message headers and the dead letters' index
/// all derive from it, and NATS refuses a protocol line past 4 KiB.
pub const MAX_ID_BYTES: usize = customer_record::MAX_ID_BYTES;

/// The ledger's memory of one customer. Versions written by builds before versions existed read
/// as `Version::default()`, older than everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The version the CRM is known to hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<Confirmed>,
    /// A version some replica is sending, or sent without learning the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
    /// The newest version whose sends failed, with the count `--max-deliver` reads. Only failed
    /// sends count: deliveries spent waiting for an older version's claim are not failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing: Option<Failing>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmed {
    pub hash: ContentHash,
    #[serde(default)]
    pub version: Version,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crm_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub hash: ContentHash,
    #[serde(default)]
    pub version: Version,
    /// Replica that holds (or held) the claim; for operators reading the bucket.
    pub owner: String,
    /// Unix milliseconds until which the claim is live. A released claim has 0; a claim of a
    /// replica that died expires by itself.
    pub lease_until_ms: i64,
    /// A request for this claim may have reached the CRM without us learning the answer (timeout,
    /// lost connection, replica death): whoever sends next looks the customer up first.
    #[serde(default)]
    pub in_doubt: bool,
    /// When the claim was given up in doubt (Unix ms; 0: it is held). Its lease then runs on for a
    /// grace, because a CRM may still apply a request after the client stopped waiting for it:
    /// the same version may go on at once (its idempotency key makes a late copy a replay), other
    /// versions wait the grace out.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub released_at_ms: i64,
}

fn is_zero(ms: &i64) -> bool {
    *ms == 0
}

impl Claim {
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.lease_until_ms > now_ms
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failing {
    pub version: Version,
    /// Failed deliveries of this version; reset when it is dead-lettered, so a redrive starts over.
    pub failures: u64,
    /// The ingest message that was dead-lettered with this version: if it comes back (its ack was
    /// lost), it is dead-lettered again rather than sent, so it keeps its one outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_seq: Option<u64>,
}

impl LedgerEntry {
    /// The newest version this entry knows of, confirmed, being sent, or failing: an ingest
    /// message older than it must never reach the CRM.
    pub fn newest_known(&self) -> Option<Version> {
        [
            self.confirmed.as_ref().map(|c| c.version),
            self.claim.as_ref().map(|c| c.version),
            self.failing.as_ref().map(|f| f.version),
        ]
        .into_iter()
        .flatten()
        .max()
    }

    /// Whether the ingest message stored at `seq` was dead-lettered with `version`.
    pub fn dead_lettered(&self, version: Version, seq: u64) -> bool {
        self.failing
            .as_ref()
            .is_some_and(|f| f.version == version && f.dead_seq == Some(seq))
    }

    /// Failed deliveries so far of `version`.
    pub fn failures_of(&self, version: Version) -> u64 {
        self.failing
            .as_ref()
            .filter(|f| f.version == version)
            .map_or(0, |f| f.failures)
    }

    /// A claim that is not live but may have reached the CRM: expired (its replica died
    /// mid-send) or released in doubt. A claim at or below the confirmed version is history.
    fn doubtful_claim(&self) -> Option<&Claim> {
        let confirmed = self.confirmed.as_ref().map(|c| c.version);
        self.claim
            .as_ref()
            .filter(|c| c.in_doubt || c.lease_until_ms > 0 || c.released_at_ms > 0)
            .filter(|c| confirmed.is_none_or(|v| c.version > v))
    }
}

/// What one ingest message (a version with content `hash`) should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The ledger confirmed exactly this version: nothing to send.
    AlreadyConfirmed { crm_id: Option<String> },
    /// The CRM holds this content from an older version (a re-read, or A-B-A where the B never
    /// landed): nothing to send, but the ledger must record this newer version as confirmed.
    SameContent { crm_id: Option<String> },
    /// A newer version is confirmed, being sent or failing: this one must never reach the CRM.
    Superseded { by: Version },
    /// Another delivery holds a live claim on an older or the same version: come back later.
    Wait {
        claim_version: Version,
        remaining_ms: i64,
    },
    /// Claim the customer and send. `look_up_first`: an earlier send may have landed unseen.
    /// `create`: no version is confirmed, so the CRM is believed not to know the customer.
    Send { look_up_first: bool, create: bool },
    /// The ledger confirmed this very version with other content: two records claim one
    /// version, which no producer of this pipeline makes. Dead-lettered, never sent.
    Conflict { confirmed_hash: ContentHash },
}

/// The ordering and dedup rules, in one place so they can be tested without NATS.
pub fn decide(
    entry: Option<&LedgerEntry>,
    version: Version,
    hash: &ContentHash,
    force_resend: bool,
    now_ms: i64,
) -> Decision {
    // A forced copy (`Sync-Force-Resend`) is for a CRM that lost data; anyone who can publish on
    // the ingest subject can set the header, so it is sent only after a lookup shows the CRM's
    // copy differs: a forged one applies nothing twice.
    let Some(entry) = entry else {
        return Decision::Send {
            look_up_first: force_resend,
            create: true,
        };
    };
    if let Some(newer) = entry.newest_known().filter(|newer| *newer > version) {
        return Decision::Superseded { by: newer };
    }
    if let Some(claim) = entry.claim.as_ref().filter(|c| c.is_live(now_ms)) {
        let same_request =
            claim.released_at_ms > 0 && claim.version == version && claim.hash == *hash;
        if !same_request {
            return Decision::Wait {
                claim_version: claim.version,
                remaining_ms: claim.lease_until_ms - now_ms,
            };
        }
        return Decision::Send {
            look_up_first: true,
            create: entry.confirmed.is_none(),
        };
    }
    let look_up_first = entry.doubtful_claim().is_some() || force_resend;
    if let Some(confirmed) = &entry.confirmed {
        let crm_id = confirmed.crm_id.clone();
        if confirmed.version == version && confirmed.hash != *hash {
            return Decision::Conflict {
                confirmed_hash: confirmed.hash.clone(),
            };
        }
        // Only while nothing newer may have landed unseen: then the lookup decides.
        if confirmed.hash == *hash && !force_resend && !look_up_first {
            return if confirmed.version == version {
                Decision::AlreadyConfirmed { crm_id }
            } else {
                Decision::SameContent { crm_id }
            };
        }
    }
    Decision::Send {
        look_up_first,
        create: entry.confirmed.is_none(),
    }
}

/// Why a customer id cannot be a ledger key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnkeyableId {
    #[error("the customer id is empty")]
    Empty,
    #[error("the customer id is {len} bytes, over the {MAX_ID_BYTES}-byte limit")]
    TooLong { len: usize },
}

/// The key under which a customer is known in NATS KV: KV keys allow only `[-/_=.a-zA-Z0-9]`,
/// customer ids are arbitrary text, so ids outside `[-_a-zA-Z0-9]` (or starting with `x`) are
/// hex-escaped behind an `x`. Injective, and at most `2 * MAX_ID_BYTES + 1` characters.
pub fn ledger_key(customer_id: &str) -> Result<String, UnkeyableId> {
    if customer_id.is_empty() {
        return Err(UnkeyableId::Empty);
    }
    if customer_id.len() > MAX_ID_BYTES {
        return Err(UnkeyableId::TooLong {
            len: customer_id.len(),
        });
    }
    let plain = customer_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !customer_id.starts_with('x');
    if plain {
        return Ok(customer_id.to_owned());
    }
    let mut key = String::with_capacity(1 + 2 * customer_id.len());
    key.push('x');
    for byte in customer_id.as_bytes() {
        key.push_str(&format!("{byte:02x}"));
    }
    Ok(key)
}

/// The customer id a ledger key stands for: the inverse of [`ledger_key`], for tools that read the
/// whole bucket. None for a key `ledger_key` never makes.
pub fn customer_id_of(key: &str) -> Option<String> {
    let Some(hex) = key.strip_prefix('x') else {
        return Some(key.to_owned());
    };
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    fn hash(n: u8) -> ContentHash {
        ContentHash::from_hex(&format!("{n:032x}")).expect("valid hex")
    }

    fn v(line: u64) -> Version {
        Version::row(1, line)
    }

    fn confirmed(n: u8, version: Version) -> Option<Confirmed> {
        Some(Confirmed {
            hash: hash(n),
            version,
            crm_id: Some("crm-1".into()),
        })
    }

    fn claim(n: u8, version: Version, lease_until_ms: i64, in_doubt: bool) -> Option<Claim> {
        Some(Claim {
            hash: hash(n),
            version,
            owner: "r1".into(),
            lease_until_ms,
            in_doubt,
            released_at_ms: 0,
        })
    }

    fn entry(confirmed: Option<Confirmed>, claim: Option<Claim>) -> LedgerEntry {
        LedgerEntry {
            confirmed,
            claim,
            failing: None,
        }
    }

    #[test]
    fn unknown_customer_is_created() {
        assert_eq!(
            decide(None, v(5), &hash(1), false, NOW),
            Decision::Send {
                look_up_first: false,
                create: true
            }
        );
    }

    #[test]
    fn the_confirmed_version_is_not_sent_again_unless_forced() {
        let e = entry(confirmed(1, v(5)), None);
        assert!(matches!(
            decide(Some(&e), v(5), &hash(1), false, NOW),
            Decision::AlreadyConfirmed { .. }
        ));
        assert_eq!(
            decide(Some(&e), v(5), &hash(1), true, NOW),
            Decision::Send {
                look_up_first: true,
                create: false
            }
        );
        assert_eq!(
            decide(None, v(5), &hash(1), true, NOW),
            Decision::Send {
                look_up_first: true,
                create: true
            },
            "a forced copy is looked up first even when the ledger knows nothing"
        );
    }

    #[test]
    fn a_newer_version_with_the_content_the_crm_holds_is_recorded_not_sent() {
        let e = entry(confirmed(1, v(5)), None);
        assert!(matches!(
            decide(Some(&e), v(9), &hash(1), false, NOW),
            Decision::SameContent { .. }
        ));
    }

    #[test]
    fn a_value_changed_back_is_sent() {
        // A (line 2) confirmed, then B (line 3) confirmed, then A again (line 4): A must be sent.
        let e = entry(confirmed(2, v(3)), None);
        assert_eq!(
            decide(Some(&e), v(4), &hash(1), false, NOW),
            Decision::Send {
                look_up_first: false,
                create: false
            }
        );
        // ... and the first A, delivered late, is superseded.
        assert_eq!(
            decide(Some(&e), v(2), &hash(1), false, NOW),
            Decision::Superseded { by: v(3) }
        );
    }

    #[test]
    fn older_versions_never_overwrite_newer_ones_however_they_are_known() {
        let newer_confirmed = entry(confirmed(2, v(10)), None);
        let newer_claimed = entry(None, claim(2, v(10), NOW + 5_000, false));
        let newer_in_doubt = entry(None, claim(2, v(10), 0, true));
        let newer_failing = LedgerEntry {
            failing: Some(Failing {
                version: v(10),
                failures: 3,
                dead_seq: None,
            }),
            ..LedgerEntry::default()
        };
        for e in [
            newer_confirmed,
            newer_claimed,
            newer_in_doubt,
            newer_failing,
        ] {
            for force in [false, true] {
                assert_eq!(
                    decide(Some(&e), v(7), &hash(1), force, NOW),
                    Decision::Superseded { by: v(10) },
                    "{e:?}"
                );
            }
        }
        // A later load beats every line of an earlier one.
        let e = entry(confirmed(2, Version::row(1, 900)), None);
        assert!(matches!(
            decide(Some(&e), Version::row(2, 1), &hash(1), false, NOW),
            Decision::Send { .. }
        ));
    }

    #[test]
    fn a_newer_version_waits_for_a_live_older_claim() {
        let e = entry(None, claim(1, v(3), NOW + 2_000, false));
        assert_eq!(
            decide(Some(&e), v(8), &hash(2), false, NOW),
            Decision::Wait {
                claim_version: v(3),
                remaining_ms: 2_000
            }
        );
        // The same message delivered twice (ack wait passed while a replica still works on it).
        assert!(matches!(
            decide(Some(&e), v(3), &hash(1), false, NOW),
            Decision::Wait { .. }
        ));
    }

    #[test]
    fn expired_or_doubtful_claims_are_looked_up_before_sending() {
        let expired = entry(None, claim(1, v(3), NOW - 1, false));
        assert_eq!(
            decide(Some(&expired), v(3), &hash(1), false, NOW),
            Decision::Send {
                look_up_first: true,
                create: true
            }
        );
        // The doubt wins over "same content confirmed": the doubtful send may have replaced it.
        let released_in_doubt = entry(confirmed(1, v(2)), claim(2, v(3), 0, true));
        assert_eq!(
            decide(Some(&released_in_doubt), v(4), &hash(1), false, NOW),
            Decision::Send {
                look_up_first: true,
                create: false
            }
        );
        // A doubtful claim older than the confirmed version is history.
        let stale = entry(confirmed(1, v(5)), claim(2, v(3), 0, true));
        assert!(matches!(
            decide(Some(&stale), v(5), &hash(1), false, NOW),
            Decision::AlreadyConfirmed { .. }
        ));
    }

    #[test]
    fn a_claim_given_up_in_doubt_holds_other_versions_for_its_grace_only() {
        let mut released = claim(1, v(3), NOW + 2_000, true);
        if let Some(c) = released.as_mut() {
            c.released_at_ms = NOW - 10;
        }
        let e = entry(None, released);
        // The same request again: its key makes a late copy a replay, so it may go on.
        assert_eq!(
            decide(Some(&e), v(3), &hash(1), false, NOW),
            Decision::Send {
                look_up_first: true,
                create: true
            }
        );
        // Another version must not race a request the CRM may still apply.
        assert!(matches!(
            decide(Some(&e), v(4), &hash(2), false, NOW),
            Decision::Wait { .. }
        ));
        // After the grace: looked up first like any doubt.
        assert_eq!(
            decide(Some(&e), v(4), &hash(2), false, NOW + 5_000),
            Decision::Send {
                look_up_first: true,
                create: true
            }
        );
    }

    #[test]
    fn one_version_with_two_contents_is_a_conflict() {
        let e = entry(confirmed(1, v(5)), None);
        assert!(matches!(
            decide(Some(&e), v(5), &hash(2), false, NOW),
            Decision::Conflict { .. }
        ));
    }

    #[test]
    fn failures_are_counted_per_version() {
        let e = LedgerEntry {
            failing: Some(Failing {
                version: v(4),
                failures: 3,
                dead_seq: Some(17),
            }),
            ..LedgerEntry::default()
        };
        assert_eq!(e.failures_of(v(4)), 3);
        assert_eq!(e.failures_of(v(5)), 0);
        assert!(e.dead_lettered(v(4), 17));
        assert!(!e.dead_lettered(v(4), 18) && !e.dead_lettered(v(5), 17));
    }

    #[test]
    fn entries_of_older_builds_read_as_the_oldest_version() {
        let old =
            r#"{"confirmed":{"hash":"00000000000000000000000000000001","seq":42,"crm_id":"c"}}"#;
        let e: LedgerEntry = serde_json::from_str(old).expect("parse");
        assert_eq!(
            e.confirmed.as_ref().map(|c| c.version),
            Some(Version::default())
        );
        assert!(matches!(
            decide(Some(&e), Version::legacy(43), &hash(2), false, NOW),
            Decision::Send { .. }
        ));
    }

    #[test]
    fn entry_json_round_trips_and_omits_empty_parts() {
        let e = entry(confirmed(1, v(2)), None);
        let json = serde_json::to_string(&e).expect("serialise");
        assert!(
            !json.contains("claim") && !json.contains("failing"),
            "{json}"
        );
        let back: LedgerEntry = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, e);
    }

    #[test]
    fn ledger_keys_are_valid_kv_keys_injective_and_bounded() {
        assert_eq!(ledger_key("123"), Ok("123".to_owned()));
        assert_eq!(ledger_key("a.b"), Ok("x612e62".to_owned()));
        assert_ne!(ledger_key("x1"), Ok("x1".to_owned()));
        let escaped = ledger_key("élan/ä b").expect("keyable");
        assert!(escaped.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(ledger_key(""), Err(UnkeyableId::Empty));
        let longest = "é".repeat(MAX_ID_BYTES / 2);
        assert_eq!(
            ledger_key(&longest).map(|k| k.len()),
            Ok(2 * MAX_ID_BYTES + 1)
        );
        assert!(matches!(
            ledger_key(&"a".repeat(MAX_ID_BYTES + 1)),
            Err(UnkeyableId::TooLong { .. })
        ));
        for id in ["123", "a.b", "x1", "élan/ä b", "-_"] {
            let key = ledger_key(id).expect("keyable");
            assert_eq!(customer_id_of(&key).as_deref(), Some(id));
        }
        assert_eq!(customer_id_of("xz1"), None);
    }
}
