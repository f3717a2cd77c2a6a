//! The write side of the SQL API: `llm_submit` and `llm_submit_body`, which check their
//! arguments, queue one request and return its id (nothing is queued when a check fails), and
//! `llm_cancel`.
//! The read side (`llm_status`, `llm_result`, …) is plain SQL in `sql/api.sql`.

use crate::config;
use crate::provider::servers::{self, Route};
use crate::request::{self, AnswerFormat, Endpoint, RequestError};
use crate::request_insert::{self, NewRequest};
use crate::wakeup;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{JsonB, PgOid};
use serde_json::Value;
use std::cell::{Cell, OnceCell};

fn raise(err: RequestError) -> ! {
    ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        err.to_string()
    );
    #[allow(unreachable_code)]
    {
        unreachable!("ereport(ERROR) does not return")
    }
}

/// The endpoint a request of `route` goes to: the one named, if its provider batches it, else
/// (NULL) the provider's first.
fn endpoint_of(route: &Route, endpoint: Option<&str>) -> Endpoint {
    let accepted = route.kind.endpoints();
    let Some(endpoint) = endpoint else {
        return accepted[0];
    };
    let endpoint = Endpoint::parse(endpoint).unwrap_or_else(|e| raise(e));
    if !accepted.contains(&endpoint) {
        let names: Vec<&str> = accepted.iter().map(|e| e.path()).collect();
        raise(RequestError::new(
            "endpoint",
            format!(
                "provider \"{}\" (kind {}) does not batch {}; it batches {}",
                route.provider,
                route.kind.name(),
                endpoint.path(),
                names.join(", ")
            ),
        ));
    }
    endpoint
}

/// The provider and endpoint of a submission (see [`servers::route_for_submit`]).
fn route_of(provider: Option<&str>, endpoint: Option<&str>) -> (Route, Endpoint) {
    let route = servers::route_for_submit(provider);
    let endpoint = endpoint_of(&route, endpoint);
    (route, endpoint)
}

/// The most bytes one request may have: what one batch of its provider may carry, and the
/// setting.
fn max_request_bytes(route: &Route) -> usize {
    config::batch_limits()
        .max_bytes
        .min(route.kind.limits().max_bytes)
}

fn job_of(job: Option<&str>) -> Option<&str> {
    if let Some(job) = job {
        request::check_job(job).unwrap_or_else(|e| raise(e));
    }
    job
}

const INSERT_REQUEST_SQL: &str =
    "INSERT INTO llmbatching.requests (endpoint, model, body, job, answer_format, reuse, provider)
     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id";

thread_local! {
    /// The insert's plan, prepared once per session.
    static INSERT_REQUEST: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
    /// Set while this backend inserts a request it has just checked itself.
    static CHECKED_INSERT: Cell<bool> = const { Cell::new(false) };
}

/// Marks an insert of an already checked request, so the insert trigger need not parse and
/// check the body again; the mark is removed when the guard drops, also when the insert fails.
struct CheckedInsert;

impl CheckedInsert {
    fn begin() -> CheckedInsert {
        CHECKED_INSERT.with(|c| c.set(true));
        CheckedInsert
    }
}

impl Drop for CheckedInsert {
    fn drop(&mut self) {
        CHECKED_INSERT.with(|c| c.set(false));
    }
}

/// Queues a checked body; returns the request's id. `fcinfo` is the calling SQL function's
/// call: the row goes straight into the table, with state kept per call site (see
/// `request_insert`), unless the table needs a plain INSERT.
#[allow(clippy::too_many_arguments)]
fn enqueue(
    fcinfo: pg_sys::FunctionCallInfo,
    route: &Route,
    endpoint: Endpoint,
    model: &str,
    body: Value,
    argument: &'static str,
    job: Option<&str>,
    format: Option<AnswerFormat>,
    reuse: Option<bool>,
) -> i64 {
    request::check_for_endpoint(endpoint, &body, argument).unwrap_or_else(|e| raise(e));
    let body_json = body.to_string();
    request::check_size(body_json.len(), max_request_bytes(route), argument)
        .unwrap_or_else(|e| raise(e));
    let job = job_of(job);
    let format_json = format.as_ref().map(|f| f.to_json().to_string());
    let new_request = NewRequest {
        provider: &route.provider,
        account: &route.account,
        endpoint: endpoint.path(),
        model,
        body_json: &body_json,
        deterministic: request::is_deterministic(endpoint, &body),
        job,
        answer_format_json: format_json.as_deref(),
        reuse,
    };
    let id = request_insert::insert(fcinfo, &new_request)
        .unwrap_or_else(|| insert_statement(route, endpoint, model, body, job, format, reuse));
    wakeup::wake_worker_at_commit();
    warn_once_if_no_worker();
    id
}

