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
