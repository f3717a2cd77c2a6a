//! How `llm_submit` writes a checked request into llmbatching.requests: straight into the heap
//! and its indexes, the way COPY writes rows, rather than one INSERT statement per call.
//! `SELECT llm_submit(...) FROM big_table` calls the function once per row, and planning and
//! starting an INSERT costs several times more than writing the row itself.
//!
//! What the table's insert triggers do for a direct INSERT is done here instead: the request was
//! checked by its caller (`check_request`), and an identical request to wait on, or an earlier
//! answer to reuse, is looked up through the `requests_hash` index (`dedupe_request`, with the
//! same rules). The row is then checked against the table's constraints and entered into every
//! index. Should the table ever carry insert triggers of someone else's, or not be a heap table,
//! [`insert`] returns `None` and the caller uses a plain INSERT, so those triggers run.
//!
//! The prepared state (column numbers, the index list with compiled partial-index predicates and
//! constraint expressions) lives in the calling expression's `fn_extra`: it is built on the
//! first call of a statement and reused for every row of it.

use crate::config::{self, ReuseAnswers};
use pgrx::prelude::*;
use pgrx::{direct_function_call_as_datum, pg_sys, IntoDatum, PgMemoryContexts};
use sha2::{Digest, Sha256};
use std::ffi::{CStr, CString};

/// A request ready to be queued: checked, with its body serialized.
pub struct NewRequest<'a> {
    /// The provider (a server) and the account whose key it goes under (see `servers::Route`).
    pub provider: &'a str,
    pub account: &'a str,
    pub endpoint: &'a str,
    pub model: &'a str,
    pub body_json: &'a str,
    /// Whether the request gives the same answer every time (see `is_deterministic` in SQL).
    pub deterministic: bool,
    pub job: Option<&'a str>,
    pub answer_format_json: Option<&'a str>,
    pub reuse: Option<bool>,
}

/// Declares `Col` and `COLUMNS` from one list, so that `COLUMNS[col as usize]` is always the
/// column's name.
macro_rules! columns {
    ($($name:ident),* $(,)?) => {
        /// A column of llmbatching.requests; its number is its place in [`COLUMNS`].
        #[allow(non_camel_case_types, dead_code)]
        #[derive(Clone, Copy)]
        enum Col {
            $($name),*
        }

        /// Every column of llmbatching.requests, by name; resolved to attribute numbers per
        /// statement.
        const COLUMNS: &[&str] = &[$(stringify!($name)),*];
    };
}

columns!(
    id,
    state,
    provider,
    account,
    endpoint,
    model,
    body,
    body_bytes,
    batch_id,
    attempts,
    response,
    result_text,
    result_json,
    answer_format,
    job,
    error,
    input_tokens,
    cached_tokens,
    output_tokens,
    reasoning_tokens,
    request_hash,
    reuse,
    reused_from,
    submitted_by,
    created_at,
    queued_at,
    submitted_at,
    finished_at,
);

/// Columns an identical earlier answer lends to a request that reuses it.
const REUSED_COLUMNS: [Col; 7] = [
    Col::response,
    Col::result_text,
    Col::result_json,
    Col::input_tokens,
    Col::cached_tokens,
    Col::output_tokens,
    Col::reasoning_tokens,
];

/// Insert triggers this module stands in for; any other one makes it step aside.
const OWN_TRIGGERS: [&str; 2] = ["check_request", "dedupe_request"];

/// The row-level security policy this module keeps (it writes only the caller's own queued
/// rows); any other policy for inserts makes it step aside, so the policy applies.
const OWN_INSERT_POLICY: &str = "submit_own";

/// Columns an INSERT by `llm_submit` names: the caller needs INSERT on each of them.
const INSERTED_COLUMNS: [Col; 7] = [
    Col::provider,
    Col::endpoint,
    Col::model,
    Col::body,
    Col::job,
    Col::answer_format,
    Col::reuse,
];

/// Per call site: valid for one command of one (sub)transaction, which holds the locks taken
/// when it was built, so later rows open the table and its indexes without locking again.
struct CallSite {
    scope: Scope,
    prepared: Option<Prepared>,
}

#[derive(PartialEq, Eq, Clone, Copy)]
struct Scope {
    local_xid: pg_sys::LocalTransactionId,
    subtransaction: pg_sys::SubTransactionId,
    command_id: pg_sys::CommandId,
}

