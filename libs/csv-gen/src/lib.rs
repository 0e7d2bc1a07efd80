//! Generates realistic customer CSVs of any size for demos, tests and benchmarks: streaming (memory
//! does not depend on the row count), deterministic for a seed, with a controlled mix of bad rows,
//! exact duplicates and changed repeats, and exact statistics of what it wrote.

use std::io::Write;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// What to generate. Rates are probabilities per data row, in `0.0..=1.0`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenOptions {
    /// Data rows, not counting the header.
    pub rows: u64,
    /// Rows that are not customers: empty id, implausible e-mail, wrong field count, over-long field.
    pub bad_rate: f64,
    /// Rows that repeat an earlier valid row exactly (same id, same content).
    pub dup_rate: f64,
    /// Rows that repeat an earlier id with changed content (a new e-mail and phone).
    pub change_rate: f64,
    pub seed: u64,
    /// Adds the `company` and `country` columns, which end up in `attributes`.
    pub extra_columns: bool,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            rows: 1000,
            bad_rate: 0.0,
            dup_rate: 0.0,
            change_rate: 0.0,
            seed: 1,
            extra_columns: true,
        }
    }
}

/// Exactly what was written. A full, clean run of the pipeline publishes
/// `distinct_ids + changed_repeats` messages, has `exact_duplicates` dropped by the stream's dedup,
/// rejects `bad` rows, and ends with `distinct_ids` customers in the CRM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GenStats {
    pub rows: u64,
    pub valid: u64,
    pub bad: u64,
    pub exact_duplicates: u64,
    pub changed_repeats: u64,
    pub distinct_ids: u64,
}

/// Repeats pick among this many most recent customers. Keeping only their version numbers bounds the
/// memory, and keeps every exact duplicate inside the stream's dedup window on any realistic rate.
const RECENT_CUSTOMERS: u64 = 1024;

/// Longer than `customer_record::MAX_FIELD_BYTES`, so the row is rejected.
const OVERLONG_FIELD_BYTES: usize = 1500;

/// Writes the header and `options.rows` data rows to `out` (buffered internally).
pub fn generate<W: Write>(options: &GenOptions, out: W) -> std::io::Result<GenStats> {
    let mut writer = csv::WriterBuilder::new()
        .flexible(true)
        .from_writer(std::io::BufWriter::with_capacity(256 * 1024, out));
    let mut header = vec!["id", "first_name", "last_name", "email", "phone"];
    if options.extra_columns {
        header.extend(["company", "country"]);
    }
    writer.write_record(&header).map_err(into_io)?;

    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut recent_versions = vec![0u32; RECENT_CUSTOMERS as usize];
    let mut stats = GenStats::default();
    let mut fields: Vec<String> = Vec::with_capacity(header.len() + 1);
    for _ in 0..options.rows {
        let draw: f64 = rng.random();
        let customers = stats.distinct_ids;
        let kind = if draw < options.bad_rate {
            RowKind::Bad
        } else if customers > 0 && draw < options.bad_rate + options.dup_rate {
            RowKind::Duplicate
        } else if customers > 0 && draw < options.bad_rate + options.dup_rate + options.change_rate
        {
            RowKind::Changed
        } else {
            RowKind::Fresh
        };
        fields.clear();
        match kind {
            RowKind::Fresh => {
                let customer = customers;
                recent_versions[slot(customer)] = 0;
                customer_fields(options, customer, 0, &mut fields);
                stats.distinct_ids += 1;
                stats.valid += 1;
            }
            RowKind::Duplicate => {
                let customer = pick_recent(&mut rng, customers);
                let version = recent_versions[slot(customer)];
                customer_fields(options, customer, version, &mut fields);
                stats.exact_duplicates += 1;
                stats.valid += 1;
            }
            RowKind::Changed => {
                let customer = pick_recent(&mut rng, customers);
                let version = recent_versions[slot(customer)] + 1;
                recent_versions[slot(customer)] = version;
                customer_fields(options, customer, version, &mut fields);
                stats.changed_repeats += 1;
                stats.valid += 1;
            }
            RowKind::Bad => {
                bad_fields(options, &mut rng, stats.rows, &mut fields);
                stats.bad += 1;
            }
        }
        writer.write_record(&fields).map_err(into_io)?;
        stats.rows += 1;
    }
    writer.flush()?;
    Ok(stats)
}

enum RowKind {
    Fresh,
    Duplicate,
    Changed,
    Bad,
}

fn slot(customer: u64) -> usize {
    (customer % RECENT_CUSTOMERS) as usize
}

fn pick_recent(rng: &mut StdRng, customers: u64) -> u64 {
    let oldest = customers.saturating_sub(RECENT_CUSTOMERS);
    rng.random_range(oldest..customers)
}

