//! The presence state conformance suite, run against [`MemoryState`] and a
//! real Redis. Ids are random per case so runs can share a Redis prefix.
//!
//! [`MemoryState`]: super::MemoryState

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failed step is a failed test"
)]

use std::sync::Arc;

use super::{Connection, Joined, NodeSeen, PresenceState, MAX_SHOWN_DEVICES};

const GRACE: i64 = 5_000;

pub async fn run_all(state: Arc<dyn PresenceState>) {
    first_device_brings_the_user_online(state.as_ref()).await;
    leaving_waits_for_the_grace_window(state.as_ref()).await;
    reconnect_inside_the_grace_window_changes_nothing(state.as_ref()).await;
    a_user_stays_online_while_any_device_is(state.as_ref()).await;
    close_processed_before_open_stays_closed(state.as_ref()).await;
    silent_nodes_lose_their_connections(state.as_ref()).await;
    a_node_lists_and_counts_its_open_connections(state.as_ref()).await;
    a_node_going_away_closes_its_connections_after_grace(state.as_ref()).await;
    departures_are_taken_once(state.clone()).await;
    presence_of_many_users_in_one_call(state.as_ref()).await;
    a_user_shows_at_most_the_cap_of_devices(state.as_ref()).await;
    state.ping().await.unwrap();
}

fn id(p: &str) -> String {
    format!("{p}{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn conn(node: &str, user: &str, device: &str) -> Connection {
    Connection {
        node_id: node.into(),
        conn_id: id("k"),
        user_id: user.into(),
        device_id: device.into(),
    }
}

pub async fn first_device_brings_the_user_online(s: &dyn PresenceState) {
    let (node, user) = (id("n"), id("u"));
    let phone = conn(&node, &user, "phone");
    match s.connect(&phone, 1_000).await.unwrap() {
        Joined::Device {
            meta,
            user_came_online,
        } => {
            assert!(user_came_online);
            assert_eq!(
                (
                    meta.device_id.as_str(),
                    meta.phx_ref.as_str(),
                    meta.online_at_ms
                ),
                ("phone", phone.conn_id.as_str(), 1_000)
            );
        }
        other => panic!("{other:?}"),
    }
    let second_tab = conn(&node, &user, "phone");
    assert_eq!(
        s.connect(&second_tab, 1_100).await.unwrap(),
        Joined::Nothing,
        "same device: nothing new"
    );
    match s
        .connect(&conn(&node, &user, "laptop"), 1_200)
        .await
        .unwrap()
    {
        Joined::Device {
            user_came_online, ..
        } => assert!(!user_came_online, "already online"),
        other => panic!("{other:?}"),
    }
    let p = &s.presence(std::slice::from_ref(&user)).await.unwrap()[0];
    assert!(p.online());
    assert_eq!(
        p.devices
            .iter()
            .map(|d| d.device_id.as_str())
            .collect::<Vec<_>>(),
        vec!["laptop", "phone"]
    );
}

pub async fn leaving_waits_for_the_grace_window(s: &dyn PresenceState) {
    let (node, user) = (id("n"), id("u"));
    let c = conn(&node, &user, "phone");
    s.connect(&c, 1_000).await.unwrap();
    s.disconnect(&c, 2_000, GRACE).await.unwrap();
    let mine = |v: Vec<super::Left>| {
        v.into_iter()
            .filter(|l| l.user_id == user)
            .collect::<Vec<_>>()
    };
    assert!(
        mine(s.take_departures(2_000 + GRACE - 1).await.unwrap()).is_empty(),
        "not before the window ends"
    );
    assert!(
        s.presence(std::slice::from_ref(&user)).await.unwrap()[0].online(),
        "online during the window"
    );
    let left = mine(s.take_departures(2_000 + GRACE).await.unwrap());
    assert_eq!(left.len(), 1);
    assert!(left[0].user_went_offline);
    assert_eq!(left[0].meta.phx_ref, c.conn_id);
    let p = &s.presence(std::slice::from_ref(&user)).await.unwrap()[0];
    assert!(!p.online());
    assert_eq!(p.last_seen_ms, Some(2_000 + GRACE));
}

pub async fn reconnect_inside_the_grace_window_changes_nothing(s: &dyn PresenceState) {
    let (node, user) = (id("n"), id("u"));
    let first = conn(&node, &user, "phone");
    s.connect(&first, 1_000).await.unwrap();
    s.disconnect(&first, 2_000, GRACE).await.unwrap();
    let again = conn(&id("n"), &user, "phone");
    assert_eq!(
        s.connect(&again, 3_000).await.unwrap(),
        Joined::Nothing,
        "the device never left"
    );
    assert!(s
        .take_departures(2_000 + GRACE * 3)
        .await
        .unwrap()
        .iter()
        .all(|l| l.user_id != user));
    let p = &s.presence(std::slice::from_ref(&user)).await.unwrap()[0];
    assert_eq!(p.devices[0].phx_ref, first.conn_id, "the meta is unchanged");
}

pub async fn a_user_stays_online_while_any_device_is(s: &dyn PresenceState) {
    let (node, user) = (id("n"), id("u"));
    let phone = conn(&node, &user, "phone");
    let laptop = conn(&node, &user, "laptop");
    s.connect(&phone, 1_000).await.unwrap();
    s.connect(&laptop, 1_000).await.unwrap();
    s.disconnect(&phone, 2_000, GRACE).await.unwrap();
    let left: Vec<_> = s
        .take_departures(10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.user_id == user)
        .collect();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].meta.device_id, "phone");
    assert!(!left[0].user_went_offline, "the laptop is still online");
}

