//! Reading a finished batch's output and error files, one line at a time, into what happened
//! to each request. Pure: no database, no network.

use crate::request::{AnswerFormat, Endpoint};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::HashMap;

/// What one result line says about its request.
#[derive(Debug, PartialEq, Clone)]
pub enum Outcome {
    /// The model answered.
    Completed {
        /// The response body as the provider wrote it (JSON text).
        response: String,
        text: Option<String>,
        usage: Usage,
    },
    /// The request ran and was refused for a reason that will not change by sending it again.
    Failed {
        message: String,
        /// The response body as the provider wrote it (JSON text), if there was one.
        response: Option<String>,
    },
    /// The request did not run, or failed in a way that may pass on another try.
    Retry { reason: String },
    /// The request ran, but its result line cannot be read. The file is read again; if the line
    /// still cannot be read, the request fails with the line kept (it is not sent again).
    Unreadable {
        reason: String,
        /// The whole line as the provider wrote it.
        line: String,
    },
}

/// One result line, attributed to the request it belongs to.
#[derive(Debug, PartialEq, Clone)]
pub struct LineResult {
    pub request_id: i64,
    pub outcome: Outcome,
}

/// Longest result line read; a longer one is skipped as malformed, so a hostile or broken
/// provider cannot make the worker hold an unbounded line in memory.
pub const MAX_RESULT_LINE_BYTES: usize = 64 * 1024 * 1024;

/// What [`read_line_bounded`] found.
#[derive(Debug, PartialEq)]
pub enum LineRead {
    /// A line (without its newline) is in the buffer.
    Line,
    /// A line longer than the limit was skipped; the buffer is empty.
    TooLong,
    /// The end of the file.
    End,
}

/// Decides which result lines of a batch are applied, so that the outcome is the same however
/// the lines are ordered and chunked: the batch's files are read twice, first to [`note`] every
/// line, then to ask whether to [`apply`] it. For each request the line of the best kind wins:
/// a success, then a refusal (it ran and failed for good), then an unreadable line (it ran; read
/// again, or failed with the line kept), then a line saying it did not run (which queues it
/// again, to be paid for twice if the provider did answer it). Of lines of the same kind, the
/// first wins; one line per request is applied.
///
/// [`note`]: LineFilter::note
/// [`apply`]: LineFilter::apply
#[derive(Default)]
pub struct LineFilter {
    /// The best kind of line each named request has (see [`LineFilter::rank`]).
    best: HashMap<i64, u8>,
    applied: std::collections::HashSet<i64>,
    duplicates: usize,
}

impl LineFilter {
    /// How good a line is for its request: the higher, the more it says.
    fn rank(outcome: &Outcome) -> u8 {
        match outcome {
            Outcome::Completed { .. } => 3,
            Outcome::Failed { .. } => 2,
            Outcome::Unreadable { .. } => 1,
            Outcome::Retry { .. } => 0,
        }
    }

    /// First reading: remembers the best kind of line of each request.
    pub fn note(&mut self, result: &LineResult) {
        let rank = Self::rank(&result.outcome);
        let best = self.best.entry(result.request_id).or_insert(rank);
        *best = (*best).max(rank);
    }

    /// The requests the files name.
    pub fn named(&self) -> Vec<i64> {
        self.best.keys().copied().collect()
    }

    /// Forgets the requests that do not exist (a provider's line naming no request of ours):
    /// they are neither applied nor counted. Returns how many there were.
    pub fn forget_unknown(&mut self, known: &std::collections::HashSet<i64>) -> usize {
        let before = self.best.len();
        self.best.retain(|id, _| known.contains(id));
        before - self.best.len()
    }

    /// Second reading: whether this line is the one applied for its request.
    pub fn apply(&mut self, result: &LineResult) -> bool {
        let Some(best) = self.best.get(&result.request_id) else {
            return false;
        };
        if Self::rank(&result.outcome) < *best {
            return false;
        }
        let first = self.applied.insert(result.request_id);
        if !first {
            self.duplicates += 1;
        }
        first
    }

    /// How many distinct requests the files name: what is compared with the provider's counts.
    pub fn requests_named(&self) -> i64 {
        self.best.len() as i64
    }

