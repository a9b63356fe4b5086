//! The FCM and APNS providers against the in-process fakes, which verify
//! signatures, tokens, headers and bodies the way the real services do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests: a failed step is a failed test"
)]

use std::time::Duration;

use quckchat_push::devices::Platform;
use quckchat_push::providers::apns::{Apns, ApnsConfig};
use quckchat_push::providers::fakes::{
    test_device, ApnsReply, FakeApns, FakeFcm, FcmReply, TEST_BUNDLE_ID, TEST_P256_PRIVATE_KEY_PEM,
    TEST_P384_PRIVATE_KEY_PEM, TEST_PROJECT_ID, TEST_RSA_PRIVATE_KEY_PEM,
};
use quckchat_push::providers::fcm::{Fcm, FcmConfig, ProviderConfigError, ServiceAccount};
use quckchat_push::providers::{data, Kind, Notification, Outcome, Provider};
use serde_json::json;

/// An APNS device token (64 hex digits).
fn apns_token(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn message() -> Notification {
    Notification {
        kind: Kind::Message,
        title: Some("Ada".into()),
        body: Some("Are we still on for lunch?".into()),
        data: data([
            ("conversationId", "c-1"),
            ("messageId", "m-9"),
            ("seq", "42"),
        ]),
        collapse_id: Some("c-1".into()),
        badge: Some(5),
        ttl: Duration::from_secs(3600),
    }
}

fn incoming_call() -> Notification {
    Notification {
        kind: Kind::IncomingCall,
        title: None,
        body: None,
        data: data([("callId", "k-7"), ("callerName", "Ada"), ("video", "true")]),
        collapse_id: Some("k-7".into()),
        badge: None,
        ttl: Duration::from_secs(30),
    }
}

fn call_ended() -> Notification {
    Notification {
        kind: Kind::CallEnded,
        title: None,
        body: None,
        data: data([("callId", "k-7"), ("reason", "answered_elsewhere")]),
        collapse_id: Some("k-7".into()),
        badge: None,
        ttl: Duration::from_secs(30),
    }
}

async fn fcm() -> (FakeFcm, Fcm) {
    let fake = FakeFcm::start().await.unwrap();
    let fcm = Fcm::new(fake.config()).unwrap();
    (fake, fcm)
}

async fn apns() -> (FakeApns, Apns) {
    let fake = FakeApns::start().await.unwrap();
    let apns = Apns::new(fake.config()).unwrap();
    (fake, apns)
}

// ---------------------------------------------------------------- FCM ---

#[tokio::test]
async fn fcm_alert_body() {
    let (fake, fcm) = fcm().await;
    let device = test_device("u1", Platform::Fcm, "fcm-token-1");
    assert_eq!(
        fcm.send(&device, &message()).await,
        Outcome::Sent,
        "{:?}",
        fake.rejections()
    );

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].project, TEST_PROJECT_ID);
    let m = requests[0].message();
    assert_eq!(m["token"], "fcm-token-1");
    assert_eq!(
        m["notification"],
        json!({"title": "Ada", "body": "Are we still on for lunch?"})
    );
    assert_eq!(
        m["data"],
        json!({"conversationId": "c-1", "messageId": "m-9", "seq": "42"})
    );
    assert_eq!(m["android"]["priority"], "normal");
    assert_eq!(m["android"]["ttl"], "3600s");
    assert_eq!(m["android"]["collapse_key"], "c-1");
    assert_eq!(m["android"]["notification"]["tag"], "c-1");
    assert_eq!(m["apns"]["payload"]["aps"]["badge"], 5);
    assert_eq!(m["apns"]["headers"]["apns-collapse-id"], "c-1");
    assert_eq!(m["apns"]["headers"]["apns-push-type"], "alert");
}

#[tokio::test]
async fn fcm_call_is_a_high_priority_data_only_message() {
    let (fake, fcm) = fcm().await;
    let device = test_device("u1", Platform::Fcm, "fcm-token-1");
    assert_eq!(
        fcm.send(&device, &incoming_call()).await,
        Outcome::Sent,
        "{:?}",
        fake.rejections()
    );
    assert_eq!(
        fcm.send(&device, &call_ended()).await,
        Outcome::Sent,
        "{:?}",
        fake.rejections()
    );

    for (request, call) in fake.requests().iter().zip([incoming_call(), call_ended()]) {
        let m = request.message();
        assert!(m.get("notification").is_none(), "data-only: {m}");
        assert!(m["android"].get("notification").is_none(), "data-only: {m}");
        assert_eq!(m["android"]["priority"], "high");
        assert_eq!(m["android"]["ttl"], "30s");
        assert_eq!(m["data"], json!(call.data));
        assert_eq!(m["apns"]["payload"]["aps"]["content-available"], 1);
    }
}

