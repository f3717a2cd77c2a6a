//! Bad arguments are refused at submit time with an error naming the argument, and nothing
//! is queued.

mod common;

use common::{Cluster, EmulatorConfig};

#[test]
fn bad_arguments_are_errors_naming_the_argument_and_queue_nothing() {
    let cluster = Cluster::start(EmulatorConfig::default(), &[]);
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    let cases = [
        ("SELECT llm_submit(NULL, 'x')", "\"model\": must not be NULL"),
        ("SELECT llm_submit('  ', 'x')", "\"model\": must not be empty"),
        ("SELECT llm_submit('m', NULL)", "\"input\": must not be NULL"),
        ("SELECT llm_submit('m', '')", "\"input\": must not be empty"),
        ("SELECT llm_submit('m', 'x', endpoint => '/v1/images/generations')", "\"endpoint\": unknown endpoint"),
        ("SELECT llm_submit('m', 'x', endpoint => '/v1/messages')", "\"endpoint\": provider \"openai\" (kind openai) does not batch /v1/messages"),
        ("SELECT llm_submit('m', 'x', provider => 'nowhere')", "\"provider\": there is no provider \"nowhere\""),
        ("SELECT llm_submit_body('{\"model\": \"m\", \"messages\": []}', '/v1/messages')", "\"endpoint\": provider \"openai\""),
        ("SELECT llm_submit('m', 'x', options => '[1, 2]')", "\"options\": must be a JSON object"),
        ("SELECT llm_submit('m', 'x', options => '{\"model\": \"other\"}')", "\"options\": may not set \"model\""),
        ("SELECT llm_submit('m', 'x', options => '{\"stream\": true}')", "\"options\": may not set \"stream\""),
        ("SELECT llm_submit('m', 'x', options => '{\"messages\": []}', endpoint => '/v1/chat/completions')",
         "\"options\": may not set \"messages\""),
        ("SELECT llm_submit('m', 'x', 'sys', endpoint => '/v1/embeddings')", "\"instructions\": is not supported"),
        ("SELECT llm_submit_body(NULL)", "\"body\": must not be NULL"),
        ("SELECT llm_submit_body('\"just a string\"')", "\"body\": must be a JSON object"),
        ("SELECT llm_submit_body('{\"input\": \"x\"}')", "\"body\": must name a \"model\""),
        ("SELECT llm_submit_body('{\"model\": \"m\", \"stream\": true}')", "\"body\": may not set \"stream\""),
        ("SELECT llm_submit_body('{\"model\": \"m\"}', '/v1/nope')", "\"endpoint\": unknown endpoint"),
        ("SELECT llm_submit('m', repeat('x', 201 * 1024 * 1024))", "\"input\": the request is"),
    ];
    for (sql, expected) in cases {
        let err = c.batch_execute(sql).expect_err(sql);
        let message = err
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_else(|| err.to_string());
        assert!(
            message.contains(expected),
            "{sql}: got {message:?}, expected {expected:?}"
        );
        assert!(message.starts_with("invalid argument"), "{sql}: {message}");
    }
    let queued: i64 = c
        .query_one("SELECT count(*) FROM llmbatching.requests", &[])
        .unwrap()
        .get(0);
    assert_eq!(queued, 0);
    // In one transaction, a refused call rolls back the requests queued before it.
    let err = c.batch_execute(
        "BEGIN; SELECT llm_submit('m', 'ok'); SELECT llm_submit('m', NULL); COMMIT;",
    );
    assert!(err.is_err());
    c.batch_execute("ROLLBACK").unwrap();
    let queued: i64 = c
        .query_one("SELECT count(*) FROM llmbatching.requests", &[])
        .unwrap()
        .get(0);
    assert_eq!(queued, 0);
}