pub async fn close_processed_before_open_stays_closed(s: &dyn PresenceState) {
    let (node, user) = (id("n"), id("u"));
    let c = conn(&node, &user, "phone");
    s.disconnect(&c, 1_000, GRACE).await.unwrap();
    assert_eq!(s.connect(&c, 1_001).await.unwrap(), Joined::Ignored);
    assert!(!s.presence(std::slice::from_ref(&user)).await.unwrap()[0].online());
}

pub async fn a_node_lists_and_counts_its_open_connections(s: &dyn PresenceState) {
    let (node, other, user) = (id("n"), id("n"), id("u"));
    let phone = conn(&node, &user, "phone");
    let laptop = conn(&node, &user, "laptop");
    let elsewhere = conn(&other, &user, "tablet");
    for c in [&phone, &laptop, &elsewhere] {
        s.connect(c, 1_000).await.unwrap();
    }
    s.disconnect(&laptop, 2_000, GRACE).await.unwrap();
    assert_eq!(
        s.heartbeat(&node, 3_000).await.unwrap(),
        NodeSeen {
            unknown: false,
            connections: 1
        }
    );
    assert_eq!(s.node_connections(&node).await.unwrap(), vec![phone]);
    assert_eq!(s.node_connections(&other).await.unwrap(), vec![elsewhere]);
    assert!(s.node_connections(&id("n")).await.unwrap().is_empty());
}

pub async fn silent_nodes_lose_their_connections(s: &dyn PresenceState) {
    let (dead, alive, user, other) = (id("n"), id("n"), id("u"), id("u"));
    s.connect(&conn(&dead, &user, "phone"), 1_000)
        .await
        .unwrap();
    s.connect(&conn(&alive, &user, "laptop"), 1_000)
        .await
        .unwrap();
    s.connect(&conn(&dead, &other, "phone"), 1_000)
        .await
        .unwrap();
    assert!(
        !s.heartbeat(&alive, 40_000).await.unwrap().unknown,
        "known from its connections"
    );
    assert!(s.expire_nodes(40_000, 30_000).await.unwrap() >= 1);
    assert_eq!(
        s.heartbeat(&dead, 41_000).await.unwrap(),
        NodeSeen {
            unknown: true,
            connections: 0
        },
        "a node given up for dead is unknown again, without connections"
    );
    assert!(!s.heartbeat(&dead, 42_000).await.unwrap().unknown);
    assert!(
        s.heartbeat(&id("n"), 42_000).await.unwrap().unknown,
        "a new node is unknown"
    );
    let left: Vec<_> = s
        .take_departures(40_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.user_id == user || l.user_id == other)
        .collect();
    assert_eq!(left.len(), 2, "both devices on the dead node leave at once");
    let by = |u: &str| left.iter().find(|l| l.user_id == u).unwrap();
    assert!(!by(&user).user_went_offline, "still on the live node");
    assert!(by(&other).user_went_offline);
    assert_eq!(
        s.expire_nodes(40_000, 30_000).await.unwrap(),
        0,
        "the live node stays"
    );
}

pub async fn a_node_going_away_closes_its_connections_after_grace(s: &dyn PresenceState) {
    let (node, user) = (id("n"), id("u"));
    s.connect(&conn(&node, &user, "phone"), 1_000)
        .await
        .unwrap();
    s.node_gone(&node, 2_000, GRACE).await.unwrap();
    assert!(
        s.take_departures(2_000)
            .await
            .unwrap()
            .iter()
            .all(|l| l.user_id != user),
        "clients may reconnect elsewhere"
    );
    // The client reconnected to another node within the window.
    s.connect(&conn(&id("n"), &user, "phone"), 3_000)
        .await
        .unwrap();
    assert!(s
        .take_departures(20_000)
        .await
        .unwrap()
        .iter()
        .all(|l| l.user_id != user));
    assert!(s.presence(std::slice::from_ref(&user)).await.unwrap()[0].online());
}