/// How often a session looks again whether what it queues will be sent. The look costs more
/// than a submit (a query, and without preloading a read of every backend's status), and
/// services often submit one request per transaction.
const LOOK_FOR_A_WORKER_EVERY_US: i64 = 5_000_000;

/// Says, once per session, that requests queued here will wait (for a worker that never comes,
/// or an administrator's adoption of a copy). Looked at on a session's first submit and then at
/// most every 5 seconds, not per transaction or row.
fn warn_once_if_no_worker() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    static LOOKED_AT: AtomicI64 = AtomicI64::new(i64::MIN);
    if WARNED.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: the current transaction's start time, a plain read.
    let transaction = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let last = LOOKED_AT.load(Ordering::Relaxed);
    if last != i64::MIN && transaction.saturating_sub(last) < LOOK_FOR_A_WORKER_EVERY_US {
        return;
    }
    LOOKED_AT.store(transaction, Ordering::Relaxed);
    if let Some(reason) = why_nothing_is_sent() {
        WARNED.store(true, std::sync::atomic::Ordering::Relaxed);
        warning!("{reason}");
    }
}

/// Why requests queued in this database will not be sent: no worker serves it, or it is a copy
/// (see sql/copies.sql).
fn why_nothing_is_sent() -> Option<String> {
    wakeup::no_worker_reason().or_else(|| {
        Spi::get_one::<String>("SELECT llmbatching.copy_problem()")
            .unwrap_or_else(|e| error!("llmbatching: checking for a copy: {e}"))
    })
}

/// Queues a checked body with an INSERT statement, so every trigger on the table runs.
fn insert_statement(
    route: &Route,
    endpoint: Endpoint,
    model: &str,
    body: Value,
    job: Option<&str>,
    format: Option<AnswerFormat>,
    reuse: Option<bool>,
) -> i64 {
    let args = [
        endpoint.path().into(),
        model.into(),
        JsonB(body).into(),
        job.into(),
        format.map(|f| JsonB(f.to_json())).into(),
        reuse.into(),
        route.provider.as_str().into(),
    ];
    let _checked = CheckedInsert::begin();
    INSERT_REQUEST
        .with(|plan| {
            Spi::connect_mut(|client| {
                let plan = match plan.get() {
                    Some(plan) => plan,
                    None => {
                        let types = [
                            pg_sys::TEXTOID,
                            pg_sys::TEXTOID,
                            pg_sys::JSONBOID,
                            pg_sys::TEXTOID,
                            pg_sys::JSONBOID,
                            pg_sys::BOOLOID,
                            pg_sys::TEXTOID,
                        ];
                        let types: Vec<PgOid> =
                            types.into_iter().map(PgOid::from_untagged).collect();
                        let kept = client.prepare_mut(INSERT_REQUEST_SQL, &types)?.keep();
                        plan.get_or_init(|| kept)
                    }
                };
                client
                    .update(plan, Some(1), &args)?
                    .first()
                    .get_one::<i64>()
            })
        })
        .unwrap_or_else(|e| error!("llmbatching: could not queue the request: {e}"))
        .unwrap_or_else(|| error!("llmbatching: queueing the request returned no id"))
}

/// The body `llm_submit` builds, shared by its structured variants.
fn built_body(
    endpoint: Endpoint,
    model: Option<&str>,
    input: Option<&str>,
    instructions: Option<&str>,
    options: Option<JsonB>,
) -> Value {
    let options = options.map(|o| o.0);
    request::build_body(endpoint, model, input, instructions, options.as_ref())
        .unwrap_or_else(|e| raise(e))
}

/// The body `llm_submit` builds, asking for an answer that follows `schema`.
fn built_body_with_schema(
    endpoint: Endpoint,
    model: Option<&str>,
    input: Option<&str>,
    instructions: Option<&str>,
    options: Option<JsonB>,
    schema: &Value,
) -> Value {
    let body = built_body(endpoint, model, input, instructions, options);
    request::with_json_schema(endpoint, body, schema).unwrap_or_else(|e| raise(e))
}

