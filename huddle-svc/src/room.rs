//! What each huddle command does to a [`Room`], written once for every
//! backend: the service loads a room, applies one of these, and commits the
//! result atomically (retrying on a lost race), then publishes the events
//! they returned, each with its own `version`.

use crate::huddle::{Participant, Room};

/// A refusal of a room change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("huddle_full")]
    Full,
    #[error("screen_in_use")]
    ScreenInUse,
    /// The device is not (or no longer) in the huddle.
    #[error("not a participant")]
    NotParticipant,
}

/// A change clients are told of (`huddle:participant:<kind>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomEvent {
    pub version: u64,
    pub kind: EventKind,
    pub participant: Participant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Joined,
    Left,
    Updated,
}

impl EventKind {
    pub fn event(self) -> &'static str {
        match self {
            Self::Joined => "huddle:participant:joined",
            Self::Left => "huddle:participant:left",
            Self::Updated => "huddle:participant:updated",
        }
    }
}

/// A device joining.
#[derive(Debug, Clone)]
pub struct Joining<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    pub conn_id: &'a str,
    pub node_id: &'a str,
    pub audio: Option<bool>,
    pub video: Option<bool>,
    pub now_ms: i64,
}

/// A participant's own change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Audio(bool),
    Video(bool),
    Screen(bool),
    Hand(bool),
}

impl Room {
    fn event(&mut self, kind: EventKind, participant: Participant) -> RoomEvent {
        self.version += 1;
        RoomEvent {
            version: self.version,
            kind,
            participant,
        }
    }

    /// A device joins. The same device joining again (a reconnect, within
    /// its grace or not) takes its place over from the new socket: no
    /// leave and join, an `updated` only when the join changed its media.
    /// Past `max` participants: [`RoomError::Full`].
    pub fn join(&mut self, j: &Joining<'_>, max: usize) -> Result<Vec<RoomEvent>, RoomError> {
        if let Some(i) = self
            .participants
            .iter()
            .position(|p| p.is(j.user_id, j.device_id))
        {
            let p = &mut self.participants[i];
            p.conn_id = j.conn_id.to_owned();
            p.node_id = j.node_id.to_owned();
            p.away_until_ms = None;
            let before = (p.audio, p.video);
            p.audio = j.audio.unwrap_or(p.audio);
            p.video = j.video.unwrap_or(p.video);
            if (p.audio, p.video) == before {
                return Ok(Vec::new());
            }
            let p = p.clone();
            return Ok(vec![self.event(EventKind::Updated, p)]);
        }
        if self.participants.len() >= max {
            return Err(RoomError::Full);
        }
        let p = Participant {
            user_id: j.user_id.to_owned(),
            device_id: j.device_id.to_owned(),
            conn_id: j.conn_id.to_owned(),
            node_id: j.node_id.to_owned(),
            audio: j.audio.unwrap_or(true),
            video: j.video.unwrap_or(false),
            screen: false,
            hand_raised: false,
            joined_at_ms: j.now_ms,
            away_until_ms: None,
        };
        self.participants.push(p.clone());
        Ok(vec![self.event(EventKind::Joined, p)])
    }

