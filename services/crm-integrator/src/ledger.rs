//! The ledger as the integrator keeps it: the KV bucket behind the rules in
//! [`sync_topology::ledger`] (which version may be sent, which is superseded, which must wait),
//! and every change one message makes to its customer's entry. Each change is a compare-and-set
//! on the key's revision, so two replicas can never both believe they own a customer: a message
//! [`LedgerStore::claim`]s its customer, then its [`OurClaim`] renews, releases, dead-letters or
//! confirms it.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use customer_record::ContentHash;
use sync_topology::Version;
use sync_topology::ledger::{Claim, Confirmed, Failing, LedgerEntry};

use crate::now_ms;
use crate::process::ProcessError;
use crate::schedules::LEDGER_CONFLICTS;

/// The ledger bucket and what this replica writes into claims.
#[derive(Debug)]
pub(crate) struct LedgerStore {
    bucket: kv::Store,
    /// This process's name in claims.
    replica: String,
    /// How long a claim lives without renewal: longer than an unacknowledged delivery and than one
    /// request, so nobody takes over while our request may still land.
    claim_lease: Duration,
    /// How long a claim given up in doubt still holds other versions back: a CRM may apply a
    /// request after we stopped waiting for it, and a second version sent meanwhile would race it.
    doubt_grace: Duration,
}

/// A customer's entry as last read or written by one message's task. Revision 0: no entry.
#[derive(Debug, Clone, Default)]
pub(crate) struct Held {
    pub entry: LedgerEntry,
    pub revision: u64,
}

/// Which version of which customer a message's task works on: the key of every ledger change.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Subject<'a> {
    pub key: &'a str,
    pub version: Version,
    pub hash: &'a ContentHash,
}

/// This replica's claim on one customer, held by the message that sends its version: every
/// change it makes to the entry until it lets go.
#[derive(Debug)]
pub(crate) struct OurClaim<'a> {
    store: &'a LedgerStore,
    subject: Subject<'a>,
    held: Held,
    /// An earlier send may have landed unseen: the next request is a lookup.
    pub in_doubt: bool,
    /// A send of this claim (or of the doubtful claim it took over) failed without an answer and
    /// may still land: a lookup that finds nothing does not end that, so the claim is given up in
    /// doubt (with its grace) until this version is confirmed, and whoever sends next looks up.
    may_land: bool,
}

impl LedgerStore {
    pub fn new(
        bucket: kv::Store,
        replica: String,
        claim_lease: Duration,
        doubt_grace: Duration,
    ) -> Self {
        LedgerStore {
            bucket,
            replica,
            claim_lease,
            doubt_grace,
        }
    }

    /// This process's name in claims.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub async fn read(&self, key: &str) -> Result<Option<Held>, ProcessError> {
        let entry = self
            .bucket
            .entry(key)
            .await
            .map_err(|err| ProcessError::ledger("read", key, err))?;
        let Some(entry) = entry else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            // Deleted by an operator: a fresh start, written over the tombstone's revision.
            return Ok(Some(Held {
                entry: LedgerEntry::default(),
                revision: entry.revision,
            }));
        }
        let parsed =
            serde_json::from_slice(&entry.value).map_err(|source| ProcessError::LedgerEntry {
                key: key.to_owned(),
                source,
            })?;
        Ok(Some(Held {
            entry: parsed,
            revision: entry.revision,
        }))
    }

    /// Compare-and-set: `Some(new revision)`, or `None` when someone else wrote first. Revision 0
    /// expects no entry at all: the create of a new customer.
    async fn write(
        &self,
        key: &str,
        entry: &LedgerEntry,
        revision: u64,
    ) -> Result<Option<u64>, ProcessError> {
        let body = serde_json::to_vec(entry)
            .map(Bytes::from)
            .map_err(|source| ProcessError::Encode {
                what: "ledger entry",
                source,
            })?;
        match self.bucket.update(key, body, revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(err) => Err(ProcessError::ledger("compare-and-set", key, err)),
        }
    }

    fn claim_for(&self, subject: Subject<'_>, in_doubt: bool, lease: Duration) -> Claim {
        Claim {
            hash: subject.hash.clone(),
            version: subject.version,
            owner: self.replica.clone(),
            lease_until_ms: now_ms() + lease.as_millis() as i64,
            in_doubt,
            released_at_ms: 0,
        }
    }

    fn is_ours(&self, claim: Option<&Claim>, version: Version) -> bool {
        claim.is_some_and(|c| c.version == version && c.owner == self.replica)
    }

    /// Writes our claim over `current` (the entry `decide` judged). `None`: someone wrote first,
    /// decide again.
    pub async fn claim<'a>(
        &'a self,
        subject: Subject<'a>,
        current: Option<&Held>,
        in_doubt: bool,
    ) -> Result<Option<OurClaim<'a>>, ProcessError> {
        let mut entry = current.map(|h| h.entry.clone()).unwrap_or_default();
        entry.claim = Some(self.claim_for(subject, in_doubt, self.claim_lease));
        let revision = current.map_or(0, |h| h.revision);
        let written = self.write(subject.key, &entry, revision).await?;
        Ok(written.map(|revision| OurClaim {
            store: self,
            subject,
            held: Held { entry, revision },
            in_doubt,
            may_land: in_doubt,
        }))
    }

    /// The CRM already holds this content from an older version: record this version as the
    /// confirmed one. False when the entry changed since it was judged (decide again).
    pub async fn advance(&self, subject: Subject<'_>, held: &Held) -> Result<bool, ProcessError> {
        let mut entry = held.entry.clone();
        let Some(confirmed) = entry.confirmed.as_mut() else {
            return Ok(false);
        };
        confirmed.version = subject.version;
        if entry
            .failing
            .as_ref()
            .is_some_and(|f| f.version <= subject.version)
        {
            entry.failing = None;
        }
        Ok(self
            .write(subject.key, &entry, held.revision)
            .await?
            .is_some())
    }
}

