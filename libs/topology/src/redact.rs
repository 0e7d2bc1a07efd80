//! Secrets out of text: the one function every error and log line that names a server goes through.

/// Keys whose value is a secret in a key-value DSN (`host=db password=…`), a URL query
/// (`?password=…`) or an environment listing (`NATS_PASSWORD=…`), matched case-insensitively as the
/// end of the key.
const SECRET_KEYS: [&str; 3] = ["password", "token", "secret"];

/// URL schemes whose user part alone is a secret: NATS takes a bare token as `nats://TOKEN@host`.
const TOKEN_SCHEMES: [&str; 4] = ["nats", "tls", "ws", "wss"];

/// Characters that end a URL's user part when reading back from its `@`.
fn ends_userinfo(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '/' | ','
                | '('
                | ')'
                | '"'
                | '\''
                | '<'
                | '>'
                | '['
                | ']'
                | '{'
                | '}'
                | '='
                | ';'
                | '`'
        )
}

/// `text` with every credential replaced by `***`, whatever form it takes: the password of a URL
/// (`postgres://u:p@h/db` → `postgres://u:***@h/db`, any scheme, percent-encoded or not, each server
/// of a comma-separated NATS list, with or without its scheme), a NATS token URL
/// (`nats://t@h` → `nats://***@h`), `password=…` / `token=…` / `secret=…` in a key-value DSN, a URL
/// query or an environment listing (quoted values included), and `Bearer …` as an `Authorization`
/// header has it. Text without
/// credentials comes back unchanged. Safe on any text (an error chain, a Debug dump), so callers
/// never need to know which form a setting took.
pub fn redact(text: &str) -> String {
    redact_bearer(&redact_key_values(&redact_userinfo(text)))
}

fn redact_userinfo(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if ends_userinfo(chars[i]) {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        // One token: up to the next delimiter. Its user part runs up to its last `@`, so a
        // password holding an unencoded `@` is still hidden whole.
        let start = i;
        while i < chars.len() && !ends_userinfo(chars[i]) {
            i += 1;
        }
        let token: String = chars[start..i].iter().collect();
        let Some(at) = token.rfind('@') else {
            out.push_str(&token);
            continue;
        };
        let (userinfo, rest) = token.split_at(at);
        let after_scheme = start >= 3 && chars[start - 3..start] == [':', '/', '/'];
        let scheme: String = if after_scheme {
            chars[..start - 3]
                .iter()
                .rev()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect()
        } else {
            String::new()
        };
        match userinfo.split_once(':') {
            Some((user, _)) => {
                out.push_str(user);
                out.push_str(":***");
            }
            None if after_scheme
                && !userinfo.is_empty()
                && TOKEN_SCHEMES.iter().any(|s| scheme.eq_ignore_ascii_case(s)) =>
            {
                out.push_str("***");
            }
            None => out.push_str(userinfo),
        }
        out.push_str(rest);
    }
    out
}

/// The end of a quoted value starting at `start` (which holds the quote), escapes included.
fn quoted_end(bytes: &[u8], start: usize) -> usize {
    let quote = bytes[start];
    let mut k = start + 1;
    while k < bytes.len() && bytes[k] != quote {
        k += if bytes[k] == b'\\' { 2 } else { 1 };
    }
    (k + 1).min(bytes.len())
}

fn redact_key_values(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let bytes = text.as_bytes();
    let skip_spaces = |mut j: usize| {
        while j < bytes.len() && bytes[j] == b' ' {
            j += 1;
        }
        j
    };
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some(key_end) = SECRET_KEYS
        .iter()
        .filter_map(|key| lower[search..].find(key).map(|p| search + p + key.len()))
        .min()
    {
        search = key_end;
        // The key must end here (`password=`, not `password_file=`), as `key=value` (a DSN, a
        // query, an environment listing) or as `key: "value"` (Debug output, JSON, YAML).
        let mut j = key_end;
        if bytes.get(j) == Some(&b'"') {
            j += 1;
        }
        j = skip_spaces(j);
        let separator = bytes.get(j).copied();
        if !matches!(separator, Some(b'=' | b':')) {
            continue;
        }
        j = skip_spaces(j + 1);
        if text[j..].starts_with("Some(") {
            j += "Some(".len();
        }
        let value_start = j;
        let value_end = match bytes.get(j) {
            Some(b'\'' | b'"') => quoted_end(bytes, j),
            // Bare values only after `=`: `password: see below` is prose.
            Some(_) if separator == Some(b'=') => {
                let mut k = j;
                while k < bytes.len()
                    && !bytes[k].is_ascii_whitespace()
                    && !matches!(bytes[k], b'&' | b'#' | b'"' | b',' | b')' | b';')
                {
                    k += 1;
                }
                k
            }
            _ => continue,
        };
        if value_end == value_start {
            continue;
        }
        out.push_str(&text[copied..value_start]);
        out.push_str("***");
        copied = value_end;
        search = value_end;
    }
    out.push_str(&text[copied..]);
    redact_debug_token_urls(&out)
}

