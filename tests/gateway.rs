//! The OpenAI-compatible gateway in front of a real cluster and the emulator: the official SDKs
//! (Python and Node) running the 422 loop, the HTTP contract, keys and roles, many clients at
//! once, and a gateway restarted while requests are in flight.

mod common;

use common::{quick, Cluster};
use llmbatching_gateway::{Config, Running};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A cluster with the extension, roles alice and bob (llmbatching_user) with a gateway key each,
/// and the gateway's login `gw`.
fn with_gateway() -> (Cluster, Running, String, String) {
    let cluster = Cluster::start(quick(), &[]);
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE EXTENSION llmbatching;
         CREATE ROLE alice LOGIN IN ROLE llmbatching_user;
         CREATE ROLE bob LOGIN IN ROLE llmbatching_user;
         CREATE ROLE gw LOGIN IN ROLE llmbatching_gateway;",
    )
    .unwrap();
    let mut key = |role: &str| -> String {
        c.query_one("SELECT llmbatching.llm_gateway_key_create($1)", &[&role])
            .unwrap()
            .get(0)
    };
    let (alice, bob) = (key("alice"), key("bob"));
    let gateway = start_gateway(&cluster);
    (cluster, gateway, alice, bob)
}

fn start_gateway(cluster: &Cluster) -> Running {
    Running::start(Config {
        database_url: format!("postgres://gw@127.0.0.1:{}/postgres", cluster.port),
        retry_after: Duration::from_secs(1),
        max_wait: Duration::from_secs(60),
        max_body_bytes: 1024 * 1024,
        ..Config::default()
    })
    .unwrap()
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

fn post(base: &str, path: &str, key: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
    let client = reqwest::blocking::Client::new();
    let mut request = client
        .post(format!("{base}{path}"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .timeout(Duration::from_secs(90));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
    }
}

fn until_answered(base: &str, path: &str, key: &str, body: &str) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = post(base, path, key, body, &[]);
        if reply.status != 422 || Instant::now() > deadline {
            return reply;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_http_contract_holds_for_every_kind_of_call() {
    let (cluster, gateway, alice, bob) = with_gateway();
    let base = &gateway.base_url;
    let body = json!({"model": "gpt-4o-mini", "input": "Hello"}).to_string();

    // Pending: 422, the state as the error's type, the request's id, Retry-After.
    let first = post(base, "/responses", &alice, &body, &[]);
    assert_eq!(first.status, 422, "{}", first.body);
    assert!(["queued", "submitted"].contains(&first.body["error"]["type"].as_str().unwrap()));
    let id = first.body["error"]["request_id"].as_i64().unwrap();
    assert_eq!(first.headers["retry-after"], "1");
    // The same call again is the same request, never a second one.
    let again = post(base, "/responses", &alice, &body, &[]);
    assert_eq!(again.body["error"]["request_id"].as_i64(), Some(id));
    let answered = until_answered(base, "/responses", &alice, &body);
    assert_eq!(answered.status, 200, "{}", answered.body);
    assert_eq!(
        answered.body["output"][0]["content"][0]["text"],
        "[gpt-4o-mini] Hello"
    );
    assert_eq!(
        answered.headers["llmbatching-request-id"],
        id.to_string().as_str()
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE submitted_by = 'alice'"),
        1
    );
    // An Idempotency-Key asks for a request of its own.
    let fresh = post(
        base,
        "/responses",
        &alice,
        &body,
        &[("idempotency-key", "fresh-1")],
    );
    let fresh_id = fresh.body["error"]["request_id"].as_i64().unwrap();
    assert_ne!(fresh_id, id);
    let same_key = post(
        base,
        "/responses",
        &alice,
        &body,
        &[("idempotency-key", "fresh-1")],
    );
    assert_eq!(
        same_key.body["error"]["request_id"].as_i64(),
        Some(fresh_id)
    );

    // Held with Prefer: wait until the answer arrives (woken by the notification).
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "held"}]})
        .to_string();
    let started = Instant::now();
    let held = post(
        base,
        "/chat/completions",
        &alice,
        &chat,
        &[("prefer", "wait=30")],
    );
    assert_eq!(held.status, 200, "{}", held.body);
    // Answered when the answer arrived, not when the wait ran out.
    assert!(started.elapsed() < Duration::from_secs(25));
    assert_eq!(
        held.body["choices"][0]["message"]["content"],
        "[gpt-4o-mini] held"
    );

    // Another role sends the same body: a request of its own, and alice's answers stay hers.
    let bobs = post(
        base,
        "/responses",
        &bob,
        &body,
        &[("idempotency-key", "fresh-1")],
    );
    let bob_id = bobs.body["error"]["request_id"].as_i64().unwrap();
    assert!(bob_id != id && bob_id != fresh_id);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE submitted_by = 'bob'"),
        1
    );

    // Hostile input: the right status, nothing queued.
    let before = cluster.count("SELECT count(*) FROM llmbatching.requests");
    for (path, key, body, status, fragment) in [
        (
            "/responses",
            "lbk_wrong",
            body.as_str(),
            401,
            "Incorrect API key",
        ),
        (
            "/responses",
            alice.as_str(),
            "{not json",
            400,
            "not valid JSON",
        ),
        ("/responses", alice.as_str(), "[1, 2]", 400, "JSON object"),
        (
            "/responses",
            alice.as_str(),
            r#"{"model": "m", "input": "x", "stream": true}"#,
            400,
            "stream",
        ),
        (
            "/responses",
            alice.as_str(),
            r#"{"input": "x"}"#,
            400,
            "must name a \"model\"",
        ),
        (
            "/images/generations",
            alice.as_str(),
            body.as_str(),
            404,
            "unknown endpoint",
        ),
    ] {
        let reply = post(base, path, key, body, &[]);
        assert_eq!(reply.status, status, "{path} {body}: {}", reply.body);
        let message = reply.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(fragment), "{path} {body}: {message}");
    }
    let huge = json!({"model": "m", "input": "x".repeat(2 * 1024 * 1024)}).to_string();
    assert_eq!(post(base, "/responses", &alice, &huge, &[]).status, 413);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests"),
        before
    );

    // Models and health.
    let client = reqwest::blocking::Client::new();
    let models: Value = client
        .get(format!("{base}/models"))
        .bearer_auth(&alice)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "gpt-4o-mini"));
    let health = client.get(base.replace("/v1", "/health")).send().unwrap();
    assert_eq!(health.status(), 200);

    // A revoked key is refused at once, with nothing queued.
    cluster
        .client()
        .batch_execute("SELECT llmbatching.llm_gateway_key_revoke(id) FROM llmbatching.llm_gateway_keys() WHERE role = 'bob'")
        .unwrap();
    let revoked = post(
        base,
        "/responses",
        &bob,
        r#"{"model": "m", "input": "after"}"#,
        &[],
    );
    assert_eq!(revoked.status, 401);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE submitted_by = 'bob'"),
        1
    );
    // Only hashes are kept, and no key or prompt reaches the server log.
    let secrets = cluster.count(&format!(
        "SELECT count(*) FROM llmbatching.gateway_keys WHERE hash::text LIKE '%{}%' OR prefix = '{alice}'",
        &alice[4..]
    ));
    assert_eq!(secrets, 0);
    assert!(!cluster.log().contains(&alice));
}

