//! What every MongoDB store of QuckChat shares (feature `mongo`): telling
//! a duplicate-key failure apart, and keeping credentials of the
//! connection string out of error messages.

use mongodb::error::{ErrorKind, WriteFailure};

/// Whether a write failed on a unique index (E11000).
pub fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    let code = match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    };
    code == Some(11000) || e.to_string().contains("E11000")
}

/// `%XX` escapes decoded (lossy), as the driver decodes user info.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `msg` without the user info of `url` (raw or decoded) in it: driver
/// errors may quote the connection string, and logs must not.
pub fn redact(msg: String, url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return msg;
    };
    let mut secrets = vec![userinfo.to_owned(), percent_decode(userinfo)];
    if let Some((_, password)) = userinfo.split_once(':') {
        secrets.push(password.to_owned());
        secrets.push(percent_decode(password));
    }
    secrets.retain(|s| !s.is_empty());
    // Longest first, so a part never leaves the rest of a whole behind.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
        .iter()
        .fold(msg, |msg, secret| msg.replace(secret.as_str(), "***"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_removes_user_info() {
        let url = "mongodb://user:p%40ss@h:1/db";
        assert_eq!(
            redact("auth user:p%40ss as user with p@ss failed".into(), url),
            "auth *** as user with *** failed"
        );
        assert_eq!(redact("fine".into(), "mongodb://h:1/db"), "fine");
        assert_eq!(redact("x@y".into(), "mongodb://h:1/db?a=b@c"), "x@y");
    }
}
