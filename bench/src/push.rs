//! The `push` scenario's provider side: FCM (with its OAuth2 token endpoint)
//! and APNS stand-ins in this process, the credentials the spawned server is
//! given for them, the offline recipients' devices, and what the providers
//! received ([`PushFigures`]).
//!
//! The stand-ins are push-svc's own provider fakes (`quckchat-push`'s
//! `testsuite` feature): they verify what FCM and APNS verify (the RS256
//! grant, bearer tokens, the ES256 provider token, topics, body shapes), so
//! a notification they count is one a real provider would have accepted.
//! They run on a runtime of their own, off the orchestrator's thread.

use std::collections::HashSet;
use std::time::UNIX_EPOCH;

use anyhow::Context;
use futures::stream::{self, StreamExt, TryStreamExt};
use quckchat_proto::push::push_service_client::PushServiceClient;
use quckchat_proto::push::RegisterDeviceRequest;
use quckchat_push::config::{
    APNS_KEY_ID, APNS_PRIVATE_KEY, APNS_TEAM_ID, APNS_TOPIC, APNS_URL, FCM_API_URL,
    FIREBASE_PROJECT_ID, FIREBASE_SERVICE_ACCOUNT,
};
use quckchat_push::providers::fakes::{
    FakeApns, FakeFcm, TEST_APNS_KEY_ID, TEST_APNS_TEAM_ID, TEST_BUNDLE_ID,
    TEST_P256_PRIVATE_KEY_PEM, TEST_PROJECT_ID,
};
use serde::{Deserialize, Serialize};

use crate::dialect::CONTENT_PREFIX;
use crate::layout::{Conversation, Layout};
use crate::orchestrate::Percentiles;

/// FCM and APNS stand-ins, serving until dropped.
pub struct Providers {
    fcm: FakeFcm,
    apns: FakeApns,
    /// Runs the fakes; shut down in the background when dropped (the
    /// orchestrator is itself async and may not block).
    runtime: Option<tokio::runtime::Runtime>,
}