    /// Devices leave now: those of `user_id` (one with `device_id`), only
    /// from socket `conn_id` when given (a late leave of a socket the device
    /// already replaced changes nothing).
    pub fn leave(
        &mut self,
        user_id: &str,
        device_id: Option<&str>,
        conn_id: Option<&str>,
    ) -> Vec<RoomEvent> {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.participants)
            .into_iter()
            .partition(|p| {
                p.user_id == user_id
                    && device_id.is_none_or(|d| p.device_id == d)
                    && conn_id.is_none_or(|c| p.conn_id == c)
            });
        self.participants = kept;
        gone.into_iter()
            .map(|p| self.event(EventKind::Left, p))
            .collect()
    }

    /// The socket of a device is gone: it leaves at `until_ms` unless it
    /// joins again first. Nothing is announced. False when that socket is
    /// not the device's (it was replaced, or left).
    pub fn away(&mut self, user_id: &str, device_id: &str, conn_id: &str, until_ms: i64) -> bool {
        match self
            .participants
            .iter_mut()
            .find(|p| p.is(user_id, device_id) && p.conn_id == conn_id)
        {
            Some(p) => {
                p.away_until_ms = Some(p.away_until_ms.map_or(until_ms, |t| t.min(until_ms)));
                true
            }
            None => false,
        }
    }

    /// Away participants whose grace ended by `now_ms` leave.
    pub fn depart_due(&mut self, now_ms: i64) -> Vec<RoomEvent> {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.participants)
            .into_iter()
            .partition(|p| p.away_until_ms.is_some_and(|t| t <= now_ms));
        self.participants = kept;
        gone.into_iter()
            .map(|p| self.event(EventKind::Left, p))
            .collect()
    }

    /// A participant's change to its own media or hand; nothing when it
    /// changes nothing. One screen sharer at a time.
    pub fn change(
        &mut self,
        user_id: &str,
        device_id: &str,
        change: Change,
    ) -> Result<Vec<RoomEvent>, RoomError> {
        if change == Change::Screen(true)
            && self
                .participants
                .iter()
                .any(|p| p.screen && !p.is(user_id, device_id))
        {
            return Err(RoomError::ScreenInUse);
        }
        let p = self
            .participants
            .iter_mut()
            .find(|p| p.is(user_id, device_id))
            .ok_or(RoomError::NotParticipant)?;
        let field = match change {
            Change::Audio(_) => &mut p.audio,
            Change::Video(_) => &mut p.video,
            Change::Screen(_) => &mut p.screen,
            Change::Hand(_) => &mut p.hand_raised,
        };
        let (Change::Audio(value)
        | Change::Video(value)
        | Change::Screen(value)
        | Change::Hand(value)) = change;
        if *field == value {
            return Ok(Vec::new());
        }
        *field = value;
        let p = p.clone();
        Ok(vec![self.event(EventKind::Updated, p)])
    }

    /// Mutes every device of `user_id` (one with `device_id`): the
    /// moderator's or the backend's change.
    pub fn mute(&mut self, user_id: &str, device_id: Option<&str>) -> Vec<RoomEvent> {
        let muted: Vec<Participant> = self
            .participants
            .iter_mut()
            .filter(|p| p.user_id == user_id && device_id.is_none_or(|d| p.device_id == d))
            .filter(|p| p.audio)
            .map(|p| {
                p.audio = false;
                p.clone()
            })
            .collect();
        muted
            .into_iter()
            .map(|p| self.event(EventKind::Updated, p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joining<'a>(user: &'a str, device: &'a str, conn: &'a str) -> Joining<'a> {
        Joining {
            user_id: user,
            device_id: device,
            conn_id: conn,
            node_id: "gw1",
            audio: None,
            video: None,
            now_ms: 1_000,
        }
    }

    #[test]
    fn versions_rise_by_one_per_event() {
        let mut room = Room::default();
        let a = room.join(&joining("alice", "phone", "k1"), 8).unwrap();
        let b = room.join(&joining("alice", "laptop", "k2"), 8).unwrap();
        assert_eq!((a[0].version, b[0].version), (1, 2));
        assert_eq!(
            room.participants.len(),
            2,
            "two devices of one user: two participants"
        );
        let left = room.leave("alice", None, None);
        assert_eq!(left.iter().map(|e| e.version).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(room.version, 4);
    }

    #[test]
    fn rejoining_device_takes_its_place_over_without_events() {
        let mut room = Room::default();
        room.join(&joining("alice", "phone", "k1"), 8).unwrap();
        assert!(room.away("alice", "phone", "k1", 5_000));
        assert!(room
            .join(&joining("alice", "phone", "k2"), 8)
            .unwrap()
            .is_empty());
        assert_eq!(room.participants[0].conn_id, "k2");
        assert_eq!(room.participants[0].away_until_ms, None);
        // The old socket's late leave changes nothing.
        assert!(!room.away("alice", "phone", "k1", 6_000));
        assert!(room.leave("alice", Some("phone"), Some("k1")).is_empty());
        assert!(room.depart_due(10_000).is_empty());
        let mut muted = joining("alice", "phone", "k3");
        muted.audio = Some(false);
        let ev = room.join(&muted, 8).unwrap();
        assert_eq!(ev[0].kind, EventKind::Updated);
        assert!(!ev[0].participant.audio);
    }

    #[test]
    fn full_room_refuses_a_new_device_but_not_a_returning_one() {
        let mut room = Room::default();
        room.join(&joining("a", "d", "k1"), 2).unwrap();
        room.join(&joining("b", "d", "k2"), 2).unwrap();
        assert_eq!(room.join(&joining("c", "d", "k3"), 2), Err(RoomError::Full));
        assert!(room.join(&joining("b", "d", "k4"), 2).is_ok());
    }

    #[test]
    fn one_screen_sharer_at_a_time() {
        let mut room = Room::default();
        room.join(&joining("a", "d", "k1"), 8).unwrap();
        room.join(&joining("b", "d", "k2"), 8).unwrap();
        assert_eq!(
            room.change("a", "d", Change::Screen(true)).unwrap().len(),
            1
        );
        assert_eq!(
            room.change("b", "d", Change::Screen(true)),
            Err(RoomError::ScreenInUse)
        );
        assert!(
            room.change("a", "d", Change::Screen(true))
                .unwrap()
                .is_empty(),
            "no change, no event"
        );
        room.leave("a", None, None);
        assert_eq!(
            room.change("b", "d", Change::Screen(true)).unwrap().len(),
            1,
            "freed by the leave"
        );
        assert_eq!(
            room.change("c", "d", Change::Hand(true)),
            Err(RoomError::NotParticipant)
        );
    }

    #[test]
    fn away_devices_leave_when_due_each_once() {
        let mut room = Room::default();
        room.join(&joining("a", "d", "k1"), 8).unwrap();
        room.join(&joining("b", "d", "k2"), 8).unwrap();
        room.away("a", "d", "k1", 5_000);
        room.away("b", "d", "k2", 9_000);
        assert_eq!(room.next_departure(), Some(5_000));
        let gone = room.depart_due(5_000);
        assert_eq!(gone.len(), 1);
        assert_eq!(
            (gone[0].kind, gone[0].participant.user_id.as_str()),
            (EventKind::Left, "a")
        );
        assert!(room.depart_due(5_000).is_empty());
        assert_eq!(room.next_departure(), Some(9_000));
    }
}