#[test]
fn keys_are_only_for_ordinary_user_roles_and_the_gateway_login_holds_nothing_else() {
    let (cluster, _gateway, _alice, _bob) = with_gateway();
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE ROLE boss SUPERUSER; CREATE ROLE outsider; CREATE ROLE carol IN ROLE llmbatching_admin;",
    )
    .unwrap();
    for role in ["boss", "outsider", "carol", "nobody"] {
        let err = c
            .query_one("SELECT llmbatching.llm_gateway_key_create($1)", &[&role])
            .expect_err(role);
        let message = err.as_db_error().unwrap().message().to_owned();
        assert!(
            message.starts_with("invalid argument \"role\""),
            "{role}: {message}"
        );
    }
    let mut gw = cluster.client_as("gw");
    for sql in [
        "SELECT * FROM llmbatching.requests",
        "SELECT * FROM llmbatching.gateway_keys",
        "SELECT llmbatching.llm_submit('m', 'x')",
        "SELECT llmbatching.llm_gateway_key_create('alice')",
    ] {
        let err = gw.batch_execute(sql).expect_err(sql);
        assert!(
            err.as_db_error()
                .unwrap()
                .message()
                .contains("permission denied"),
            "{sql}: {err}"
        );
    }
    // Listing shows no secret.
    let listed: Vec<String> = c
        .query(
            "SELECT row_to_json(k)::text FROM llmbatching.llm_gateway_keys() k",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|k| !k.contains("hash")));
}

