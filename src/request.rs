//! Building and checking request bodies, without a database: what `llm_submit` sends for each
//! endpoint, and the rules every body must meet before it may be queued.

use serde_json::{json, Map, Value};
use std::fmt;

/// The batch endpoints llmbatching sends requests to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Responses,
    ChatCompletions,
    Embeddings,
    Completions,
    Moderations,
}

impl Endpoint {
    pub const ALL: [Endpoint; 5] = [
        Endpoint::Responses,
        Endpoint::ChatCompletions,
        Endpoint::Embeddings,
        Endpoint::Completions,
        Endpoint::Moderations,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Responses => "/v1/responses",
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Moderations => "/v1/moderations",
        }
    }

    pub fn parse(path: &str) -> Result<Endpoint, RequestError> {
        Endpoint::ALL.into_iter().find(|e| e.path() == path).ok_or_else(|| {
            let known: Vec<&str> = Endpoint::ALL.iter().map(|e| e.path()).collect();
            RequestError::new("endpoint", format!("unknown endpoint \"{path}\"; expected one of {}", known.join(", ")))
        })
    }

    /// The body fields the convenience form of `llm_submit` fills itself, which `options` may
    /// therefore not replace.
    fn own_fields(self) -> &'static [&'static str] {
        match self {
            Endpoint::Responses => &["model", "input", "instructions"],
            Endpoint::ChatCompletions => &["model", "messages"],
            Endpoint::Completions => &["model", "prompt"],
            Endpoint::Embeddings | Endpoint::Moderations => &["model", "input"],
        }
    }
}

/// A request that may not be queued, and which argument is at fault.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestError {
    pub argument: &'static str,
    pub message: String,
}

impl RequestError {
    pub fn new(argument: &'static str, message: impl Into<String>) -> Self {
        RequestError { argument, message: message.into() }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid argument \"{}\": {}", self.argument, self.message)
    }
}

/// Bytes a batch line adds around its body: `{"custom_id":"…","method":"POST","url":"…","body":…}`
/// plus the newline, with room for the longest custom_id and endpoint.
pub const LINE_OVERHEAD_BYTES: usize = 128;

fn non_empty<'a>(argument: &'static str, value: Option<&'a str>) -> Result<&'a str, RequestError> {
    match value {
        None => Err(RequestError::new(argument, "must not be NULL")),
        Some(v) if v.trim().is_empty() => Err(RequestError::new(argument, "must not be empty")),
        Some(v) => Ok(v),
    }
}

/// Builds the body the endpoint expects from a model, an input and optional instructions, with
/// `options` merged in (temperature, max tokens, response format, …).
pub fn build_body(
    endpoint: Endpoint,
    model: Option<&str>,
    input: Option<&str>,
    instructions: Option<&str>,
    options: Option<&Value>,
) -> Result<Value, RequestError> {
    let model = non_empty("model", model)?;
    let input = non_empty("input", input)?;
    let options = match options {
        None => Map::new(),
        Some(Value::Object(map)) => map.clone(),
        Some(_) => return Err(RequestError::new("options", "must be a JSON object")),
    };
    if let Some(field) = endpoint.own_fields().iter().find(|f| options.contains_key(**f)) {
        return Err(RequestError::new(
            "options",
            format!("may not set \"{field}\"; it comes from the arguments of llm_submit (use llm_submit_body for full control)"),
        ));
    }
    let mut body = match endpoint {
        Endpoint::Responses => match instructions {
            Some(i) => json!({"model": model, "input": input, "instructions": i}),
            None => json!({"model": model, "input": input}),
        },
        Endpoint::ChatCompletions => {
            let mut messages = Vec::new();
            if let Some(i) = instructions {
                messages.push(json!({"role": "system", "content": i}));
            }
            messages.push(json!({"role": "user", "content": input}));
            json!({"model": model, "messages": messages})
        }
        Endpoint::Completions => {
            if instructions.is_some() {
                return Err(RequestError::new("instructions", "is not supported by /v1/completions; put it in the input"));
            }
            json!({"model": model, "prompt": input})
        }
        Endpoint::Embeddings | Endpoint::Moderations => {
            if instructions.is_some() {
                return Err(RequestError::new("instructions", format!("is not supported by {}", endpoint.path())));
            }
            json!({"model": model, "input": input})
        }
    };
    if let Value::Object(map) = &mut body {
        map.extend(options);
    }
    validate_body(&body, "options")?;
    Ok(body)
}

