//! `llm_submit` writes its rows straight into llmbatching.requests (see src/request_insert.rs);
//! these tests hold it to what an INSERT statement, with the table's triggers, would write.

mod common;

use common::Cluster;

#[test]
fn submitted_rows_match_inserted_rows_and_follow_each_other() {
    let cluster = Cluster::with_extension(&[("llmbatching.batch_wait", "1h")]);
    let mut c = cluster.client();
    // A direct INSERT goes through the table's triggers; llm_submit does their work itself.
    c.batch_execute(
        "INSERT INTO llmbatching.requests (endpoint, model, body)
         VALUES ('/v1/responses', 'm', '{\"input\": \"same\", \"model\": \"m\"}');
         SELECT llm_submit('m', 'same');
         SELECT llm_submit('m', 'other') FROM generate_series(1, 3);",
    )
    .unwrap();
    let rows = c
        .query(
            "SELECT id, state, reused_from, body_bytes = octet_length(body::text),
                    request_hash = sha256(convert_to(provider || ' ' || endpoint || ' ' || body::text, 'UTF8')),
                    submitted_by = current_user, queued_at = created_at, attempts
               FROM llmbatching.requests ORDER BY id",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 5);
    let first: i64 = rows[0].get(0);
    let third: i64 = rows[2].get(0);
    let expected_leaders = [None, Some(first), None, Some(third), Some(third)];
    for (row, leader) in rows.iter().zip(expected_leaders) {
        assert_eq!(row.get::<_, String>(1), "queued");
        assert_eq!(
            row.get::<_, Option<i64>>(2),
            leader,
            "an identical request waits on the first one"
        );
        for col in 3..7 {
            assert!(
                row.get::<_, bool>(col),
                "column {col} of request {}",
                row.get::<_, i64>(0)
            );
        }
        assert_eq!(row.get::<_, i32>(7), 0);
    }
    // And the other way round: an INSERT after llm_submit finds the submitted request.
    c.batch_execute("INSERT INTO llmbatching.requests (endpoint, model, body) VALUES ('/v1/responses', 'm', '{\"model\": \"m\", \"input\": \"other\"}')")
        .unwrap();
    assert_eq!(
        cluster.count(&format!(
            "SELECT count(*) FROM llmbatching.requests WHERE reused_from = {third}"
        )),
        3
    );
}

#[test]
fn a_trigger_added_to_the_requests_table_still_fires_for_llm_submit() {
    let cluster = Cluster::with_extension(&[("llmbatching.batch_wait", "1h")]);
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE TABLE audit (request_id bigint, model text);
         CREATE FUNCTION audit_request() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO audit VALUES (NEW.id, NEW.model); RETURN NEW; END $$;
         CREATE TRIGGER audit AFTER INSERT ON llmbatching.requests FOR EACH ROW EXECUTE FUNCTION audit_request();
         SELECT llm_submit('m', 'p' || g) FROM generate_series(1, 4) g;",
    )
    .unwrap();
    assert_eq!(
        cluster.count(
            "SELECT count(*) FROM audit a JOIN llmbatching.requests r ON r.id = a.request_id"
        ),
        4
    );
    c.batch_execute("DROP TRIGGER audit ON llmbatching.requests; SELECT llm_submit('m', 'after');")
        .unwrap();
    assert_eq!(cluster.count("SELECT count(*) FROM audit"), 4);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests"),
        5
    );
}

#[test]
fn submissions_roll_back_with_their_subtransaction_and_need_a_writable_transaction() {
    let cluster = Cluster::with_extension(&[("llmbatching.batch_wait", "1h")]);
    let mut c = cluster.client();
    c.batch_execute(
        "DO $$
         DECLARE
             id bigint;
         BEGIN
             FOR i IN 1..6 LOOP
                 BEGIN
                     id := llm_submit('m', 'prompt ' || i);
                     IF i % 2 = 0 THEN
                         RAISE EXCEPTION 'undo %', i;
                     END IF;
                     -- The row is there for the next statement of the same function.
                     IF llm_status(id) IS DISTINCT FROM 'queued' THEN
                         RAISE EXCEPTION 'request % not visible', id;
                     END IF;
                 EXCEPTION WHEN raise_exception THEN
                     IF SQLERRM NOT LIKE 'undo%' THEN RAISE; END IF;
                 END;
             END LOOP;
         END
         $$;",
    )
    .unwrap();
    let kept: Vec<String> = c
        .query(
            "SELECT body ->> 'input' FROM llmbatching.requests ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kept, ["prompt 1", "prompt 3", "prompt 5"]);

    let err = c
        .batch_execute("BEGIN READ ONLY; SELECT llm_submit('m', 'x');")
        .expect_err("a read-only transaction cannot queue");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("read-only transaction"), "{message}");
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests"),
        3
    );
}