#[tokio::test]
async fn fcm_access_token_is_cached_across_sends() {
    let (fake, fcm) = fcm().await;
    for i in 0..5 {
        let device = test_device("u1", Platform::Fcm, &format!("fcm-token-{i}"));
        assert_eq!(
            fcm.send(&device, &message()).await,
            Outcome::Sent,
            "{:?}",
            fake.rejections()
        );
    }
    assert_eq!(fake.tokens_issued(), 1);
    let tokens: Vec<_> = fake
        .requests()
        .iter()
        .map(|r| r.access_token.clone())
        .collect();
    assert!(tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
}

#[tokio::test]
async fn fcm_concurrent_senders_share_one_refresh() {
    let (fake, fcm) = fcm().await;
    let devices: Vec<_> = (0..10)
        .map(|i| test_device("u1", Platform::Fcm, &format!("fcm-token-{i}")))
        .collect();
    let n = message();
    let outcomes = futures::future::join_all(devices.iter().map(|d| fcm.send(d, &n))).await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Sent), "{outcomes:?}");
    assert_eq!(fake.tokens_issued(), 1);
}

#[tokio::test]
async fn fcm_access_token_is_refreshed_before_it_expires() {
    let (fake, fcm) = fcm().await;
    // Two-second tokens: used for one second (half their life), then
    // replaced before the fake would refuse them.
    fake.set_token_lifetime(Duration::from_secs(2));
    let device = test_device("u1", Platform::Fcm, "fcm-token-1");
    assert_eq!(fcm.send(&device, &message()).await, Outcome::Sent);
    assert_eq!(fcm.send(&device, &message()).await, Outcome::Sent);
    assert_eq!(fake.tokens_issued(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        fcm.send(&device, &message()).await,
        Outcome::Sent,
        "{:?}",
        fake.rejections()
    );
    assert_eq!(fake.tokens_issued(), 2);
    let requests = fake.requests();
    assert_ne!(requests[0].access_token, requests[2].access_token);
}

#[tokio::test]
async fn fcm_401_drops_the_cached_token() {
    let (fake, fcm) = fcm().await;
    let device = test_device("u1", Platform::Fcm, "fcm-token-1");
    assert_eq!(fcm.send(&device, &message()).await, Outcome::Sent);
    fake.revoke_access_tokens();
    let outcome = fcm.send(&device, &message()).await;
    assert!(
        matches!(&outcome, Outcome::Failed { reason } if reason.contains("401")),
        "{outcome:?}"
    );
    assert_eq!(fake.tokens_issued(), 1);
    // The next send fetches a new token.
    assert_eq!(fcm.send(&device, &message()).await, Outcome::Sent);
    assert_eq!(fake.tokens_issued(), 2);

    // A scripted 401 too.
    fake.script("fcm-token-1", [FcmReply::Unauthenticated]);
    assert!(matches!(
        fcm.send(&device, &message()).await,
        Outcome::Failed { .. }
    ));
    assert_eq!(fcm.send(&device, &message()).await, Outcome::Sent);
    assert_eq!(fake.tokens_issued(), 3);
}

#[tokio::test]
async fn fcm_unregistered_and_invalid_tokens_are_dead() {
    let (fake, fcm) = fcm().await;
    let gone = test_device("u1", Platform::Fcm, "uninstalled");
    fake.script("uninstalled", [FcmReply::Unregistered]);
    let outcome = fcm.send(&gone, &message()).await;
    assert!(
        matches!(&outcome, Outcome::DeadToken { reason } if reason.contains("UNREGISTERED")),
        "{outcome:?}"
    );

    let garbled = test_device("u1", Platform::Fcm, "garbled");
    fake.script("garbled", [FcmReply::InvalidToken]);
    assert!(matches!(
        fcm.send(&garbled, &message()).await,
        Outcome::DeadToken { .. }
    ));

    // A sender mismatch is a configuration problem: kept, not retried, and
    // the access token stays cached.
    let other = test_device("u1", Platform::Fcm, "other-project");
    fake.script("other-project", [FcmReply::SenderIdMismatch]);
    assert!(matches!(
        fcm.send(&other, &message()).await,
        Outcome::Failed { .. }
    ));
    assert_eq!(fcm.send(&other, &message()).await, Outcome::Sent);
    assert_eq!(fake.tokens_issued(), 1);
}

#[tokio::test]
async fn fcm_overload_is_retried_after_retry_after() {
    let (fake, fcm) = fcm().await;
    let device = test_device("u1", Platform::Fcm, "busy");
    fake.script(
        "busy",
        [
            FcmReply::QuotaExceeded {
                retry_after: Some(2),
            },
            FcmReply::Unavailable { retry_after: None },
            FcmReply::Internal,
        ],
    );
    let outcome = fcm.send(&device, &message()).await;
    assert!(
        matches!(&outcome, Outcome::Retry { after: Some(after), .. } if *after == Duration::from_secs(2)),
        "{outcome:?}"
    );
    assert!(matches!(
        fcm.send(&device, &message()).await,
        Outcome::Retry { after: None, .. }
    ));
    assert!(matches!(
        fcm.send(&device, &message()).await,
        Outcome::Retry { after: None, .. }
    ));
    assert_eq!(fcm.send(&device, &message()).await, Outcome::Sent);
    assert_eq!(fake.attempts("busy"), 4);
}

#[tokio::test]
async fn fcm_unreachable_is_retried() {
    let (fake, _) = fcm().await;
    let mut config = fake.config();
    config.api_url = "http://127.0.0.1:1".to_owned();
    let fcm = Fcm::new(config).unwrap();
    let outcome = fcm
        .send(&test_device("u1", Platform::Fcm, "t"), &message())
        .await;
    assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
}

#[tokio::test]
async fn fcm_refuses_apns_devices() {
    let (fake, fcm) = fcm().await;
    let outcome = fcm
        .send(
            &test_device("u1", Platform::Apns, &apns_token(1)),
            &message(),
        )
        .await;
    assert!(matches!(outcome, Outcome::Failed { .. }), "{outcome:?}");
    assert_eq!(fake.tokens_issued(), 0);
}

#[tokio::test]
async fn fcm_token_endpoint_checks_the_signature() {
    let fake = FakeFcm::start().await.unwrap();
    let mut config = fake.config();
    // Signed by the right key but claiming to be another account.
    config.account.client_email = "someone-else@example.iam.gserviceaccount.com".to_owned();
    let fcm = Fcm::new(config).unwrap();
    let outcome = fcm
        .send(&test_device("u1", Platform::Fcm, "t"), &message())
        .await;
    assert!(
        matches!(&outcome, Outcome::Failed { reason } if reason.contains("invalid_grant")),
        "{outcome:?}"
    );
    assert_eq!(fake.tokens_issued(), 0);
}

// ------------------------------------------------------ service account ---

#[tokio::test]
async fn service_account_from_inline_json_and_file() {
    let fake = FakeFcm::start().await.unwrap();
    let json = fake.service_account_json();
    let inline = ServiceAccount::parse(&json).unwrap();
    assert_eq!(
        inline.client_email,
        "push-test@quckchat-test.iam.gserviceaccount.com"
    );
    assert_eq!(inline.token_uri, fake.token_uri());
    assert_eq!(inline.project_id.as_deref(), Some(TEST_PROJECT_ID));
    assert!(
        !format!("{inline:?}").contains("PRIVATE KEY"),
        "Debug hides the key"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sa.json");
    std::fs::write(&path, &json).unwrap();
    let from_file = ServiceAccount::parse(path.to_str().unwrap()).unwrap();
    assert_eq!(from_file, inline);

    // Usable end to end.
    let mut config = FcmConfig::new(from_file, None).unwrap();
    config.api_url = fake.api_url();
    let fcm = Fcm::new(config).unwrap();
    assert_eq!(
        fcm.send(&test_device("u1", Platform::Fcm, "t"), &message())
            .await,
        Outcome::Sent
    );
}

#[test]
fn service_account_errors_say_what_is_wrong() {
    let missing = ServiceAccount::parse("/nonexistent/sa.json").unwrap_err();
    assert!(
        matches!(missing, ProviderConfigError::Unreadable { .. }),
        "{missing}"
    );
    assert!(
        missing.to_string().contains("/nonexistent/sa.json"),
        "{missing}"
    );

    let not_json = ServiceAccount::parse("{\"client_email\": ").unwrap_err();
    assert!(
        matches!(not_json, ProviderConfigError::NotJson { .. }),
        "{not_json}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sa.json");
    std::fs::write(&path, "client_email=x").unwrap();
    let file_not_json = ServiceAccount::parse(path.to_str().unwrap()).unwrap_err();
    assert!(
        matches!(file_not_json, ProviderConfigError::NotJson { .. }),
        "{file_not_json}"
    );
    assert!(
        file_not_json.to_string().contains("sa.json"),
        "{file_not_json}"
    );

    let no_email =
        json!({"type": "service_account", "private_key": TEST_RSA_PRIVATE_KEY_PEM}).to_string();
    let err = ServiceAccount::parse(&no_email).unwrap_err();
    assert!(
        matches!(
            err,
            ProviderConfigError::MissingField {
                field: "client_email",
                ..
            }
        ),
        "{err}"
    );

    let no_key = json!({"client_email": "a@b"}).to_string();
    let err = ServiceAccount::parse(&no_key).unwrap_err();
    assert!(
        matches!(
            err,
            ProviderConfigError::MissingField {
                field: "private_key",
                ..
            }
        ),
        "{err}"
    );

    let ec_key =
        json!({"client_email": "a@b", "private_key": TEST_P256_PRIVATE_KEY_PEM}).to_string();
    let err = ServiceAccount::parse(&ec_key).unwrap_err();
    assert!(matches!(err, ProviderConfigError::BadKey { .. }), "{err}");
    assert!(err.to_string().contains("not an RSA private key"), "{err}");

    let garbage = json!({"client_email": "a@b", "private_key": "hello"}).to_string();
    let err = ServiceAccount::parse(&garbage).unwrap_err();
    assert!(matches!(err, ProviderConfigError::BadKey { .. }), "{err}");

    let user = json!({"type": "authorized_user", "client_email": "a@b"}).to_string();
    let err = ServiceAccount::parse(&user).unwrap_err();
    assert!(err.to_string().contains("authorized_user"), "{err}");

    // Escaped newlines (a key pasted into an environment variable) are fine.
    let escaped = json!({"client_email": "a@b", "private_key": TEST_RSA_PRIVATE_KEY_PEM.replace('\n', "\\n")});
    let account = ServiceAccount::parse(&escaped.to_string()).unwrap();
    assert!(account.private_key.contains('\n'));
    let err = FcmConfig::new(account, None).unwrap_err();
    assert!(err.to_string().contains("project id"), "{err}");
}

// --------------------------------------------------------------- APNS ---

#[tokio::test]
async fn apns_alert_headers_and_body() {
    let (fake, apns) = apns().await;
    let token = apns_token(1);
    let device = test_device("u1", Platform::Apns, &token);
    let before = chrono::Utc::now().timestamp();
    assert_eq!(
        apns.send(&device, &message()).await,
        Outcome::Sent,
        "{:?}",
        fake.rejections()
    );

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert!(r.http2);
    assert_eq!(r.device_token, token);
    assert_eq!(r.header("apns-topic"), Some(TEST_BUNDLE_ID));
    assert_eq!(r.header("apns-push-type"), Some("alert"));
    assert_eq!(r.header("apns-priority"), Some("10"));
    assert_eq!(r.header("apns-collapse-id"), Some("c-1"));
    let expiration: i64 = r.header("apns-expiration").unwrap().parse().unwrap();
    assert!(
        (before + 3600..=before + 3602).contains(&expiration),
        "{expiration}"
    );
    assert!(r.header("authorization").unwrap().starts_with("bearer "));
    assert_eq!(
        r.body,
        json!({
            "aps": {"alert": {"title": "Ada", "body": "Are we still on for lunch?"}, "badge": 5, "sound": "default"},
            "conversationId": "c-1", "messageId": "m-9", "seq": "42",
        })
    );
}

#[tokio::test]
async fn apns_voip_push() {
    let (fake, apns) = apns().await;
    let device = test_device("u1", Platform::ApnsVoip, &apns_token(2));
    assert_eq!(
        apns.send(&device, &incoming_call()).await,
        Outcome::Sent,
        "{:?}",
        fake.rejections()
    );
    assert_eq!(
        apns.send(&device, &call_ended()).await,
        Outcome::Sent,
        "{:?}",
        fake.rejections()
    );
    let requests = fake.requests();
    let r = &requests[0];
    assert_eq!(
        r.header("apns-topic"),
        Some(format!("{TEST_BUNDLE_ID}.voip").as_str())
    );
    assert_eq!(r.header("apns-push-type"), Some("voip"));
    assert_eq!(r.header("apns-priority"), Some("10"));
    assert_eq!(
        r.body,
        json!({"aps": {}, "callId": "k-7", "callerName": "Ada", "video": "true"})
    );
    assert_eq!(requests[1].header("apns-push-type"), Some("voip"));

    // An alert never goes to a VoIP token.
    let outcome = apns.send(&device, &message()).await;
    assert!(matches!(outcome, Outcome::Failed { .. }), "{outcome:?}");
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn apns_call_ended_is_a_background_push() {
    let (fake, apns) = apns().await;
    let device = test_device("u1", Platform::Apns, &apns_token(3));
    assert_eq!(
        apns.send(&device, &call_ended()).await,
        Outcome::Sent,
        "{:?}",
        fake.rejections()
    );
    let r = &fake.requests()[0];
    assert_eq!(r.header("apns-topic"), Some(TEST_BUNDLE_ID));
    assert_eq!(r.header("apns-push-type"), Some("background"));
    assert_eq!(r.header("apns-priority"), Some("5"));
    assert_eq!(
        r.body,
        json!({"aps": {"content-available": 1}, "callId": "k-7", "reason": "answered_elsewhere"})
    );
}

#[tokio::test]
async fn apns_dead_tokens() {
    let (fake, apns) = apns().await;
    for (n, reply) in [
        (10, ApnsReply::Unregistered),
        (11, ApnsReply::BadDeviceToken),
        (12, ApnsReply::DeviceTokenNotForTopic),
    ] {
        let token = apns_token(n);
        fake.script(&token, [reply.clone()]);
        let outcome = apns
            .send(&test_device("u1", Platform::Apns, &token), &message())
            .await;
        assert!(
            matches!(outcome, Outcome::DeadToken { .. }),
            "{reply:?}: {outcome:?}"
        );
        assert_eq!(fake.attempts(&token), 1);
    }
    // A malformed token never reaches APNS.
    let outcome = apns
        .send(&test_device("u1", Platform::Apns, "not/hex?"), &message())
        .await;
    assert!(matches!(outcome, Outcome::DeadToken { .. }), "{outcome:?}");
}

#[tokio::test]
async fn apns_overload_and_errors() {
    let (fake, apns) = apns().await;
    let token = apns_token(20);
    let device = test_device("u1", Platform::Apns, &token);
    fake.script(
        &token,
        [
            ApnsReply::TooManyRequests {
                retry_after: Some(2),
            },
            ApnsReply::ServiceUnavailable { retry_after: None },
            ApnsReply::InternalServerError,
            ApnsReply::Reason {
                status: 400,
                reason: "BadCollapseId".into(),
            },
        ],
    );
    let outcome = apns.send(&device, &message()).await;
    assert!(
        matches!(&outcome, Outcome::Retry { after: Some(after), .. } if *after == Duration::from_secs(2)),
        "{outcome:?}"
    );
    assert!(matches!(
        apns.send(&device, &message()).await,
        Outcome::Retry { after: None, .. }
    ));
    assert!(matches!(
        apns.send(&device, &message()).await,
        Outcome::Retry { .. }
    ));
    assert!(matches!(
        apns.send(&device, &message()).await,
        Outcome::Failed { .. }
    ));
    assert_eq!(apns.send(&device, &message()).await, Outcome::Sent);
    assert_eq!(fake.attempts(&token), 5);
}

#[tokio::test]
async fn apns_expired_provider_token_is_re_signed() {
    let (fake, apns) = apns().await;
    let token = apns_token(30);
    let device = test_device("u1", Platform::Apns, &token);
    assert_eq!(apns.send(&device, &message()).await, Outcome::Sent);
    assert_eq!(apns.send(&device, &message()).await, Outcome::Sent);
    assert_eq!(fake.provider_tokens(), 1, "the provider token is reused");

    fake.script(&token, [ApnsReply::ExpiredProviderToken]);
    let outcome = apns.send(&device, &message()).await;
    assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
    // A new `iat` second, so the re-signed token differs.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(apns.send(&device, &message()).await, Outcome::Sent);
    assert_eq!(fake.provider_tokens(), 2);
}

#[tokio::test]
async fn apns_reuses_one_http2_connection() {
    let (fake, apns) = apns().await;
    let devices: Vec<_> = (0..40u8)
        .map(|n| test_device("u1", Platform::Apns, &apns_token(n)))
        .collect();
    // Concurrent sends from a cold start share the connection being made.
    let n = message();
    let outcomes = futures::future::join_all(devices.iter().map(|d| apns.send(d, &n))).await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Sent), "{outcomes:?}");
    for device in &devices[..10] {
        assert_eq!(apns.send(device, &n).await, Outcome::Sent);
    }
    assert_eq!(fake.requests().len(), 50);
    assert!(fake.requests().iter().all(|r| r.http2));
    assert_eq!(fake.connections(), 1);
}

#[tokio::test]
async fn apns_fake_checks_the_provider_token() {
    let fake = FakeApns::start().await.unwrap();
    let device = test_device("u1", Platform::Apns, &apns_token(1));
    for config in [
        ApnsConfig {
            team_id: "OTHERTEAM1".into(),
            ..fake.config()
        },
        ApnsConfig {
            key_id: "OTHERKEY01".into(),
            ..fake.config()
        },
        ApnsConfig {
            topic: "com.example.other".into(),
            ..fake.config()
        },
    ] {
        let apns = Apns::new(config.clone()).unwrap();
        let outcome = apns.send(&device, &message()).await;
        assert!(
            matches!(outcome, Outcome::Failed { .. }),
            "{config:?}: {outcome:?}"
        );
    }
    assert_eq!(fake.rejections().len(), 3, "{:?}", fake.rejections());
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn apns_unreachable_is_retried() {
    let fake = FakeApns::start().await.unwrap();
    let apns = Apns::new(ApnsConfig {
        url: "http://127.0.0.1:1".into(),
        ..fake.config()
    })
    .unwrap();
    let outcome = apns
        .send(
            &test_device("u1", Platform::Apns, &apns_token(1)),
            &message(),
        )
        .await;
    assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
}

#[test]
fn apns_key_errors_say_what_is_wrong() {
    assert_eq!(
        ApnsConfig::parse_key(TEST_P256_PRIVATE_KEY_PEM)
            .unwrap()
            .trim(),
        TEST_P256_PRIVATE_KEY_PEM.trim()
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("AuthKey_TESTKEY001.p8");
    std::fs::write(&path, TEST_P256_PRIVATE_KEY_PEM).unwrap();
    let config = ApnsConfig::new(
        "TESTKEY001",
        "TESTTEAM01",
        path.to_str().unwrap(),
        "chat.quck.test",
    )
    .unwrap();
    assert_eq!(config.private_key, TEST_P256_PRIVATE_KEY_PEM);
    assert_eq!(config.url, "https://api.push.apple.com");
    assert!(
        !format!("{config:?}").contains("PRIVATE KEY"),
        "Debug hides the key"
    );

    let missing = ApnsConfig::parse_key("/nonexistent/AuthKey.p8").unwrap_err();
    assert!(
        matches!(missing, ProviderConfigError::Unreadable { .. }),
        "{missing}"
    );

    let p384 = ApnsConfig::parse_key(TEST_P384_PRIVATE_KEY_PEM).unwrap_err();
    assert!(matches!(p384, ProviderConfigError::BadKey { .. }), "{p384}");
    assert!(p384.to_string().contains("P-256"), "{p384}");

    let rsa = ApnsConfig::parse_key(TEST_RSA_PRIVATE_KEY_PEM).unwrap_err();
    assert!(
        rsa.to_string().contains("not a PKCS#8 EC private key"),
        "{rsa}"
    );

    let garbage = ApnsConfig::parse_key(
        "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
    )
    .unwrap_err();
    assert!(
        matches!(garbage, ProviderConfigError::BadKey { .. }),
        "{garbage}"
    );
}