/// This backend's local transaction id (a field that moved in PostgreSQL 17).
unsafe fn local_transaction_id() -> pg_sys::LocalTransactionId {
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    {
        (*pg_sys::MyProc).lxid
    }
    #[cfg(not(any(feature = "pg15", feature = "pg16")))]
    {
        (*pg_sys::MyProc).vxid.lxid
    }
}

impl Scope {
    unsafe fn current() -> Scope {
        Scope {
            local_xid: local_transaction_id(),
            subtransaction: pg_sys::GetCurrentSubTransactionId(),
            command_id: pg_sys::GetCurrentCommandId(false),
        }
    }
}

/// What every row of a statement shares.
struct Prepared {
    table: pg_sys::Oid,
    sequence: pg_sys::Oid,
    estate: *mut pg_sys::EState,
    result_rel: *mut pg_sys::ResultRelInfo,
    index_oids: Vec<pg_sys::Oid>,
    /// Position of `requests_hash` among the result relation's indexes.
    hash_index: usize,
    /// Attribute number (1-based) of each of [`COLUMNS`].
    attnums: [i16; COLUMNS.len()],
    natts: usize,
    /// A private copy of the row type, for slots that outlive one call.
    tupdesc: pg_sys::TupleDesc,
    scan_slot: *mut pg_sys::TupleTableSlot,
    insert_slot: *mut pg_sys::TupleTableSlot,
}

unsafe extern "C-unwind" {
    // Not in pgrx's bindings; `check_permissions = false` is how an identity column's default
    // takes its value (the caller needs no privilege on the sequence).
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// The next id from the table's identity sequence.
unsafe fn next_id(sequence: pg_sys::Oid) -> i64 {
    // Postgres errors (a sequence at its end) become Rust panics here, as for pgrx's own bindings.
    pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| nextval_internal(sequence, false))
}

/// Writes the request as a new row; returns its id, or `None` when a plain INSERT must be used.
pub fn insert(fcinfo: pg_sys::FunctionCallInfo, request: &NewRequest) -> Option<i64> {
    unsafe {
        pg_sys::PreventCommandIfReadOnly(c"llm_submit()".as_ptr());
        let prepared = call_site(fcinfo).prepared.as_mut()?;
        Some(prepared.insert_row(request))
    }
}

/// The call site's state, built on its first call in this command.
unsafe fn call_site(fcinfo: pg_sys::FunctionCallInfo) -> &'static mut CallSite {
    let flinfo = (*fcinfo).flinfo;
    let scope = Scope::current();
    let existing = (*flinfo).fn_extra as *mut CallSite;
    if !existing.is_null() && (*existing).scope == scope {
        return &mut *existing;
    }
    let memory = (*flinfo).fn_mcxt;
    let prepared = PgMemoryContexts::For(memory).switch_to(|_| Prepared::new());
    if !existing.is_null() {
        // A call site that outlives its command (a PL/pgSQL expression in a loop) is rebuilt
        // in place; the old state's memory goes now rather than with the function's context.
        if let Some(old) = (*existing).prepared.take() {
            old.release();
        }
        *existing = CallSite { scope, prepared };
        return &mut *existing;
    }
    let site = PgMemoryContexts::For(memory).leak_and_drop_on_delete(CallSite { scope, prepared });
    (*flinfo).fn_extra = site.cast();
    &mut *site
}

unsafe fn name_of(ptr: *const std::ffi::c_char) -> &'static str {
    CStr::from_ptr(ptr).to_str().unwrap_or("")
}

/// Whether every insert trigger on the table is one this module stands in for, or internal
/// (a foreign key check: the table has none of its own, and a new row references nothing).
unsafe fn only_own_insert_triggers(rel: pg_sys::Relation) -> bool {
    let trigdesc = (*rel).trigdesc;
    if trigdesc.is_null() {
        return true;
    }
    let triggers =
        std::slice::from_raw_parts((*trigdesc).triggers, (*trigdesc).numtriggers as usize);
    triggers.iter().all(|t| {
        (t.tgtype as u32 & pg_sys::TRIGGER_TYPE_INSERT) == 0
            || t.tgisinternal
            || OWN_TRIGGERS.contains(&name_of(t.tgname))
    })
}