fn into_io(err: csv::Error) -> std::io::Error {
    match err.into_kind() {
        csv::ErrorKind::Io(io) => io,
        other => std::io::Error::other(format!("writing CSV: {other:?}")),
    }
}

/// Display name and the ASCII form used in e-mail addresses.
const FIRST_NAMES: &[(&str, &str)] = &[
    ("Ann", "ann"),
    ("Zoë", "zoe"),
    ("José", "jose"),
    ("Mohammed", "mohammed"),
    ("Li", "li"),
    ("Siobhán", "siobhan"),
    ("Olga", "olga"),
    ("Kwame", "kwame"),
    ("Priya", "priya"),
    ("Lars", "lars"),
    ("María", "maria"),
    ("Yuki", "yuki"),
    ("Chloé", "chloe"),
    ("Ahmet", "ahmet"),
    ("John", "john"),
    ("Fatima", "fatima"),
];

const LAST_NAMES: &[(&str, &str)] = &[
    ("Lee", "lee"),
    ("O'Neil", "oneil"),
    ("Müller", "mueller"),
    ("García", "garcia"),
    ("Nguyen", "nguyen"),
    ("Smith", "smith"),
    ("van der Berg", "vanderberg"),
    ("Kowalski", "kowalski"),
    ("Okafor", "okafor"),
    ("Sørensen", "sorensen"),
    ("Tanaka", "tanaka"),
    ("Dubois", "dubois"),
    ("Singh", "singh"),
    ("Rossi", "rossi"),
    ("Ivanova", "ivanova"),
    ("Brown", "brown"),
];

/// Includes the awkward cases a real export has: commas, quotes and a line break inside a field.
const COMPANIES: &[&str] = &[
    "Acme, Inc.",
    "Globex",
    "The \"Best\" Widgets",
    "Initech",
    "Müller & Söhne\nNiederlassung Wien",
    "Umbrella Corp",
    "",
    "東京商事",
    "Stark Industries",
    "Wayne Enterprises",
];

const COUNTRIES: &[&str] = &["US", "DE", "FR", "JP", "GB", "BR", "IN", "NG", "ES", "SE"];

const DOMAINS: &[&str] = &[
    "example.com",
    "mail.example.org",
    "corp.example.net",
    "example.co.uk",
];

/// The fields of one customer at one version, derived from (seed, customer, version) alone, so an
/// earlier row can be repeated without having been stored.
fn customer_fields(options: &GenOptions, customer: u64, version: u32, fields: &mut Vec<String>) {
    let mut rng = StdRng::seed_from_u64(
        options.seed ^ customer.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d,
    );
    let (first, first_ascii) = FIRST_NAMES[rng.random_range(0..FIRST_NAMES.len())];
    let (last, last_ascii) = LAST_NAMES[rng.random_range(0..LAST_NAMES.len())];
    let company = COMPANIES[rng.random_range(0..COMPANIES.len())];
    let country = COUNTRIES[rng.random_range(0..COUNTRIES.len())];
    let domain = DOMAINS[(rng.random_range(0..DOMAINS.len()) + version as usize) % DOMAINS.len()];
    let number = customer + 1;
    // The version is part of the address, so every change really changes the content.
    let email = if version == 0 {
        format!("{first_ascii}.{last_ascii}{number}@{domain}")
    } else {
        format!("{first_ascii}.{last_ascii}{number}+v{version}@{domain}")
    };
    let phone_base: u64 = rng.random_range(1_000_000..9_999_999);
    let phone = if rng.random_bool(0.15) && version == 0 {
        String::new()
    } else {
        format!(
            "+1-555-{:07}",
            (phone_base + u64::from(version)) % 10_000_000
        )
    };
    fields.push(format!("CUST-{number:08}"));
    fields.push(first.to_owned());
    fields.push(last.to_owned());
    fields.push(email);
    fields.push(phone);
    if options.extra_columns {
        fields.push(company.to_owned());
        fields.push(country.to_owned());
    }
}

