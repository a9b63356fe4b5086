//! The device registry conformance suite: what every [`Devices`] must do.
//! Run against the embedded registry and a real MongoDB-wire server. User
//! ids and tokens are random, so runs can share a database.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failed step is a failed test"
)]

use std::sync::Arc;

use super::{Device, Devices, Platform};

/// A time with milliseconds in it (they must survive the round trip).
const T0: i64 = 1_700_000_000_123;

pub async fn run_all(devices: Arc<dyn Devices>) {
    let d = devices.as_ref();
    unknown_users_have_no_devices(d).await;
    every_field_round_trips(d).await;
    registering_again_updates(d).await;
    registering_for_another_user_moves_the_token(d).await;
    unregister_happens_once(d).await;
    lists_several_users_by_user_then_token(d).await;
    many_users_in_one_call(d).await;
    no_users_no_devices(d).await;
    concurrent_registrations_all_land(devices.clone()).await;
    concurrent_registrations_of_one_token_leave_one(devices.clone()).await;
    devices.ping().await.expect("ping");
}

fn id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

fn device(user_id: &str, platform: Platform) -> Device {
    Device {
        user_id: user_id.to_owned(),
        platform,
        token: id("token-"),
        app: None,
        locale: None,
        updated_at_ms: T0,
    }
}

async fn unknown_users_have_no_devices(devices: &dyn Devices) {
    assert_eq!(devices.devices_of(&[id("nobody")]).await.unwrap(), vec![]);
}

async fn every_field_round_trips(devices: &dyn Devices) {
    let user = id("user");
    // Tokens are in order so the expected list is too.
    let bare = Device {
        token: format!("a-{}", id("")),
        ..device(&user, Platform::Fcm)
    };
    let full = Device {
        token: format!("b-{}", id("")),
        app: Some("com.example.chat".into()),
        locale: Some("zh-Hant-TW".into()),
        updated_at_ms: T0 + 7,
        ..device(&user, Platform::Apns)
    };
    let voip = Device {
        // An APNS-like token: 64 hex digits.
        token: format!("c{}{}", id(""), id("")),
        app: Some("com.example.chat.voip".into()),
        locale: Some("en".into()),
        updated_at_ms: 1,
        ..device(&user, Platform::ApnsVoip)
    };
    for d in [&bare, &full, &voip] {
        devices.register(d).await.unwrap();
    }
    assert_eq!(
        devices
            .devices_of(std::slice::from_ref(&user))
            .await
            .unwrap(),
        vec![bare, full, voip]
    );
}

async fn registering_again_updates(devices: &dyn Devices) {
    let user = id("user");
    let first = Device {
        app: Some("com.example.old".into()),
        locale: Some("fr".into()),
        ..device(&user, Platform::Fcm)
    };
    devices.register(&first).await.unwrap();
    // The same registration again changes nothing.
    devices.register(&first).await.unwrap();
    assert_eq!(
        devices
            .devices_of(std::slice::from_ref(&user))
            .await
            .unwrap(),
        vec![first.clone()]
    );
    // New details replace the old, including clearing the optional ones.
    let updated = Device {
        platform: Platform::Apns,
        app: None,
        locale: None,
        updated_at_ms: T0 + 60_001,
        ..first
    };
    devices.register(&updated).await.unwrap();
    assert_eq!(devices.devices_of(&[user]).await.unwrap(), vec![updated]);
}

async fn registering_for_another_user_moves_the_token(devices: &dyn Devices) {
    let (before, after) = (id("user"), id("user"));
    let kept = device(&before, Platform::Fcm);
    let moved = Device {
        locale: Some("de".into()),
        ..device(&before, Platform::Fcm)
    };
    devices.register(&kept).await.unwrap();
    devices.register(&moved).await.unwrap();
    let now_theirs = Device {
        user_id: after.clone(),
        updated_at_ms: T0 + 1_000,
        ..moved.clone()
    };
    devices.register(&now_theirs).await.unwrap();
    assert_eq!(
        devices
            .devices_of(std::slice::from_ref(&before))
            .await
            .unwrap(),
        vec![kept]
    );
    assert_eq!(
        devices
            .devices_of(std::slice::from_ref(&after))
            .await
            .unwrap(),
        vec![now_theirs.clone()]
    );
    // One record: asked together, the token shows up once, under the new
    // user.
    let both = devices.devices_of(&[before, after]).await.unwrap();
    assert_eq!(
        both.iter()
            .filter(|d| d.token == moved.token)
            .collect::<Vec<_>>(),
        vec![&now_theirs]
    );
}

