//! How every binary reports the failure that ends it: one line naming what failed (with its causes
//! joined on that line) and what to do, as JSON when `LOG_FORMAT=json`, coloured only on a
//! terminal; exit code 2 for a usage mistake, 1 for a failure at run time.

use std::error::Error;
use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;

/// Exit code of a mistake on the command line or in the environment.
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a failure at run time.
pub const EXIT_FAILURE: u8 = 1;

/// The error and every cause below it, on one line: `outer: inner: innermost`. A cause whose text
/// the line already holds is left out, and line breaks inside a message become spaces.
pub fn one_line(err: &(dyn Error + 'static)) -> String {
    let mut text = flat(&err.to_string());
    let mut cause = err.source();
    while let Some(inner) = cause {
        let line = flat(&inner.to_string());
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = inner.source();
    }
    text
}

/// The innermost cause as a short reason, such as `connection refused`: what an operator needs in
/// a "not reachable yet" line.
pub fn root_cause(err: &(dyn Error + 'static)) -> String {
    let mut innermost = err;
    while let Some(inner) = innermost.source() {
        innermost = inner;
    }
    let text = flat(&innermost.to_string());
    // "…: error connecting to server: Connection refused (os error 111) (is it running?)", from
    // an error that keeps its causes as text: the operating system's words are the reason, and
    // its number helps nobody.
    let text = match text.find(" (os error ") {
        Some(at) => {
            let before = &text[..at];
            before
                .rsplit_once(": ")
                .map_or(before, |(_, last)| last)
                .to_owned()
        }
        None => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

fn flat(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether logs (and the final failure) are JSON: `LOG_FORMAT=json`.
pub fn json_logs() -> bool {
    std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"))
}

/// Prints the failure that ends `program` on stderr, the one way every binary does, and returns
/// `code` as the process's exit code.
pub fn report_failure(program: &str, err: &(dyn Error + 'static), code: u8) -> ExitCode {
    print_failure(program, &one_line(err), code);
    ExitCode::from(code)
}

fn print_failure(program: &str, message: &str, code: u8) {
    // A failure may quote a URL or DSN: never with its password.
    let message = &sync_topology::redact(message);
    let line = if json_logs() {
        // The shape of the tracing subscriber's JSON lines, so one parser reads both.
        serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": "ERROR",
            "fields": { "message": message, "exit_code": code },
            "target": program,
        })
        .to_string()
    } else if std::io::stderr().is_terminal() {
        format!("{program}: \x1b[1;31merror\x1b[0m: {message}")
    } else {
        format!("{program}: error: {message}")
    };
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{line}");
}

/// Parses the command line (and environment) of `program`. `--help` and `--version` print and
/// exit 0; a usage mistake (an unknown flag, a value out of range) is reported like any failure,
/// on one line, with exit code 2.
pub fn parse_args<T: clap::Parser>(program: &str) -> T {
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(err) => exit_on_usage_error(program, &err),
    }
}

/// Reports a clap error (from parsing, or `Command::error` for a check of our own) and exits.
pub fn exit_on_usage_error(program: &str, err: &clap::Error) -> ! {
    if !err.use_stderr() {
        // --help, --version: not a failure.
        let _ = err.print();
        std::process::exit(0);
    }
    print_failure(program, &usage_message(&err.to_string()), EXIT_USAGE);
    std::process::exit(i32::from(EXIT_USAGE));
}

/// clap's several-line report as one line: its message without the usage block, and where to look.
fn usage_message(rendered: &str) -> String {
    let kept: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .filter(|line| !line.is_empty())
        .collect();
    let text = kept.join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    format!("{text} (see --help)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|l| l as &(dyn Error + 'static))
        }
    }

    #[test]
    fn causes_are_joined_on_one_line_each_once() {
        let err = Layer(
            "cannot connect to NATS at nats://h:4222: IO error",
            Some(Box::new(Layer(
                "IO error",
                Some(Box::new(Layer("Connection refused (os error 111)", None))),
            ))),
        );
        assert_eq!(
            one_line(&err),
            "cannot connect to NATS at nats://h:4222: IO error: Connection refused (os error 111)"
        );
        assert_eq!(root_cause(&err), "connection refused");
        let flat_causes = Layer(
            "cannot connect to PostgreSQL at postgres://h:5432/db: error connecting to server: \
             Connection refused (os error 111) (is it running?)",
            None,
        );
        assert_eq!(root_cause(&flat_causes), "connection refused");
        let multi = Layer("first line\n  second line", None);
        assert_eq!(one_line(&multi), "first line second line");
    }

    #[test]
    fn clap_reports_become_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  --id <ID>\n\n\
                        Usage: syncctl dlq redrive --id <ID>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_message(rendered),
            "the following required arguments were not provided: --id <ID> (see --help)"
        );
    }
}