/// Checks a complete request body; returns its model. `argument` names the SQL argument the
/// body came from, for the error message.
pub fn validate_body<'a>(body: &'a Value, argument: &'static str) -> Result<&'a str, RequestError> {
    let Value::Object(map) = body else {
        return Err(RequestError::new(argument, "must be a JSON object"));
    };
    let model = match map.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.as_str(),
        Some(_) => return Err(RequestError::new(argument, "\"model\" must be a non-empty string")),
        None => return Err(RequestError::new(argument, "must name a \"model\"")),
    };
    match map.get("stream") {
        None | Some(Value::Bool(false)) | Some(Value::Null) => {}
        Some(_) => return Err(RequestError::new(argument, "may not set \"stream\"; batch requests cannot stream")),
    }
    Ok(model)
}

/// Checks that a body of `body_bytes` fits in one batch input file of at most `max_file_bytes`.
pub fn check_size(body_bytes: usize, max_file_bytes: usize, argument: &'static str) -> Result<(), RequestError> {
    if body_bytes + LINE_OVERHEAD_BYTES > max_file_bytes {
        return Err(RequestError::new(
            argument,
            format!(
                "the request is {body_bytes} bytes, larger than one batch input file may hold ({max_file_bytes} bytes)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(endpoint: Endpoint, instructions: Option<&str>, options: Value) -> Result<Value, RequestError> {
        build_body(endpoint, Some("gpt-4o-mini"), Some("hello"), instructions, Some(&options))
    }

    #[test]
    fn responses_body_carries_input_and_instructions() {
        let body = build(Endpoint::Responses, Some("be brief"), json!({"temperature": 0})).unwrap();
        assert_eq!(body, json!({"model": "gpt-4o-mini", "input": "hello", "instructions": "be brief", "temperature": 0}));
    }

    #[test]
    fn chat_body_puts_instructions_in_a_system_message() {
        let body = build(Endpoint::ChatCompletions, Some("be brief"), json!({})).unwrap();
        assert_eq!(body["messages"], json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]));
        let plain = build(Endpoint::ChatCompletions, None, json!({})).unwrap();
        assert_eq!(plain["messages"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn embeddings_take_no_instructions() {
        assert_eq!(build(Endpoint::Embeddings, None, json!({})).unwrap(), json!({"model": "gpt-4o-mini", "input": "hello"}));
        assert_eq!(build(Endpoint::Embeddings, Some("x"), json!({})).unwrap_err().argument, "instructions");
    }

    #[test]
    fn errors_name_the_argument() {
        let err = |m: Option<&str>, i: Option<&str>| build_body(Endpoint::Responses, m, i, None, None).unwrap_err();
        assert_eq!(err(None, Some("x")).argument, "model");
        assert_eq!(err(Some(" "), Some("x")).argument, "model");
        assert_eq!(err(Some("m"), None).argument, "input");
        assert_eq!(err(Some("m"), Some("")).argument, "input");
        assert_eq!(Endpoint::parse("/v1/nope").unwrap_err().argument, "endpoint");
    }

    #[test]
    fn options_may_not_replace_the_model_or_stream() {
        assert_eq!(build(Endpoint::Responses, None, json!({"model": "other"})).unwrap_err().argument, "options");
        assert_eq!(build(Endpoint::Responses, None, json!({"input": "other"})).unwrap_err().argument, "options");
        assert_eq!(build(Endpoint::Responses, None, json!({"stream": true})).unwrap_err().argument, "options");
        assert_eq!(build(Endpoint::Responses, None, json!([1])).unwrap_err().argument, "options");
        assert!(build(Endpoint::Responses, None, json!({"stream": false})).is_ok());
    }

    #[test]
    fn raw_bodies_need_a_model() {
        assert_eq!(validate_body(&json!({"input": "x"}), "body").unwrap_err().argument, "body");
        assert_eq!(validate_body(&json!({"model": 3}), "body").unwrap_err().argument, "body");
        assert_eq!(validate_body(&json!({"model": "m"}), "body").unwrap(), "m");
    }

    #[test]
    fn oversized_requests_are_refused() {
        assert!(check_size(100, 1000, "input").is_ok());
        assert_eq!(check_size(990, 1000, "input").unwrap_err().argument, "input");
    }
}