async fn unregister_happens_once(devices: &dyn Devices) {
    let user = id("user");
    let gone = device(&user, Platform::Apns);
    let stays = device(&user, Platform::Fcm);
    devices.register(&gone).await.unwrap();
    devices.register(&stays).await.unwrap();
    assert!(devices.unregister(&gone.token).await.unwrap());
    assert!(!devices.unregister(&gone.token).await.unwrap());
    assert!(!devices.unregister(&id("never-registered")).await.unwrap());
    assert_eq!(devices.devices_of(&[user]).await.unwrap(), vec![stays]);
}

async fn lists_several_users_by_user_then_token(devices: &dyn Devices) {
    let run = id("");
    let user = |n: u8| format!("{run}-user-{n}");
    let token = |n: u8| format!("{run}-token-{n}");
    let at = |u: u8, t: u8, platform| Device {
        user_id: user(u),
        platform,
        token: token(t),
        app: None,
        locale: None,
        updated_at_ms: T0,
    };
    // Registered out of order: the list is by user, then token.
    let registered = [
        at(3, 1, Platform::Fcm),
        at(1, 5, Platform::Apns),
        at(2, 4, Platform::ApnsVoip),
        at(1, 2, Platform::Fcm),
        at(3, 3, Platform::Apns),
        at(4, 6, Platform::Fcm),
    ];
    for d in &registered {
        devices.register(d).await.unwrap();
    }
    let asked = vec![user(3), user(9), user(1), user(2), user(8)];
    let expected = vec![
        at(1, 2, Platform::Fcm),
        at(1, 5, Platform::Apns),
        at(2, 4, Platform::ApnsVoip),
        at(3, 1, Platform::Fcm),
        at(3, 3, Platform::Apns),
    ];
    assert_eq!(devices.devices_of(&asked).await.unwrap(), expected);
    assert_eq!(
        devices.devices_of(&[user(4)]).await.unwrap(),
        vec![at(4, 6, Platform::Fcm)]
    );
    assert_eq!(
        devices.devices_of(&[user(9), user(8)]).await.unwrap(),
        vec![]
    );
}

async fn many_users_in_one_call(devices: &dyn Devices) {
    // More ids than one SQL statement may bind.
    let users: Vec<String> = (0..1_200).map(|_| id("crowd")).collect();
    let mut expected: Vec<Device> = [0, 1, 499, 500, 501, 999, 1_000, 1_199]
        .iter()
        .map(|&i| device(&users[i], Platform::Fcm))
        .collect();
    futures::future::try_join_all(expected.iter().map(|d| devices.register(d)))
        .await
        .unwrap();
    expected.sort_by(|a, b| (&a.user_id, &a.token).cmp(&(&b.user_id, &b.token)));
    assert_eq!(devices.devices_of(&users).await.unwrap(), expected);
}

async fn no_users_no_devices(devices: &dyn Devices) {
    assert_eq!(devices.devices_of(&[]).await.unwrap(), vec![]);
}

async fn concurrent_registrations_all_land(devices: Arc<dyn Devices>) {
    let (one, other) = (id("user"), id("user"));
    let registered: Vec<Device> = (0..20)
        .map(|i| {
            let user = if i % 2 == 0 { &one } else { &other };
            device(user, Platform::Fcm)
        })
        .collect();
    let tasks: Vec<_> = registered
        .iter()
        .cloned()
        .map(|d| {
            let devices = devices.clone();
            tokio::spawn(async move { devices.register(&d).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let mut expected = registered;
    expected.sort_by(|a, b| (&a.user_id, &a.token).cmp(&(&b.user_id, &b.token)));
    assert_eq!(devices.devices_of(&[one, other]).await.unwrap(), expected);
}

async fn concurrent_registrations_of_one_token_leave_one(devices: Arc<dyn Devices>) {
    let users: Vec<String> = (0..8).map(|_| id("user")).collect();
    let token = id("token-");
    let tasks: Vec<_> = users
        .iter()
        .map(|user| {
            let d = Device {
                token: token.clone(),
                ..device(user, Platform::Apns)
            };
            let devices = devices.clone();
            tokio::spawn(async move { devices.register(&d).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let found = devices.devices_of(&users).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].token, token);
    assert!(users.contains(&found[0].user_id), "{found:?}");
}
