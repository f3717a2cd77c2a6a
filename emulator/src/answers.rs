//! What the emulated model answers. Every answer is derived from the request alone, so a test
//! can compute the expected answer for each row and prove it landed on the right one.
//!
//! - Responses, Chat Completions and Completions answer `"[<model>] <prompt>"`, where the prompt
//!   is the last user text of the request.
//! - Embeddings answer an 8-dimensional vector computed from the bytes of each input (as
//!   base64 of little-endian float32 values when the request asks `encoding_format: "base64"`).
//! - Moderations answer `flagged: false`.
//! - Usage counts about four characters a token; a quarter of the input tokens are reported as
//!   cached and a fifth of the output tokens as reasoning, so every usage field is exercised.
//! - A request asking for structured output (`text.format` or `response_format` of type
//!   `json_schema`) answers JSON built from its schema: each string property holds the prompt,
//!   and a property with an `enum` holds the first choice that appears in the prompt (ignoring
//!   case), or the first choice if none does. See [`structured_answer`].
//!
//! A request whose body contains [`FAIL_MARKER`] is rejected by the "model" with status 400,
//! the way a real endpoint rejects a bad parameter; its error message is [`failure_message`].
//! Requests containing [`GARBLE_MARKER`] or [`TRUNCATE_MARKER`] get malformed result lines.
//! A request containing [`NUL_MARKER`] is answered normally except that its answer holds the
//! character U+0000, which the result line carries as the JSON escape `\u0000`: a text answer is
//! [`nul_answer`], and a structured answer is built from [`with_nul`] of the prompt (so its
//! string properties hold U+0000 too).

use serde_json::{json, Value};

/// Put this anywhere in a request body to make the emulated model reject that one request.
pub const FAIL_MARKER: &str = "EMULATOR_FAIL";

/// A request with a label schema containing this answers a label that is not on its list.
pub const OFF_LABEL_MARKER: &str = "EMULATOR_OFF_LABEL";

/// A request containing this gets a result line whose response body is not an object.
pub const GARBLE_MARKER: &str = "EMULATOR_GARBLE";
/// A request containing this gets a result line cut off halfway.
pub const TRUNCATE_MARKER: &str = "EMULATOR_TRUNCATE";

/// A request containing this gets an answer holding the character U+0000 (see [`nul_answer`]).
pub const NUL_MARKER: &str = "EMULATOR_NUL";

/// The error message a request containing [`FAIL_MARKER`] fails with.
pub fn failure_message(custom_id: &str) -> String {
    format!("Emulated model failure for request {custom_id}")
}

/// The answer text the emulator gives for a prompt, as tests expect it.
pub fn echo_answer(model: &str, prompt: &str) -> String {
    format!("[{model}] {prompt}")
}

/// `text` followed by a part holding U+0000: what a request containing [`NUL_MARKER`] gets in
/// place of `text`.
pub fn with_nul(text: &str) -> String {
    format!("{text} before\u{0}after")
}

/// The answer text the emulator gives for a prompt of a request containing [`NUL_MARKER`]
/// (without an answer schema): the echo answer followed by text holding U+0000.
pub fn nul_answer(model: &str, prompt: &str) -> String {
    with_nul(&echo_answer(model, prompt))
}

/// The embedding the emulator gives for one input text.
pub fn embedding_of(text: &str) -> Vec<f32> {
    let mut v = [0f32; 8];
    for (i, b) in text.bytes().enumerate() {
        v[i % 8] += b as f32 / 255.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.iter().map(|x| x / norm).collect()
}

/// The outcome of running one request line.
pub enum LineResult {
    Ok(Value),
    Rejected { status: u16, body: Value },
}

pub fn run_request(endpoint: &str, custom_id: &str, body: &Value, seq: u64) -> LineResult {
    if body.to_string().contains(FAIL_MARKER) {
        return LineResult::Rejected {
            status: 400,
            body: json!({"error": {
                "message": failure_message(custom_id),
                "type": "invalid_request_error", "param": null, "code": "emulated_failure"}}),
        };
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    LineResult::Ok(match endpoint {
        "/v1/chat/completions" => chat_completion(model, body, seq),
        "/v1/completions" => completion(model, body, seq),
        "/v1/embeddings" => embeddings(model, body),
        "/v1/moderations" => moderation(model, seq),
        "/v1/messages" => message(model, body, seq),
        _ => response(model, body, seq),
    })
}

fn tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str).or(p.as_str()))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// The last user message of a `messages`/`input` array, or the string itself.
fn last_user_text(input: &Value) -> String {
    match input {
        Value::Array(items) => items
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .map(|m| text_of(m.get("content").unwrap_or(&Value::Null)))
            .unwrap_or_default(),
        other => text_of(other),
    }
}

