//! What a finished batch's result lines say, in every provider's terms: each line becomes an
//! [`Outcome`] for one request (each provider's module reads its own format into these), and
//! [`LineFilter`] decides which line of a request counts. Pure: no database, no network.

use crate::request::AnswerFormat;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;

/// What one result line says about its request.
#[derive(Debug, PartialEq, Clone, Serialize, Deserialize)]
pub enum Outcome {
    /// The model answered.
    Completed {
        /// The response body as the provider wrote it (JSON text).
        response: String,
        text: Option<String>,
        usage: Usage,
    },
    /// The request ran and was refused for a reason that will not change by sending it again.
    Failed {
        message: String,
        /// The response body as the provider wrote it (JSON text), if there was one.
        response: Option<String>,
    },
    /// The request did not run, or failed in a way that may pass on another try.
    Retry { reason: String },
    /// The request ran, but its result line cannot be read. The file is read again; if the line
    /// still cannot be read, the request fails with the line kept (it is not sent again).
    Unreadable {
        reason: String,
        /// The whole line as the provider wrote it.
        line: String,
    },
}

/// One result line, attributed to the request it belongs to. (Kept as JSON while its request is
/// held locked: see `state::held`.)
#[derive(Debug, PartialEq, Clone, Serialize, Deserialize)]
pub struct LineResult {
    pub request_id: i64,
    pub outcome: Outcome,
}

/// Longest result line read; a longer one is skipped as malformed, so a hostile or broken
/// provider cannot make the worker hold an unbounded line in memory.
pub const MAX_RESULT_LINE_BYTES: usize = 64 * 1024 * 1024;

/// What [`read_line_bounded`] found.
#[derive(Debug, PartialEq)]
pub enum LineRead {
    /// A line (without its newline) is in the buffer.
    Line,
    /// A line longer than the limit was skipped; the buffer is empty.
    TooLong,
    /// The end of the file.
    End,
}

/// Decides which result lines of a batch are applied, so that the outcome is the same however
/// the lines are ordered and chunked: the batch's files are read twice, first to [`note`] every
/// line, then to ask whether to [`apply`] it. For each request the line of the best kind wins:
/// a success, then a refusal (it ran and failed for good), then an unreadable line (it ran; read
/// again, or failed with the line kept), then a line saying it did not run (which queues it
/// again, to be paid for twice if the provider did answer it). Of lines of the same kind, the
/// first wins; one line per request is applied.
///
/// [`note`]: LineFilter::note
/// [`apply`]: LineFilter::apply
#[derive(Default)]
pub struct LineFilter {
    /// The best kind of line each named request has (see [`LineFilter::rank`]).
    best: HashMap<i64, u8>,
    applied: std::collections::HashSet<i64>,
    duplicates: usize,
}

impl LineFilter {
    /// How good a line is for its request: the higher, the more it says.
    fn rank(outcome: &Outcome) -> u8 {
        match outcome {
            Outcome::Completed { .. } => 3,
            Outcome::Failed { .. } => 2,
            Outcome::Unreadable { .. } => 1,
            Outcome::Retry { .. } => 0,
        }
    }

    /// First reading: remembers the best kind of line of each request.
    pub fn note(&mut self, result: &LineResult) {
        let rank = Self::rank(&result.outcome);
        let best = self.best.entry(result.request_id).or_insert(rank);
        *best = (*best).max(rank);
    }

    /// The requests the files name.
    pub fn named(&self) -> Vec<i64> {
        self.best.keys().copied().collect()
    }

    /// Forgets the requests that do not exist (a provider's line naming no request of ours):
    /// they are neither applied nor counted. Returns how many there were.
    pub fn forget_unknown(&mut self, known: &std::collections::HashSet<i64>) -> usize {
        let before = self.best.len();
        self.best.retain(|id, _| known.contains(id));
        before - self.best.len()
    }

    /// Second reading: whether this line is the one applied for its request.
    pub fn apply(&mut self, result: &LineResult) -> bool {
        let Some(best) = self.best.get(&result.request_id) else {
            return false;
        };
        if Self::rank(&result.outcome) < *best {
            return false;
        }
        let first = self.applied.insert(result.request_id);
        if !first {
            self.duplicates += 1;
        }
        first
    }

    /// How many distinct requests the files name: what is compared with the provider's counts.
    pub fn requests_named(&self) -> i64 {
        self.best.len() as i64
    }

