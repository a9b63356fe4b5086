//! Which service owns a topic, and which topics are well-formed: the one
//! table in `quckchat_runtime::routes` (services take their bus names from
//! it too), see docs/protocol.md#topics.

pub use quckchat_runtime::ids::valid_id;
pub use quckchat_runtime::routes::{route, Route, ROUTES};
