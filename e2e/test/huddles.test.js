// docs/protocol.md#huddles: persistent group rooms of a conversation with the phoenix client:
// huddle:create on `huddle:lobby` (and huddle:created / updated / ended on the conversation's
// `chat:<id>`), joining `huddle:<id>` (reply, refusals, huddle_full), one participant per device,
// toggles and the raised hand, one screen sharer, relays to one device or every device of a user,
// invitations to `webrtc:lobby`, moderation (mute, remove, end), huddles outliving their
// participants, gap-free versions at every client under concurrent changes, the leave grace after
// a socket closes (and a reconnect within it), and (distributed) the audit's cleanup of
// participants whose gateway was SIGKILLed.
// Each device's huddle events are compared with exactly what it should have got, after a short
// quiet period, so an event where it must not be fails the case.
import {describe, it} from "node:test"
import assert from "node:assert/strict"
import {createHmac, randomBytes} from "node:crypto"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {join, push, listen, dumpFrames, disconnectPhoenix} from "../lib/phx.js"
import {ISO_UTC, sleep, waitUntil} from "../lib/util.js"

const LOBBY = "huddle:lobby"
const MAX_PARTICIPANTS = 4
const GRACE_SECS = 2
const AUDIT_SECS = 1
const HUDDLE_ENV = {
  HUDDLE_MAX_PARTICIPANTS: String(MAX_PARTICIPANTS),
  HUDDLE_GRACE_SECS: String(GRACE_SECS),
  HUDDLE_AUDIT_SECS: String(AUDIT_SECS),
}
/** the ghost set: a participant of a SIGKILLed gateway leaves within 2 audits + the grace + one sweep */
const GHOST_GRACE_SECS = 1
const GHOST_AUDIT_SECS = 1
const GHOST_BOUND_MS = 2 * GHOST_AUDIT_SECS * 1000 + GHOST_GRACE_SECS * 1000 + 250
/** how long after the bound the departure may come on a loaded machine */
const GHOST_SLACK_MS = 10_000
/** how long a device must stay silent to count as "got nothing more" */
const QUIET_MS = 700
/** a timer (the grace) fires at most one sweep (250 ms) late; load adds to that */
const LATE_MS = 5000
const STUN_DEFAULT = "stun:stun.l.google.com:19302"
const TURN_URL = "turn:turn.example.test:3478"
const TURN_TTL_SECS = 600
const HUDDLE_ID = /^[0-9a-f]{32}$/
const PARTICIPANT_EVENTS = ["huddle:participant:joined", "huddle:participant:left", "huddle:participant:updated"]
const RELAY_EVENTS = ["webrtc:offer", "webrtc:answer", "webrtc:ice-candidate"]
const unknownHuddleId = () => randomBytes(16).toString("hex")

function assertOk(reply, what){
  assert.equal(reply.status, "ok", `${what} refused: ${JSON.stringify(reply.response)}`)
  return reply.response
}

function assertError(reply, expected, what){
  assert.equal(reply.status, "error", `${what}: expected an error, got ${JSON.stringify(reply)}`)
  assert.deepEqual(reply.response, expected, `${what}: ${JSON.stringify(reply.response)}`)
}

/** coturn REST credential: base64(HMAC-SHA1(secret, username)) */
const turnCredential = (secret, username) => createHmac("sha1", secret).update(username).digest("base64")

/** The participant as every client sees it; `joinedAt` is taken from the server (checked to be ISO). */
function pview(user, deviceId, joinedAt, {audio = true, video = false, screen = false, handRaised = false} = {}){
  return {userId: user, deviceId, audio, video, screen, handRaised, joinedAt}
}

/** Helpers bound to one server set. */
function huddleKit(srv){
  /** `user` on `huddle:lobby` (a socket of its own): `create(conversationId, title?)` checks the reply. */
  async function lobby(user, {deviceId = "lobby", gateway} = {}){
    const socket = await srv.connect(user, {params: {deviceId}, gateway})
    const channel = socket.channel(LOBBY)
    assert.deepEqual(assertOk(await join(channel), `${user} joining ${LOBBY}`), {}, `${LOBBY} join reply`)
    const create = async (conversationId, title) => {
      const t0 = Date.now()
      const payload = title === undefined ? {conversationId} : {conversationId, title}
      const reply = assertOk(await push(channel, "huddle:create", payload), `huddle:create ${JSON.stringify(payload)}`)
      assert.deepEqual(Object.keys(reply), ["huddle"], `huddle:create reply: ${JSON.stringify(reply)}`)
      const h = reply.huddle
      assert.match(String(h.id), HUDDLE_ID, JSON.stringify(h))
      assert.match(String(h.createdAt), ISO_UTC, JSON.stringify(h))
      const created = Date.parse(h.createdAt)
      assert.ok(created >= t0 - 1000 && created <= Date.now() + 1000, `createdAt ${h.createdAt} is not about now`)
      assert.deepEqual(h, {id: h.id, conversationId, title: title ?? null, createdBy: user, createdAt: h.createdAt, participantCount: 0})
      return h
    }
    return {user, socket, channel, create, push: (event, p) => push(channel, event, p)}
  }

  /**
   * One device of `user` joined to `huddle:<huddleId>` with `payload`: inboxes per event
   * (registered before the join), `reply` = the join reply, `events()` = every event on the topic
   * but replies, in order, as [event, payload], `versions()` = the versions of its participant events.
   */
  async function device(user, huddleId, deviceId, {payload = {}, gateway, expect = "ok"} = {}){
    const socket = await srv.connect(user, {params: {deviceId}, gateway})
    const topic = `huddle:${huddleId}`
    const channel = socket.channel(topic, payload)
    const inbox = Object.fromEntries([...PARTICIPANT_EVENTS, ...RELAY_EVENTS, "huddle:ended"].map((e) => [e, listen(channel, e)]))
    const t0 = Date.now()
    const joined = await join(channel)
    if(expect !== "ok"){ return {socket, channel, joined} }
    const reply = assertOk(joined, `${user}/${deviceId} joining ${topic}`)
    const dev = {user, deviceId, socket, channel, topic, inbox, reply, joinedWithin: [t0, Date.now()]}
    dev.events = () => socket.frames.filter((f) => f.topic === topic && f.event !== "phx_reply").map((f) => [f.event, f.payload])
    dev.frames = () => dumpFrames(socket, topic)
    dev.versions = () => dev.events().filter(([e]) => PARTICIPANT_EVENTS.includes(e)).map(([, p]) => p.version)
    dev.push = (event, p = {}) => push(channel, event, p)
    dev.next = (event, opts) => inbox[event].next(opts).catch((err) => {
      throw new Error(`${user}/${deviceId}: ${err.message}; its frames:\n${dev.frames()}`)
    })
    /** its own participant in the join reply (joinedAt checked) */
    dev.me = reply.participants?.find((p) => p.userId === user && p.deviceId === deviceId)
    assert.ok(dev.me, `${user}/${deviceId} is not in its own join reply: ${JSON.stringify(reply)}`)
    assert.match(String(dev.me.joinedAt), ISO_UTC, JSON.stringify(dev.me))
    return dev
  }

  /** After QUIET_MS, each device's events (optionally only `only`) are exactly `expected`. */
  async function assertExactly(pairs, only){
    await sleep(QUIET_MS)
    for(const [dev, expected] of pairs){
      const got = only ? dev.events().filter(([e]) => only.includes(e)) : dev.events()
      assert.deepEqual(got, expected, `${dev.user}/${dev.deviceId} got other ${dev.topic} events than expected; its frames:\n${dev.frames()}`)
    }
  }

  /** A conversation of fresh users `names` (the first creates) and an open huddle in it. */
  async function setup(names = ["a", "b"], {title = "Standup", extraMembers = []} = {}){
    const users = names.map((n) => ids.user(n))
    const conv = ids.conv()
    await srv.putConversation(conv, [...users, ...extraMembers])
    const L = await lobby(users[0])
    const huddle = await L.create(conv, title)
    return {users, conv, huddle, lobby: L}
  }

  /** `user` joined to chat:<conv>; `huddleEvents()` = its huddle:* events there. */
  async function chatMember(user, conv, deviceId = "chat"){
    const socket = await srv.connect(user, {params: {deviceId}})
    const topic = `chat:${conv}`
    const channel = socket.channel(topic)
    const inbox = {created: listen(channel, "huddle:created"), updated: listen(channel, "huddle:updated"), ended: listen(channel, "huddle:ended")}
    assertOk(await join(channel), `${user} joining ${topic}`)
    const huddleEvents = () => socket.frames.filter((f) => f.topic === topic && f.event.startsWith("huddle:")).map((f) => [f.event, f.payload])
    const frames = () => dumpFrames(socket, topic)
    return {user, socket, channel, inbox, huddleEvents, frames}
  }

  return {lobby, device, assertExactly, setup, chatMember}
}