/// A URL's Debug form (`Url { scheme: "nats", …, username: "TOKEN", password: None, … }`, as
/// async-nats logs its servers) shows a NATS token as the user name.
fn redact_debug_token_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(found) = rest.find("Url { scheme: \"") {
        let (before, url) = rest.split_at(found);
        out.push_str(before);
        let scheme_start = "Url { scheme: \"".len();
        let scheme = url[scheme_start..].split('"').next().unwrap_or_default();
        let end = url[1..].find("Url { ").map_or(url.len(), |p| p + 1);
        let (this, after) = url.split_at(end);
        let token = TOKEN_SCHEMES.iter().any(|s| scheme.eq_ignore_ascii_case(s))
            && this.contains("password: None");
        match (token, this.find("username: \"")) {
            (true, Some(at)) => {
                let value = at + "username: ".len();
                let value_end = quoted_end(this.as_bytes(), value);
                if value_end > value + 2 {
                    out.push_str(&this[..value]);
                    out.push_str("***");
                    out.push_str(&this[value_end..]);
                } else {
                    out.push_str(this);
                }
            }
            _ => out.push_str(this),
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

fn redact_bearer(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    // As the header writes it: prose such as "wrong bearer token" is left alone.
    while let Some(found) = text[search..].find("Bearer ") {
        let value_start = search + found + "bearer ".len();
        let value_end = text[value_start..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ')'))
            .map_or(text.len(), |p| value_start + p);
        search = value_end.max(value_start);
        if value_end == value_start || &text[value_start..value_end] == "***" {
            continue;
        }
        out.push_str(&text[copied..value_start]);
        out.push_str("***");
        copied = value_end;
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_hidden_in_every_scheme() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact("postgresql://u:s%40cret@h/db?sslmode=require"),
            "postgresql://u:***@h/db?sslmode=require"
        );
        assert_eq!(redact("nats://u:p@h:4222"), "nats://u:***@h:4222");
        assert_eq!(redact("http://u:p@crm:8080/x"), "http://u:***@crm:8080/x");
        assert_eq!(
            redact("cannot connect to nats://u:p@ss@h:4222: refused"),
            "cannot connect to nats://u:***@h:4222: refused"
        );
    }

    #[test]
    fn every_server_of_a_nats_list_is_hidden() {
        assert_eq!(
            redact("nats://a:s1@n1:4222,nats://b:s2@n2:4222, c:s3@n3"),
            "nats://a:***@n1:4222,nats://b:***@n2:4222, c:***@n3"
        );
    }

    #[test]
    fn a_nats_token_in_a_url_is_hidden_but_a_user_name_is_kept() {
        assert_eq!(redact("nats://s3cr3t@h:4222"), "nats://***@h:4222");
        assert_eq!(redact("tls://s3cr3t@h:4222"), "tls://***@h:4222");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn key_value_dsns_queries_and_environment_listings_are_hidden() {
        assert_eq!(
            redact("host=db user=u password=secret dbname=x"),
            "host=db user=u password=*** dbname=x"
        );
        assert_eq!(
            redact("host=db password = 'sec ret\\'x' port=5"),
            "host=db password = *** port=5"
        );
        assert_eq!(
            redact("postgres://h/db?user=u&password=secret&sslmode=require"),
            "postgres://h/db?user=u&password=***&sslmode=require"
        );
        assert_eq!(
            redact("NATS_PASSWORD=pw CRM_API_TOKEN=tok X_SECRET=s"),
            "NATS_PASSWORD=*** CRM_API_TOKEN=*** X_SECRET=***"
        );
        assert_eq!(
            redact("Authorization: Bearer abc.def"),
            "Authorization: Bearer ***"
        );
    }

    #[test]
    fn debug_and_json_forms_are_hidden() {
        let url = r#"ServerAddr(Url { scheme: "nats", cannot_be_a_base: false, username: "sync", password: Some("s3cret"), host: Some(Domain("h")), port: Some(4222) })"#;
        let shown = redact(url);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains(r#"username: "sync""#), "{shown}");
        let token =
            r#"Url { scheme: "nats", username: "t0ken", password: None, host: Some(Domain("h")) }"#;
        let shown = redact(token);
        assert!(!shown.contains("t0ken"), "{shown}");
        let plain = r#"Url { scheme: "postgres", username: "u", password: None }"#;
        assert_eq!(redact(plain), plain);
        assert_eq!(
            redact(r#"{"password":"s3cret","user":"u"}"#),
            r#"{"password":***,"user":"u"}"#
        );
        assert_eq!(redact("password: 'x y'"), "password: ***");
        assert_eq!(
            redact("wrong password: check NATS_PASSWORD"),
            "wrong password: check NATS_PASSWORD"
        );
    }

    #[test]
    fn text_without_credentials_is_unchanged() {
        for text in [
            "host=/tmp",
            "postgres://postgres@127.0.0.1:15432/postgres",
            "nats://127.0.0.1:4222,nats://10.0.0.2:4222",
            "http://127.0.0.1:8080/customers/a@b.example",
            "customer ada@example.com updated (3 passwords reset)",
            "the token is missing",
            "password_file=/run/secrets/pw",
            "",
        ] {
            assert_eq!(redact(text), text);
        }
    }

    #[test]
    fn non_ascii_text_survives() {
        assert_eq!(
            redact("é nats://ü:ß@h — password=ł"),
            "é nats://ü:***@h — password=***"
        );
    }
}
