//! Settings (`llmbatching.*`), registered when the library loads.

use crate::planner::{BatchLimits, PROVIDER_MAX_BYTES, PROVIDER_MAX_REQUESTS};
use pgrx::{pg_sys, GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::ffi::CString;
use std::time::Duration;

static API_BASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"https://api.openai.com/v1"));
static API_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static DEFAULT_PROVIDER: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"openai"));
static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static BATCH_WAIT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
static BATCH_MAX_REQUESTS: GucSetting<i32> = GucSetting::<i32>::new(PROVIDER_MAX_REQUESTS as i32);
static BATCH_MAX_BYTES: GucSetting<i32> = GucSetting::<i32>::new(PROVIDER_MAX_BYTES as i32);
static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(3);
static MAX_BATCHES_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(100);
static MAX_ENQUEUED_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(0);
static TOKEN_LIMIT_PAUSE_MS: GucSetting<i32> = GucSetting::<i32>::new(10 * 60 * 1000);
static MAX_BATCHES_PER_ROLE: GucSetting<i32> = GucSetting::<i32>::new(50);
static WRITE_BACK_LOCK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static WRITE_BACK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
static TRANSFER_IDLE_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
static MAX_CONCURRENT_TRANSFERS: GucSetting<i32> = GucSetting::<i32>::new(4);
static RESULT_RETRY_WINDOW_S: GucSetting<i32> = GucSetting::<i32>::new(24 * 3600);
static BATCH_DEADLINE_S: GucSetting<i32> = GucSetting::<i32>::new(25 * 3600);
static DELETE_PROVIDER_FILES: GucSetting<bool> = GucSetting::<bool>::new(true);
static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(0);
static REUSE_ANSWERS: GucSetting<ReuseAnswers> =
    GucSetting::<ReuseAnswers>::new(ReuseAnswers::Deterministic);
static REUSE_MAX_AGE_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 3600);

/// When an identical request's earlier answer is reused instead of sending the request again.
/// `llm_submit` and the insert trigger (for direct INSERTs) read it.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ReuseAnswers {
    #[name = c"off"]
    Off,
    /// Only requests that give the same answer every time (embeddings, moderations, temperature 0).
    #[name = c"deterministic"]
    Deterministic,
    #[name = c"always"]
    Always,
}

