//! OpenAI's batch file formats, which Azure OpenAI and OpenAI-compatible services share: the
//! input line (`custom_id`, `method`, `url`, `body`) and the result lines of the output and error
//! files (`response.status_code` and `response.body`, or `error`).

use crate::request::Endpoint;
use crate::results::{request_id_of, without_nul_escapes, LineResult, Outcome, Usage};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::HashMap;

#[derive(serde::Serialize)]
struct BatchLine<'a> {
    custom_id: &'a str,
    method: &'static str,
    url: &'a str,
    body: &'a serde_json::value::RawValue,
}

/// One line of a batch input file, without its newline. The body is embedded as the JSON text
/// it already is (checked to be valid JSON), and every other field is serialized by serde, so
/// nothing inside a body can reach `custom_id`, `method`, `url` or the line's end.
pub fn batch_line(
    custom_id: &str,
    url: &str,
    body_json: &str,
) -> Result<String, serde_json::Error> {
    let body: &serde_json::value::RawValue = serde_json::from_str(body_json)?;
    serde_json::to_string(&BatchLine {
        custom_id,
        method: "POST",
        url,
        body,
    })
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
        .and_then(request_id_of)
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
        Endpoint::Embeddings | Endpoint::Moderations | Endpoint::Messages => None,
    }
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
    use crate::request::AnswerFormat;
    use crate::results::*;
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