    /// Lines skipped in the second reading because their request already had one applied.
    pub fn duplicates(&self) -> usize {
        self.duplicates
    }
}

/// Reads the next line into `buf` (cleared first), holding at most `limit` bytes of it.
pub fn read_line_bounded(
    reader: &mut impl std::io::BufRead,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<LineRead> {
    buf.clear();
    let mut too_long = false;
    let mut read_any = false;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(match (read_any, too_long) {
                (false, _) => LineRead::End,
                (true, true) => LineRead::TooLong,
                (true, false) => LineRead::Line,
            });
        }
        read_any = true;
        let (part, found_newline) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (&chunk[..i], true),
            None => (chunk, false),
        };
        if !too_long && buf.len() + part.len() <= limit {
            buf.extend_from_slice(part);
        } else {
            too_long = true;
            buf.clear();
        }
        let used = part.len() + usize::from(found_newline);
        reader.consume(used);
        if found_newline {
            return Ok(if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line
            });
        }
    }
}

/// The `custom_id` llmbatching gives a request in a batch file.
pub fn custom_id(request_id: i64) -> String {
    request_id.to_string()
}

/// The line with every JSON escape of U+0000 (`\u0000`), which neither `text` nor `jsonb` can
/// hold, replaced by U+FFFD (the replacement character), so that an answer holding it can be
/// stored and its request complete.
/// An escaped backslash followed by `u0000` is text, not the escape, and is left alone.
pub fn without_nul_escapes(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.contains("\\u0000") {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let escape = &rest[at..];
        if escape.starts_with("\\u0000") {
            out.push_str("\\ufffd");
            rest = &escape[6..];
        } else {
            // Any other escape (including an escaped backslash) is copied whole.
            let len = escape[1..].chars().next().map_or(1, |c| 1 + c.len_utf8());
            out.push_str(&escape[..len]);
            rest = &escape[len..];
        }
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// The request a `custom_id` names, if llmbatching issued it (see [`custom_id`]).
pub fn request_id_of(custom_id: &str) -> Option<i64> {
    custom_id.parse::<i64>().ok().filter(|id| *id > 0)
}

/// Checks a completed answer against the format its request asked for. Returns the answer
/// text to keep and the parsed JSON answer, or why the answer is not acceptable.
pub fn check_answer(
    format: &AnswerFormat,
    text: Option<&str>,
) -> Result<(Option<String>, Value), String> {
    let text = text.ok_or("the answer has no text")?;
    let json: Value = serde_json::from_str(text)
        .map_err(|e| format!("the answer is not valid JSON ({e}): {text:.200}"))?;
    match format {
        AnswerFormat::Json => Ok((Some(text.to_owned()), json)),
        AnswerFormat::Label(labels) => {
            let label = json
                .get("label")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("the answer names no label: {text:.200}"))?;
            if !labels.iter().any(|l| l == label) {
                return Err(format!(
                    "the answer \"{label:.100}\" is not one of the labels {}",
                    labels.join(", ")
                ));
            }
            Ok((Some(label.to_owned()), json))
        }
    }
}

/// The tokens one answer used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub input: Option<i32>,
    /// Input tokens served from the provider's prompt cache (billed at the cached price).
    pub cached: Option<i32>,
    pub output: Option<i32>,
    /// Output tokens spent on reasoning (billed as output).
    pub reasoning: Option<i32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_result_reads_back_as_it_was() {
        let outcomes = [
            Outcome::Completed {
                response: r#"{"output": "x"}"#.into(),
                text: Some("positive \u{1F600} \"quoted\"".into()),
                usage: Usage {
                    input: Some(5),
                    cached: None,
                    output: Some(2),
                    reasoning: Some(0),
                },
            },
            Outcome::Failed {
                message: "refused".into(),
                response: None,
            },
            Outcome::Retry {
                reason: "expired".into(),
            },
            Outcome::Unreadable {
                reason: "not JSON".into(),
                line: "{".into(),
            },
        ];
        for (id, outcome) in outcomes.into_iter().enumerate() {
            let result = LineResult {
                request_id: id as i64,
                outcome,
            };
            let kept = serde_json::to_string(&result).unwrap();
            assert_eq!(serde_json::from_str::<LineResult>(&kept).unwrap(), result);
        }
    }
}
