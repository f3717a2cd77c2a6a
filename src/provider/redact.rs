//! Provider texts made safe to store and log: no API key, no credential of any header an
//! OpenAI-compatible service may echo back, no U+0000, and a bounded length.

/// Longest provider text kept.
pub const MAX_CHARS: usize = 2000;

/// What a redacted credential becomes.
const REDACTED: &str = "[redacted]";

/// Labels after which a credential follows (`Authorization: Bearer …`, `api-key: …`, …).
const CREDENTIAL_LABELS: [&str; 6] = [
    "authorization",
    "x-api-key",
    "api-key",
    "api_key",
    "apikey",
    "bearer",
];

/// `text` without `key` and without the value after any credential label, with U+0000 as
/// U+FFFD, cut to [`MAX_CHARS`].
pub fn redact(text: &str, key: &str) -> String {
    let mut text = text.replace('\0', "\u{FFFD}");
    if key.len() >= 4 {
        text = text.replace(key, REDACTED);
    }
    bounded(&without_credentials(&text))
}

/// `text` cut to [`MAX_CHARS`] characters.
pub fn bounded(text: &str) -> String {
    match text.char_indices().nth(MAX_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

fn is_separator(c: char) -> bool {
    matches!(c, ' ' | '\t' | ':' | '=' | '"' | '\'')
}

fn ends_token(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ';' | '}' | ']' | ')')
}

fn without_credentials(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while at < text.len() {
        let label = CREDENTIAL_LABELS
            .iter()
            .find(|l| lower[at..].starts_with(*l) && !preceded_by_word(&lower, at));
        let Some(label) = label else {
            let c = text[at..].chars().next().expect("at is inside text");
            out.push(c);
            at += c.len_utf8();
            continue;
        };
        let mut next = at + label.len();
        out.push_str(&text[at..next]);
        let separators: usize = text[next..]
            .chars()
            .take_while(|c| is_separator(*c))
            .map(char::len_utf8)
            .sum();
        if separators == 0 {
            // A word that merely starts like a label ("bearers"): not a credential.
            at = next;
            continue;
        }
        out.push_str(&text[next..next + separators]);
        next += separators;
        // "Authorization: Bearer <token>": the scheme stays, the token goes.
        for scheme in ["bearer ", "basic "] {
            if lower[next..].starts_with(scheme) {
                out.push_str(&text[next..next + scheme.len()]);
                next += scheme.len();
            }
        }
        let token: usize = text[next..]
            .chars()
            .take_while(|c| !ends_token(*c))
            .map(char::len_utf8)
            .sum();
        if token > 0 {
            out.push_str(REDACTED);
        }
        at = next + token;
    }
    out
}

fn preceded_by_word(lower: &str, at: usize) -> bool {
    lower[..at]
        .chars()
        .next_back()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-test-123456";

    #[test]
    fn the_key_and_echoed_credentials_are_removed() {
        for text in [
            "Invalid request. Headers received: Authorization: Bearer sk-test-123456, api-key: sk-test-123456",
            "{\"error\": {\"message\": \"bad header 'authorization': 'Bearer sk-other-999'\"}}",
            "x-api-key=abc.def.ghi; retry",
            "got api_key \"zzz-secret\"",
        ] {
            let out = redact(text, KEY);
            for secret in [KEY, "sk-other-999", "abc.def.ghi", "zzz-secret"] {
                assert!(!out.contains(secret), "{secret} left in {out}");
            }
            assert!(out.contains(REDACTED), "{out}");
        }
    }

    #[test]
    fn ordinary_text_is_kept() {
        let text = "HTTP 400: Invalid 'input_file_id': file-abc does not exist";
        assert_eq!(redact(text, KEY), text);
        assert_eq!(redact("bearers of news", KEY), "bearers of news");
    }

    #[test]
    fn nul_and_length_are_bounded() {
        assert_eq!(redact("a\0b", KEY), "a\u{FFFD}b");
        let long = "é".repeat(MAX_CHARS * 2);
        assert_eq!(redact(&long, KEY).chars().count(), MAX_CHARS + 1);
    }
}
