//! Deciding when a group of queued requests becomes a batch and how large it may be, and how
//! long to wait before trying a failed step again. Pure: no database, no network.

use crate::request::LINE_OVERHEAD_BYTES;
use std::time::Duration;

/// The most requests and bytes one batch input file may hold.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub max_requests: usize,
    pub max_bytes: usize,
}

impl BatchLimits {
    /// The tighter of two limits.
    pub fn within(self, other: BatchLimits) -> BatchLimits {
        BatchLimits {
            max_requests: self.max_requests.min(other.max_requests),
            max_bytes: self.max_bytes.min(other.max_bytes),
        }
    }
}

/// The highest ceilings of any provider, which no setting may raise (each provider's own limits
/// apply below them; see `provider::Kind::limits`).
pub const PROVIDER_MAX_REQUESTS: usize = 100_000;
pub const PROVIDER_MAX_BYTES: usize = 256 * 1024 * 1024;

/// A queued request as the planner sees it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub id: i64,
    pub body_bytes: usize,
}

impl Candidate {
    fn line_bytes(&self) -> usize {
        self.body_bytes + LINE_OVERHEAD_BYTES
    }

    pub fn estimated_tokens(&self) -> usize {
        estimate_tokens(self.body_bytes)
    }
}

/// Prompt tokens a request body is estimated to hold: about four bytes per token, the usual
/// rule of thumb for English text. JSON syntax counts too, which errs on the safe side.
pub fn estimate_tokens(body_bytes: usize) -> usize {
    body_bytes.div_ceil(4)
}

/// The enqueued-token allowance of a model: its cap, and how much of it is free now.
#[derive(Clone, Copy, Debug)]
pub struct TokenBudget {
    pub cap: usize,
    pub available: usize,
}

/// A group of queued requests (one endpoint and model) as the planner sees it.
#[derive(Clone, Copy, Debug)]
pub struct QueuedGroup {
    pub requests: usize,
    pub body_bytes: usize,
    /// How long its oldest request has waited.
    pub oldest_wait: Duration,
}

/// A group is sent when it fills a batch, or when its oldest request has waited long enough.
pub fn group_is_due(group: &QueuedGroup, limits: BatchLimits, batch_wait: Duration) -> bool {
    let line_bytes = group.body_bytes + group.requests * LINE_OVERHEAD_BYTES;
    group.requests >= limits.max_requests
        || line_bytes >= limits.max_bytes
        || group.oldest_wait >= batch_wait
}

/// How long until a group that is not due yet becomes due by waiting (zero if it is due now).
pub fn due_in(group: &QueuedGroup, limits: BatchLimits, batch_wait: Duration) -> Duration {
    if group_is_due(group, limits, batch_wait) {
        return Duration::ZERO;
    }
    batch_wait.saturating_sub(group.oldest_wait)
}

/// How the candidates (oldest first) are split off into the next batch.
#[derive(Debug, Default, PartialEq)]
pub struct Split {
    /// The ids that go into the batch.
    pub batch: Vec<i64>,
    /// Their estimated prompt tokens.
    pub estimated_tokens: usize,
    /// Ids too large for any batch file, even alone.
    pub too_many_bytes: Vec<i64>,
    /// Ids whose estimated tokens exceed the model's whole enqueued-token cap.
    pub too_many_tokens: Vec<i64>,
}

/// Several roles' items, each role's in its own order, as one list that takes each role's next
/// item in turn. Batches formed from queued requests in this order carry every waiting role's
/// requests, and write-backs taken in it leave no role waiting behind another's.
pub fn interleave_roles<T>(per_role: Vec<Vec<T>>) -> Vec<T> {
    let total = per_role.iter().map(Vec::len).sum();
    let mut queues: Vec<std::vec::IntoIter<T>> = per_role.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        for queue in &mut queues {
            if let Some(item) = queue.next() {
                out.push(item);
            }
        }
    }
    out
}

/// Items that come ordered by role, split into one list per role (for [`interleave_roles`]).
pub fn split_by_role<T>(items: Vec<(String, T)>) -> Vec<Vec<T>> {
    let mut per_role: Vec<Vec<T>> = Vec::new();
    let mut last_role: Option<String> = None;
    for (role, item) in items {
        if last_role.as_ref() != Some(&role) {
            per_role.push(Vec::new());
            last_role = Some(role);
        }
        per_role.last_mut().expect("pushed above").push(item);
    }
    per_role
}

/// Takes the longest run of candidates, in the order given (oldest first), that fits in one batch and in the
/// model's free token budget. A request that could never fit, even alone, is set aside so it
/// does not block the queue.
pub fn take_batch(
    candidates: &[Candidate],
    limits: BatchLimits,
    budget: Option<TokenBudget>,
) -> Split {
    let mut split = Split::default();
    let mut bytes = 0usize;
    for c in candidates {
        if c.line_bytes() > limits.max_bytes {
            split.too_many_bytes.push(c.id);
            continue;
        }
        if budget.is_some_and(|b| c.estimated_tokens() > b.cap) {
            split.too_many_tokens.push(c.id);
            continue;
        }
        let full = split.batch.len() == limits.max_requests
            || bytes + c.line_bytes() > limits.max_bytes
            || budget.is_some_and(|b| split.estimated_tokens + c.estimated_tokens() > b.available);
        if full {
            break;
        }
        bytes += c.line_bytes();
        split.estimated_tokens += c.estimated_tokens();
        split.batch.push(c.id);
    }
    split
}

