//! Anthropic's Message Batches formats: each request is `{"custom_id", "params"}` (the params
//! are a Messages request), and each result line is `{"custom_id", "result"}` with a result
//! `succeeded` (the message), `errored`, `canceled` or `expired`.

use crate::request::Endpoint;
use crate::results::{request_id_of, without_nul_escapes, LineResult, Outcome, Usage};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

#[derive(serde::Serialize)]
struct Item<'a> {
    custom_id: &'a str,
    params: &'a RawValue,
}

/// One request of a batch, without its newline. The body is embedded as the JSON text it
/// already is (checked to be valid JSON); nothing inside it can reach `custom_id`.
pub fn request_item(custom_id: &str, body_json: &str) -> Result<String, serde_json::Error> {
    let params: &RawValue = serde_json::from_str(body_json)?;
    serde_json::to_string(&Item { custom_id, params })
}

#[derive(Deserialize)]
struct RawLine<'a> {
    #[serde(default)]
    custom_id: Option<Value>,
    #[serde(default, borrow)]
    result: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawResult<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, borrow)]
    message: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<Value>,
}

/// Reads one result line (see [`crate::provider::Kind::parse_result_line`]).
pub fn parse_line(_endpoint: Endpoint, line: &str) -> Result<LineResult, String> {
    let line = without_nul_escapes(line);
    let raw = line.as_ref();
    let parsed: RawLine = serde_json::from_str(raw).map_err(|e| format!("not JSON ({e})"))?;
    let request_id = parsed
        .custom_id
        .as_ref()
        .and_then(Value::as_str)
        .and_then(request_id_of)
        .ok_or_else(|| "no custom_id that llmbatching issued".to_string())?;
    let outcome = parsed
        .result
        .ok_or_else(|| "no result".to_string())
        .and_then(outcome_of)
        .unwrap_or_else(|reason| Outcome::Unreadable {
            reason: format!("the provider returned a malformed result line: {reason}"),
            line: raw.to_owned(),
        });
    Ok(LineResult {
        request_id,
        outcome,
    })
}

/// Error types that say the request itself will keep failing; any other (`api_error`,
/// `overloaded_error`, `rate_limit_error`, …) may pass on another try.
const FINAL_ERRORS: [&str; 5] = [
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
];

fn outcome_of(result: &RawValue) -> Result<Outcome, String> {
    let parsed: RawResult =
        serde_json::from_str(result.get()).map_err(|_| "the result is not an object")?;
    match parsed.kind.as_str() {
        "succeeded" => {
            let raw = parsed.message.ok_or("a success without its message")?;
            let message: Value = serde_json::from_str(raw.get())
                .ok()
                .filter(Value::is_object)
                .ok_or("the message is not an object")?;
            Ok(Outcome::Completed {
                text: answer_text(&message),
                usage: token_usage(&message),
                response: raw.get().to_owned(),
            })
        }
        "errored" => {
            let error = parsed.error.unwrap_or(Value::Null);
            let inner = error.get("error").unwrap_or(&error);
            let kind = inner.get("type").and_then(Value::as_str).unwrap_or("error");
            let message = inner
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or(kind)
                .to_owned();
            if FINAL_ERRORS.contains(&kind) {
                Ok(Outcome::Failed {
                    message: format!("{kind}: {message}"),
                    response: Some(result.get().to_owned()),
                })
            } else {
                Ok(Outcome::Retry {
                    reason: format!("{kind}: {message}"),
                })
            }
        }
        "canceled" => Ok(Outcome::Retry {
            reason: "the batch was cancelled before this request ran".into(),
        }),
        "expired" => Ok(Outcome::Retry {
            reason: "the batch expired before this request ran".into(),
        }),
        other => Err(format!("an unknown result type \"{other}\"")),
    }
}

/// The answer as text: the input of the `answer` tool the request made the model call (see
/// `request::with_json_schema`), as JSON, else the message's text blocks.
pub fn answer_text(message: &Value) -> Option<String> {
    let blocks = message.get("content")?.as_array()?;
    let tool = blocks.iter().find(|b| {
        b.get("type").and_then(Value::as_str) == Some("tool_use")
            && b.get("name").and_then(Value::as_str) == Some("answer")
    });
    if let Some(input) = tool.and_then(|t| t.get("input")) {
        return Some(input.to_string());
    }
    let text: Vec<&str> = blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text")?.as_str())
        .collect();
    (!text.is_empty()).then(|| text.concat())
}

