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

/// `text` without `key`, without anything shaped like an OpenAI key (`sk-…`) and without the
/// value after any credential label, with U+0000 as U+FFFD, cut to [`MAX_CHARS`].
pub fn redact(text: &str, key: &str) -> String {
    bounded(&redact_json(&text.replace('\0', "\u{FFFD}"), key))
}

/// [`redact`] with every key of `keys` (also the shapes and labels when there is none).
pub fn redact_all<'a>(text: &str, keys: impl IntoIterator<Item = &'a str>) -> String {
    keys.into_iter()
        .fold(redact(text, ""), |text, key| redact(&text, key))
}

/// [`redact_json`] with every key of `keys`.
pub fn redact_json_all<'a>(text: &str, keys: impl IntoIterator<Item = &'a str>) -> String {
    keys.into_iter()
        .fold(redact_json(text, ""), |text, key| redact_json(&text, key))
}

/// [`redact`] for a JSON text kept whole (a provider's error body): nothing is cut, and every
/// replacement stays inside the string it was found in, so the JSON stays valid.
pub fn redact_json(text: &str, key: &str) -> String {
    let text = if key.len() >= 4 {
        text.replace(key, REDACTED)
    } else {
        text.to_owned()
    };
    without_credentials(&without_key_shapes(&text))
}

/// Anything that looks like an OpenAI secret key: `sk-` and 16 or more key characters.
fn without_key_shapes(text: &str) -> String {
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("sk-") {
        let starts_word = !rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let len = rest[at..].chars().take_while(|c| is_key_char(*c)).count();
        out.push_str(&rest[..at]);
        if starts_word && len >= 3 + 16 {
            out.push_str(REDACTED);
        } else {
            out.push_str(&rest[at..at + len.max(3)]);
        }
        rest = &rest[at + len.max(3)..];
    }
    out.push_str(rest);
    out
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
        for scheme in ["bearer", "basic"] {
            if !lower[next..].starts_with(scheme) {
                continue;
            }
            let spaces: usize = text[next + scheme.len()..]
                .chars()
                .take_while(|c| *c == ' ' || *c == '\t')
                .count();
            if spaces > 0 {
                out.push_str(&text[next..next + scheme.len() + spaces]);
                next += scheme.len() + spaces;
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
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
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
            "OpenAI-Api-Key: abc.def.ghi and Authorization: Bearer  zzz-secret",
            "a key in sk-proj-abcdefghijklmnopqrstuvwxyz0123 text, authorization: é",
        ] {
            let out = redact(text, KEY);
            for secret in [KEY, "sk-other-999", "abc.def.ghi", "zzz-secret", "abcdefghijklmnop"] {
                assert!(!out.contains(secret), "{secret} left in {out}");
            }
            assert!(out.contains(REDACTED), "{out}");
        }
    }

    #[test]
    fn a_json_body_stays_json() {
        let body = r#"{"error": {"message": "Invalid header Authorization: Bearer sk-abcdefghijklmnopqrstu", "code": "x"}}"#;
        let out = redact_json(body, KEY);
        let parsed: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
        let message = parsed["error"]["message"].as_str().unwrap();
        assert!(!message.contains("abcdefghijklmnop"), "{message}");
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
