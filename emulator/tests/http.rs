//! The emulator over HTTP: faults that depend on what a call carries in its headers.

use llmbatching_emulator::{Config, Emulator};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;

/// Sends one HTTP/1.1 request and returns the status and the body parsed as JSON.
fn call(
    base_url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
) -> (u16, Value) {
    let authority = base_url
        .trim_start_matches("http://")
        .trim_end_matches("/v1");
    let mut stream = TcpStream::connect(authority).expect("emulator listens");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8(answer).expect("a UTF-8 answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn upload(base_url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let boundary = "xBOUNDARYx";
    let line = json!({"custom_id": "1", "method": "POST", "url": "/v1/responses",
                      "body": {"model": "m", "input": "hello"}});
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{line}\n\r\n--{boundary}--\r\n"
    );
    call(
        base_url,
        "POST",
        "/v1/files",
        headers,
        &format!("multipart/form-data; boundary={boundary}"),
        body.as_bytes(),
    )
}

fn create(base_url: &str, headers: &[(&str, &str)], file_id: &str) -> (u16, Value) {
    let body =
        json!({"input_file_id": file_id, "endpoint": "/v1/responses", "completion_window": "24h"});
    call(
        base_url,
        "POST",
        "/v1/batches",
        headers,
        "application/json",
        body.to_string().as_bytes(),
    )
}

#[test]
fn echo_authorization_refuses_uploads_and_creates_with_the_credentials_in_the_message() {
    let emulator = Emulator::start(Config {
        echo_authorization: 2,
        ..Config::default()
    })
    .unwrap();
    let url = &emulator.base_url;
    let headers = [
        ("Authorization", "Bearer sk-echoed-key"),
        ("api-key", "sk-echoed-key"),
    ];

    let (status, body) = upload(url, &headers);
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["message"],
        "Invalid request. Headers received: Authorization: Bearer sk-echoed-key, api-key: sk-echoed-key"
    );
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // Other operations are not affected while the counter runs.
    let (status, _) = call(
        url,
        "GET",
        "/v1/batches",
        &headers[..1],
        "application/json",
        b"",
    );
    assert_eq!(status, 200);

    let (status, body) = create(url, &headers[..1], "file-does-not-matter");
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["message"],
        "Invalid request. Headers received: Authorization: Bearer sk-echoed-key"
    );
    assert_eq!(emulator.stats().faults_injected, 2);

    // The counter is spent: the same calls now work.
    let (status, file) = upload(url, &headers);
    assert_eq!(status, 200, "{file}");
    let (status, batch) = create(url, &headers, file["id"].as_str().unwrap());
    assert_eq!(status, 200, "{batch}");
    assert!(!batch.to_string().contains("sk-echoed-key"));
    assert_eq!(emulator.stats().faults_injected, 2);
}

#[test]
fn echo_authorization_is_set_through_the_config_endpoint() {
    let emulator = Emulator::start(Config::default()).unwrap();
    let url = &emulator.base_url;
    let (status, config) = call(
        url,
        "POST",
        "/emulator/config",
        &[],
        "application/json",
        br#"{"echo_authorization": 1}"#,
    );
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["echo_authorization"], 1);
    let headers = [("Authorization", "Bearer sk-posted")];
    let (status, body) = upload(url, &headers);
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Authorization: Bearer sk-posted"));
    let (status, _) = upload(url, &headers);
    assert_eq!(status, 200, "the counter goes down with each refusal");
}