/// Token usage of a message. Anthropic counts cache reads and writes apart from `input_tokens`;
/// here input holds all three, and cached the cache reads (billed at the cached price).
pub fn token_usage(message: &Value) -> Usage {
    let count = |name: &str| {
        message
            .pointer(&format!("/usage/{name}"))
            .and_then(Value::as_i64)
    };
    let clamp = |n: i64| n.clamp(0, i32::MAX as i64) as i32;
    let input = count("input_tokens").map(|n| {
        n + count("cache_read_input_tokens").unwrap_or(0)
            + count("cache_creation_input_tokens").unwrap_or(0)
    });
    Usage {
        input: input.map(clamp),
        cached: count("cache_read_input_tokens").map(clamp),
        output: count("output_tokens").map(clamp),
        reasoning: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Outcome {
        parse_line(Endpoint::Messages, &v.to_string())
            .unwrap()
            .outcome
    }

    #[test]
    fn a_success_yields_the_text_and_usage_with_cache_reads() {
        let outcome = parse(
            json!({"custom_id": "7", "result": {"type": "succeeded", "message": {
            "content": [{"type": "text", "text": "po"}, {"type": "text", "text": "sitive"}],
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 1,
                      "output_tokens": 2}}}}),
        );
        let Outcome::Completed {
            text,
            usage,
            response,
        } = outcome
        else {
            panic!("{outcome:?}")
        };
        assert_eq!(text.as_deref(), Some("positive"));
        assert_eq!(
            (usage.input, usage.cached, usage.output),
            (Some(15), Some(4), Some(2))
        );
        assert!(response.starts_with('{') && response.contains("cache_read_input_tokens"));
    }

    #[test]
    fn a_forced_tool_call_is_the_json_answer() {
        let outcome = parse(
            json!({"custom_id": "7", "result": {"type": "succeeded", "message": {
            "content": [{"type": "tool_use", "id": "t", "name": "answer", "input": {"label": "positive"}}]}}}),
        );
        let Outcome::Completed { text, .. } = outcome else {
            panic!()
        };
        assert_eq!(text.as_deref(), Some(r#"{"label":"positive"}"#));
    }

    #[test]
    fn errors_fail_or_retry_by_type_and_unrun_requests_retry() {
        let errored = |kind: &str| {
            parse(json!({"custom_id": "7", "result": {"type": "errored",
            "error": {"type": "error", "error": {"type": kind, "message": "nope"}}}}))
        };
        assert!(matches!(
            errored("invalid_request_error"),
            Outcome::Failed { .. }
        ));
        assert!(matches!(errored("overloaded_error"), Outcome::Retry { .. }));
        for kind in ["canceled", "expired"] {
            assert!(matches!(
                parse(json!({"custom_id": "7", "result": {"type": kind}})),
                Outcome::Retry { .. }
            ));
        }
    }

    #[test]
    fn malformed_lines_are_unreadable_or_unattributed() {
        assert!(parse_line(Endpoint::Messages, "{\"custom_id\":\"x\"}").is_err());
        assert!(parse_line(Endpoint::Messages, "[1,").is_err());
        for bad in [
            json!({"custom_id": "7"}),
            json!({"custom_id": "7", "result": {"type": "succeeded"}}),
            json!({"custom_id": "7", "result": {"type": "succeeded", "message": "<html>"}}),
        ] {
            assert!(matches!(parse(bad), Outcome::Unreadable { .. }));
        }
    }

    #[test]
    fn a_request_item_embeds_the_body_as_params() {
        let item = request_item("12", r#"{"model":"m","max_tokens":5,"messages":[]}"#).unwrap();
        let v: Value = serde_json::from_str(&item).unwrap();
        assert_eq!(v["custom_id"], "12");
        assert_eq!(v["params"]["max_tokens"], 5);
        assert!(request_item("12", "{not json").is_err());
    }
}