/// Delay before the next try of a step that failed `failures` times in a row: exponential from
/// `base`, capped at `cap`, with "equal jitter" (half fixed, half random) so that many batches
/// failing together do not retry in lockstep. A provider's `Retry-After` is a floor.
pub fn retry_delay(
    failures: u32,
    base: Duration,
    cap: Duration,
    retry_after: Option<Duration>,
    random: f64,
) -> Duration {
    let exp = base.saturating_mul(1u32 << failures.min(20)).min(cap);
    let delay = exp / 2 + exp.mul_f64(random.clamp(0.0, 1.0) / 2.0);
    delay.max(retry_after.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(sizes: &[usize]) -> Vec<Candidate> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &b)| Candidate {
                id: i as i64 + 1,
                body_bytes: b,
            })
            .collect()
    }

    #[test]
    fn a_batch_stops_at_the_request_limit() {
        let limits = BatchLimits {
            max_requests: 2,
            max_bytes: 1 << 20,
        };
        assert_eq!(
            take_batch(&candidates(&[10, 10, 10]), limits, None).batch,
            vec![1, 2]
        );
    }

    #[test]
    fn a_batch_stops_at_the_byte_limit() {
        let line = 100 + LINE_OVERHEAD_BYTES;
        let limits = BatchLimits {
            max_requests: 100,
            max_bytes: 2 * line + 1,
        };
        assert_eq!(
            take_batch(&candidates(&[100, 100, 100]), limits, None).batch,
            vec![1, 2]
        );
    }

    #[test]
    fn a_request_too_large_for_any_batch_is_set_aside() {
        let limits = BatchLimits {
            max_requests: 100,
            max_bytes: 1000,
        };
        let split = take_batch(&candidates(&[10, 5000, 10]), limits, None);
        assert_eq!(split.batch, vec![1, 3]);
        assert_eq!(split.too_many_bytes, vec![2]);
    }

    #[test]
    fn a_batch_stops_at_the_free_token_budget() {
        let limits = BatchLimits {
            max_requests: 100,
            max_bytes: 1 << 20,
        };
        // 400-byte bodies are about 100 tokens each.
        let budget = TokenBudget {
            cap: 1000,
            available: 250,
        };
        let split = take_batch(&candidates(&[400, 400, 400]), limits, Some(budget));
        assert_eq!((split.batch, split.estimated_tokens), (vec![1, 2], 200));
        let none_free = TokenBudget {
            cap: 1000,
            available: 50,
        };
        assert!(take_batch(&candidates(&[400]), limits, Some(none_free))
            .batch
            .is_empty());
    }

    #[test]
    fn a_request_over_the_whole_token_cap_is_set_aside() {
        let limits = BatchLimits {
            max_requests: 100,
            max_bytes: 1 << 20,
        };
        let split = take_batch(
            &candidates(&[40, 8000, 40]),
            limits,
            Some(TokenBudget {
                cap: 1000,
                available: 1000,
            }),
        );
        assert_eq!((split.batch, split.too_many_tokens), (vec![1, 3], vec![2]));
    }

    #[test]
    fn groups_are_due_when_full_or_old() {
        let limits = BatchLimits {
            max_requests: 10,
            max_bytes: 1 << 20,
        };
        let wait = Duration::from_secs(30);
        let group = |requests, secs| QueuedGroup {
            requests,
            body_bytes: 0,
            oldest_wait: Duration::from_secs(secs),
        };
        assert!(!group_is_due(&group(3, 5), limits, wait));
        assert!(group_is_due(&group(10, 5), limits, wait));
        assert!(group_is_due(&group(3, 30), limits, wait));
        assert_eq!(due_in(&group(3, 5), limits, wait), Duration::from_secs(25));
        assert_eq!(due_in(&group(10, 5), limits, wait), Duration::ZERO);
        assert_eq!(due_in(&group(3, 40), limits, wait), Duration::ZERO);
    }

    #[test]
    fn roles_take_turns() {
        let role = |ids: &[i64]| -> Vec<Candidate> {
            ids.iter()
                .map(|&id| Candidate { id, body_bytes: 10 })
                .collect()
        };
        let order: Vec<i64> = interleave_roles(vec![role(&[1, 2, 3, 4]), role(&[10]), role(&[])])
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(order, vec![1, 10, 2, 3, 4]);
        // A batch of two carries both roles, whatever the first one's backlog.
        let batch = take_batch(
            &interleave_roles(vec![role(&[1, 2, 3]), role(&[9])]),
            BatchLimits {
                max_requests: 2,
                max_bytes: 1 << 20,
            },
            None,
        );
        assert_eq!(batch.batch, vec![1, 9]);
    }

    #[test]
    fn retry_delays_grow_and_respect_retry_after() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(retry_delay(0, base, cap, None, 1.0), Duration::from_secs(1));
        assert_eq!(retry_delay(3, base, cap, None, 0.0), Duration::from_secs(4));
        assert_eq!(retry_delay(30, base, cap, None, 1.0), cap);
        assert_eq!(
            retry_delay(0, base, cap, Some(Duration::from_secs(9)), 0.0),
            Duration::from_secs(9)
        );
    }
}