    /// Lines skipped in the second reading because their request already had one applied.
    pub fn duplicates(&self) -> usize {
        self.duplicates
    }
}

/// Reads the next line into `buf` (cleared first), holding at most `limit` bytes of it.
pub fn read_line_bounded(
    reader: &mut impl std::io::BufRead,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<LineRead> {
    buf.clear();
    let mut too_long = false;
    let mut read_any = false;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(match (read_any, too_long) {
                (false, _) => LineRead::End,
                (true, true) => LineRead::TooLong,
                (true, false) => LineRead::Line,
            });
        }
        read_any = true;
        let (part, found_newline) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (&chunk[..i], true),
            None => (chunk, false),
        };
        if !too_long && buf.len() + part.len() <= limit {
            buf.extend_from_slice(part);
        } else {
            too_long = true;
            buf.clear();
        }
        let used = part.len() + usize::from(found_newline);
        reader.consume(used);
        if found_newline {
            return Ok(if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line
            });
        }
    }
}

/// The `custom_id` llmbatching gives a request in a batch file.
pub fn custom_id(request_id: i64) -> String {
    request_id.to_string()
}

/// The line with every JSON escape of U+0000 (`\u0000`), which neither `text` nor `jsonb` can
/// hold, replaced by U+FFFD (the replacement character), so that an answer holding it can be
/// stored and its request complete.
/// An escaped backslash followed by `u0000` is text, not the escape, and is left alone.
pub fn without_nul_escapes(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.contains("\\u0000") {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let escape = &rest[at..];
        if escape.starts_with("\\u0000") {
            out.push_str("\\ufffd");
            rest = &escape[6..];
        } else {
            // Any other escape (including an escaped backslash) is copied whole.
            let len = escape[1..].chars().next().map_or(1, |c| 1 + c.len_utf8());
            out.push_str(&escape[..len]);
            rest = &escape[len..];
        }
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// Reads one line of an output or error file. `Err` means the line could not be attributed to
/// any request; its text is returned for the log. A line that names its request but is
/// otherwise malformed becomes [`Outcome::Unreadable`].
pub fn parse_line(endpoint: Endpoint, line: &str) -> Result<LineResult, String> {
    let line = without_nul_escapes(line);
    let raw = line.as_ref();
    let line: RawLine = serde_json::from_str(raw).map_err(|e| format!("not JSON ({e})"))?;
    let request_id = line
        .custom_id
        .as_ref()
        .and_then(Value::as_str)
        .and_then(|id| id.parse::<i64>().ok())
        .ok_or_else(|| "no custom_id that llmbatching issued".to_string())?;
    let outcome = outcome_of(endpoint, &line).unwrap_or_else(|reason| Outcome::Unreadable {
        reason: format!("the provider returned a malformed result line: {reason}"),
        line: raw.to_owned(),
    });
    Ok(LineResult {
        request_id,
        outcome,
    })
}

/// A result line, with the response left as the provider's text: its body is stored as it came,
/// and only read into a tree to find the answer and the token counts.
#[derive(Deserialize)]
struct RawLine<'a> {
    #[serde(default)]
    custom_id: Option<Value>,
    #[serde(default, borrow)]
    response: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct RawResponse<'a> {
    #[serde(default)]
    status_code: Option<Value>,
    #[serde(default, borrow)]
    body: Option<&'a RawValue>,
}

fn outcome_of(endpoint: Endpoint, line: &RawLine) -> Result<Outcome, String> {
    match line.response.filter(|r| r.get() != "null") {
        Some(response) => response_outcome(endpoint, response),
        None => line_error_outcome(line.error.as_ref().unwrap_or(&Value::Null)),
    }
}

fn response_outcome(endpoint: Endpoint, response: &RawValue) -> Result<Outcome, String> {
    let response: RawResponse =
        serde_json::from_str(response.get()).map_err(|_| "the response is not an object")?;
    let status = response
        .status_code
        .as_ref()
        .and_then(Value::as_u64)
        .ok_or("no status_code")?;
    let raw_body = response.body.ok_or("no response body")?;
    let body = read_body(raw_body)?;
    if (200..300).contains(&status) {
        return Ok(Outcome::Completed {
            text: answer_text(endpoint, &body),
            response: raw_body.get().to_owned(),
            usage: token_usage(&body),
        });
    }
    let message = body
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("the provider answered status {status}"));
    // Rate limits, timeouts and server errors are the provider's trouble, not the request's.
    if matches!(status, 408 | 409 | 429) || status >= 500 {
        return Ok(Outcome::Retry {
            reason: format!("status {status}: {message}"),
        });
    }
    Ok(Outcome::Failed {
        message,
        response: Some(raw_body.get().to_owned()),
    })
}