impl Providers {
    pub fn start() -> anyhow::Result<Providers> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("provider-fakes")
            .enable_all()
            .build()?;
        // A thread of its own: the caller is inside the orchestrator's runtime.
        let (fcm, apns) = std::thread::scope(|s| {
            s.spawn(|| {
                runtime.block_on(async { tokio::try_join!(FakeFcm::start(), FakeApns::start()) })
            })
            .join()
        })
        .map_err(|_| anyhow::anyhow!("the provider stand-ins panicked while starting"))??;
        Ok(Providers {
            fcm,
            apns,
            runtime: Some(runtime),
        })
    }

    /// The server's environment for these providers: one app with FCM and
    /// APNS credentials, previews on (the send stamp travels in the body).
    pub fn server_env(&self) -> Vec<(String, String)> {
        [
            (FIREBASE_SERVICE_ACCOUNT, self.fcm.service_account_json()),
            (FIREBASE_PROJECT_ID, TEST_PROJECT_ID.to_owned()),
            (FCM_API_URL, self.fcm.api_url()),
            (APNS_KEY_ID, TEST_APNS_KEY_ID.to_owned()),
            (APNS_TEAM_ID, TEST_APNS_TEAM_ID.to_owned()),
            (APNS_PRIVATE_KEY, TEST_P256_PRIVATE_KEY_PEM.to_owned()),
            (APNS_TOPIC, TEST_BUNDLE_ID.to_owned()),
            (APNS_URL, self.apns.url()),
            ("PUSH_PREVIEW", "true".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// What the providers accepted, measured against the sends acknowledged.
    pub fn figures(
        &self,
        recipients: usize,
        devices: usize,
        acked: u64,
        send_secs: f64,
    ) -> anyhow::Result<PushFigures> {
        let fcm = self.fcm.requests();
        let apns = self.apns.requests();
        let mut latency = hdrhistogram::Histogram::<u64>::new(3)?;
        let mut seen = HashSet::new();
        let mut duplicates = 0;
        let mut unstamped = 0;
        let bodies = fcm
            .iter()
            .map(|r| (r.token().to_owned(), &r.body, r.received_at))
            .chain(
                apns.iter()
                    .map(|r| (r.device_token.clone(), &r.body, r.received_at)),
            );
        for (token, body, at) in bodies {
            let text = body.to_string();
            let message_id = field(&text, "messageId").unwrap_or_default().to_owned();
            if !seen.insert((token, message_id)) {
                duplicates += 1;
            }
            let at_ns = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
            match stamp(&text) {
                Some(sent_ns) => {
                    let _ = latency.record(at_ns.saturating_sub(sent_ns) / 1000);
                }
                None => unstamped += 1,
            }
        }
        let notifications = (fcm.len() + apns.len()) as u64;
        let expected = acked * recipients as u64;
        Ok(PushFigures {
            recipients,
            devices,
            expected,
            notifications,
            fcm: fcm.len() as u64,
            apns: apns.len() as u64,
            per_sec: notifications as f64 / send_secs.max(1e-9),
            missing: expected as i64 - (notifications - duplicates) as i64,
            duplicates,
            unstamped,
            rejections: self.fcm.rejections().len() as u64 + self.apns.rejections().len() as u64,
            provider_connections: (self.fcm.connections() + self.apns.connections()) as u64,
            latency_ms: Percentiles::of(&latency),
        })
    }
}

impl Drop for Providers {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The `push` scenario's figures: every acknowledged message should reach
/// each offline member's device once.
#[derive(Debug, Serialize, Deserialize)]
pub struct PushFigures {
    /// Offline members per conversation, each with one device (alternately
    /// FCM and APNS).
    pub recipients: usize,
    pub devices: usize,
    /// Acknowledged messages × recipients.
    pub expected: u64,
    /// Requests the providers accepted (FCM + APNS).
    pub notifications: u64,
    pub fcm: u64,
    pub apns: u64,
    /// Over the send window (`--duration`).
    pub per_sec: f64,
    /// Expected − distinct notifications received by the end of the drain.
    pub missing: i64,
    /// A device pushed the same message twice.
    pub duplicates: u64,
    /// Notifications whose body carried no send stamp (previews off?).
    pub unstamped: u64,
    /// Requests the providers refused (bad token, body, credentials).
    pub rejections: u64,
    /// TCP connections the server opened to the providers.
    pub provider_connections: u64,
    /// `message:send` due → the provider accepted the request.
    pub latency_ms: Percentiles,
}

/// The offline members of `conversation`: users who never connect.
pub fn recipients(layout: &Layout, conversation: &Conversation, n: usize) -> Vec<String> {
    (0..n)
        .map(|j| format!("{}-r{j}", layout.user(conversation.first)))
        .collect()
}

/// Registers one device for each recipient (even: FCM, odd: APNS);
/// returns how many.
pub async fn register_devices(grpc_addr: &str, layout: &Layout, n: usize) -> anyhow::Result<usize> {
    let client = PushServiceClient::new(crate::setup::channel(grpc_addr)?);
    let requests: Vec<RegisterDeviceRequest> = layout
        .conversations
        .iter()
        .enumerate()
        .flat_map(|(k, c)| {
            recipients(layout, c, n)
                .into_iter()
                .enumerate()
                .map(move |(j, user)| (k, j, user))
        })
        .map(|(k, j, user)| RegisterDeviceRequest {
            // 64 hex digits, as APNS tokens are (push-svc drops others
            // as dead without asking APNS); unique per run.
            token: format!("{:0>16}{k:024x}{j:024x}", layout.run_id()),
            platform: if j % 2 == 0 { "fcm" } else { "apns" }.to_owned(),
            user_id: user,
            app: String::new(),
            locale: String::new(),
        })
        .collect();
    let count = requests.len();
    stream::iter(requests)
        .map(|request| {
            let mut client = client.clone();
            async move {
                let user = request.user_id.clone();
                client
                    .register_device(request)
                    .await
                    .with_context(|| format!("register a device for {user}"))
            }
        })
        .buffer_unordered(32)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(count)
}

/// The send stamp (`bench:<nanos>`) in a notification's body.
fn stamp(text: &str) -> Option<u64> {
    let at = text.find(CONTENT_PREFIX)? + CONTENT_PREFIX.len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The string value of `"key":"…"` in a JSON text.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":\"");
    let at = text.find(&pattern)? + pattern.len();
    let end = text[at..].find('"')?;
    Some(&text[at..at + end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_and_message_ids_are_read_from_either_provider_body() {
        let fcm = r#"{"message":{"data":{"messageId":"m-7","seq":"3"},"notification":{"body":"bench:123456:xx","title":"New message"},"token":"t"}}"#;
        assert_eq!(stamp(fcm), Some(123_456));
        assert_eq!(field(fcm, "messageId"), Some("m-7"));
        let apns =
            r#"{"aps":{"alert":{"body":"bench:42","title":"New message"}},"messageId":"m-8"}"#;
        assert_eq!(stamp(apns), Some(42));
        assert_eq!(field(apns, "messageId"), Some("m-8"));
        assert_eq!(
            stamp(r#"{"aps":{"alert":{"body":"You have a new message"}}}"#),
            None
        );
    }
}