/// A row the reader must reject, of one of the kinds docs/CONTRACT.md lists (valid UTF-8 throughout, so
/// the output stays text).
fn bad_fields(options: &GenOptions, rng: &mut StdRng, row: u64, fields: &mut Vec<String>) {
    let id = format!("BAD-{:08}", row + 1);
    let valid_rest = |fields: &mut Vec<String>, email: String| {
        fields.push("Bad".to_owned());
        fields.push("Row".to_owned());
        fields.push(email);
        fields.push("+1-555-0000000".to_owned());
        if options.extra_columns {
            fields.push("Acme, Inc.".to_owned());
            fields.push("US".to_owned());
        }
    };
    match rng.random_range(0..4u8) {
        0 => {
            fields.push(if rng.random_bool(0.5) {
                String::new()
            } else {
                "   ".to_owned()
            });
            valid_rest(fields, format!("bad.row{}@example.com", row + 1));
        }
        1 => {
            fields.push(id);
            let emails = [
                "not-an-address",
                "two@@example.com",
                "has space@example.com",
                "x@localhost",
            ];
            valid_rest(fields, emails[rng.random_range(0..emails.len())].to_owned());
        }
        2 => {
            fields.push(id);
            valid_rest(fields, format!("bad.row{}@example.com", row + 1));
            if rng.random_bool(0.5) {
                fields.truncate(3);
            } else {
                fields.push("surplus".to_owned());
            }
        }
        _ => {
            fields.push(id);
            valid_rest(fields, format!("bad.row{}@example.com", row + 1));
            fields[1] = "x".repeat(OVERLONG_FIELD_BYTES);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use customer_record::ColumnLayout;

    use super::*;

    /// Recomputes the statistics by parsing the output the way the reader does.
    fn parse_stats(csv_bytes: &[u8]) -> (GenStats, HashSet<&'static str>) {
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .has_headers(false)
            .from_reader(csv_bytes);
        let mut records = reader.byte_records();
        let header = records
            .next()
            .expect("header row")
            .expect("readable header");
        let layout = ColumnLayout::from_header(header.iter()).expect("valid header");
        let mut stats = GenStats::default();
        let mut kinds = HashSet::new();
        let mut seen_versions: HashMap<String, HashSet<String>> = HashMap::new();
        for record in records {
            let record = record.expect("readable row");
            stats.rows += 1;
            match layout.parse_row(record.iter()) {
                Ok(customer) => {
                    stats.valid += 1;
                    let hash = customer.content_hash().to_string();
                    let versions = seen_versions.entry(customer.id.clone()).or_default();
                    if versions.is_empty() {
                        stats.distinct_ids += 1;
                    } else if versions.contains(&hash) {
                        stats.exact_duplicates += 1;
                    } else {
                        stats.changed_repeats += 1;
                    }
                    versions.insert(hash);
                }
                Err(rejection) => {
                    stats.bad += 1;
                    kinds.insert(rejection.kind());
                }
            }
        }
        (stats, kinds)
    }

    #[test]
    fn stats_match_a_parse_of_the_output() {
        let options = GenOptions {
            rows: 5000,
            bad_rate: 0.05,
            dup_rate: 0.05,
            change_rate: 0.05,
            seed: 7,
            extra_columns: true,
        };
        let mut out = Vec::new();
        let stats = generate(&options, &mut out).expect("generate");
        let (parsed, kinds) = parse_stats(&out);
        assert_eq!(stats, parsed);
        assert_eq!(stats.rows, 5000);
        assert_eq!(stats.valid + stats.bad, stats.rows);
        assert!(stats.bad > 150 && stats.exact_duplicates > 150 && stats.changed_repeats > 150);
        let expected: HashSet<&str> =
            ["empty_id", "invalid_email", "field_count", "field_too_long"].into();
        assert_eq!(kinds, expected);
    }

    #[test]
    fn clean_default_file_has_one_row_per_customer_and_no_extra_columns_when_asked() {
        let options = GenOptions {
            extra_columns: false,
            ..GenOptions::default()
        };
        let mut out = Vec::new();
        let stats = generate(&options, &mut out).expect("generate");
        assert_eq!(stats.distinct_ids, 1000);
        assert_eq!(stats.valid, 1000);
        let text = String::from_utf8(out).expect("output is UTF-8");
        assert!(text.starts_with("id,first_name,last_name,email,phone\n"));
        assert_eq!(parse_stats(text.as_bytes()).0, stats);
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let options = GenOptions {
            rows: 300,
            bad_rate: 0.1,
            dup_rate: 0.1,
            change_rate: 0.1,
            ..GenOptions::default()
        };
        let run = |options: &GenOptions| {
            let mut out = Vec::new();
            generate(options, &mut out).expect("generate");
            out
        };
        assert_eq!(run(&options), run(&options));
        let other = GenOptions {
            seed: 2,
            ..options.clone()
        };
        assert_ne!(run(&options), run(&other));
    }

    #[test]
    fn zero_rows_is_just_the_header() {
        let mut out = Vec::new();
        let stats = generate(
            &GenOptions {
                rows: 0,
                ..GenOptions::default()
            },
            &mut out,
        )
        .expect("generate");
        assert_eq!(stats, GenStats::default());
        assert_eq!(
            out,
            b"id,first_name,last_name,email,phone,company,country\n"
        );
    }
}