/// Registers the settings. `preloading`: the library is being loaded at server start; the
/// launcher's setting (`llmbatching.database`) means something only then.
///
/// The worker's settings are `SUSET`: besides postgresql.conf, a superuser may set them for one
/// database (`ALTER DATABASE … SET`), which that database's worker reads when it starts.
pub fn register(preloading: bool) {
    if preloading {
        GucRegistry::define_string_guc(
            c"llmbatching.database",
            c"Databases the launcher starts workers for: a comma-separated list of names, or empty for every database.",
            c"The launcher starts a worker for each database that has the extension installed, allows connections and is no template; this setting leaves out the databases it does not name.",
            &DATABASE,
            GucContext::Sighup,
            GucFlags::default(),
        );
    }
    GucRegistry::define_string_guc(
        c"llmbatching.default_provider",
        c"The provider (a foreign server of the llmbatching wrapper) a submit function uses when its provider argument is NULL.",
        c"The extension creates the server openai; CREATE SERVER adds others.",
        &DEFAULT_PROVIDER,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"llmbatching.api_base",
        c"Base URL of the API of the server openai, when the server does not name one.",
        c"The worker sends that server's Files and Batches calls here, for example https://api.openai.com/v1.",
        &API_BASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"llmbatching.api_key_file",
        c"File holding the API key, used when llmbatching.api_key is empty.",
        c"It must belong to the server's OS user and be readable by it alone (mode 0600 or 0400); a relative path is relative to the data directory. Without it, the worker uses OPENAI_API_KEY from the server's environment.",
        &API_KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_int_guc(
        c"llmbatching.batch_wait",
        c"How long the oldest queued request waits for more before a batch is sent.",
        c"A batch is sent as soon as it is full, or once its oldest request has waited this long.",
        &BATCH_WAIT_MS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"llmbatching.poll_interval",
        c"How often the worker asks the provider about each submitted batch.",
        c"The provider asks for no more than about one poll a minute per batch.",
        &POLL_INTERVAL_MS,
        10,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"llmbatching.batch_max_requests",
        c"Most requests in one batch.",
        c"Each provider's own limit applies too (OpenAI 50000, Azure OpenAI and Anthropic 100000).",
        &BATCH_MAX_REQUESTS,
        1,
        PROVIDER_MAX_REQUESTS as i32,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"llmbatching.batch_max_bytes",
        c"Largest batch input file.",
        c"Each provider's own limit applies too (OpenAI and Azure OpenAI 200MB, Anthropic 256MB). A request larger than this is refused at submit time.",
        &BATCH_MAX_BYTES,
        1024,
        PROVIDER_MAX_BYTES as i32,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"llmbatching.max_attempts",
        c"How many batches a request may be sent in before it is failed.",
        c"A request that did not run (its batch expired, was cancelled or failed validation) is queued again until it has been sent this many times.",
        &MAX_ATTEMPTS,
        1,
        100,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"llmbatching.max_batches_in_flight",
        c"Most batches open at once (being sent, at the provider, or being read back).",
        c"New batches wait while this many are open.",
        &MAX_BATCHES_IN_FLIGHT,
        1,
        100_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"llmbatching.max_batches_per_role",
        c"Most open batches carrying any one role's requests; 0 means no cap below llmbatching.max_batches_in_flight.",
        c"A role with a large backlog then leaves batch slots for the others. Each batch also takes the queued requests of every waiting role in turn.",
        &MAX_BATCHES_PER_ROLE,
        0,
        100_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"llmbatching.write_back_lock_timeout",
        c"Longest a write-back waits for a lock on its target table or row.",
        c"A target another transaction holds locked is tried again later (outcome 'waiting: ...'); the other roles' write-backs go on meanwhile.",
        &WRITE_BACK_LOCK_TIMEOUT_MS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"llmbatching.write_back_timeout",
        c"Longest one write-back (one role's answers into one column, with the table's triggers) may take.",
        c"A write-back that takes longer is rolled back and tried again later, and given up after 5 tries.",
        &WRITE_BACK_TIMEOUT_MS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"llmbatching.transfer_idle_timeout",
        c"A call to the provider fails when no byte of it arrives for this long.",
        c"Covers connecting, the answer's headers and every part of a download or upload: a stalled transfer is given up and tried again later.",
        &TRANSFER_IDLE_TIMEOUT_MS,
        100,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"llmbatching.max_concurrent_transfers",
        c"Most batch steps waiting on the provider at once (uploads, downloads, polls).",
        c"Each runs beside the worker, so a slow or stalled transfer holds up only its own batch.",
        &MAX_CONCURRENT_TRANSFERS,
        1,
        64,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"llmbatching.batch_deadline",
        c"A batch not ended this long after it was created at the provider is cancelled there.",
        c"The provider's completion window (24 hours) plus a grace period: a batch stuck in validating or finalizing past it is cancelled and handled like an expired one (answers that arrived are kept, the rest queued again).",
        &BATCH_DEADLINE_S,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"llmbatching.result_retry_window",
        c"How long after a batch ended its result files are asked for again while they cannot be read whole.",
        c"Until then, a download that fails, is cut short or holds unreadable lines is retried with backoff (nothing is sent again, no attempt is used); after it, requests the files did not settle are queued again.",
        &RESULT_RETRY_WINDOW_S,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"llmbatching.max_enqueued_tokens",
        c"Per-model cap on prompt tokens enqueued at the provider at once; 0 means no cap.",
        c"Estimated before sending (about 4 bytes of request per token), so batches stay under the provider's enqueued-token limit. llmbatching.model_limits overrides it per model.",
        &MAX_ENQUEUED_TOKENS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"llmbatching.token_limit_pause",
        c"How long a model's new batches wait after the provider refused one for its enqueued-token limit.",
        c"The refused batch's requests go back to the queue without using up an attempt.",
        &TOKEN_LIMIT_PAUSE_MS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"llmbatching.delete_provider_files",
        c"Delete a batch's input, output and error files at the provider once it is read back.",
        c"Turn off to keep them (the provider deletes them after 30 days by default).",
        &DELETE_PROVIDER_FILES,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"llmbatching.retention",
        c"Finished requests and batches older than this are deleted; 0 keeps everything.",
        c"Counts from when a request completed, failed or was cancelled.",
        &RETENTION_S,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_enum_guc(
        c"llmbatching.reuse_answers",
        c"Reuse the answer of an identical completed request: off, deterministic or always.",
        c"deterministic reuses only answers of requests that give the same answer every time (embeddings, moderations, temperature 0). llm_submit's reuse argument overrides it per request.",
        &REUSE_ANSWERS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"llmbatching.reuse_max_age",
        c"Oldest answer that may be reused.",
        c"An identical request completed longer ago than this is sent again.",
        &REUSE_MAX_AGE_S,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    warn_of_a_key_setting();
    unsafe { pg_sys::MarkGUCPrefixReserved(c"llmbatching".as_ptr()) };
}

/// The key is no setting: any setting can be read by members of pg_read_all_settings, and a
/// changed setting's value is written to the server log on reload. One left in postgresql.conf
/// from an earlier version is named (never shown) and ignored.
fn warn_of_a_key_setting() {
    // SAFETY: a lookup by name; `missing_ok`, and no privilege check while loading.
    let set =
        unsafe { !pg_sys::GetConfigOption(c"llmbatching.api_key".as_ptr(), true, false).is_null() };
    if set {
        pgrx::warning!(
            "llmbatching.api_key is not read: a setting is visible to pg_read_all_settings and logged when it changes. \
             Put the key in a file only the server's OS user can read and name it in llmbatching.api_key_file, \
             or set OPENAI_API_KEY in the server's environment; then remove llmbatching.api_key from the configuration"
        );
    }
}

fn string(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .and_then(|s| s.into_string().ok())
        .filter(|s| !s.is_empty())
}

fn millis(setting: &GucSetting<i32>) -> Duration {
    Duration::from_millis(setting.get().max(0) as u64)
}

/// llmbatching.default_provider, as the current session has it.
pub fn default_provider() -> String {
    string(&DEFAULT_PROVIDER).unwrap_or_else(|| "openai".into())
}

/// llmbatching.api_base: where the server openai is, unless its options say.
pub fn api_base() -> String {
    string(&API_BASE).unwrap_or_default()
}

/// llmbatching.database as written (empty: every database).
pub fn database() -> String {
    string(&DATABASE).unwrap_or_default()
}

/// The databases `llmbatching.database` names, or None for every database.
pub fn database_restriction() -> Option<Vec<String>> {
    let names: Vec<String> = database()
        .split(',')
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .collect();
    (!names.is_empty()).then_some(names)
}

/// Whether the launcher may serve the database of this name.
pub fn serves_database(name: &str) -> bool {
    database_restriction().is_none_or(|names| names.iter().any(|n| n == name))
}

/// The settings the worker acts on, read once per round so a reload applies between rounds.
#[derive(Clone, Debug)]
pub struct Settings {
    pub batch_wait: Duration,
    pub poll_interval: Duration,
    pub limits: BatchLimits,
    pub max_attempts: i32,
    pub max_batches_in_flight: i64,
    /// The cap on open batches carrying one role's requests (0: none).
    pub max_batches_per_role: i64,
    pub write_back: crate::restricted::Bounds,
    /// A provider call fails after this long without a byte.
    pub transfer_idle_timeout: Duration,
    /// Most batch steps whose provider calls are under way at once.
    pub max_concurrent_transfers: usize,
    /// How long after a batch ended its result files are asked for again.
    pub result_retry_window: Duration,
    /// A batch not ended this long after its creation is cancelled at the provider.
    pub batch_deadline: Duration,
    /// The default per-model cap on enqueued prompt tokens, if any.
    pub max_enqueued_tokens: Option<i64>,
    pub token_limit_pause: Duration,
    pub delete_provider_files: bool,
    pub retention: Option<Duration>,
}

impl Settings {
    pub fn current() -> Settings {
        Settings {
            batch_wait: millis(&BATCH_WAIT_MS),
            poll_interval: millis(&POLL_INTERVAL_MS),
            limits: batch_limits(),
            max_attempts: MAX_ATTEMPTS.get(),
            max_batches_in_flight: MAX_BATCHES_IN_FLIGHT.get() as i64,
            max_batches_per_role: MAX_BATCHES_PER_ROLE.get() as i64,
            transfer_idle_timeout: millis(&TRANSFER_IDLE_TIMEOUT_MS),
            max_concurrent_transfers: MAX_CONCURRENT_TRANSFERS.get().max(1) as usize,
            result_retry_window: Duration::from_secs(RESULT_RETRY_WINDOW_S.get().max(0) as u64),
            batch_deadline: Duration::from_secs(BATCH_DEADLINE_S.get().max(1) as u64),
            write_back: crate::restricted::Bounds {
                lock_timeout: millis(&WRITE_BACK_LOCK_TIMEOUT_MS),
                time_limit: millis(&WRITE_BACK_TIMEOUT_MS),
            },
            max_enqueued_tokens: Some(MAX_ENQUEUED_TOKENS.get() as i64).filter(|t| *t > 0),
            token_limit_pause: millis(&TOKEN_LIMIT_PAUSE_MS),
            delete_provider_files: DELETE_PROVIDER_FILES.get(),
            retention: Some(Duration::from_secs(RETENTION_S.get().max(0) as u64))
                .filter(|d| !d.is_zero()),
        }
    }
}

/// llmbatching.reuse_answers, as the current session has it.
pub fn reuse_answers() -> ReuseAnswers {
    REUSE_ANSWERS.get()
}

/// llmbatching.reuse_max_age, as the current session has it.
pub fn reuse_max_age() -> Duration {
    Duration::from_secs(REUSE_MAX_AGE_S.get().max(0) as u64)
}

pub fn batch_limits() -> BatchLimits {
    BatchLimits {
        max_requests: BATCH_MAX_REQUESTS
            .get()
            .clamp(1, PROVIDER_MAX_REQUESTS as i32) as usize,
        max_bytes: BATCH_MAX_BYTES.get().clamp(1024, PROVIDER_MAX_BYTES as i32) as usize,
    }
}

/// The API key: from the key file, else `OPENAI_API_KEY` from the server's environment. Never
/// a setting, never logged or shown. `Err` says why a configured key file was not used.
pub fn api_key() -> Result<Option<String>, String> {
    if let Some(path) = string(&API_KEY_FILE) {
        return read_key_file(std::path::Path::new(&path)).map(Some);
    }
    Ok(std::env::var("OPENAI_API_KEY")
        .ok()
        .filter(|k| !k.is_empty()))
}

/// Reads a key file that only the server's OS user can read: it must belong to the owner of
/// the data directory (the worker's working directory) and grant nothing to group or others.
fn read_key_file(path: &std::path::Path) -> Result<String, String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let problem = |what: String| format!("llmbatching.api_key_file {}: {what}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| problem(e.to_string()))?;
    let server_uid = std::fs::metadata(".")
        .map_err(|e| problem(e.to_string()))?
        .uid();
    if !meta.is_file() || meta.uid() != server_uid {
        return Err(problem(
            "must be a file owned by the server's OS user".into(),
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(problem(
            "must not be readable by group or others (chmod 600)".into(),
        ));
    }
    let key = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(problem("is empty".into()));
    }
    Ok(key.to_owned())
}