pub async fn departures_are_taken_once(s: Arc<dyn PresenceState>) {
    let node = id("n");
    let users: Vec<String> = (0..20).map(|_| id("u")).collect();
    for u in &users {
        let c = conn(&node, u, "d");
        s.connect(&c, 1_000).await.unwrap();
        s.disconnect(&c, 1_000, GRACE).await.unwrap();
    }
    let takers: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.take_departures(100_000).await.unwrap() })
        })
        .collect();
    let mut taken = Vec::new();
    for t in takers {
        taken.extend(
            t.await
                .unwrap()
                .into_iter()
                .map(|l| l.user_id)
                .filter(|u| users.contains(u)),
        );
    }
    taken.sort();
    let mut expected = users.clone();
    expected.sort();
    assert_eq!(taken, expected, "each departure reaches exactly one taker");
}

pub async fn presence_of_many_users_in_one_call(s: &dyn PresenceState) {
    let node = id("n");
    let users: Vec<String> = (0..1000).map(|i| format!("{}-{i}", id("u"))).collect();
    for u in users.iter().step_by(10) {
        s.connect(&conn(&node, u, "d"), 1_000).await.unwrap();
    }
    let all = s.presence(&users).await.unwrap();
    assert_eq!(all.len(), 1000);
    assert_eq!(all.iter().filter(|p| p.online()).count(), 100);
    assert!(
        all.iter().zip(&users).all(|(p, u)| &p.user_id == u),
        "in the order asked"
    );
}

/// One user's many devices: past [`MAX_SHOWN_DEVICES`] shown at once, new
/// ones are hidden (not announced, not listed beyond the cap); a shown one
/// leaving makes room.
pub async fn a_user_shows_at_most_the_cap_of_devices(s: &dyn PresenceState) {
    let (node, user) = (id("n"), id("u"));
    let extra = 10;
    // Each device with two sockets.
    let mut sockets = Vec::new();
    let mut hidden = Vec::new();
    for i in 0..MAX_SHOWN_DEVICES + extra {
        let device = format!("d{i:03}");
        let (first, second) = (conn(&node, &user, &device), conn(&node, &user, &device));
        let at = 1_000 + i64::try_from(i).unwrap();
        match s.connect(&first, at).await.unwrap() {
            Joined::Device { meta, .. } => hidden.push(meta.hidden),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.connect(&second, at).await.unwrap(),
            Joined::Nothing,
            "a second socket of the same device adds nothing"
        );
        sockets.push((first, second));
    }
    assert_eq!(hidden.iter().filter(|h| !**h).count(), MAX_SHOWN_DEVICES);
    assert!(
        hidden[MAX_SHOWN_DEVICES..].iter().all(|h| *h),
        "the devices past the cap are hidden"
    );
    let p = &s.presence(std::slice::from_ref(&user)).await.unwrap()[0];
    assert_eq!(p.devices.len(), MAX_SHOWN_DEVICES, "presence lists the cap");
    assert!(p.devices.iter().all(|d| !d.hidden), "the shown ones");

    // A shown device and a hidden one leave: each says which it was.
    let mine = |v: Vec<super::Left>| {
        v.into_iter()
            .filter(|l| l.user_id == user)
            .collect::<Vec<_>>()
    };
    for (first, second) in [&sockets[0], &sockets[MAX_SHOWN_DEVICES]] {
        s.disconnect(first, 2_000, GRACE).await.unwrap();
        s.disconnect(second, 2_000, GRACE).await.unwrap();
    }
    let mut left = mine(s.take_departures(2_000 + GRACE).await.unwrap());
    left.sort_by(|a, b| a.meta.device_id.cmp(&b.meta.device_id));
    assert_eq!(
        left.iter()
            .map(|l| (l.meta.device_id.as_str(), l.meta.hidden))
            .collect::<Vec<_>>(),
        vec![("d000", false), ("d016", true)]
    );
    // The shown one made room: the next device is shown, the one after not.
    for (device, expect_hidden) in [("fresh1", false), ("fresh2", true)] {
        match s.connect(&conn(&node, &user, device), 8_000).await.unwrap() {
            Joined::Device { meta, .. } => assert_eq!(meta.hidden, expect_hidden, "{device}"),
            other => panic!("{other:?}"),
        }
    }

    // Everything leaves; offline, the count starts again.
    s.node_gone(&node, 9_000, GRACE).await.unwrap();
    let left = mine(s.take_departures(9_000 + GRACE).await.unwrap());
    assert_eq!(left.len(), MAX_SHOWN_DEVICES + extra);
    assert_eq!(
        left.iter().filter(|l| !l.meta.hidden).count(),
        MAX_SHOWN_DEVICES
    );
    assert_eq!(left.iter().filter(|l| l.user_went_offline).count(), 1);
    match s
        .connect(&conn(&id("n"), &user, "again"), 20_000)
        .await
        .unwrap()
    {
        Joined::Device { meta, .. } => assert!(!meta.hidden),
        other => panic!("{other:?}"),
    }
}