/// Queues a request built from a model and an input; returns its id.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::too_many_arguments)] // the SQL signature
fn llm_submit(
    model: Option<&str>,
    input: Option<&str>,
    instructions: default!(Option<&str>, "NULL"),
    options: default!(Option<JsonB>, "'{}'"),
    endpoint: default!(Option<&str>, "NULL"),
    job: default!(Option<&str>, "NULL"),
    reuse: default!(Option<bool>, "NULL"),
    provider: default!(Option<&str>, "NULL"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> i64 {
    let (route, endpoint) = route_of(provider, endpoint);
    let body = built_body(endpoint, model, input, instructions, options);
    enqueue(
        fcinfo,
        &route,
        endpoint,
        model.unwrap_or_default(),
        body,
        "input",
        job,
        None,
        reuse,
    )
}

/// Queues a request whose answer must be JSON following `schema`; read it with
/// `llm_answer_json`.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::too_many_arguments)] // the SQL signature
fn llm_submit_json(
    model: Option<&str>,
    input: Option<&str>,
    schema: Option<JsonB>,
    instructions: default!(Option<&str>, "NULL"),
    options: default!(Option<JsonB>, "'{}'"),
    endpoint: default!(Option<&str>, "NULL"),
    job: default!(Option<&str>, "NULL"),
    reuse: default!(Option<bool>, "NULL"),
    provider: default!(Option<&str>, "NULL"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> i64 {
    let (route, endpoint) = route_of(provider, endpoint);
    let schema = schema
        .map(|s| s.0)
        .unwrap_or_else(|| raise(RequestError::new("schema", "must not be NULL")));
    let body = built_body_with_schema(endpoint, model, input, instructions, options, &schema);
    enqueue(
        fcinfo,
        &route,
        endpoint,
        model.unwrap_or_default(),
        body,
        "input",
        job,
        Some(AnswerFormat::Json),
        reuse,
    )
}

/// Queues a request whose answer is one of `labels`; `llm_result` is then always one of them,
/// or the request fails saying what the model answered instead.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::too_many_arguments)] // the SQL signature
fn llm_submit_label(
    model: Option<&str>,
    input: Option<&str>,
    labels: Option<Vec<Option<String>>>,
    instructions: default!(Option<&str>, "NULL"),
    options: default!(Option<JsonB>, "'{}'"),
    endpoint: default!(Option<&str>, "NULL"),
    job: default!(Option<&str>, "NULL"),
    reuse: default!(Option<bool>, "NULL"),
    provider: default!(Option<&str>, "NULL"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> i64 {
    let (route, endpoint) = route_of(provider, endpoint);
    let labels = labels.unwrap_or_else(|| raise(RequestError::new("labels", "must not be NULL")));
    let labels: Vec<Option<&str>> = labels.iter().map(Option::as_deref).collect();
    let (schema, labels) = request::label_schema(&labels).unwrap_or_else(|e| raise(e));
    let body = built_body_with_schema(endpoint, model, input, instructions, options, &schema);
    enqueue(
        fcinfo,
        &route,
        endpoint,
        model.unwrap_or_default(),
        body,
        "input",
        job,
        Some(AnswerFormat::Label(labels)),
        reuse,
    )
}

/// Queues a request given as a complete body for the endpoint; returns its id.
#[pg_extern(volatile, parallel_unsafe)]
fn llm_submit_body(
    body: Option<JsonB>,
    endpoint: default!(Option<&str>, "NULL"),
    job: default!(Option<&str>, "NULL"),
    reuse: default!(Option<bool>, "NULL"),
    provider: default!(Option<&str>, "NULL"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> i64 {
    let (route, endpoint) = route_of(provider, endpoint);
    let body = body
        .map(|b| b.0)
        .unwrap_or_else(|| raise(RequestError::new("body", "must not be NULL")));
    let model = request::validate_body(&body, "body")
        .unwrap_or_else(|e| raise(e))
        .to_owned();
    enqueue(
        fcinfo, &route, endpoint, &model, body, "body", job, None, reuse,
    )
}

/// Cancels a request that has no answer yet; true if it was cancelled. A queued request is
/// simply never sent. A submitted one keeps its place in its batch, and its answer is ignored
/// when it arrives; once every request of a batch is cancelled, the worker cancels the batch at
/// the provider. Row-level security limits this to the caller's own requests (any request, for
/// members of llmbatching_admin).
#[pg_extern(volatile, parallel_unsafe, strict)]
fn llm_cancel(id: i64) -> bool {
    let cancelled = Spi::connect_mut(|client| -> pgrx::spi::SpiResult<Option<Option<i64>>> {
        let rows = client.update(
            "UPDATE llmbatching.requests SET state = 'cancelled', finished_at = now()
              WHERE id = $1 AND state IN ('queued', 'submitted')
             RETURNING batch_id",
            None,
            &[id.into()],
        )?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(rows.first().get_one::<i64>()?))
    });
    match cancelled.unwrap_or_else(|e| error!("llmbatching: could not cancel request {id}: {e}")) {
        None => false,
        Some(batch_id) => {
            if batch_id.is_some() {
                // The worker checks whether the whole batch is now cancelled.
                wakeup::wake_worker_at_commit();
            }
            true
        }
    }
}

/// Starts this database's worker, unless one runs: through the launcher where it serves this
/// database, else as a dynamic background worker; returns its pid, or NULL when one runs
/// already. Needed where nothing starts it otherwise: without the library in
/// shared_preload_libraries after a server restart (CREATE EXTENSION starts one the first
/// time). For llmbatching_admin.
#[pg_extern(volatile, parallel_unsafe)]
fn llm_worker_start() -> Option<i32> {
    if crate::wakeup::worker_runs_here() {
        return None;
    }
    if crate::wakeup::launcher_serves_here() {
        return Some(start_by_launcher());
    }
    Some(crate::worker::start_for_this_database().unwrap_or_else(|e| error!("llmbatching: {e}")))
}

/// Asks the launcher for this database's worker and waits until it runs; returns its pid.
fn start_by_launcher() -> i32 {
    let database = unsafe { pg_sys::MyDatabaseId };
    crate::registry::request_worker(database);
    let patience = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < patience {
        if let Some(pid) = crate::registry::running_worker(database) {
            return pid;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        pg_sys::check_for_interrupts!();
    }
    error!(
        "llmbatching: the launcher did not start the worker within 10 seconds; see the server log"
    )
}

/// Internal functions, for the extension's own SQL (in its schema, like everything else).
mod internal {
    use crate::config;
    use crate::request::{self, AnswerFormat, Endpoint};
    use pgrx::prelude::*;
    use pgrx::JsonB;

    /// Why nothing queued in this database will be sent, or NULL if it will be (llm_wait and
    /// llm_submit warn with it): no worker serves it, or it is a copy.
    #[pg_extern(stable, parallel_safe)]
    fn worker_problem() -> Option<String> {
        super::why_nothing_is_sent()
    }

    /// Where this installation lives now: the cluster's system identifier and the database's
    /// oid. A database restored from a dump or cloned lives elsewhere than its original.
    #[pg_extern(stable, parallel_safe)]
    fn current_home() -> String {
        // SAFETY: plain reads of this backend's cluster and database identity.
        unsafe {
            format!(
                "{}/{}",
                pg_sys::GetSystemIdentifier(),
                pg_sys::MyDatabaseId.to_u32()
            )
        }
    }

    /// Has this database's worker started when the current transaction commits (CREATE
    /// EXTENSION and llm_worker_restart() call it), unless one runs: by the launcher where it
    /// serves this database, else as a dynamic background worker. A worker that cannot be
    /// started is a warning, not a failed CREATE EXTENSION.
    #[pg_extern(volatile, parallel_unsafe)]
    fn start_worker_if_needed() {
        // (A worker started while one runs ends at once; so does the launcher's request.)
        crate::wakeup::start_worker_at_commit();
    }

    /// Wakes the worker when the current transaction commits (the extension's triggers call it
    /// when they queue work for it).
    #[pg_extern(volatile, parallel_unsafe)]
    fn wake_worker() {
        crate::wakeup::wake_worker_at_commit();
    }

    /// Whether the row being inserted is one `llm_submit` has just checked itself, so the insert
    /// trigger need not convert and check its body again.
    #[pg_extern(volatile, parallel_safe)]
    fn insert_is_checked() -> bool {
        super::CHECKED_INSERT.with(|c| c.get())
    }

    /// The account (see `servers::Route`) of a request row queued through `provider` to
    /// `endpoint`; raises the ERROR `llm_submit` would when the provider cannot take it. The
    /// insert trigger sets every new row's account with it, so no role can pick another's key.
    #[pg_extern(stable, parallel_safe)]
    fn request_account(provider: Option<&str>, endpoint: Option<&str>) -> String {
        let route = crate::provider::servers::route_for_submit(provider);
        super::endpoint_of(&route, endpoint);
        route.account
    }

    /// Why a request row may not be queued, or NULL if it may: the checks `llm_submit_body`
    /// makes, applied by a trigger to every row inserted into llmbatching.requests, so a direct
    /// INSERT cannot put a request in a batch that would fail it for everyone.
    #[pg_extern(stable, parallel_safe)]
    fn request_problem(
        endpoint: Option<&str>,
        model: Option<&str>,
        body: Option<JsonB>,
        answer_format: Option<JsonB>,
        job: Option<&str>,
    ) -> Option<String> {
        let problem = (|| {
            let endpoint = Endpoint::parse(endpoint.unwrap_or_default())?;
            if let Some(job) = job {
                request::check_job(job)?;
            }
            let body = body.map(|b| b.0).unwrap_or_default();
            let body_model = request::validate_body(&body, "body")?;
            request::check_for_endpoint(endpoint, &body, "body")?;
            if Some(body_model) != model {
                return Err(request::RequestError::new(
                    "model",
                    "must equal the body's \"model\"",
                ));
            }
            request::check_size(
                body.to_string().len(),
                config::batch_limits().max_bytes,
                "body",
            )?;
            if let Some(format) = answer_format {
                AnswerFormat::from_json(&format.0).ok_or_else(|| {
                    request::RequestError::new(
                        "answer_format",
                        "must be {\"type\": \"json\"} or {\"type\": \"label\", \"labels\": [...]} with at least one label",
                    )
                })?;
            }
            Ok(())
        })();
        problem.err().map(|e| e.to_string())
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use pgrx::JsonB;
    use serde_json::json;

    fn body_of(id: i64) -> serde_json::Value {
        Spi::get_one_with_args::<JsonB>(
            "SELECT body FROM llmbatching.requests WHERE id = $1",
            &[id.into()],
        )
        .unwrap()
        .unwrap()
        .0
    }

    #[pg_test]
    fn submit_queues_a_responses_request() {
        let id = Spi::get_one::<i64>("SELECT llm_submit('gpt-4o-mini', 'Classify: great')")
            .unwrap()
            .unwrap();
        assert_eq!(
            body_of(id),
            json!({"model": "gpt-4o-mini", "input": "Classify: great"})
        );
        let status =
            Spi::get_one_with_args::<String>("SELECT llm_status($1)", &[id.into()]).unwrap();
        assert_eq!(status.as_deref(), Some("queued"));
        let result =
            Spi::get_one_with_args::<String>("SELECT llm_result($1)", &[id.into()]).unwrap();
        assert_eq!(result, None);
    }

    #[pg_test]
    fn submit_builds_chat_and_embedding_bodies_with_options() {
        let chat = Spi::get_one::<i64>(
            "SELECT llm_submit('gpt-4o', 'hi', 'be terse', '{\"temperature\": 0}', '/v1/chat/completions')",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            body_of(chat),
            json!({"model": "gpt-4o", "temperature": 0, "messages": [
                {"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}]})
        );
        let emb = Spi::get_one::<i64>(
            "SELECT llm_submit('text-embedding-3-small', 'hi', endpoint => '/v1/embeddings')",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            body_of(emb),
            json!({"model": "text-embedding-3-small", "input": "hi"})
        );
    }

    #[pg_test]
    fn submit_body_takes_a_whole_body() {
        let id = Spi::get_one::<i64>(
            "SELECT llm_submit_body('{\"model\": \"m\", \"input\": [{\"role\": \"user\", \"content\": \"x\"}]}')",
        )
        .unwrap()
        .unwrap();
        assert_eq!(body_of(id)["input"][0]["content"], "x");
        let model = Spi::get_one_with_args::<String>(
            "SELECT model FROM llmbatching.requests WHERE id = $1",
            &[id.into()],
        );
        assert_eq!(model.unwrap().as_deref(), Some("m"));
    }

    #[pg_test]
    fn cancel_only_cancels_queued_requests() {
        let id = Spi::get_one::<i64>("SELECT llm_submit('m', 'x')")
            .unwrap()
            .unwrap();
        assert_eq!(
            Spi::get_one_with_args::<bool>("SELECT llm_cancel($1)", &[id.into()]).unwrap(),
            Some(true)
        );
        assert_eq!(
            Spi::get_one_with_args::<bool>("SELECT llm_cancel($1)", &[id.into()]).unwrap(),
            Some(false)
        );
        let status =
            Spi::get_one_with_args::<String>("SELECT llm_status($1)", &[id.into()]).unwrap();
        assert_eq!(status.as_deref(), Some("cancelled"));
        assert_eq!(
            Spi::get_one::<bool>("SELECT llm_cancel(-1)").unwrap(),
            Some(false)
        );
        assert_eq!(
            Spi::get_one::<String>("SELECT llm_status(-1)").unwrap(),
            None
        );
    }

    #[pg_test(error = "invalid argument \"model\": must not be NULL")]
    fn a_null_model_is_refused() {
        Spi::run("SELECT llm_submit(NULL, 'x')").unwrap();
    }

    #[pg_test(
        error = "invalid argument \"options\": may not set \"stream\"; batch requests cannot stream"
    )]
    fn streaming_is_refused() {
        Spi::run("SELECT llm_submit('m', 'x', options => '{\"stream\": true}')").unwrap();
    }
}
