//! Ids of conversations, users, calls and huddles: `[A-Za-z0-9_-]{1,64}`
//! (24-hex MongoDB ObjectIds fit). Valid ids are safe as bus subject tokens.

pub const MAX_ID_LEN: usize = 64;

pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("65a1b2c3d4e5f60718293a4b"));
        assert!(valid_id("user_1-x"));
        assert!(!valid_id(""));
        assert!(!valid_id("a.b"));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"a".repeat(65)));
    }
}