/// Whether the table's row-level security, if on, has no policy for inserts but the one that
/// ships with it (an administrator may add a restrictive one, or change it).
unsafe fn only_own_insert_policies(rel: pg_sys::Relation) -> bool {
    if !(*(*rel).rd_rel).relrowsecurity {
        return true;
    }
    let rsdesc = (*rel).rd_rsdesc;
    if rsdesc.is_null() {
        return true;
    }
    let policies = pgrx::PgList::<pg_sys::RowSecurityPolicy>::from_pg((*rsdesc).policies);
    let own = policies.iter_ptr().all(|p| {
        let applies_to_insert = matches!((*p).polcmd as u8, b'a' | b'*');
        !applies_to_insert || name_of((*p).policy_name) == OWN_INSERT_POLICY
    });
    own
}

/// Whether the current user holds INSERT on the table, or on every column `llm_submit` fills;
/// when not, the plain INSERT reports the refusal.
unsafe fn may_insert(table: pg_sys::Oid, attnums: &[i16; COLUMNS.len()]) -> bool {
    let user = pg_sys::GetUserId();
    if pg_sys::pg_class_aclcheck(table, user, pg_sys::ACL_INSERT as pg_sys::AclMode)
        == pg_sys::AclResult::ACLCHECK_OK
    {
        return true;
    }
    INSERTED_COLUMNS.iter().all(|col| {
        pg_sys::pg_attribute_aclcheck(
            table,
            attnums[*col as usize],
            user,
            pg_sys::ACL_INSERT as pg_sys::AclMode,
        ) == pg_sys::AclResult::ACLCHECK_OK
    })
}

impl Prepared {
    /// Opens the table once to learn its shape, indexes and constraints; `None` if rows must go
    /// through a plain INSERT. Runs in the call site's memory context.
    unsafe fn new() -> Option<Prepared> {
        let schema = pg_sys::get_namespace_oid(c"llmbatching".as_ptr(), false);
        let table = pg_sys::get_relname_relid(c"requests".as_ptr(), schema);
        let rel = pg_sys::table_open(table, pg_sys::RowExclusiveLock as i32);
        let prepared = Self::from_open_table(rel);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        prepared
    }

