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
    /// Anthropic's Messages API.
    Messages,
}

impl Endpoint {
    pub const ALL: [Endpoint; 6] = [
        Endpoint::Responses,
        Endpoint::ChatCompletions,
        Endpoint::Embeddings,
        Endpoint::Completions,
        Endpoint::Moderations,
        Endpoint::Messages,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Responses => "/v1/responses",
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Moderations => "/v1/moderations",
            Endpoint::Messages => "/v1/messages",
        }
    }

    pub fn parse(path: &str) -> Result<Endpoint, RequestError> {
        Endpoint::ALL
            .into_iter()
            .find(|e| e.path() == path)
            .ok_or_else(|| {
                let known: Vec<&str> = Endpoint::ALL.iter().map(|e| e.path()).collect();
                RequestError::new(
                    "endpoint",
                    format!(
                        "unknown endpoint \"{path}\"; expected one of {}",
                        known.join(", ")
                    ),
                )
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
            Endpoint::Messages => &["model", "messages", "system"],
        }
    }
}

/// `max_tokens` of a Messages request built by `llm_submit`, unless `options` sets it: the
/// Messages API requires it.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

/// A request that may not be queued, and which argument is at fault.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestError {
    pub argument: &'static str,
    pub message: String,
}

impl RequestError {
    pub fn new(argument: &'static str, message: impl Into<String>) -> Self {
        RequestError {
            argument,
            message: message.into(),
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid argument \"{}\": {}",
            self.argument, self.message
        )
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
    check_instructions(instructions)?;
    let options = match options {
        None => Map::new(),
        Some(Value::Object(map)) => map.clone(),
        Some(_) => return Err(RequestError::new("options", "must be a JSON object")),
    };
    if let Some(field) = endpoint
        .own_fields()
        .iter()
        .find(|f| options.contains_key(**f))
    {
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
                return Err(RequestError::new(
                    "instructions",
                    "is not supported by /v1/completions; put it in the input",
                ));
            }
            json!({"model": model, "prompt": input})
        }
        Endpoint::Messages => {
            let mut body = json!({"model": model, "max_tokens": DEFAULT_MAX_TOKENS,
                                  "messages": [{"role": "user", "content": input}]});
            if let Some(i) = instructions {
                body["system"] = json!(i);
            }
            body
        }
        Endpoint::Embeddings | Endpoint::Moderations => {
            if instructions.is_some() {
                return Err(RequestError::new(
                    "instructions",
                    format!("is not supported by {}", endpoint.path()),
                ));
            }
            json!({"model": model, "input": input})
        }
    };
    if let Value::Object(map) = &mut body {
        map.extend(options);
    }
    validate_body(&body, "options")?;
    check_for_endpoint(endpoint, &body, "options")?;
    Ok(body)
}

/// What an endpoint requires of a body beyond [`validate_body`]: Messages requests name
/// `max_tokens` and their `messages`.
pub fn check_for_endpoint(
    endpoint: Endpoint,
    body: &Value,
    argument: &'static str,
) -> Result<(), RequestError> {
    if endpoint == Endpoint::Messages {
        if !body.get("max_tokens").is_some_and(Value::is_u64) {
            return Err(RequestError::new(
                argument,
                "must set \"max_tokens\" (a positive integer) for /v1/messages",
            ));
        }
        if !body.get("messages").is_some_and(Value::is_array) {
            return Err(RequestError::new(
                argument,
                "must hold \"messages\" (an array) for /v1/messages",
            ));
        }
    }
    Ok(())
}

/// Checks a complete request body; returns its model. `argument` names the SQL argument the
/// body came from, for the error message.
pub fn validate_body<'a>(body: &'a Value, argument: &'static str) -> Result<&'a str, RequestError> {
    let Value::Object(map) = body else {
        return Err(RequestError::new(argument, "must be a JSON object"));
    };
    let model = match map.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.as_str(),
        Some(_) => {
            return Err(RequestError::new(
                argument,
                "\"model\" must be a non-empty string",
            ))
        }
        None => return Err(RequestError::new(argument, "must name a \"model\"")),
    };
    match map.get("stream") {
        None | Some(Value::Bool(false)) | Some(Value::Null) => {}
        Some(_) => {
            return Err(RequestError::new(
                argument,
                "may not set \"stream\"; batch requests cannot stream",
            ))
        }
    }
    Ok(model)
}

/// What a request's answer must be, checked when it arrives.
#[derive(Clone, Debug, PartialEq)]
pub enum AnswerFormat {
    /// JSON (the model was given a JSON schema).
    Json,
    /// One of these labels.
    Label(Vec<String>),
}