/// Reads a URL's body as text (for result files).
fn get_text(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let rest = url.trim_start_matches("http://");
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = TcpStream::connect(authority).unwrap();
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

fn wait_until(mut done: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < until, "timed out");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn quick() -> Config {
    Config {
        validating_ms: 10,
        in_progress_ms: 30,
        finalizing_ms: 10,
        ..Config::default()
    }
}

#[test]
fn anthropic_message_batches_run_inline_requests_and_answer_behind_results_url() {
    let emulator = Emulator::start(quick()).unwrap();
    let base = &emulator.base_url;
    let anthropic = &emulator.anthropic_base_url;
    let path = anthropic
        .trim_start_matches("http://")
        .split_once('/')
        .unwrap()
        .1;
    let headers = [
        ("x-api-key", "sk-ant-test"),
        ("anthropic-version", "2023-06-01"),
    ];
    let params = |text: &str| {
        json!({"model": "claude-x", "max_tokens": 64,
                                     "messages": [{"role": "user", "content": text}]})
    };

    // Checked at creation: custom_id pattern, required fields.
    let bad = json!({"requests": [{"custom_id": "no spaces", "params": params("x")}]});
    let (status, body) = call(
        base,
        "POST",
        &format!("/{path}/messages/batches"),
        &headers,
        "application/json",
        bad.to_string().as_bytes(),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, body) = call(
        base,
        "POST",
        &format!("/{path}/messages/batches"),
        &headers[..1],
        "application/json",
        b"{}",
    );
    assert_eq!(status, 400, "anthropic-version is required: {body}");

    let tool = json!({"model": "claude-x", "max_tokens": 64,
        "messages": [{"role": "user", "content": "it is positive"}],
        "tools": [{"name": "answer", "input_schema": {"type": "object",
                   "properties": {"label": {"enum": ["negative", "positive"]}}}}],
        "tool_choice": {"type": "tool", "name": "answer"}});
    let batch = json!({"requests": [
        {"custom_id": "1", "params": params("hello")},
        {"custom_id": "2", "params": tool},
        {"custom_id": "3", "params": params("EMULATOR_FAIL")}]});
    let (status, created) = call(
        base,
        "POST",
        &format!("/{path}/messages/batches"),
        &headers,
        "application/json",
        batch.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["type"], "message_batch");
    assert_eq!(created["processing_status"], "in_progress");
    assert!(created["results_url"].is_null());
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("msgbatch_"));

    let mut ended = Value::Null;
    wait_until(|| {
        let (_, b) = call(
            base,
            "GET",
            &format!("/{path}/messages/batches/{id}"),
            &headers,
            "application/json",
            b"",
        );
        ended = b;
        ended["processing_status"] == "ended"
    });
    assert_eq!(
        ended["request_counts"],
        json!({"processing": 0, "succeeded": 2, "errored": 1, "canceled": 0, "expired": 0})
    );
    let results_url = ended["results_url"].as_str().unwrap();
    let (status, text) = get_text(results_url, &headers);
    assert_eq!(status, 200);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_id = |id: &str| lines.iter().find(|l| l["custom_id"] == id).unwrap().clone();
    assert_eq!(by_id("1")["result"]["type"], "succeeded");
    assert_eq!(
        by_id("1")["result"]["message"]["content"][0]["text"],
        "[claude-x] hello"
    );
    assert!(by_id("1")["result"]["message"]["usage"]["cache_read_input_tokens"].is_u64());
    assert_eq!(
        by_id("2")["result"]["message"]["content"][0]["type"],
        "tool_use"
    );
    assert_eq!(
        by_id("2")["result"]["message"]["content"][0]["input"],
        json!({"label": "positive"})
    );
    assert_eq!(by_id("3")["result"]["type"], "errored");

    let (status, list) = call(
        base,
        "GET",
        &format!("/{path}/messages/batches?limit=10"),
        &headers,
        "application/json",
        b"",
    );
    assert_eq!(status, 200);
    assert_eq!(list["data"][0]["id"], id.as_str());
    let (status, deleted) = call(
        base,
        "DELETE",
        &format!("/{path}/messages/batches/{id}"),
        &headers,
        "application/json",
        b"",
    );
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["type"], "message_batch_deleted");
    assert_eq!(emulator.stats().batches_deleted, 1);
    assert_eq!(emulator.stats().runs_per_custom_id.len(), 2);
}

#[test]
fn azure_speaks_the_batch_protocol_at_its_paths_with_the_api_key_header() {
    let emulator = Emulator::start(quick()).unwrap();
    let base = &emulator.base_url;
    let prefix = "/azure/openai";
    assert!(emulator.azure_base_url.ends_with(prefix));
    let bearer = [("Authorization", "Bearer sk-x")];
    let (status, _) = call(
        base,
        "GET",
        &format!("{prefix}/batches?api-version=2024-10-21"),
        &bearer,
        "application/json",
        b"",
    );
    assert_eq!(status, 401, "Azure wants the api-key header");
    let key = [("api-key", "azure-key")];
    let (status, _) = call(
        base,
        "GET",
        &format!("{prefix}/batches"),
        &key,
        "application/json",
        b"",
    );
    assert_eq!(status, 404, "Azure wants an api-version");
    let (status, list) = call(
        base,
        "GET",
        &format!("{prefix}/batches?api-version=2024-10-21"),
        &key,
        "application/json",
        b"",
    );
    assert_eq!(status, 200, "{list}");
}