    unsafe fn from_open_table(rel: pg_sys::Relation) -> Option<Prepared> {
        let form = (*rel).rd_rel;
        if (*form).relkind != pg_sys::RELKIND_RELATION as i8
            || (*form).relam != pg_sys::HEAP_TABLE_AM_OID
            || !only_own_insert_triggers(rel)
            || !only_own_insert_policies(rel)
        {
            return None;
        }
        let tupdesc = pg_sys::CreateTupleDescCopy((*rel).rd_att);
        let natts = (*tupdesc).natts as usize;
        let mut attnums = [0i16; COLUMNS.len()];
        // Attributes are read through pgrx, which knows where each version keeps them.
        let attributes = pgrx::PgTupleDesc::from_pg_unchecked(tupdesc);
        for i in 0..natts {
            let Some(att) = attributes.get(i) else {
                return None;
            };
            if att.attisdropped {
                continue;
            }
            match COLUMNS
                .iter()
                .position(|c| *c == name_of(att.attname.data.as_ptr()))
            {
                Some(k) => attnums[k] = (i + 1) as i16,
                // A column this module does not know: only a plain INSERT gives it its default.
                None => return None,
            }
        }
        if attnums.contains(&0) || !may_insert((*rel).rd_id, &attnums) {
            return None;
        }
        // The identity column's sequence: asked by relation oid up to PostgreSQL 16, by relation
        // from 17 on.
        #[cfg(any(feature = "pg15", feature = "pg16"))]
        let sequence = pg_sys::getIdentitySequence((*rel).rd_id, attnums[Col::id as usize], false);
        #[cfg(not(any(feature = "pg15", feature = "pg16")))]
        let sequence = pg_sys::getIdentitySequence(rel, attnums[Col::id as usize], false);

        let estate = pg_sys::CreateExecutorState();
        pg_sys::MakePerTupleExprContext(estate);
        let result_rel = PgMemoryContexts::For((*estate).es_query_cxt).switch_to(|_| {
            let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
                as *mut pg_sys::ResultRelInfo;
            (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
            pg_sys::InitResultRelInfo(rri, rel, 0, std::ptr::null_mut(), 0);
            pg_sys::ExecOpenIndices(rri, false);
            rri
        });
        let count = (*result_rel).ri_NumIndices as usize;
        let descs = std::slice::from_raw_parts((*result_rel).ri_IndexRelationDescs, count);
        let index_oids: Vec<pg_sys::Oid> = descs.iter().map(|d| (**d).rd_id).collect();
        let hash_index = descs
            .iter()
            .position(|d| name_of((*(**d).rd_rel).relname.data.as_ptr()) == "requests_hash");
        // Keep the compiled index information and the locks; the relations are opened per row.
        for d in descs {
            pg_sys::index_close(*d, pg_sys::NoLock as i32);
        }
        let hash_index = hash_index?;
        let scan_slot =
            pg_sys::MakeSingleTupleTableSlot(tupdesc, pg_sys::table_slot_callbacks(rel));
        let insert_slot = pg_sys::MakeSingleTupleTableSlot(tupdesc, &pg_sys::TTSOpsHeapTuple);
        Some(Prepared {
            table: (*rel).rd_id,
            sequence,
            estate,
            result_rel,
            index_oids,
            hash_index,
            attnums,
            natts,
            tupdesc,
            scan_slot,
            insert_slot,
        })
    }

    /// Frees what `new` allocated. (Not a `Drop`: when the call site's memory context goes, the
    /// executor state, its child context, is already gone.)
    unsafe fn release(self) {
        pg_sys::ExecDropSingleTupleTableSlot(self.scan_slot);
        pg_sys::ExecDropSingleTupleTableSlot(self.insert_slot);
        pg_sys::FreeExecutorState(self.estate);
        pg_sys::FreeTupleDesc(self.tupdesc);
    }

    fn attnum(&self, col: Col) -> usize {
        self.attnums[col as usize] as usize
    }

    /// Opens the table and its indexes for this row (their locks were taken when the call site
    /// was built, in this same subtransaction), writes the row, closes them.
    unsafe fn insert_row(&mut self, request: &NewRequest) -> i64 {
        let per_row = (*(*self.estate).es_per_tuple_exprcontext).ecxt_per_tuple_memory;
        let rel = pg_sys::table_open(self.table, pg_sys::NoLock as i32);
        (*self.result_rel).ri_RelationDesc = rel;
        for (i, oid) in self.index_oids.iter().enumerate() {
            *(*self.result_rel).ri_IndexRelationDescs.add(i) =
                pg_sys::index_open(*oid, pg_sys::NoLock as i32);
        }
        let id = PgMemoryContexts::For(per_row).switch_to(|_| self.write(rel, request));
        for i in 0..self.index_oids.len() {
            pg_sys::index_close(
                *(*self.result_rel).ri_IndexRelationDescs.add(i),
                pg_sys::NoLock as i32,
            );
        }
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        pg_sys::MemoryContextReset(per_row);
        id
    }

    unsafe fn write(&mut self, rel: pg_sys::Relation, request: &NewRequest) -> i64 {
        let body = jsonb_from_text(request.body_json);
        // The hash and size are those of the body as Postgres prints it (keys in jsonb's order),
        // the same text the dedupe trigger hashes for a direct INSERT.
        let canonical = direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(body)])
            .expect("jsonb_out returns a value");
        let canonical = CStr::from_ptr(canonical.cast_mut_ptr::<std::ffi::c_char>()).to_bytes();
        let hash: Vec<u8> = Sha256::new()
            .chain_update(request.provider.as_bytes())
            .chain_update(b" ")
            .chain_update(request.endpoint.as_bytes())
            .chain_update(b" ")
            .chain_update(canonical)
            .finalize()
            .to_vec();
        let user = pg_sys::GetUserNameFromId(pg_sys::GetUserId(), false);
        let user =
            direct_function_call_as_datum(pg_sys::namein, &[Some(pg_sys::Datum::from(user))])
                .expect("namein returns a value");
        let hash_datum = hash.as_slice().into_datum().expect("bytea");
        let now = pg_sys::GetCurrentTransactionStartTimestamp();