const joinedEv = (participant, version) => ["huddle:participant:joined", {participant, version}]
const updatedEv = (participant, version) => ["huddle:participant:updated", {participant, version}]
const leftEv = (participant, version) => ["huddle:participant:left", {userId: participant.userId, deviceId: participant.deviceId, participant, version}]

for(const mode of modes){
  describe(`huddles [${mode}] (max ${MAX_PARTICIPANTS} devices, grace ${GRACE_SECS} s, audit ${AUDIT_SECS} s)`, () => {
    const srv = useServerSet(mode, {env: HUDDLE_ENV})
    const {lobby, device, assertExactly, setup, chatMember} = huddleKit(srv)

    it("huddle:create: reply {huddle} with every field; the conversation's chat topic gets huddle:created, then huddle:updated as the count changes", {timeout: 60_000}, async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const conv = ids.conv()
      await srv.putConversation(conv, [a, b])
      const B = await chatMember(b, conv)
      const L = await lobby(a)
      const h1 = await L.create(conv, "Standup")
      const created1 = await B.inbox.created.next().catch((err) => { throw new Error(`${err.message}\n${B.frames()}`) })
      assert.deepEqual(created1, {huddle: h1})
      const h2 = await L.create(conv) // no title: null
      assert.notEqual(h2.id, h1.id)
      const created2 = await B.inbox.created.next().catch((err) => { throw new Error(`${err.message}\n${B.frames()}`) })
      assert.deepEqual(created2, {huddle: h2})

      const A = await device(a, h1.id, "a1")
      assert.deepEqual(await B.inbox.updated.next(), {huddleId: h1.id, participantCount: 1})
      assert.deepEqual(assertOk(await A.push("huddle:leave"), "huddle:leave"), {})
      assert.deepEqual(await B.inbox.updated.next(), {huddleId: h1.id, participantCount: 0})
      await sleep(QUIET_MS)
      assert.deepEqual(B.huddleEvents(), [
        ["huddle:created", {huddle: h1}],
        ["huddle:created", {huddle: h2}],
        ["huddle:updated", {huddleId: h1.id, participantCount: 1}],
        ["huddle:updated", {huddleId: h1.id, participantCount: 0}],
      ], `B's huddle events on chat:${conv}:\n${B.frames()}`)
    })

    it("huddle:create refused: non-member forbidden, unknown conversation not_found, bad payloads invalid payload (a 200-byte title is fine)", {timeout: 60_000}, async () => {
      const [a, b, c] = [ids.user("a"), ids.user("b"), ids.user("c")]
      const conv = ids.conv()
      await srv.putConversation(conv, [a, b])
      const B = await chatMember(b, conv)
      const C = await lobby(c)
      const A = await lobby(a)
      assertError(await C.push("huddle:create", {conversationId: conv}), {reason: "forbidden"}, "huddle:create by a non-member")
      assertError(await A.push("huddle:create", {conversationId: ids.conv()}), {reason: "not_found"}, "huddle:create in an unknown conversation")
      assertError(await A.push("huddle:create", {}), {reason: "invalid payload: conversationId is required"}, "huddle:create {}")
      assertError(await A.push("huddle:create", {title: "x"}), {reason: "invalid payload: conversationId is required"}, "huddle:create without conversationId")
      assertError(await A.push("huddle:create", {conversationId: "not an id"}),
        {reason: "invalid payload: conversationId must be an id ([A-Za-z0-9_-], 1 to 64)"}, "huddle:create with a malformed conversationId")
      assertError(await A.push("huddle:create", {conversationId: conv, title: "é".repeat(100) + "x"}),
        {reason: "invalid payload: title must be at most 200 bytes"}, "a title of 201 bytes")
      assertError(await A.push("huddle:create", {conversationId: conv, title: "t".repeat(5000)}),
        {reason: "invalid payload: title must be at most 200 bytes"}, "a title of 5000 bytes")
      assertError(await A.push("huddle:create", {conversationId: conv, title: 42}),
        {reason: "invalid payload: title must be a string"}, "a numeric title")
      // exactly 200 bytes (100 two-byte characters) is accepted
      const h = await A.create(conv, "é".repeat(100))
      await B.inbox.created.next()
      await sleep(QUIET_MS)
      assert.deepEqual(B.huddleEvents(), [["huddle:created", {huddle: h}]], `refused creates told the conversation something:\n${B.frames()}`)
    })

    it("join huddle:<id>: reply {huddle, participants, iceServers, version}; each joiner gets its own joined; non-member unauthorized, unknown not_found, malformed invalid topic", {timeout: 60_000}, async () => {
      const {users: [a, b, c], huddle: h} = await setup(["a", "b", "c"])
      const outsider = ids.user("x")
      const before = Math.floor(Date.now() / 1000)
      const A = await device(a, h.id, "a1", {payload: {audio: false, video: true}})
      const after = Math.ceil(Date.now() / 1000)
      assert.deepEqual(Object.keys(A.reply).sort(), ["huddle", "iceServers", "participants", "version"], JSON.stringify(A.reply))
      assert.deepEqual(A.reply.huddle, {...h, participantCount: 1})
      const pA = pview(a, "a1", A.me.joinedAt, {audio: false, video: true})
      assert.deepEqual(A.reply.participants, [pA])
      assert.equal(A.reply.version, 1, JSON.stringify(A.reply))
      const joinedAt = Date.parse(pA.joinedAt)
      assert.ok(joinedAt >= A.joinedWithin[0] - 1000 && joinedAt <= A.joinedWithin[1] + 1000, `joinedAt ${pA.joinedAt} is not about the join`)

      const [stun, turn, ...rest] = A.reply.iceServers
      assert.deepEqual(rest, [], `more iceServers than STUN and TURN: ${JSON.stringify(A.reply.iceServers)}`)
      assert.deepEqual(stun, {urls: [STUN_DEFAULT]})
      const m = /^(\d+):(.+)$/.exec(String(turn?.username))
      assert.ok(m, `TURN username is not <expiry>:<userId>: ${JSON.stringify(turn)}`)
      assert.equal(m[2], a)
      const expiry = Number(m[1])
      assert.ok(expiry >= before + TURN_TTL_SECS && expiry <= after + TURN_TTL_SECS, `TURN expiry ${expiry} is not now + ${TURN_TTL_SECS}`)
      assert.deepEqual(turn, {urls: [TURN_URL], username: turn.username, credential: turnCredential(srv.turnSecret, turn.username), credentialType: "password"})

      const B = await device(b, h.id, "b1")
      const pB = pview(b, "b1", B.me.joinedAt)
      assert.deepEqual(B.reply.huddle, {...h, participantCount: 2})
      assert.deepEqual(B.reply.participants, [pA, pB], "participants in join order")
      assert.equal(B.reply.version, 2)
      assert.equal(B.reply.iceServers[1]?.username?.endsWith(`:${b}`), true, JSON.stringify(B.reply.iceServers))

      const refused = async (user, huddleId, expected, what) => {
        const {joined} = await device(user, huddleId, "z1", {expect: "error"})
        assertError(joined, expected, what)
      }
      await refused(outsider, h.id, {reason: "unauthorized"}, "a non-member joining")
      await refused(c, unknownHuddleId(), {reason: "not_found"}, "joining an unknown huddle")
      await refused(c, "bad.id", {reason: "invalid topic"}, "joining huddle:bad.id")
      assert.deepEqual(assertOk(await A.push("huddle:participants"), "huddle:participants"), {participants: [pA, pB], version: 2})
      await assertExactly([
        [A, [joinedEv(pA, 1), joinedEv(pB, 2)]],
        [B, [joinedEv(pB, 2)]],
      ])
    })

    it("two devices of one user are two participants with one userId: the others see two joined, neither device is kicked", {timeout: 60_000}, async () => {
      const {users: [a, b], huddle: h} = await setup(["a", "b"])
      const A = await device(a, h.id, "a1")
      const phone = await device(b, h.id, "phone")
      const laptop = await device(b, h.id, "laptop")
      const pA = A.me
      const pPhone = pview(b, "phone", phone.me.joinedAt)
      const pLaptop = pview(b, "laptop", laptop.me.joinedAt)
      assert.deepEqual(laptop.reply.participants, [pA, pPhone, pLaptop])
      assert.equal(laptop.reply.huddle.participantCount, 3)
      // both devices still act as participants
      assert.deepEqual(assertOk(await phone.push("huddle:raise-hand", {raised: true}), "phone's raise-hand"), {version: 4})
      assert.deepEqual(assertOk(await laptop.push("huddle:toggle-video", {enabled: true}), "laptop's toggle-video"), {version: 5})
      const phoneUp = {...pPhone, handRaised: true}
      const laptopUp = {...pLaptop, video: true}
      assert.deepEqual(assertOk(await A.push("huddle:participants"), "huddle:participants"), {participants: [pA, phoneUp, laptopUp], version: 5})
      const tail = [joinedEv(pLaptop, 3), updatedEv(phoneUp, 4), updatedEv(laptopUp, 5)]
      await assertExactly([
        [A, [joinedEv(pA, 1), joinedEv(pPhone, 2), ...tail]],
        [phone, [joinedEv(pPhone, 2), ...tail]],
        [laptop, tail],
      ])
    })

    it("toggles and raise-hand: huddle:participant:updated with the changed field and the reply's version; no change, no event; one screen sharer (screen_in_use)", {timeout: 60_000}, async () => {
      const {users: [a, b, c], huddle: h} = await setup(["a", "b", "c"])
      const A = await device(a, h.id, "a1")
      const B = await device(b, h.id, "b1")
      let pA = A.me
      let pB = B.me
      const seen = [] // the updated events both A and B must get, in order
      const change = async (dev, event, payload, field, value, version) => {
        const r = assertOk(await dev.push(event, payload), `${dev.user}'s ${event} ${JSON.stringify(payload)}`)
        assert.deepEqual(r, {version}, `${event} reply`)
        if(dev === A){ pA = {...pA, [field]: value}; seen.push(updatedEv(pA, version)) } else { pB = {...pB, [field]: value}; seen.push(updatedEv(pB, version)) }
        const got = await B.next("huddle:participant:updated")
        assert.deepEqual(got, seen.at(-1)[1], `B's updated after ${event}`)
      }
      await change(A, "huddle:toggle-audio", {enabled: false}, "audio", false, 3)
      await change(A, "huddle:toggle-video", {enabled: true}, "video", true, 4)
      await change(A, "huddle:toggle-screen", {enabled: true}, "screen", true, 5)
      await change(A, "huddle:raise-hand", {raised: true}, "handRaised", true, 6)
      // nothing changes: the reply has the current version, nobody gets an event
      assert.deepEqual(assertOk(await A.push("huddle:toggle-audio", {enabled: false}), "muting again"), {version: 6})
      assert.deepEqual(assertOk(await A.push("huddle:raise-hand", {raised: true}), "raising again"), {version: 6})
      // one screen sharer at a time
      assertError(await B.push("huddle:toggle-screen", {enabled: true}), {reason: "screen_in_use"}, "B sharing while A shares")
      assert.deepEqual(assertOk(await B.push("huddle:toggle-screen", {enabled: false}), "B stopping a share it has not started"), {version: 6})
      await change(A, "huddle:toggle-screen", {enabled: false}, "screen", false, 7)
      await change(B, "huddle:toggle-screen", {enabled: true}, "screen", true, 8)
      await change(B, "huddle:raise-hand", {raised: true}, "handRaised", true, 9)
      await change(A, "huddle:raise-hand", {raised: false}, "handRaised", false, 10)
      await change(A, "huddle:toggle-audio", {enabled: true}, "audio", true, 11)
      // refused
      const missing = await A.push("huddle:toggle-audio", {})
      assert.equal(missing.status, "error", JSON.stringify(missing))
      assert.match(String(missing.response.reason), /^invalid payload: enabled /, JSON.stringify(missing))
      const notBool = await A.push("huddle:raise-hand", {raised: "yes"})
      assert.equal(notBool.status, "error", JSON.stringify(notBool))
      assert.match(String(notBool.response.reason), /^invalid payload: raised /, JSON.stringify(notBool))
      // a device that left may not change anything
      const C = await device(c, h.id, "c1")
      assert.deepEqual(assertOk(await C.push("huddle:leave"), "C's huddle:leave"), {})
      assertError(await C.push("huddle:toggle-audio", {enabled: false}), {reason: "forbidden"}, "toggle-audio after huddle:leave")
      assertError(await C.push("huddle:raise-hand", {raised: true}), {reason: "forbidden"}, "raise-hand after huddle:leave")
      const pC = C.me
      assert.deepEqual(assertOk(await A.push("huddle:participants"), "huddle:participants"), {participants: [pA, pB], version: 13})
      const tail = [joinedEv(pC, 12), leftEv(pC, 13)]
      await assertExactly([
        [A, [joinedEv(A.me, 1), joinedEv(B.me, 2), ...seen, ...tail]],
        [B, [joinedEv(B.me, 2), ...seen, ...tail]],
        [C, tail],
      ])
    })

    it("relays: webrtc:offer {to, toDeviceId} reaches only that device, without toDeviceId every device of `to`; nobody else gets anything; refusals", {timeout: 60_000}, async () => {
      const {users: [a, b, c, d], huddle: h} = await setup(["a", "b", "c", "d"])
      const A = await device(a, h.id, "a1")
      const phone = await device(b, h.id, "phone")
      const laptop = await device(b, h.id, "laptop")
      const C = await device(c, h.id, "c1")
      const got = {A: [], phone: [], laptop: [], C: []}
      const sdp = {type: "offer", sdp: "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"}

      assert.deepEqual(assertOk(await A.push("webrtc:offer", {to: b, toDeviceId: "laptop", sdp}), "offer to B's laptop"), {})
      const o1 = await laptop.next("webrtc:offer")
      assert.deepEqual(o1, {from: a, fromDeviceId: "a1", sdp})
      got.laptop.push(["webrtc:offer", o1])

      assert.deepEqual(assertOk(await A.push("webrtc:offer", {to: b, sdp: "v=0 every device"}), "offer to every device of B"), {})
      const o2 = {from: a, fromDeviceId: "a1", sdp: "v=0 every device"}
      assert.deepEqual(await phone.next("webrtc:offer"), o2)
      assert.deepEqual(await laptop.next("webrtc:offer"), o2)
      got.phone.push(["webrtc:offer", o2])
      got.laptop.push(["webrtc:offer", o2])

      assert.deepEqual(assertOk(await laptop.push("webrtc:answer", {to: a, toDeviceId: "a1", sdp: "v=0 answer"}), "laptop's answer"), {})
      const ans = {from: b, fromDeviceId: "laptop", sdp: "v=0 answer"}
      assert.deepEqual(await A.next("webrtc:answer"), ans)
      got.A.push(["webrtc:answer", ans])

      const candidate = {candidate: "candidate:1 1 udp 2122260223 10.0.0.1 50000 typ host", sdpMid: "0", sdpMLineIndex: 0}
      assert.deepEqual(assertOk(await C.push("webrtc:ice-candidate", {to: b, toDeviceId: "phone", candidate}), "C's candidate to B's phone"), {})
      const ice = {from: c, fromDeviceId: "c1", candidate}
      assert.deepEqual(await phone.next("webrtc:ice-candidate"), ice)
      got.phone.push(["webrtc:ice-candidate", ice])
      // one device of a user to its other device
      assert.deepEqual(assertOk(await phone.push("webrtc:offer", {to: b, sdp: "v=0 own laptop"}), "phone's offer to its own user"), {})
      const own = {from: b, fromDeviceId: "phone", sdp: "v=0 own laptop"}
      assert.deepEqual(await laptop.next("webrtc:offer"), own)
      got.laptop.push(["webrtc:offer", own])

      // refused: not in the huddle, an unknown device, oneself, no sdp, a sender who left
      assertError(await A.push("webrtc:offer", {to: d, sdp: "v=0"}), {reason: "not_found"}, "an offer to a member not in the huddle")
      assertError(await A.push("webrtc:offer", {to: b, toDeviceId: "tablet", sdp: "v=0"}), {reason: "not_found"}, "an offer to a device not in the huddle")
      assertError(await A.push("webrtc:offer", {to: a, sdp: "v=0"}), {reason: "not_found"}, "an offer to oneself (no other device)")
      assertError(await A.push("webrtc:offer", {to: b}), {reason: "invalid payload: sdp is required"}, "an offer without sdp")
      assertError(await A.push("webrtc:ice-candidate", {to: b}), {reason: "invalid payload: candidate is required"}, "a candidate without candidate")
      assertError(await A.push("webrtc:offer", {sdp: "v=0"}), {reason: "invalid payload: to is required"}, "an offer without to")
      assert.deepEqual(assertOk(await C.push("huddle:leave"), "C's huddle:leave"), {})
      assertError(await C.push("webrtc:offer", {to: a, sdp: "v=0 gone"}), {reason: "forbidden"}, "an offer from a device that left")
      assertError(await A.push("webrtc:offer", {to: c, sdp: "v=0"}), {reason: "not_found"}, "an offer to a device that left")

      await assertExactly([[A, got.A], [phone, got.phone], [laptop, got.laptop], [C, got.C]], RELAY_EVENTS)
    })

    it(`huddle_full: past HUDDLE_MAX_PARTICIPANTS (${MAX_PARTICIPANTS}) devices a new one is refused; a device already in may join again; after a leave the new one gets in`, {timeout: 60_000}, async () => {
      const {users, huddle: h} = await setup(["a", "b", "c", "d", "e"])
      const devs = []
      for(const u of users.slice(0, MAX_PARTICIPANTS)){ devs.push(await device(u, h.id, "d1")) }
      const [A, , , D] = devs
      const late = users[MAX_PARTICIPANTS]
      const {joined: full} = await device(late, h.id, "d1", {expect: "error"})
      assertError(full, {reason: "huddle_full"}, `the ${MAX_PARTICIPANTS + 1}th device joining`)
      const {joined: full2} = await device(users[0], h.id, "second-device", {expect: "error"})
      assertError(full2, {reason: "huddle_full"}, "a participant's second device joining a full huddle")
      // the same device on a new socket takes its place over: no events
      const A2 = await device(users[0], h.id, "d1")
      assert.equal(A2.reply.version, MAX_PARTICIPANTS, `a device joining again changed the version: ${JSON.stringify(A2.reply)}`)
      assert.equal(A2.reply.participants.length, MAX_PARTICIPANTS)
      assert.deepEqual(A2.events(), [], `the returning device got events: ${A2.frames()}`)
      assert.deepEqual(assertOk(await D.push("huddle:leave"), "D's huddle:leave"), {})
      const E = await device(late, h.id, "d1")
      assert.equal(E.reply.version, MAX_PARTICIPANTS + 2)
      assert.deepEqual(E.reply.participants.map((p) => p.userId), [...users.slice(0, 3), late])
      const expectA = [...devs.map((d, i) => joinedEv(d.me, i + 1)), leftEv(D.me, MAX_PARTICIPANTS + 1), joinedEv(E.me, MAX_PARTICIPANTS + 2)]
      await assertExactly([
        [A, expectA],
        [A2, expectA.slice(MAX_PARTICIPANTS)],
        [E, [joinedEv(E.me, MAX_PARTICIPANTS + 2)]],
      ])
    })

    it("persistence: everyone leaves with huddle:leave; the huddle stays, a later join gets it back and versions go on", {timeout: 60_000}, async () => {
      const {users: [a, b], huddle: h} = await setup(["a", "b"])
      const A = await device(a, h.id, "a1")
      const B = await device(b, h.id, "b1")
      assert.deepEqual(assertOk(await B.push("huddle:leave"), "B's huddle:leave"), {})
      assert.deepEqual(await A.next("huddle:participant:left"), leftEv(B.me, 3)[1])
      assert.deepEqual(assertOk(await A.push("huddle:leave"), "A's huddle:leave"), {})
      assert.deepEqual(await B.next("huddle:participant:left", {where: (p) => p.userId === a}), leftEv(A.me, 4)[1])
      assert.deepEqual(assertOk(await A.push("huddle:participants"), "huddle:participants of the empty huddle"), {participants: [], version: 4})
      await sleep(500)
      // back on a new socket: the same huddle, the version goes on
      const B2 = await device(b, h.id, "b1")
      assert.deepEqual(B2.reply.huddle, {...h, participantCount: 1})
      assert.deepEqual(B2.reply.participants, [B2.me])
      assert.equal(B2.reply.version, 5)
      const A2 = await device(a, h.id, "a1")
      assert.equal(A2.reply.version, 6)
      const tail = [leftEv(B.me, 3), leftEv(A.me, 4), joinedEv(B2.me, 5), joinedEv(A2.me, 6)]
      await assertExactly([
        [A, [joinedEv(A.me, 1), joinedEv(B.me, 2), ...tail]],
        [B, [joinedEv(B.me, 2), ...tail]],
        [B2, [joinedEv(B2.me, 5), joinedEv(A2.me, 6)]],
        [A2, [joinedEv(A2.me, 6)]],
      ])
    })

    it("versions: concurrent joins, toggles and leaves; at every client the participant events rise strictly, without a gap after its join reply's version, and replay to the final list", {timeout: 90_000}, async () => {
      const {users: [a, b, c, d, e], huddle: h} = await setup(["a", "b", "c", "d", "e"])
      const clients = []
      const joinAs = async (user, deviceId) => { const dev = await device(user, h.id, deviceId); clients.push(dev); return dev }
      const ok = async (dev, event, payload) => assertOk(await dev.push(event, payload), `${dev.user}/${dev.deviceId}'s ${event} ${JSON.stringify(payload)}`)
      const seq = async (dev, steps) => { for(const [event, payload] of steps){ await ok(await dev, event, payload) } }
      // at most MAX_PARTICIPANTS (4) devices at once in every phase
      const [A, B, C1] = await Promise.all([joinAs(a, "a1"), joinAs(b, "b1"), joinAs(c, "c1")])
      let D
      await Promise.all([
        seq(A, [["huddle:toggle-audio", {enabled: false}], ["huddle:toggle-video", {enabled: true}], ["huddle:raise-hand", {raised: true}], ["huddle:toggle-audio", {enabled: true}]]),
        seq(B, [["huddle:raise-hand", {raised: true}], ["huddle:toggle-video", {enabled: true}], ["huddle:raise-hand", {raised: false}]]),
        seq(C1, [["huddle:toggle-audio", {enabled: false}], ["huddle:leave", {}]]),
        (async () => { D = await joinAs(d, "d1"); await seq(D, [["huddle:toggle-video", {enabled: true}]]) })(),
      ])
      await Promise.all([
        (async () => { const C2 = await joinAs(c, "c2"); await seq(C2, [["huddle:raise-hand", {raised: true}]]) })(),
        seq(B, [["huddle:toggle-screen", {enabled: true}], ["huddle:leave", {}]]),
        seq(A, [["huddle:toggle-video", {enabled: false}], ["huddle:raise-hand", {raised: false}]]),
        seq(D, [["huddle:toggle-audio", {enabled: false}]]),
      ])
      const C2 = clients.find((x) => x.deviceId === "c2")
      await Promise.all([
        (async () => { const E = await joinAs(e, "e1"); await seq(E, [["huddle:toggle-video", {enabled: true}], ["huddle:raise-hand", {raised: true}]]) })(),
        seq(A, [["huddle:toggle-screen", {enabled: true}], ["huddle:toggle-audio", {enabled: false}]]),
        seq(D, [["huddle:leave", {}]]),
        seq(C2, [["huddle:toggle-audio", {enabled: false}], ["huddle:raise-hand", {raised: false}]]),
      ])
      await sleep(QUIET_MS)
      const final = assertOk(await A.push("huddle:participants"), "huddle:participants")
      // 6 joins + 20 changes + 3 leaves
      assert.equal(final.version, 29, `final version: ${JSON.stringify(final)}`)
      assert.deepEqual(final.participants.map((p) => `${p.userId}/${p.deviceId}`), [`${a}/a1`, `${c}/c2`, `${e}/e1`])
      await sleep(QUIET_MS)

      const key = (p) => `${p.userId}/${p.deviceId}`
      const report = []
      for(const dev of clients){
        const who = `${dev.user}/${dev.deviceId} (join reply version ${dev.reply.version})`
        const versions = dev.versions()
        for(let i = 1; i < versions.length; i++){
          assert.ok(versions[i] > versions[i - 1], `${who}: versions not strictly increasing: ${versions.join(",")}\n${dev.frames()}`)
        }
        const after = versions.filter((v) => v > dev.reply.version)
        const expected = Array.from({length: final.version - dev.reply.version}, (_, i) => dev.reply.version + 1 + i)
        assert.deepEqual(after, expected, `${who}: versions after the join reply ${after.join(",")} are not ${dev.reply.version + 1}..${final.version} without gaps\n${dev.frames()}`)
        const own = dev.events().find(([ev, p]) => ev === "huddle:participant:joined" && key(p.participant) === key(dev.me))
        assert.ok(own, `${who}: no joined for itself\n${dev.frames()}`)
        assert.equal(own[1].version, dev.reply.version, `${who}: its own joined has another version than its join reply`)
        // replaying the events after the reply on the reply's list gives the final list
        let list = dev.reply.participants.slice()
        for(const [ev, p] of dev.events()){
          if(!PARTICIPANT_EVENTS.includes(ev) || p.version <= dev.reply.version){ continue }
          if(ev === "huddle:participant:joined"){ list.push(p.participant) }
          else if(ev === "huddle:participant:left"){ list = list.filter((q) => key(q) !== key(p.participant)) }
          else { list = list.map((q) => key(q) === key(p.participant) ? p.participant : q) }
        }
        assert.deepEqual(list, final.participants, `${who}: its list after replaying its events differs from huddle:participants\n${dev.frames()}`)
        report.push(`${dev.deviceId}:${dev.reply.version}+${after.length}`)
      }
      console.log(`huddle versions [${mode}]: ${clients.length} clients, final version ${final.version}; reply version + events after it: ${report.join(" ")}`)
    })

    it(`socket close: exactly one huddle:participant:left, HUDDLE_GRACE_SECS (${GRACE_SECS} s) later`, {timeout: 60_000}, async () => {
      const {users: [a, b], huddle: h} = await setup(["a", "b"])
      const A = await device(a, h.id, "a1")
      const B = await device(b, h.id, "b1")
      const goneAt = Date.now()
      await disconnectPhoenix(B.socket)
      const left = await A.next("huddle:participant:left", {timeoutMs: GRACE_SECS * 1000 + LATE_MS})
      const after = Date.now() - goneAt
      assert.deepEqual(left, leftEv(B.me, 3)[1])
      assert.ok(after >= GRACE_SECS * 1000 - 50, `left ${after} ms after B began closing its socket, before the ${GRACE_SECS} s grace`)
      console.log(`huddle grace [${mode}]: participant:left ${after} ms after the socket closed; HUDDLE_GRACE_SECS=${GRACE_SECS}`)
      await sleep(1000)
      await assertExactly([[A, [joinedEv(A.me, 1), joinedEv(B.me, 2), leftEv(B.me, 3)]]])
      assert.deepEqual(assertOk(await A.push("huddle:participants"), "huddle:participants"), {participants: [A.me], version: 3})
    })

    it(`reconnect of the same device within the grace (${GRACE_SECS} s): no left or joined at the others; the new socket is the participant`, {timeout: 60_000}, async () => {
      const {users: [a, b, c], huddle: h} = await setup(["a", "b", "c"])
      const A = await device(a, h.id, "a1")
      const B = await device(b, h.id, "phone", {payload: {video: true}})
      const W = await device(c, h.id, "w1") // a witness who leaves for good after B's socket closed
      const goneAt = Date.now()
      await disconnectPhoenix(B.socket)
      await disconnectPhoenix(W.socket)
      const B2 = await device(b, h.id, "phone") // no audio/video: keeps its state
      const back = Date.now() - goneAt
      assert.ok(back < GRACE_SECS * 1000, `B took ${back} ms to reconnect and join, not within the ${GRACE_SECS} s grace: the test proves nothing`)
      assert.equal(B2.reply.version, 3, `the device's return changed the version: ${JSON.stringify(B2.reply)}`)
      assert.deepEqual(B2.reply.participants, [A.me, B.me, W.me], "the returning device is the same participant (same joinedAt, video still on)")
      // W did not come back: its left, due after B's would have been, proves B's was cancelled
      const left = await A.next("huddle:participant:left", {timeoutMs: GRACE_SECS * 1000 + LATE_MS})
      assert.deepEqual(left, leftEv(W.me, 4)[1], `the first left is not W's:\n${A.frames()}`)
      await sleep(1000)
      // the new socket gets relays
      assert.deepEqual(assertOk(await A.push("webrtc:offer", {to: b, sdp: "v=0 after reconnect"}), "A's offer to B"), {})
      assert.deepEqual(await B2.next("webrtc:offer"), {from: a, fromDeviceId: "a1", sdp: "v=0 after reconnect"})
      await assertExactly([
        [A, [joinedEv(A.me, 1), joinedEv(B.me, 2), joinedEv(W.me, 3), leftEv(W.me, 4)]],
        [B2, [leftEv(W.me, 4), ["webrtc:offer", {from: a, fromDeviceId: "a1", sdp: "v=0 after reconnect"}]]],
      ])
      assert.deepEqual(assertOk(await A.push("huddle:participants"), "huddle:participants"), {participants: [A.me, B.me], version: 4})
    })

    it("invite: huddle:invite {userIds} → every device of each invitee on webrtc:lobby gets huddle:invited {huddleId, conversationId, title, from}; refusals", {timeout: 60_000}, async () => {
      const outsider = ids.user("x")
      const {users: [a, b, c, d], huddle: h, conv} = await setup(["a", "b", "c", "d"], {title: "Design review"})
      const lobbyDevice = async (user, deviceId) => {
        const socket = await srv.connect(user, {params: {deviceId}})
        const channel = socket.channel("webrtc:lobby")
        const inbox = listen(channel, "huddle:invited")
        assertOk(await join(channel), `${user}/${deviceId} joining webrtc:lobby`)
        const events = () => socket.frames.filter((f) => f.topic === "webrtc:lobby" && !f.event.startsWith("phx_")).map((f) => [f.event, f.payload])
        return {user, deviceId, socket, inbox, events, frames: () => dumpFrames(socket, "webrtc:lobby")}
      }
      const [bPhone, bLaptop, C, D] = [await lobbyDevice(b, "phone"), await lobbyDevice(b, "laptop"), await lobbyDevice(c, "c1"), await lobbyDevice(d, "d1")]
      const A = await device(a, h.id, "a1")
      assert.deepEqual(assertOk(await A.push("huddle:invite", {userIds: [b, c]}), "huddle:invite"), {invited: [b, c]})
      const invited = {huddleId: h.id, conversationId: conv, title: "Design review", from: a}
      for(const dev of [bPhone, bLaptop, C]){
        const got = await dev.inbox.next().catch((err) => { throw new Error(`${dev.user}/${dev.deviceId}: ${err.message}\n${dev.frames()}`) })
        assert.deepEqual(got, invited)
      }
      assertError(await A.push("huddle:invite", {userIds: [outsider]}), {reason: "forbidden"}, "inviting a non-member")
      assertError(await A.push("huddle:invite", {userIds: [c, outsider]}), {reason: "forbidden"}, "inviting a member and a non-member")
      for(const bad of [{}, {userIds: []}, {userIds: "x"}, {userIds: Array.from({length: 51}, (_, i) => `u${i}`)}]){
        const r = await A.push("huddle:invite", bad)
        assert.equal(r.status, "error", `huddle:invite ${JSON.stringify(bad).slice(0, 80)}: ${JSON.stringify(r)}`)
        assert.match(String(r.response.reason), /^invalid payload: userIds /, `huddle:invite ${JSON.stringify(bad).slice(0, 80)}: ${JSON.stringify(r)}`)
      }
      // a member who is not (or no longer) in the huddle may not invite
      const B = await device(b, h.id, "b1")
      assert.deepEqual(assertOk(await B.push("huddle:leave"), "B's huddle:leave"), {})
      assertError(await B.push("huddle:invite", {userIds: [d]}), {reason: "forbidden"}, "an invite from a device that left")
      await sleep(QUIET_MS)
      for(const [dev, expected] of [[bPhone, [["huddle:invited", invited]]], [bLaptop, [["huddle:invited", invited]]], [C, [["huddle:invited", invited]]], [D, []]]){
        assert.deepEqual(dev.events(), expected, `${dev.user}/${dev.deviceId}'s webrtc:lobby events:\n${dev.frames()}`)
      }
    })

    it("escalation: call:escalate turns a connected call into a huddle of its conversation; both get call:escalated, then call:ended escalated, and meet in the huddle", {timeout: 60_000}, async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const conv = ids.conv()
      await srv.putConversation(conv, [a, b])
      const lobbyDevice = async (user, deviceId) => {
        const socket = await srv.connect(user, {params: {deviceId}})
        const channel = socket.channel("webrtc:lobby")
        const inbox = Object.fromEntries(["call:incoming", "call:answered", "call:escalated", "call:ended"].map((e) => [e, listen(channel, e)]))
        assertOk(await join(channel), `${user}/${deviceId} joining webrtc:lobby`)
        const events = () => socket.frames.filter((f) => f.topic === "webrtc:lobby" && !f.event.startsWith("phx_")).map((f) => [f.event, f.payload])
        return {user, deviceId, socket, channel, inbox, events, push: (e, p) => push(channel, e, p), frames: () => dumpFrames(socket, "webrtc:lobby")}
      }
      const A = await lobbyDevice(a, "a1")
      const B = await lobbyDevice(b, "b1")
      const {callId} = assertOk(await A.push("call:initiate", {calleeId: b, conversationId: conv}), "call:initiate")
      await B.inbox["call:incoming"].next({where: (p) => p.callId === callId})
      assertOk(await B.push("call:answer", {callId}), "call:answer")
      await A.inbox["call:answered"].next({where: (p) => p.callId === callId})
      const reply = assertOk(await B.push("call:escalate", {callId}), "call:escalate")
      assert.match(String(reply.huddleId), HUDDLE_ID, JSON.stringify(reply))
      const escalated = {callId, huddleId: reply.huddleId, conversationId: conv}
      assert.deepEqual(reply, escalated)
      for(const dev of [A, B]){
        assert.deepEqual(await dev.inbox["call:escalated"].next({where: (p) => p.callId === callId}), escalated)
        const ended = await dev.inbox["call:ended"].next({where: (p) => p.callId === callId})
        assert.equal(ended.reason, "escalated", `${dev.user}: ${JSON.stringify(ended)}`)
        const order = dev.events().filter(([e, p]) => p.callId === callId && (e === "call:escalated" || e === "call:ended")).map(([e]) => e)
        assert.deepEqual(order, ["call:escalated", "call:ended"], `${dev.user}'s lobby:\n${dev.frames()}`)
      }
      assertError(await A.push("call:escalate", {callId}), {reason: "call_ended"}, "escalating twice")
      // both join the huddle and see each other
      const HA = await device(a, reply.huddleId, "a1")
      const HB = await device(b, reply.huddleId, "b1")
      assert.equal(HB.reply.huddle.conversationId, conv)
      assert.equal(HB.reply.huddle.createdBy, b)
      assert.deepEqual(HB.reply.participants.map((p) => p.userId).sort(), [a, b].sort())
      assert.deepEqual(await HA.next("huddle:participant:joined", {where: (p) => p.participant.userId === b}), {participant: HB.me, version: 2})
    })

    it("moderation: the creator mutes and removes (participant:updated / left, then phx_close on the removed device); others are forbidden", {timeout: 60_000}, async () => {
      const {users: [a, b], huddle: h} = await setup(["a", "b"])
      const A = await device(a, h.id, "a1")
      const phone = await device(b, h.id, "phone")
      const laptop = await device(b, h.id, "laptop")
      assertError(await phone.push("huddle:mute", {userId: a}), {reason: "forbidden"}, "a non-creator's mute")
      assertError(await phone.push("huddle:remove", {userId: a}), {reason: "forbidden"}, "a non-creator's remove")
      assert.deepEqual(assertOk(await A.push("huddle:mute", {userId: b}), "mute every device of B"), {version: 5})
      const mutedPhone = {...phone.me, audio: false}
      const mutedLaptop = {...laptop.me, audio: false}
      assert.deepEqual(assertOk(await A.push("huddle:remove", {userId: b, deviceId: "laptop"}), "remove B's laptop"), {version: 6})
      // the removed device gets its left, then phx_close (after which its channel is gone)
      await waitUntil(() => laptop.channel.state === "closed", {timeoutMs: 5000, what: "phx_close on the removed laptop's channel"})
        .catch((err) => { throw new Error(`${err.message}\n${laptop.frames()}`) })
      await sleep(QUIET_MS)
      assert.deepEqual(laptop.events().slice(-2).map(([e]) => e), ["huddle:participant:left", "phx_close"], `laptop's last events:\n${laptop.frames()}`)
      assert.deepEqual(assertOk(await phone.push("huddle:raise-hand", {raised: true}), "the phone still in"), {version: 7})
      const tail = [joinedEv(laptop.me, 3), updatedEv(mutedPhone, 4), updatedEv(mutedLaptop, 5), leftEv(mutedLaptop, 6)]
      const raised = updatedEv({...mutedPhone, handRaised: true}, 7)
      await assertExactly([
        [A, [joinedEv(A.me, 1), joinedEv(phone.me, 2), ...tail, raised]],
        [phone, [joinedEv(phone.me, 2), ...tail, raised]],
      ])
      // The removed device gets its left on its own path just before phx_close; the topic's copy
      // (same version) may reach it too, first: a client drops an event whose version it has seen.
      const seen = new Set()
      const laptopEvents = laptop.events().filter(([e, p]) => {
        if(!e.startsWith("huddle:participant:")){ return true }
        if(seen.has(p.version)){ return false }
        seen.add(p.version)
        return true
      })
      assert.deepEqual(laptopEvents, [...tail, ["phx_close", {}]], `laptop's events (duplicates by version dropped):\n${laptop.frames()}`)
      assert.equal(laptop.channel.state, "closed", "the removed device's channel is not closed")
    })

    it("end: the creator's huddle:end → huddle:ended then phx_close at every participant, huddle:ended on the chat topic; a later join not_found; a non-creator forbidden", {timeout: 60_000}, async () => {
      const {users: [a, b, c], huddle: h, conv} = await setup(["a", "b", "c"])
      const chat = await chatMember(c, conv)
      const A = await device(a, h.id, "a1")
      const phone = await device(b, h.id, "phone")
      const laptop = await device(b, h.id, "laptop")
      assertError(await phone.push("huddle:end"), {reason: "forbidden"}, "huddle:end by a non-creator")
      // The creator is a participant too: its reply must come before its channel's phx_close (after
      // it, the phoenix client has dropped the channel and the reply never resolves the push); and
      // every participant must get huddle:ended before its phx_close (after it, the channel is gone).
      const endPush = A.push("huddle:end").catch((err) => ({status: "no reply", response: err.message}))
      const devs = [A, phone, laptop]
      await waitUntil(() => devs.every((d) => d.channel.state === "closed"), {timeoutMs: 5000, what: "phx_close on every participant's channel"})
        .catch((err) => { throw new Error(`${err.message}\n${devs.map((d) => `${d.user}/${d.deviceId}:\n${d.frames()}`).join("\n")}`) })
      const ended = {huddleId: h.id}
      const endReply = await endPush
      await sleep(QUIET_MS)
      const problems = []
      if(endReply.status !== "ok" || JSON.stringify(endReply.response) !== "{}"){
        problems.push(`the creator's huddle:end got ${JSON.stringify(endReply)}, not {status: ok, response: {}}; its frames:\n${A.frames()}`)
      }
      for(const dev of devs){
        const tail = dev.events().slice(-2)
        if(JSON.stringify(tail) !== JSON.stringify([["huddle:ended", ended], ["phx_close", {}]])){
          problems.push(`${dev.user}/${dev.deviceId}: its last events are not huddle:ended then phx_close; its frames:\n${dev.frames()}`)
        }
      }
      assert.deepEqual(problems, [], problems.join("\n"))
      const {joined} = await device(c, h.id, "c1", {expect: "error"})
      assertError(joined, {reason: "not_found"}, "joining an ended huddle")
      const L = await lobby(a, {deviceId: "lobby2"})
      assert.notEqual((await L.create(conv)).id, h.id)
      const chatHuddle = chat.huddleEvents().filter(([, p]) => (p.huddleId ?? p.huddle?.id) === h.id)
      assert.deepEqual(chatHuddle, [
        ["huddle:updated", {huddleId: h.id, participantCount: 1}],
        ["huddle:updated", {huddleId: h.id, participantCount: 2}],
        ["huddle:updated", {huddleId: h.id, participantCount: 3}],
        ["huddle:ended", ended],
      ], `chat:${conv}'s events about the huddle:\n${chat.frames()}`)
    })
  })

  if(mode !== "distributed"){ continue }

  // A on gateway 1 (SIGKILLed), B and C on gateway 0: nothing tells huddle-svc; its audit finds
  // gateway 1 unanswered twice, A is away, and leaves one grace later.
  describe(`huddles after a gateway crash [${mode}, 2 gateways] (audit ${GHOST_AUDIT_SECS} s, grace ${GHOST_GRACE_SECS} s)`, () => {
    const srv = useServerSet(mode, {env: {HUDDLE_AUDIT_SECS: String(GHOST_AUDIT_SECS), HUDDLE_GRACE_SECS: String(GHOST_GRACE_SECS)}, gateways: 2})
    const {device, setup, assertExactly} = huddleKit(srv)

    it(`a participant on a SIGKILLed gateway leaves with exactly one participant:left within the bound (~${GHOST_BOUND_MS} ms + slack)`, {timeout: 90_000}, async () => {
      const {users: [a, b, c], huddle: h} = await setup(["a", "b", "c"])
      const A = await device(a, h.id, "a1", {gateway: 1})
      const B = await device(b, h.id, "b1", {gateway: 0})
      const C = await device(c, h.id, "c1", {gateway: 0})
      // relays cross gateways
      assert.deepEqual(assertOk(await B.push("webrtc:offer", {to: a, sdp: "v=0 cross"}), "B's offer to A"), {})
      assert.deepEqual(await A.next("webrtc:offer"), {from: b, fromDeviceId: "b1", sdp: "v=0 cross"})
      // the audit must not take live participants for gone
      await sleep(3 * GHOST_AUDIT_SECS * 1000)
      assert.deepEqual(B.events().filter(([e]) => e === "huddle:participant:left"), [], `a left before the kill:\n${B.frames()}`)

      const killedAt = await srv.killGateway(1)
      const left = await B.next("huddle:participant:left", {timeoutMs: GHOST_BOUND_MS + GHOST_SLACK_MS})
      const ms = Date.now() - killedAt
      assert.deepEqual(left, leftEv(A.me, 4)[1])
      console.log(`huddle ghost cleanup after SIGKILL: ${ms} ms (bound 2 × HUDDLE_AUDIT_SECS + HUDDLE_GRACE_SECS + 0.25 s = ${GHOST_BOUND_MS} ms)`)
      assert.ok(ms <= GHOST_BOUND_MS + GHOST_SLACK_MS, `left ${ms} ms after the kill`)
      await sleep(2 * GHOST_AUDIT_SECS * 1000 + GHOST_GRACE_SECS * 1000)
      const tail = [joinedEv(C.me, 3), leftEv(A.me, 4)]
      await assertExactly([
        [B, [joinedEv(B.me, 2), ...tail]],
        [C, tail],
      ], PARTICIPANT_EVENTS)
      assert.deepEqual(assertOk(await B.push("huddle:participants"), "huddle:participants"), {participants: [B.me, C.me], version: 4})
    })
  })
}