impl AnswerFormat {
    pub fn to_json(&self) -> Value {
        match self {
            AnswerFormat::Json => json!({"type": "json"}),
            AnswerFormat::Label(labels) => json!({"type": "label", "labels": labels}),
        }
    }

    pub fn from_json(v: &Value) -> Option<AnswerFormat> {
        match v.get("type")?.as_str()? {
            "json" => Some(AnswerFormat::Json),
            "label" => {
                let labels = v.get("labels")?.as_array()?;
                let labels: Option<Vec<String>> = labels
                    .iter()
                    .map(|l| l.as_str().map(str::to_owned))
                    .collect();
                // An empty list would fail every answer; a non-string label none could match.
                Some(AnswerFormat::Label(labels.filter(|l| !l.is_empty())?))
            }
            _ => None,
        }
    }
}

/// Asks for an answer following `schema`: `text.format` for Responses, `response_format` for
/// Chat Completions, and for Messages a tool whose input is the answer, which the model is made
/// to call (the answer is then that call's input).
pub fn with_json_schema(
    endpoint: Endpoint,
    mut body: Value,
    schema: &Value,
) -> Result<Value, RequestError> {
    if !schema.is_object() {
        return Err(RequestError::new(
            "schema",
            "must be a JSON object (a JSON schema)",
        ));
    }
    let format = match endpoint {
        Endpoint::Responses => {
            json!({"text": {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": true}}})
        }
        Endpoint::ChatCompletions => json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": true}}}),
        Endpoint::Messages => json!({
            "tools": [{"name": "answer", "description": "Gives the answer.", "input_schema": schema}],
            "tool_choice": {"type": "tool", "name": "answer"}}),
        other => {
            return Err(RequestError::new(
                "endpoint",
                format!(
                    "structured answers need /v1/responses, /v1/chat/completions or /v1/messages, not {}",
                    other.path()
                ),
            ))
        }
    };
    let (Value::Object(body_map), Value::Object(format_map)) = (&mut body, format) else {
        return Err(RequestError::new("body", "must be a JSON object"));
    };
    for (key, value) in format_map {
        if body_map.contains_key(&key) {
            return Err(RequestError::new(
                "options",
                format!("may not set \"{key}\" when a schema is given"),
            ));
        }
        body_map.insert(key, value);
    }
    Ok(body)
}

/// The JSON schema of an answer that picks one of `labels`: `{"label": <one of them>}`.
pub fn label_schema(labels: &[Option<&str>]) -> Result<(Value, Vec<String>), RequestError> {
    let mut list: Vec<String> = Vec::with_capacity(labels.len());
    for label in labels {
        match label {
            Some(l) if !l.trim().is_empty() && !list.iter().any(|x| x == l) => {
                list.push((*l).to_owned())
            }
            Some(l) if !l.trim().is_empty() => {
                return Err(RequestError::new("labels", format!("lists \"{l}\" twice")))
            }
            _ => {
                return Err(RequestError::new(
                    "labels",
                    "may not hold NULL or empty labels",
                ))
            }
        }
    }
    if list.len() < 2 {
        return Err(RequestError::new("labels", "must hold at least two labels"));
    }
    let schema = json!({"type": "object", "additionalProperties": false, "required": ["label"],
                        "properties": {"label": {"type": "string", "enum": list}}});
    Ok((schema, list))
}

/// Checks that a body of `body_bytes` fits in one batch input file of at most `max_file_bytes`.
/// Whether a request gives the same answer every time: embeddings and moderations do, and so does
/// a generation with temperature 0 (the rule of `llmbatching.is_deterministic` in SQL).
pub fn is_deterministic(endpoint: Endpoint, body: &Value) -> bool {
    matches!(endpoint, Endpoint::Embeddings | Endpoint::Moderations)
        || body
            .get("temperature")
            .and_then(Value::as_number)
            .is_some_and(is_zero)
}

/// Exactly zero, however written (`0`, `-0.0`, `0e7`), without going through a float.
fn is_zero(n: &serde_json::Number) -> bool {
    let text = n.to_string();
    let mantissa = text.split(['e', 'E']).next().unwrap_or_default();
    mantissa.chars().all(|c| matches!(c, '0' | '.' | '-'))
}

/// Instructions that are a JSON object were meant as options: the third argument of
/// `llm_submit` is `instructions`, an easy slip for `llm_submit(model, input, '{"temperature": 0}')`.
fn check_instructions(instructions: Option<&str>) -> Result<(), RequestError> {
    let looks_like_options = instructions.is_some_and(|i| {
        i.trim_start().starts_with('{')
            && matches!(serde_json::from_str::<Value>(i), Ok(Value::Object(_)))
    });
    if looks_like_options {
        return Err(RequestError::new(
            "instructions",
            "is a JSON object; to pass options, name them: llm_submit(model, input, options => '{...}')",
        ));
    }
    Ok(())
}

/// Longest job name, in bytes: a job name travels in views and logs, and must stay a name.
pub const MAX_JOB_BYTES: usize = 200;

/// A job name is not empty and at most [`MAX_JOB_BYTES`] long.
pub fn check_job(job: &str) -> Result<(), RequestError> {
    if job.trim().is_empty() {
        return Err(RequestError::new(
            "job",
            "must not be empty (leave it NULL for none)",
        ));
    }
    if job.len() > MAX_JOB_BYTES {
        return Err(RequestError::new(
            "job",
            format!(
                "is {} bytes; a job name may be at most {MAX_JOB_BYTES} bytes",
                job.len()
            ),
        ));
    }
    Ok(())
}

pub fn check_size(
    body_bytes: usize,
    max_file_bytes: usize,
    argument: &'static str,
) -> Result<(), RequestError> {
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
    use crate::provider::openai::format::batch_line;

    #[test]
    fn determinism_follows_endpoint_and_temperature() {
        assert!(is_deterministic(
            Endpoint::Embeddings,
            &json!({"model": "m", "input": "x"})
        ));
        assert!(is_deterministic(
            Endpoint::Moderations,
            &json!({"model": "m", "input": "x"})
        ));
        assert!(!is_deterministic(
            Endpoint::Responses,
            &json!({"model": "m", "input": "x"})
        ));
        for zero in ["0", "0.0", "-0", "0e5", "0.000E-3"] {
            let body: Value =
                serde_json::from_str(&format!(r#"{{"temperature": {zero}}}"#)).unwrap();
            assert!(is_deterministic(Endpoint::Responses, &body), "{zero}");
        }
        for other in ["1", "0.001", "\"0\"", "null"] {
            let body: Value =
                serde_json::from_str(&format!(r#"{{"temperature": {other}}}"#)).unwrap();
            assert!(
                !is_deterministic(Endpoint::ChatCompletions, &body),
                "{other}"
            );
        }
    }

    fn build(
        endpoint: Endpoint,
        instructions: Option<&str>,
        options: Value,
    ) -> Result<Value, RequestError> {
        build_body(
            endpoint,
            Some("gpt-4o-mini"),
            Some("hello"),
            instructions,
            Some(&options),
        )
    }

    #[test]
    fn responses_body_carries_input_and_instructions() {
        let body = build(
            Endpoint::Responses,
            Some("be brief"),
            json!({"temperature": 0}),
        )
        .unwrap();
        assert_eq!(
            body,
            json!({"model": "gpt-4o-mini", "input": "hello", "instructions": "be brief", "temperature": 0})
        );
    }

    #[test]
    fn chat_body_puts_instructions_in_a_system_message() {
        let body = build(Endpoint::ChatCompletions, Some("be brief"), json!({})).unwrap();
        assert_eq!(
            body["messages"],
            json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
        );
        let plain = build(Endpoint::ChatCompletions, None, json!({})).unwrap();
        assert_eq!(plain["messages"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn embeddings_take_no_instructions() {
        assert_eq!(
            build(Endpoint::Embeddings, None, json!({})).unwrap(),
            json!({"model": "gpt-4o-mini", "input": "hello"})
        );
        assert_eq!(
            build(Endpoint::Embeddings, Some("x"), json!({}))
                .unwrap_err()
                .argument,
            "instructions"
        );
    }

    #[test]
    fn errors_name_the_argument() {
        let err = |m: Option<&str>, i: Option<&str>| {
            build_body(Endpoint::Responses, m, i, None, None).unwrap_err()
        };
        assert_eq!(err(None, Some("x")).argument, "model");
        assert_eq!(err(Some(" "), Some("x")).argument, "model");
        assert_eq!(err(Some("m"), None).argument, "input");
        assert_eq!(err(Some("m"), Some("")).argument, "input");
        assert_eq!(
            Endpoint::parse("/v1/nope").unwrap_err().argument,
            "endpoint"
        );
    }

    #[test]
    fn options_may_not_replace_the_model_or_stream() {
        assert_eq!(
            build(Endpoint::Responses, None, json!({"model": "other"}))
                .unwrap_err()
                .argument,
            "options"
        );
        assert_eq!(
            build(Endpoint::Responses, None, json!({"input": "other"}))
                .unwrap_err()
                .argument,
            "options"
        );
        assert_eq!(
            build(Endpoint::Responses, None, json!({"stream": true}))
                .unwrap_err()
                .argument,
            "options"
        );
        assert_eq!(
            build(Endpoint::Responses, None, json!([1]))
                .unwrap_err()
                .argument,
            "options"
        );
        assert!(build(Endpoint::Responses, None, json!({"stream": false})).is_ok());
    }

    #[test]
    fn raw_bodies_need_a_model() {
        assert_eq!(
            validate_body(&json!({"input": "x"}), "body")
                .unwrap_err()
                .argument,
            "body"
        );
        assert_eq!(
            validate_body(&json!({"model": 3}), "body")
                .unwrap_err()
                .argument,
            "body"
        );
        assert_eq!(validate_body(&json!({"model": "m"}), "body").unwrap(), "m");
    }

    #[test]
    fn schemas_go_where_each_endpoint_expects_them() {
        let schema = json!({"type": "object"});
        let body = with_json_schema(Endpoint::Responses, json!({"model": "m"}), &schema).unwrap();
        assert_eq!(body["text"]["format"]["schema"], schema);
        let body =
            with_json_schema(Endpoint::ChatCompletions, json!({"model": "m"}), &schema).unwrap();
        assert_eq!(body["response_format"]["json_schema"]["schema"], schema);
        assert_eq!(
            with_json_schema(Endpoint::Embeddings, json!({}), &schema)
                .unwrap_err()
                .argument,
            "endpoint"
        );
        assert_eq!(
            with_json_schema(Endpoint::Responses, json!({"text": {}}), &schema)
                .unwrap_err()
                .argument,
            "options"
        );
        assert_eq!(
            with_json_schema(Endpoint::Responses, json!({}), &json!(1))
                .unwrap_err()
                .argument,
            "schema"
        );
    }

    #[test]
    fn labels_must_be_distinct_and_at_least_two() {
        let (schema, labels) = label_schema(&[Some("yes"), Some("no")]).unwrap();
        assert_eq!(schema["properties"]["label"]["enum"], json!(["yes", "no"]));
        assert_eq!(
            AnswerFormat::from_json(&AnswerFormat::Label(labels.clone()).to_json()),
            Some(AnswerFormat::Label(labels))
        );
        assert_eq!(label_schema(&[Some("yes")]).unwrap_err().argument, "labels");
        assert_eq!(
            label_schema(&[Some("yes"), Some("yes")])
                .unwrap_err()
                .argument,
            "labels"
        );
        assert_eq!(
            label_schema(&[Some("yes"), None]).unwrap_err().argument,
            "labels"
        );
    }

    #[test]
    fn a_batch_line_carries_the_body_verbatim() {
        let line = batch_line("7", "/v1/responses", r#"{"input": "x", "model": "m"}"#).unwrap();
        assert_eq!(
            line,
            r#"{"custom_id":"7","method":"POST","url":"/v1/responses","body":{"input": "x", "model": "m"}}"#
        );
        assert!(batch_line("7", "/v1/responses", r#"{"input": "x"#).is_err());
    }

    mod hostile_input {
        use super::super::*;
        use crate::provider::openai::format::batch_line;
        use proptest::prelude::*;

        proptest! {
            /// Whatever a prompt or option holds, the line parses back with our own fields
            /// intact and the prompt unchanged.
            #[test]
            fn nothing_in_a_request_can_change_another_field(
                input in any::<String>(),
                instructions in proptest::option::of(any::<String>()),
                option_key in "[a-z_]{1,12}",
                option_value in any::<String>(),
                custom_id in 1i64..i64::MAX,
            ) {
                prop_assume!(!input.trim().is_empty());
                prop_assume!(!["model", "input", "instructions", "stream"].contains(&option_key.as_str()));
                // Instructions that are a JSON object are refused as options given by mistake.
                prop_assume!(!instructions.as_deref().is_some_and(|i| matches!(serde_json::from_str::<Value>(i), Ok(Value::Object(_)))));
                let options = json!({ option_key.clone(): option_value });
                let body = build_body(Endpoint::Responses, Some("gpt-4o-mini"), Some(&input), instructions.as_deref(), Some(&options)).unwrap();
                let line = batch_line(&custom_id.to_string(), "/v1/responses", &body.to_string()).unwrap();
                prop_assert!(!line.contains('\n'));
                let parsed: Value = serde_json::from_str(&line).unwrap();
                prop_assert_eq!(parsed.as_object().unwrap().len(), 4);
                prop_assert_eq!(&parsed["custom_id"], &json!(custom_id.to_string()));
                prop_assert_eq!(&parsed["method"], &json!("POST"));
                prop_assert_eq!(&parsed["url"], &json!("/v1/responses"));
                prop_assert_eq!(&parsed["body"]["model"], &json!("gpt-4o-mini"));
                prop_assert_eq!(&parsed["body"]["input"], &json!(input));
            }
        }
    }

    #[test]
    fn oversized_requests_are_refused() {
        assert!(check_size(100, 1000, "input").is_ok());
        assert_eq!(
            check_size(990, 1000, "input").unwrap_err().argument,
            "input"
        );
    }
}