        let mut values = vec![pg_sys::Datum::from(0usize); self.natts];
        let mut nulls = vec![true; self.natts];
        let attnums = self.attnums;
        let mut set = |col: Col, value: Option<pg_sys::Datum>| {
            let at = attnums[col as usize] as usize - 1;
            nulls[at] = value.is_none();
            values[at] = value.unwrap_or(pg_sys::Datum::from(0usize));
        };
        let id = next_id(self.sequence);
        set(Col::id, id.into_datum());
        set(Col::state, "queued".into_datum());
        set(Col::provider, request.provider.into_datum());
        set(Col::account, request.account.into_datum());
        set(Col::endpoint, request.endpoint.into_datum());
        set(Col::model, request.model.into_datum());
        set(Col::body, Some(body));
        set(Col::body_bytes, (canonical.len() as i32).into_datum());
        set(Col::attempts, 0i32.into_datum());
        set(
            Col::answer_format,
            request.answer_format_json.map(|f| jsonb_from_text(f)),
        );
        set(Col::job, request.job.into_datum());
        set(Col::request_hash, Some(hash_datum));
        set(Col::reuse, request.reuse.into_datum());
        set(Col::submitted_by, Some(user));
        set(Col::created_at, Some(pg_sys::Datum::from(now)));
        set(Col::queued_at, Some(pg_sys::Datum::from(now)));

        match self.find_identical(rel, hash_datum, &hash, user, reuse_applies(request), now) {
            Identical::None => {}
            Identical::InFlight(leader) => set(Col::reused_from, leader.into_datum()),
            Identical::Answered(source, tuple) => {
                let mut src_values = vec![pg_sys::Datum::from(0usize); self.natts];
                let mut src_nulls = vec![true; self.natts];
                pg_sys::heap_deform_tuple(
                    tuple,
                    self.tupdesc,
                    src_values.as_mut_ptr(),
                    src_nulls.as_mut_ptr(),
                );
                for col in REUSED_COLUMNS {
                    let at = self.attnum(col) - 1;
                    set(col, (!src_nulls[at]).then_some(src_values[at]));
                }
                set(Col::state, "completed".into_datum());
                set(Col::reused_from, source.into_datum());
                set(Col::finished_at, Some(pg_sys::Datum::from(now)));
            }
        }