/// The members of a response body that llmbatching reads: the answer, the token counts and an
/// error. Only these are read into a tree; the rest, such as an embedding's vector, is skipped
/// over and stored as it came.
const BODY_MEMBERS_READ: [&str; 5] = ["output_text", "output", "choices", "usage", "error"];

/// A response body (a JSON object) holding only the members in [`BODY_MEMBERS_READ`].
fn read_body(raw: &RawValue) -> Result<Value, String> {
    let members: HashMap<String, &RawValue> =
        serde_json::from_str(raw.get()).map_err(|_| "no response body")?;
    let mut body = serde_json::Map::new();
    for name in BODY_MEMBERS_READ {
        if let Some(member) = members.get(name) {
            let value = serde_json::from_str(member.get()).map_err(|e| e.to_string())?;
            body.insert(name.to_owned(), value);
        }
    }
    Ok(Value::Object(body))
}

/// Error codes of lines that never reached the model, or failed only for lack of time.
const NOT_RUN_CODES: [&str; 4] = [
    "batch_expired",
    "batch_cancelled",
    "request_timeout",
    "batch_failed",
];

fn line_error_outcome(error: &Value) -> Result<Outcome, String> {
    let code = error
        .get("code")
        .and_then(Value::as_str)
        .ok_or("neither a response nor an error")?;
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or(code)
        .to_owned();
    if NOT_RUN_CODES.contains(&code) {
        return Ok(Outcome::Retry {
            reason: format!("{code}: {message}"),
        });
    }
    Ok(Outcome::Failed {
        message: format!("{code}: {message}"),
        response: None,
    })
}

/// The answer as text: Responses' output text, the first choice's message (Chat Completions)
/// or text (Completions). None for endpoints whose answer is not text.
pub fn answer_text(endpoint: Endpoint, body: &Value) -> Option<String> {
    match endpoint {
        Endpoint::Responses => {
            if let Some(text) = body.get("output_text").and_then(Value::as_str) {
                return Some(text.to_owned());
            }
            let parts: Vec<&str> = body
                .get("output")?
                .as_array()?
                .iter()
                .filter_map(|item| item.get("content")?.as_array())
                .flatten()
                .filter(|part| part.get("type").and_then(Value::as_str) == Some("output_text"))
                .filter_map(|part| part.get("text")?.as_str())
                .collect();
            (!parts.is_empty()).then(|| parts.concat())
        }
        Endpoint::ChatCompletions => body
            .pointer("/choices/0/message/content")?
            .as_str()
            .map(str::to_owned),
        Endpoint::Completions => body.pointer("/choices/0/text")?.as_str().map(str::to_owned),
        Endpoint::Embeddings | Endpoint::Moderations => None,
    }
}

/// Checks a completed answer against the format its request asked for. Returns the answer
/// text to keep and the parsed JSON answer, or why the answer is not acceptable.
pub fn check_answer(
    format: &AnswerFormat,
    text: Option<&str>,
) -> Result<(Option<String>, Value), String> {
    let text = text.ok_or("the answer has no text")?;
    let json: Value = serde_json::from_str(text)
        .map_err(|e| format!("the answer is not valid JSON ({e}): {text:.200}"))?;
    match format {
        AnswerFormat::Json => Ok((Some(text.to_owned()), json)),
        AnswerFormat::Label(labels) => {
            let label = json
                .get("label")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("the answer names no label: {text:.200}"))?;
            if !labels.iter().any(|l| l == label) {
                return Err(format!(
                    "the answer \"{label:.100}\" is not one of the labels {}",
                    labels.join(", ")
                ));
            }
            Ok((Some(label.to_owned()), json))
        }
    }
}