/// The JSON the emulated model answers for a schema and a prompt.
pub fn structured_answer(schema: &Value, prompt: &str) -> Value {
    if let Some(choices) = schema.get("enum").and_then(Value::as_array) {
        let lower = prompt.to_lowercase();
        if prompt.contains(OFF_LABEL_MARKER) {
            return json!("not-a-label");
        }
        let matching = choices.iter().find(|c| {
            c.as_str()
                .is_some_and(|c| lower.contains(&c.to_lowercase()))
        });
        return matching.or(choices.first()).cloned().unwrap_or(Value::Null);
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let fields = properties
                .into_iter()
                .flatten()
                .map(|(k, s)| (k.clone(), structured_answer(s, prompt)));
            Value::Object(fields.collect())
        }
        Some("array") => json!([]),
        Some("integer") | Some("number") => json!(prompt.chars().count()),
        Some("boolean") => json!(true),
        _ => json!(prompt),
    }
}

/// The schema a body asks its answer to follow, if any.
fn requested_schema(body: &Value) -> Option<&Value> {
    let format = body
        .pointer("/text/format")
        .or_else(|| body.get("response_format"))?;
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return None;
    }
    format
        .get("schema")
        .or_else(|| format.pointer("/json_schema/schema"))
}

/// Whether the request asked for an answer holding U+0000.
fn wants_nul(body: &Value) -> bool {
    body.to_string().contains(NUL_MARKER)
}

/// The plain text answer: the echo, or [`nul_answer`] when the request asks for it.
fn text_answer(model: &str, body: &Value, prompt: &str) -> String {
    if wants_nul(body) {
        nul_answer(model, prompt)
    } else {
        echo_answer(model, prompt)
    }
}

/// The answer text: JSON following the requested schema, or the echo.
fn answer_for(model: &str, body: &Value, prompt: &str) -> String {
    match requested_schema(body) {
        Some(schema) if wants_nul(body) => structured_answer(schema, &with_nul(prompt)).to_string(),
        Some(schema) => structured_answer(schema, prompt).to_string(),
        None => text_answer(model, body, prompt),
    }
}

fn response(model: &str, body: &Value, seq: u64) -> Value {
    let prompt = last_user_text(body.get("input").unwrap_or(&Value::Null));
    let answer = answer_for(model, body, &prompt);
    let (input_tokens, output_tokens) = (tokens(&prompt), tokens(&answer));
    json!({
        "id": format!("resp_{seq:012}"), "object": "response", "status": "completed", "model": model,
        "output": [{"type": "message", "id": format!("msg_{seq:012}"), "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": answer, "annotations": []}]}],
        "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": input_tokens / 4},
                  "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": output_tokens / 5},
                  "total_tokens": input_tokens + output_tokens}
    })
}

fn chat_completion(model: &str, body: &Value, seq: u64) -> Value {
    let prompt = last_user_text(body.get("messages").unwrap_or(&Value::Null));
    let answer = answer_for(model, body, &prompt);
    let (prompt_tokens, completion_tokens) = (tokens(&prompt), tokens(&answer));
    json!({
        "id": format!("chatcmpl-{seq:012}"), "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": prompt_tokens / 4},
                  "completion_tokens_details": {"reasoning_tokens": completion_tokens / 5},
                  "total_tokens": prompt_tokens + completion_tokens}
    })
}

/// An Anthropic Messages answer. A request that forces a tool (`tool_choice` of type `tool`)
/// is answered with that tool's call, its input built from the tool's `input_schema`; usage
/// reports a quarter of the input tokens as read from the cache.
fn message(model: &str, body: &Value, seq: u64) -> Value {
    let prompt = last_user_text(body.get("messages").unwrap_or(&Value::Null));
    let forced = body
        .pointer("/tool_choice/name")
        .and_then(Value::as_str)
        .filter(|_| body.pointer("/tool_choice/type").and_then(Value::as_str) == Some("tool"));
    let tool_schema = forced.and_then(|name| {
        body.get("tools")?
            .as_array()?
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some(name))?
            .get("input_schema")
    });
    let (content, answer_len, stop_reason) = match (forced, tool_schema) {
        (Some(name), Some(schema)) => {
            let prompt = if wants_nul(body) {
                with_nul(&prompt)
            } else {
                prompt.clone()
            };
            let input = structured_answer(schema, &prompt);
            let len = input.to_string();
            (
                json!([{"type": "tool_use", "id": format!("toolu_{seq:012}"), "name": name, "input": input}]),
                len,
                "tool_use",
            )
        }
        _ => {
            let answer = text_answer(model, body, &prompt);
            (
                json!([{"type": "text", "text": answer}]),
                answer,
                "end_turn",
            )
        }
    };
    let (input_tokens, output_tokens) = (tokens(&prompt), tokens(&answer_len));
    json!({
        "id": format!("msg_{seq:012}"), "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": stop_reason, "stop_sequence": null,
        "usage": {"input_tokens": input_tokens - input_tokens / 4, "cache_read_input_tokens": input_tokens / 4,
                  "cache_creation_input_tokens": 0, "output_tokens": output_tokens}
    })
}