impl OurClaim<'_> {
    /// A send failed without an answer: it may have landed, now or later.
    pub fn suspect(&mut self) {
        self.in_doubt = true;
        self.may_land = true;
    }

    /// What the ledger's claim says to whoever sends next: look up first.
    fn doubtful(&self) -> bool {
        self.in_doubt || self.may_land
    }

    /// Failed deliveries counted against this version so far.
    pub fn failures(&self) -> u64 {
        self.held.entry.failures_of(self.subject.version)
    }

    /// Renews our claim so it stays live for at least `needed`. False when it is no longer ours.
    pub async fn renew(&mut self, needed: Duration) -> Result<bool, ProcessError> {
        let Some(claim) = self.held.entry.claim.as_ref() else {
            return Ok(false);
        };
        let margin = needed.as_millis() as i64 + 1_000;
        if claim.lease_until_ms - now_ms() > margin && claim.in_doubt == self.doubtful() {
            return Ok(true);
        }
        let (store, subject, in_doubt) = (self.store, self.subject, self.doubtful());
        let lease = store.claim_lease.max(needed + Duration::from_secs(1));
        let mut still_ours = true;
        let written = self
            .update(|entry| {
                if !store.is_ours(entry.claim.as_ref(), subject.version) {
                    still_ours = false;
                    return false;
                }
                entry.claim = Some(store.claim_for(subject, in_doubt, lease));
                true
            })
            .await?;
        Ok(written && still_ours)
    }

    /// Gives the claim up, keeping the doubt for whoever sends next. `failed`: this delivery's
    /// sends failed, and it counts toward `--max-deliver`.
    pub async fn release(&mut self, failed: bool) -> Result<(), ProcessError> {
        let (store, subject, in_doubt) = (self.store, self.subject, self.doubtful());
        self.update(|entry| {
            let ours = store.is_ours(entry.claim.as_ref(), subject.version);
            if ours {
                release_claim(entry, in_doubt, store.doubt_grace);
            }
            // A version something newer has overtaken will be superseded anyway: no count.
            let counted = failed && entry.newest_known() <= Some(subject.version);
            if counted {
                entry.failing = Some(Failing {
                    version: subject.version,
                    failures: entry.failures_of(subject.version) + 1,
                    dead_seq: None,
                });
            }
            ours || counted
        })
        .await?;
        Ok(())
    }

    /// The version was dead-lettered (by the ingest message at `seq`): release the claim and keep
    /// the version as the newest known (older versions stay superseded by it), with the count
    /// reset so a redrive starts over.
    pub async fn mark_dead(&mut self, seq: u64) -> Result<(), ProcessError> {
        let (store, subject, in_doubt) = (self.store, self.subject, self.doubtful());
        self.update(|entry| {
            if store.is_ours(entry.claim.as_ref(), subject.version) {
                release_claim(entry, in_doubt, store.doubt_grace);
            }
            if entry.newest_known() > Some(subject.version) {
                return false;
            }
            entry.failing = Some(Failing {
                version: subject.version,
                failures: 0,
                dead_seq: Some(seq),
            });
            true
        })
        .await?;
        Ok(())
    }

    /// The CRM holds this version: record it (unless a newer one is confirmed meanwhile) and drop
    /// our claim and what failed before it.
    pub async fn confirm(&mut self, crm_id: Option<String>) -> Result<(), ProcessError> {
        let (store, subject) = (self.store, self.subject);
        self.update(|entry| {
            let newer_confirmed = entry
                .confirmed
                .as_ref()
                .is_some_and(|c| c.version > subject.version);
            if !newer_confirmed {
                entry.confirmed = Some(Confirmed {
                    hash: subject.hash.clone(),
                    version: subject.version,
                    crm_id: crm_id.clone(),
                });
            }
            if store.is_ours(entry.claim.as_ref(), subject.version) {
                entry.claim = None;
            }
            if entry
                .failing
                .as_ref()
                .is_some_and(|f| f.version <= subject.version)
            {
                entry.failing = None;
            }
            true
        })
        .await?;
        Ok(())
    }

    /// Applies `change` with compare-and-set, re-reading after conflicts. `change` returns false
    /// when there is nothing (left) to write; so does this.
    async fn update(
        &mut self,
        mut change: impl FnMut(&mut LedgerEntry) -> bool,
    ) -> Result<bool, ProcessError> {
        let key = self.subject.key;
        for _ in 0..LEDGER_CONFLICTS {
            let mut wanted = self.held.entry.clone();
            if !change(&mut wanted) {
                return Ok(false);
            }
            if let Some(revision) = self.store.write(key, &wanted, self.held.revision).await? {
                self.held = Held {
                    entry: wanted,
                    revision,
                };
                return Ok(true);
            }
            self.held = self.store.read(key).await?.unwrap_or_default();
        }
        Err(ProcessError::Ledger {
            action: "compare-and-set",
            key: key.to_owned(),
            message: format!("{LEDGER_CONFLICTS} conflicts in a row"),
        })
    }
}

fn release_claim(entry: &mut LedgerEntry, in_doubt: bool, grace: Duration) {
    if in_doubt {
        if let Some(claim) = entry.claim.as_mut() {
            let now = now_ms();
            claim.lease_until_ms = now + grace.as_millis() as i64;
            claim.released_at_ms = now;
            claim.in_doubt = true;
        }
    } else {
        entry.claim = None;
    }
}