#[test]
fn hundreds_of_clients_at_once_and_a_restart_mid_flight_lose_nothing() {
    let (cluster, gateway, alice, _bob) = with_gateway();
    let base = gateway.base_url.clone();
    let clients: Vec<_> = (0..200)
        .map(|i| {
            let (base, key) = (base.clone(), alice.clone());
            std::thread::spawn(move || {
                let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": format!("client {i}")}]}).to_string();
                let reply = until_answered(&base, "/chat/completions", &key, &body);
                (i, reply.status, reply.body)
            })
        })
        .collect();
    for client in clients {
        let (i, status, body) = client.join().unwrap();
        assert_eq!(status, 200, "client {i}: {body}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            format!("[gpt-4o-mini] client {i}")
        );
    }
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests"),
        200
    );

    // Requests queued through one gateway are answered through the next.
    let body = json!({"model": "gpt-4o-mini", "input": "across a restart"}).to_string();
    let pending = post(&base, "/responses", &alice, &body, &[]);
    let id = pending.body["error"]["request_id"].as_i64().unwrap();
    drop(gateway);
    let restarted = start_gateway(&cluster);
    let answered = until_answered(&restarted.base_url, "/responses", &alice, &body);
    assert_eq!(answered.status, 200);
    assert_eq!(
        answered.headers["llmbatching-request-id"],
        id.to_string().as_str()
    );
    assert!(cluster.emulator.stats().ran_more_than_once().is_empty());
}

/// Where scripts/test installed the SDKs.
fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target")
}

#[test]
fn the_official_python_and_node_sdks_get_their_answers() {
    let (_cluster, gateway, alice, _bob) = with_gateway();
    let python = target_dir().join("sdk-venv/bin/python");
    let node_dir = target_dir().join("sdk-node");
    assert!(
        python.exists() && node_dir.join("node_modules/openai").exists(),
        "the SDKs are not installed: run scripts/test (it installs them into target/)"
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/client.py");
    let started = Instant::now();
    let out = Command::new(&python)
        .arg(&script)
        .env("LLMBATCHING_KEY", &alice)
        .env("LLMBATCHING_BASE_URL", &gateway.base_url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("python client: {:?}", started.elapsed());
    let python: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(python["responses"], "[gpt-4o-mini] Hello from Python");
    assert_eq!(python["chat"], "[gpt-4o-mini] Chat from Python");
    assert_eq!(python["embedding"], 8);
    assert_eq!(python["waited"], "[gpt-4o-mini] Waited for");
    assert_eq!(python["stream"], 400);

    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/client.mjs"),
        node_dir.join("client.mjs"),
    )
    .unwrap();
    let out = Command::new("node")
        .arg(node_dir.join("client.mjs"))
        .env("LLMBATCHING_KEY", &alice)
        .env("LLMBATCHING_BASE_URL", &gateway.base_url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(node["responses"], "[gpt-4o-mini] Hello from Node");
    assert_eq!(node["chat"], "[gpt-4o-mini] Chat from Node");
    assert_eq!(node["embedding"], 8);
}
