//! Timestamps: ISO-8601 UTC strings with millisecond precision, as clients
//! see them (`2026-11-25T17:19:30.123Z`).

use chrono::{DateTime, SecondsFormat, Utc};

pub fn now_iso() -> String {
    iso(Utc::now())
}

pub fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}