fn completion(model: &str, body: &Value, seq: u64) -> Value {
    let prompt = text_of(body.get("prompt").unwrap_or(&Value::Null));
    let answer = text_answer(model, body, &prompt);
    let (prompt_tokens, completion_tokens) = (tokens(&prompt), tokens(&answer));
    json!({
        "id": format!("cmpl-{seq:012}"), "object": "text_completion", "model": model,
        "choices": [{"index": 0, "text": answer, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}
    })
}

fn embeddings(model: &str, body: &Value) -> Value {
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::Array(items)) => items.iter().map(text_of).collect(),
        Some(other) => vec![text_of(other)],
        None => vec![],
    };
    let prompt_tokens: u64 = inputs.iter().map(|s| tokens(s)).sum();
    // As OpenAI does, `encoding_format: "base64"` (what the official SDKs ask for) gives each
    // vector as base64 of its little-endian float32 values.
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let vector = embedding_of(s);
            let embedding = if base64 {
                use base64::Engine;
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({"object": "list", "data": data, "model": model,
           "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})
}

fn moderation(model: &str, seq: u64) -> Value {
    json!({"id": format!("modr-{seq:012}"), "model": model,
           "results": [{"flagged": false, "categories": {}, "category_scores": {}}]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_echo_the_last_user_text() {
        let body = json!({"model": "m1", "input": "hello"});
        let LineResult::Ok(v) = run_request("/v1/responses", "1", &body, 1) else {
            panic!()
        };
        assert_eq!(v["output"][0]["content"][0]["text"], "[m1] hello");
    }

    #[test]
    fn chat_echoes_the_last_user_message() {
        let body = json!({"model": "m2", "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]});
        let LineResult::Ok(v) = run_request("/v1/chat/completions", "1", &body, 1) else {
            panic!()
        };
        assert_eq!(v["choices"][0]["message"]["content"], "[m2] hi");
    }

    #[test]
    fn marker_makes_the_line_fail() {
        let body = json!({"model": "m", "input": format!("x {FAIL_MARKER}")});
        match run_request("/v1/responses", "42", &body, 1) {
            LineResult::Rejected { status, body } => {
                assert_eq!(status, 400);
                assert_eq!(body["error"]["message"], failure_message("42"));
            }
            LineResult::Ok(_) => panic!("expected a rejection"),
        }
    }

    #[test]
    fn structured_answers_follow_the_schema() {
        let schema = json!({"type": "object", "properties": {
            "label": {"type": "string", "enum": ["positive", "negative"]}, "why": {"type": "string"}}});
        let body = json!({"model": "m", "input": "Quite NEGATIVE review",
                          "text": {"format": {"type": "json_schema", "name": "a", "schema": schema}}});
        let LineResult::Ok(v) = run_request("/v1/responses", "1", &body, 1) else {
            panic!()
        };
        let text = v["output"][0]["content"][0]["text"].as_str().unwrap();
        let answer: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            answer,
            json!({"label": "negative", "why": "Quite NEGATIVE review"})
        );
    }

    #[test]
    fn the_nul_marker_puts_u0000_into_the_answer_and_the_result_line() {
        let prompt = format!("say {NUL_MARKER}");
        let body = json!({"model": "m", "input": prompt});
        let LineResult::Ok(v) = run_request("/v1/responses", "1", &body, 1) else {
            panic!("a NUL request must not be rejected")
        };
        let text = v["output"][0]["content"][0]["text"].as_str().unwrap();
        assert_eq!(text, nul_answer("m", &prompt));
        assert!(text.contains('\u{0}'), "{text:?}");
        assert!(text.starts_with(&echo_answer("m", &prompt)));
        assert!(v.to_string().contains("\\u0000"), "{v}");

        let chat = json!({"model": "m", "messages": [{"role": "user", "content": prompt}]});
        let LineResult::Ok(v) = run_request("/v1/chat/completions", "1", &chat, 1) else {
            panic!()
        };
        assert_eq!(
            v["choices"][0]["message"]["content"],
            nul_answer("m", &prompt)
        );

        let schema = json!({"type": "object", "properties": {"why": {"type": "string"}}});
        let structured = json!({"model": "m", "input": prompt,
                                "text": {"format": {"type": "json_schema", "name": "a", "schema": schema}}});
        let LineResult::Ok(v) = run_request("/v1/responses", "1", &structured, 1) else {
            panic!()
        };
        let answer: Value =
            serde_json::from_str(v["output"][0]["content"][0]["text"].as_str().unwrap()).unwrap();
        assert_eq!(answer["why"], with_nul(&prompt));

        let plain = json!({"model": "m", "input": "no marker"});
        let LineResult::Ok(v) = run_request("/v1/responses", "1", &plain, 1) else {
            panic!()
        };
        assert!(!v.to_string().contains("\\u0000"));
    }

    #[test]
    fn embeddings_are_unit_vectors_per_input() {
        let body = json!({"model": "e", "input": ["a", "bc"]});
        let LineResult::Ok(v) = run_request("/v1/embeddings", "1", &body, 1) else {
            panic!()
        };
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        let norm: f64 = v["data"][1]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap().powi(2))
            .sum();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}