        let tuple = pg_sys::heap_form_tuple(self.tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let slot = pg_sys::ExecStoreHeapTuple(tuple, self.insert_slot, false);
        (*slot).tts_tableOid = self.table;
        if !(*(*rel).rd_att).constr.is_null() {
            pg_sys::ExecConstraints(self.result_rel, slot, self.estate);
        }
        pg_sys::heap_insert(
            rel,
            tuple,
            pg_sys::GetCurrentCommandId(true),
            0,
            std::ptr::null_mut(),
        );
        (*slot).tts_tid = (*tuple).t_self;
        // PostgreSQL 16 added `onlySummarizing` (false: every index gets its entry).
        #[cfg(feature = "pg15")]
        pg_sys::ExecInsertIndexTuples(
            self.result_rel,
            slot,
            self.estate,
            false,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        #[cfg(not(feature = "pg15"))]
        pg_sys::ExecInsertIndexTuples(
            self.result_rel,
            slot,
            self.estate,
            false,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            false,
        );
        clear_slot(slot);
        id
    }

    /// The identical request (same hash, same role) this one should wait on, else, when reuse
    /// applies, the newest identical answer young enough to reuse. `SnapshotSelf` sees committed
    /// rows and this statement's own earlier rows, as the trigger's query does after each row.
    unsafe fn find_identical(
        &mut self,
        rel: pg_sys::Relation,
        hash: pg_sys::Datum,
        hash_bytes: &[u8],
        user: pg_sys::Datum,
        reuse: bool,
        now: pg_sys::TimestampTz,
    ) -> Identical {
        let index = *(*self.result_rel)
            .ri_IndexRelationDescs
            .add(self.hash_index);
        // Equality is strategy 1 of a hash index, 3 of a btree.
        let equal = if (*(*index).rd_rel).relam == pg_sys::HASH_AM_OID {
            1
        } else {
            pg_sys::BTEqualStrategyNumber as u16
        };
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            1,
            equal,
            pg_sys::Oid::from(pg_sys::F_BYTEAEQ),
            hash,
        );
        // PostgreSQL 18 added the scan's instrumentation (none here).
        #[cfg(not(feature = "pg18"))]
        let scan = pg_sys::index_beginscan(rel, index, &raw mut pg_sys::SnapshotSelfData, 1, 0);
        #[cfg(feature = "pg18")]
        let scan = pg_sys::index_beginscan(
            rel,
            index,
            &raw mut pg_sys::SnapshotSelfData,
            std::ptr::null_mut(),
            1,
            0,
        );
        pg_sys::index_rescan(scan, &mut key, 1, std::ptr::null_mut(), 0);
        let oldest_reusable = now - config::reuse_max_age().as_micros() as i64;
        let slot = self.scan_slot;
        let mut leader: Option<i64> = None;
        let mut answer: Option<(i64, pg_sys::TimestampTz, pg_sys::HeapTuple)> = None;
        while pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
            pg_sys::slot_getsomeattrs_int(slot, self.natts as i32);
            let value = |col: Col| {
                let at = self.attnum(col) - 1;
                (!*(*slot).tts_isnull.add(at)).then(|| *(*slot).tts_values.add(at))
            };
            // A hash index finds rows by a 32-bit hash of the key: compare the whole hash (a
            // million requests hold about a hundred such near misses).
            let same_hash = value(Col::request_hash)
                .and_then(|d| Vec::<u8>::from_datum(d, false))
                .is_some_and(|h| h == hash_bytes);
            if !same_hash {
                continue;
            }
            let same_role = value(Col::submitted_by).is_some_and(|d| {
                CStr::from_ptr(d.cast_mut_ptr::<std::ffi::c_char>())
                    == CStr::from_ptr(user.cast_mut_ptr::<std::ffi::c_char>())
            });
            if !same_role {
                continue;
            }
            let id = value(Col::id).map(|d| d.value() as i64).unwrap_or_default();
            let state = value(Col::state)
                .and_then(|d| String::from_datum(d, false))
                .unwrap_or_default();
            match state.as_str() {
                "queued" | "submitted" if value(Col::reused_from).is_none() => {
                    leader = Some(leader.map_or(id, |l| l.min(id)));
                }
                "completed" if reuse && leader.is_none() => {
                    let finished = value(Col::finished_at).map(|d| d.value() as i64);
                    if let Some(finished) = finished.filter(|f| *f > oldest_reusable) {
                        if answer.as_ref().is_none_or(|(_, best, _)| finished > *best) {
                            let copy = (*(*slot).tts_ops)
                                .copy_heap_tuple
                                .expect("slots copy tuples")(
                                slot
                            );
                            answer = Some((id, finished, copy));
                        }
                    }
                }
                _ => {}
            }
        }
        pg_sys::index_endscan(scan);
        clear_slot(slot);
        match (leader, answer) {
            (Some(leader), _) => Identical::InFlight(leader),
            (None, Some((source, _, tuple))) => Identical::Answered(source, tuple),
            (None, None) => Identical::None,
        }
    }
}

enum Identical {
    None,
    /// Queued or in flight: wait for its answer.
    InFlight(i64),
    /// Completed recently: reuse its answer (the tuple is a copy of its row).
    Answered(i64, pg_sys::HeapTuple),
}

/// Empties a slot, dropping any buffer pin it holds.
unsafe fn clear_slot(slot: *mut pg_sys::TupleTableSlot) {
    if let Some(clear) = (*(*slot).tts_ops).clear {
        clear(slot);
    }
}

unsafe fn jsonb_from_text(json: &str) -> pg_sys::Datum {
    let text = CString::new(json).expect("serialized JSON has no NUL byte");
    direct_function_call_as_datum(
        pg_sys::jsonb_in,
        &[Some(pg_sys::Datum::from(text.as_ptr()))],
    )
    .expect("jsonb_in returns a value")
}

/// Whether an earlier identical answer may be reused: the request's own `reuse` if given, else
/// llmbatching.reuse_answers.
fn reuse_applies(request: &NewRequest) -> bool {
    request
        .reuse
        .unwrap_or_else(|| match config::reuse_answers() {
            ReuseAnswers::Off => false,
            ReuseAnswers::Deterministic => request.deterministic,
            ReuseAnswers::Always => true,
        })
}