#[test]
fn requests_whose_hashes_share_an_index_bucket_are_not_taken_for_each_other() {
    let cluster = Cluster::with_extension(&[("llmbatching.batch_wait", "1h")]);
    let mut c = cluster.client();
    // Each pair's sha256 hashes agree in the 32 bits the hash index files them under (found
    // among 200,000 prompts 'p1' .. 'p200000'); only the whole hash tells them apart.
    let pairs = [
        ("p124285", "p185112"),
        ("p104011", "p192385"),
        ("p105608", "p119804"),
        ("p148596", "p167817"),
        ("p5751", "p127707"),
    ];
    for (first, second) in pairs {
        c.batch_execute(&format!(
            "SELECT llm_submit('m', '{first}'); SELECT llm_submit('m', '{second}');"
        ))
        .unwrap();
    }
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE reused_from IS NULL"),
        10,
        "no request waits on a different one"
    );
    // A true duplicate is still found in the same bucket.
    c.batch_execute("SELECT llm_submit('m', 'p185112')")
        .unwrap();
    assert_eq!(
        cluster.count(
            "SELECT count(*) FROM llmbatching.requests r JOIN llmbatching.requests l ON l.id = r.reused_from
              WHERE l.body = r.body"
        ),
        1
    );
}

#[test]
fn the_fast_path_keeps_the_callers_insert_privilege_and_every_insert_policy() {
    let cluster = Cluster::with_extension(&[("llmbatching.batch_wait", "1h")]);
    let mut admin = cluster.client();
    admin
        .batch_execute("CREATE ROLE alice LOGIN IN ROLE llmbatching_user")
        .unwrap();
    let mut alice = cluster.client_as("alice");
    let submit = |c: &mut postgres::Client, model: &str| {
        c.query_one("SELECT llm_submit($1, 'x')", &[&model])
            .map(|r| r.get::<_, i64>(0))
            .map_err(|e| {
                e.as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_default()
            })
    };
    submit(&mut alice, "m").expect("a plain submit works");

    // An administrator's restrictive policy applies to llm_submit as it does to an INSERT.
    admin
        .batch_execute(
            "CREATE POLICY no_forbidden ON llmbatching.requests AS RESTRICTIVE FOR INSERT
                 WITH CHECK (model <> 'forbidden')",
        )
        .unwrap();
    let refused = submit(&mut alice, "forbidden").expect_err("the policy was bypassed");
    assert!(refused.contains("row-level security"), "{refused}");
    submit(&mut alice, "allowed").expect("other models still go");
    admin
        .batch_execute("DROP POLICY no_forbidden ON llmbatching.requests")
        .unwrap();

    // A revoked privilege is honoured.
    admin
        .batch_execute("REVOKE INSERT ON llmbatching.requests FROM llmbatching_user")
        .unwrap();
    let refused = submit(&mut alice, "m").expect_err("the revoked privilege was bypassed");
    assert!(refused.contains("permission denied"), "{refused}");
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE model IN ('forbidden')"),
        0
    );

    // A direct INSERT may not carry a label list no answer could match.
    let err = admin
        .batch_execute(
            "INSERT INTO llmbatching.requests (endpoint, model, body, answer_format)
             VALUES ('/v1/responses', 'm', '{\"model\": \"m\", \"input\": \"x\"}', '{\"type\": \"label\", \"labels\": []}')",
        )
        .expect_err("an empty label list was accepted");
    let message = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("answer_format"), "{message}");
}