/// The tokens one answer used.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub input: Option<i32>,
    /// Input tokens served from the provider's prompt cache (billed at the cached price).
    pub cached: Option<i32>,
    pub output: Option<i32>,
    /// Output tokens spent on reasoning (billed as output).
    pub reasoning: Option<i32>,
}

/// Token usage from a body's `usage`, in the naming of Responses (`input_tokens`,
/// `input_tokens_details.cached_tokens`, …) or of Chat Completions and Embeddings
/// (`prompt_tokens`, `prompt_tokens_details.cached_tokens`, …).
pub fn token_usage(body: &Value) -> Usage {
    let usage = body.get("usage");
    let count = |paths: [&str; 2]| {
        paths
            .iter()
            .find_map(|p| usage?.pointer(p)?.as_i64())
            .map(|n| n.clamp(0, i32::MAX as i64) as i32)
    };
    Usage {
        input: count(["/input_tokens", "/prompt_tokens"]),
        cached: count([
            "/input_tokens_details/cached_tokens",
            "/prompt_tokens_details/cached_tokens",
        ]),
        output: count(["/output_tokens", "/completion_tokens"]),
        reasoning: count([
            "/output_tokens_details/reasoning_tokens",
            "/completion_tokens_details/reasoning_tokens",
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(v: Value) -> String {
        v.to_string()
    }

    #[test]
    fn a_response_line_yields_text_and_usage() {
        let l = line(
            json!({"id": "batch_req_1", "custom_id": "17", "error": null, "response": {
            "status_code": 200, "request_id": "r", "body": {"output": [{"type": "message",
            "content": [{"type": "output_text", "text": "positive"}]}],
            "usage": {"input_tokens": 12, "output_tokens": 1}}}}),
        );
        let r = parse_line(Endpoint::Responses, &l).unwrap();
        assert_eq!(r.request_id, 17);
        match r.outcome {
            Outcome::Completed {
                text,
                usage,
                response,
            } => {
                assert_eq!(text.as_deref(), Some("positive"));
                assert_eq!((usage.input, usage.output), (Some(12), Some(1)));
                let stored: Value = serde_json::from_str(&response).unwrap();
                assert_eq!(stored["usage"]["input_tokens"], 12);
                assert!(
                    stored.get("status_code").is_none(),
                    "the body, not the envelope"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_embedding_is_stored_as_it_came_and_its_usage_read() {
        let vector: Vec<f64> = (0..1536).map(|i| i as f64 / 7.0).collect();
        let body = json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                          "model": "text-embedding-3-small", "usage": {"prompt_tokens": 5, "total_tokens": 5}});
        let l = line(json!({"custom_id": "3", "response": {"status_code": 200, "body": body}}));
        match parse_line(Endpoint::Embeddings, &l).unwrap().outcome {
            Outcome::Completed {
                text,
                usage,
                response,
            } => {
                assert_eq!(text, None);
                assert_eq!(usage.input, Some(5));
                assert_eq!(response, body.to_string(), "the provider's text, unchanged");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_body_that_is_not_an_object_is_malformed() {
        for body in [json!([1, 2]), json!("text"), json!(null)] {
            let l = line(json!({"custom_id": "4", "response": {"status_code": 200, "body": body}}));
            match parse_line(Endpoint::Responses, &l).unwrap().outcome {
                Outcome::Unreadable { reason, .. } => {
                    assert!(reason.contains("malformed"), "{reason}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn chat_text_is_the_first_choice() {
        let body = json!({"choices": [{"message": {"content": "hi"}}, {"message": {"content": "no"}}],
                          "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                    "prompt_tokens_details": {"cached_tokens": 2},
                                    "completion_tokens_details": {"reasoning_tokens": 1}}});
        assert_eq!(
            answer_text(Endpoint::ChatCompletions, &body).as_deref(),
            Some("hi")
        );
        assert_eq!(
            token_usage(&body),
            Usage {
                input: Some(3),
                cached: Some(2),
                output: Some(4),
                reasoning: Some(1)
            }
        );
        let responses = json!({"usage": {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 8},
                                         "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 6}}});
        assert_eq!(
            token_usage(&responses),
            Usage {
                input: Some(9),
                cached: Some(8),
                output: Some(7),
                reasoning: Some(6)
            }
        );
    }

    #[test]
    fn a_rejected_request_fails_with_the_provider_message() {
        let l = line(
            json!({"custom_id": "5", "error": null, "response": {"status_code": 400,
            "body": {"error": {"message": "Invalid value for temperature", "type": "invalid_request_error"}}}}),
        );
        match parse_line(Endpoint::Responses, &l).unwrap().outcome {
            Outcome::Failed { message, .. } => assert_eq!(message, "Invalid value for temperature"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn server_errors_and_unrun_lines_are_retried() {
        let l = line(
            json!({"custom_id": "5", "response": {"status_code": 503, "body": {"error": {"message": "busy"}}}}),
        );
        assert!(matches!(
            parse_line(Endpoint::Responses, &l).unwrap().outcome,
            Outcome::Retry { .. }
        ));
        let l = line(
            json!({"custom_id": "6", "response": null, "error": {"code": "batch_expired", "message": "late"}}),
        );
        assert_eq!(
            parse_line(Endpoint::Responses, &l).unwrap().outcome,
            Outcome::Retry {
                reason: "batch_expired: late".into()
            }
        );
    }

    #[test]
    fn labelled_answers_must_be_on_the_list() {
        let labels = AnswerFormat::Label(vec!["positive".into(), "negative".into()]);
        let (text, json) = check_answer(&labels, Some(r#"{"label": "negative"}"#)).unwrap();
        assert_eq!(
            (text.as_deref(), json),
            (Some("negative"), json!({"label": "negative"}))
        );
        assert!(check_answer(&labels, Some(r#"{"label": "meh"}"#))
            .unwrap_err()
            .contains("not one of the labels"));
        assert!(check_answer(&labels, Some("positive"))
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(check_answer(&AnswerFormat::Json, Some("[1, 2]")).is_ok());
        assert!(check_answer(&AnswerFormat::Json, None).is_err());
    }

    #[test]
    fn long_lines_are_skipped_not_held() {
        let mut input = std::io::Cursor::new(b"short\nthis one is too long\nlast".to_vec());
        let mut buf = Vec::new();
        assert_eq!(
            read_line_bounded(&mut input, &mut buf, 10).unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"short");
        assert_eq!(
            read_line_bounded(&mut input, &mut buf, 10).unwrap(),
            LineRead::TooLong
        );
        assert!(buf.is_empty());
        assert_eq!(
            read_line_bounded(&mut input, &mut buf, 10).unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"last");
        assert_eq!(
            read_line_bounded(&mut input, &mut buf, 10).unwrap(),
            LineRead::End
        );
    }

    mod fuzzed {
        use super::super::*;
        use proptest::prelude::*;
        use serde_json::json;

        fn valid_line() -> String {
            json!({"id": "batch_req_1", "custom_id": "42", "error": null, "response": {"status_code": 200,
                   "body": {"output": [{"content": [{"type": "output_text", "text": "hi"}]}]}}}).to_string()
        }

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)),
                ".{0,20}".prop_map(Value::from),
                Just(Value::from("custom_id")),
                Just(Value::from("42")),
            ];
            leaf.prop_recursive(4, 64, 8, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(
                        prop_oneof![
                            Just("custom_id".to_string()),
                            Just("response".to_string()),
                            Just("error".to_string()),
                            Just("status_code".to_string()),
                            Just("body".to_string()),
                            Just("output".to_string()),
                            Just("content".to_string()),
                            Just("text".to_string()),
                            Just("usage".to_string()),
                            ".{0,8}"
                        ],
                        inner,
                        0..6
                    )
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #[test]
            fn arbitrary_text_never_panics(line in any::<String>()) {
                for endpoint in Endpoint::ALL {
                    let _ = parse_line(endpoint, &line);
                }
            }

            #[test]
            fn arbitrary_json_never_panics(value in json_value()) {
                for endpoint in Endpoint::ALL {
                    let _ = parse_line(endpoint, &value.to_string());
                }
            }

            #[test]
            fn truncated_and_corrupted_lines_never_panic(cut in 0usize..200, flip in 0usize..200, byte in any::<u8>()) {
                let line = valid_line();
                let truncated = &line.as_bytes()[..cut.min(line.len())];
                let _ = parse_line(Endpoint::Responses, &String::from_utf8_lossy(truncated));
                let mut corrupted = line.into_bytes();
                let at = flip % corrupted.len();
                corrupted[at] = byte;
                let _ = parse_line(Endpoint::Responses, &String::from_utf8_lossy(&corrupted));
            }
        }
    }

    #[test]
    fn malformed_lines_never_panic() {
        assert!(parse_line(Endpoint::Responses, "{\"custom_id\":\"1\",\"resp").is_err());
        assert!(parse_line(Endpoint::Responses, "[]").is_err());
        assert!(parse_line(Endpoint::Responses, "{\"custom_id\":\"x1\"}").is_err());
        let r = parse_line(
            Endpoint::Responses,
            "{\"custom_id\":\"9\",\"response\":{\"status_code\":200}}",
        )
        .unwrap();
        assert!(matches!(r.outcome, Outcome::Unreadable { .. }));
    }

    #[test]
    fn a_nul_in_an_answer_is_stored_as_the_replacement_character() {
        let body =
            json!({"output_text": "a\u{0}b", "usage": {"input_tokens": 1, "output_tokens": 1}});
        let l = line(json!({"custom_id": "4", "response": {"status_code": 200, "body": body}}));
        assert!(l.contains("\\u0000"), "{l}");
        let r = parse_line(Endpoint::Responses, &l).unwrap();
        match r.outcome {
            Outcome::Completed { text, response, .. } => {
                assert_eq!(text.as_deref(), Some("a\u{FFFD}b"));
                assert!(
                    !response.contains("\\u0000") && response.contains("\\ufffd"),
                    "{response}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_success_beats_an_error_line_wherever_it_comes_and_the_first_success_wins() {
        let ok = |id: i64, text: &str| LineResult {
            request_id: id,
            outcome: Outcome::Completed {
                response: "{}".into(),
                text: Some(text.into()),
                usage: Usage::default(),
            },
        };
        let retry = |id: i64| LineResult {
            request_id: id,
            outcome: Outcome::Retry {
                reason: "server error".into(),
            },
        };
        // The error line comes first, the success much later (another chunk, another file).
        let refused = |id: i64| LineResult {
            request_id: id,
            outcome: Outcome::Failed {
                message: "refused".into(),
                response: None,
            },
        };
        let lines = vec![
            retry(1),
            ok(2, "first"),
            retry(3),
            ok(1, "late"),
            ok(2, "again"),
            retry(4),
            refused(4),
        ];
        let mut filter = LineFilter::default();
        lines.iter().for_each(|l| filter.note(l));
        let applied: Vec<&LineResult> = lines.iter().filter(|l| filter.apply(l)).collect();
        assert_eq!(
            applied,
            vec![&ok(2, "first"), &retry(3), &ok(1, "late"), &refused(4)]
        );
        assert_eq!(filter.requests_named(), 4);
        assert_eq!(filter.duplicates(), 1);
        // The same lines in the other order give the same outcome.
        let mut filter = LineFilter::default();
        lines.iter().rev().for_each(|l| filter.note(l));
        let mut applied: Vec<&LineResult> =
            lines.iter().rev().filter(|l| filter.apply(l)).collect();
        applied.sort_by_key(|l| l.request_id);
        assert_eq!(
            applied,
            vec![&ok(1, "late"), &ok(2, "again"), &retry(3), &refused(4)]
        );
    }

    #[test]
    fn only_the_nul_escape_itself_is_replaced() {
        assert_eq!(without_nul_escapes(r#""\\u0000""#), r#""\\u0000""#);
        assert_eq!(without_nul_escapes(r#""\\\u0000""#), r#""\\\ufffd""#);
        assert_eq!(without_nul_escapes(r#""\u00001é\n""#), r#""\ufffd1é\n""#);
        assert_eq!(without_nul_escapes("plain"), "plain");
    }
}
