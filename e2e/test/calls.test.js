// docs/protocol.md#webrtc-lobby: 1:1 voice and video call signaling on `webrtc:lobby` with the
// phoenix client: the join reply (iceServers with coturn REST TURN credentials, activeCall),
// call:initiate / answer / reject / end and the events they cause on every device of both parties
// (call:incoming, call:answered, call:rejected, call:ended with each reason), busy, glare, the
// ring timeout, the relays (webrtc:offer / answer / ice-candidate) between the call's two devices
// only, the disconnect grace with resume on a new socket, and refused payloads.
// Each device's lobby events are compared with exactly what it should have got, after a short
// quiet period, so an event where it must not be fails the case.
import {describe, it} from "node:test"
import assert from "node:assert/strict"
import {createHmac, randomBytes} from "node:crypto"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {join, push, listen, dumpFrames, disconnectPhoenix} from "../lib/phx.js"
import {ISO_UTC, sleep} from "../lib/util.js"

const LOBBY = "webrtc:lobby"
const RING_SECS = 3
const GRACE_SECS = 3
const TURN_URL = "turn:turn.example.test:3478"
const TURN_TTL_SECS = 600
const STUN_DEFAULT = "stun:stun.l.google.com:19302"
/** the service's own limit on an SDP or a batch of candidates (bytes of JSON) */
const MAX_RELAY_BYTES = 64 * 1024
/** the gateway's frame limit is raised above MAX_RELAY_BYTES so that the service's check is what answers */
const FRAME_BYTES = 256 * 1024
const CALL_ENV = {
  CALL_RING_TIMEOUT_SECS: String(RING_SECS),
  CALL_DISCONNECT_GRACE_SECS: String(GRACE_SECS),
  TURN_SERVER_URL: TURN_URL,
  TURN_SECRET: `e2e-calls-${randomBytes(8).toString("hex")}`,
  TURN_CREDENTIAL_TTL_SECS: String(TURN_TTL_SECS),
  MAX_FRAME_BYTES: String(FRAME_BYTES),
}
/** how long a device must stay silent to count as "got nothing more" */
const QUIET_MS = 700
/** a timer (ring, grace) fires at most one sweep (250 ms) late; load adds to that, never takes away */
const LATE_MS = 4000
const CALL_EVENTS = ["call:incoming", "call:answered", "call:rejected", "call:ended", "webrtc:offer", "webrtc:answer", "webrtc:ice-candidate"]
const CALL_ID = /^[0-9a-f]{24}$/
const unknownCallId = () => randomBytes(12).toString("hex")

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

for(const mode of modes){
  describe(`calls [${mode}] (ring ${RING_SECS} s, disconnect grace ${GRACE_SECS} s)`, () => {
    const srv = useServerSet(mode, {env: CALL_ENV})

    /**
     * One device of `user` joined to webrtc:lobby: inboxes per call event (registered before the
     * join), `events()` = every lobby event it received, in order, as [event, payload].
     */
    async function device(user, deviceId){
      const socket = await srv.connect(user, {params: {deviceId}})
      const channel = socket.channel(LOBBY)
      const inbox = Object.fromEntries(CALL_EVENTS.map((e) => [e, listen(channel, e)]))
      const reply = await join(channel)
      const joinReply = assertOk(reply, `${user}/${deviceId} joining ${LOBBY}`)
      const events = () => socket.frames.filter((f) => f.topic === LOBBY && !f.event.startsWith("phx_")).map((f) => [f.event, f.payload])
      const frames = () => dumpFrames(socket, LOBBY)
      const dev = {user, deviceId, socket, channel, inbox, joinReply, events, frames}
      dev.push = (event, payload) => push(channel, event, payload)
      dev.next = (event, opts) => inbox[event].next(opts).catch((err) => {
        throw new Error(`${user}/${deviceId}: ${err.message}; its lobby frames:\n${frames()}`)
      })
      return dev
    }

    /** After QUIET_MS, each device's lobby events are exactly `expected` ([device, [[event, payload], ...]] pairs). */
    async function assertExactly(pairs){
      await sleep(QUIET_MS)
      for(const [dev, expected] of pairs){
        assert.deepEqual(dev.events(), expected, `${dev.user}/${dev.deviceId} got other lobby events than expected; its frames:\n${dev.frames()}`)
      }
    }

    async function initiate(caller, calleeId, extra = {}){
      const r = assertOk(await caller.push("call:initiate", {calleeId, ...extra}), "call:initiate")
      assert.deepEqual(Object.keys(r), ["callId"], `call:initiate reply: ${JSON.stringify(r)}`)
      assert.match(r.callId, CALL_ID)
      return r.callId
    }

    /** The call:incoming `dev` got for `callId`, checked field by field. */
    async function incoming(dev, callId, callerId, {callType = "audio", conversationId = null, after = 0} = {}){
      const ev = await dev.next("call:incoming", {where: (p) => p.callId === callId})
      assert.match(String(ev.createdAt), ISO_UTC, JSON.stringify(ev))
      const created = Date.parse(ev.createdAt)
      assert.ok(created >= after - 1000 && created <= Date.now() + 1000, `createdAt ${ev.createdAt} is not about now: ${JSON.stringify(ev)}`)
      assert.deepEqual(ev, {callId, callerId, callType, conversationId, createdAt: ev.createdAt})
      return ev
    }

    /** A (one device) calls B (given devices, all joined); B's `answerer` answers. */
    async function connected({bDevices = ["phone"], answerer = 0, callType} = {}){
      const [a, b] = [ids.user("a"), ids.user("b")]
      const A = await device(a, "a1")
      const Bs = []
      for(const d of bDevices){ Bs.push(await device(b, d)) }
      const callId = await initiate(A, b, callType ? {callType} : {})
      for(const B of Bs){ await incoming(B, callId, a, callType ? {callType} : {}) }
      const B = Bs[answerer]
      assert.deepEqual(assertOk(await B.push("call:answer", {callId}), "call:answer"), {callId})
      const answered = await A.next("call:answered", {where: (p) => p.callId === callId})
      assert.deepEqual(answered, {callId, answeredBy: b, answeredByDevice: B.deviceId})
      return {a, b, A, B, Bs, callId}
    }

    it("join reply: iceServers = the STUN default and TURN with REST credentials (<expiry>:<userId>, HMAC-SHA1); no activeCall", async () => {
      const user = ids.user("ice")
      const before = Math.floor(Date.now() / 1000)
      const D = await device(user, "d1")
      const after = Math.ceil(Date.now() / 1000)
      const reply = D.joinReply
      assert.deepEqual(Object.keys(reply), ["iceServers"], `join reply: ${JSON.stringify(reply)}`)
      const [stun, turn, ...rest] = reply.iceServers
      assert.deepEqual(rest, [], `more iceServers than STUN and TURN: ${JSON.stringify(reply)}`)
      assert.deepEqual(stun, {urls: [STUN_DEFAULT]})
      const m = /^(\d+):(.+)$/.exec(String(turn?.username))
      assert.ok(m, `TURN username is not <expiry>:<userId>: ${JSON.stringify(turn)}`)
      assert.equal(m[2], user)
      const expiry = Number(m[1])
      assert.ok(expiry >= before + TURN_TTL_SECS && expiry <= after + TURN_TTL_SECS,
        `expiry ${expiry} not within [${before + TURN_TTL_SECS}, ${after + TURN_TTL_SECS}] (now + TURN_CREDENTIAL_TTL_SECS)`)
      assert.deepEqual(turn, {
        urls: [TURN_URL],
        username: `${expiry}:${user}`,
        credential: turnCredential(CALL_ENV.TURN_SECRET, `${expiry}:${user}`),
        credentialType: "password",
      })
      await assertExactly([[D, []]])
    })

    it("call:incoming on both of B's devices; the phone answers: A gets call:answered, the laptop call:ended answered_elsewhere, a second answer is refused", async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const A = await device(a, "a1")
      const phone = await device(b, "phone")
      const laptop = await device(b, "laptop")
      const t0 = Date.now()
      const callId = await initiate(A, b, {callType: "video"})
      const inPhone = await incoming(phone, callId, a, {callType: "video", after: t0})
      const inLaptop = await incoming(laptop, callId, a, {callType: "video", after: t0})
      assert.deepEqual(inLaptop, inPhone)

      assert.deepEqual(assertOk(await phone.push("call:answer", {callId}), "phone's call:answer"), {callId})
      const answered = await A.next("call:answered")
      assert.deepEqual(answered, {callId, answeredBy: b, answeredByDevice: "phone"})
      const elsewhere = await laptop.next("call:ended")
      assert.deepEqual(elsewhere, {callId, reason: "answered_elsewhere"})

      assertError(await laptop.push("call:answer", {callId}), {reason: "answered_elsewhere"}, "laptop's call:answer after the phone's")
      // the answering device repeating its answer (a retry) changes nothing
      assert.deepEqual(assertOk(await phone.push("call:answer", {callId}), "phone's second call:answer"), {callId})
      await assertExactly([
        [A, [["call:answered", answered]]],
        [phone, [["call:incoming", inPhone]]],
        [laptop, [["call:incoming", inLaptop], ["call:ended", elsewhere]]],
      ])
    })

    it("call:reject from one of B's devices: A gets call:rejected {callId, reason}, every device of both gets call:ended rejected", async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const A = await device(a, "a1")
      const phone = await device(b, "phone")
      const laptop = await device(b, "laptop")
      const callId = await initiate(A, b)
      const inPhone = await incoming(phone, callId, a)
      const inLaptop = await incoming(laptop, callId, a)

      assert.deepEqual(assertOk(await laptop.push("call:reject", {callId, reason: "declined"}), "call:reject"), {callId})
      const rejected = await A.next("call:rejected")
      assert.deepEqual(rejected, {callId, reason: "declined"})
      const ended = {callId, reason: "rejected", endedBy: b}
      for(const dev of [A, phone, laptop]){ assert.deepEqual(await dev.next("call:ended"), ended) }
      assertError(await phone.push("call:answer", {callId}), {reason: "call_ended"}, "call:answer after the reject")
      await assertExactly([
        [A, [["call:rejected", rejected], ["call:ended", ended]]],
        [phone, [["call:incoming", inPhone], ["call:ended", ended]]],
        [laptop, [["call:incoming", inLaptop], ["call:ended", ended]]],
      ])
    })

    it("busy: a third user calling either party, or a party calling someone else, is refused {reason: busy} (ringing and connected)", async () => {
      const [a, b, c, d] = [ids.user("a"), ids.user("b"), ids.user("c"), ids.user("d")]
      const A = await device(a, "a1")
      const B = await device(b, "b1")
      const C = await device(c, "c1")
      const D = await device(d, "d1")
      const callId = await initiate(A, b)
      const inB = await incoming(B, callId, a)
      const busy = {reason: "busy"}
      // while it rings
      assertError(await C.push("call:initiate", {calleeId: a}), busy, "C calling A (ringing)")
      assertError(await C.push("call:initiate", {calleeId: b}), busy, "C calling B (ringing)")
      assertError(await A.push("call:initiate", {calleeId: d}), busy, "A calling D while its call rings")
      assertError(await B.push("call:initiate", {calleeId: d}), busy, "B calling D while A's call rings")
      // once connected
      assertOk(await B.push("call:answer", {callId}), "call:answer")
      const answered = await A.next("call:answered")
      assertError(await C.push("call:initiate", {calleeId: a}), busy, "C calling A (connected)")
      assertError(await C.push("call:initiate", {calleeId: b, callType: "video"}), busy, "C calling B (connected)")
      assertError(await A.push("call:initiate", {calleeId: d}), busy, "A calling D during its call")
      assertError(await A.push("call:initiate", {calleeId: b}), busy, "A calling B again during their call")
      assertError(await B.push("call:initiate", {calleeId: a}), busy, "B calling A during their call")
      await assertExactly([
        [A, [["call:answered", answered]]],
        [B, [["call:incoming", inB]]],
        [C, []],
        [D, []],
      ])
    })

    it("glare: B calls A while A's call to B rings: B's reply {callId: A's, merged: true}, A gets call:answered, relays flow both ways", async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const A = await device(a, "a1")
      const phone = await device(b, "phone")
      const laptop = await device(b, "laptop")
      const callId = await initiate(A, b, {callType: "video"})
      const inPhone = await incoming(phone, callId, a, {callType: "video"})
      const inLaptop = await incoming(laptop, callId, a, {callType: "video"})

      const merged = assertOk(await phone.push("call:initiate", {calleeId: a, callType: "video"}), "B's call:initiate to A")
      assert.deepEqual(merged, {callId, merged: true})
      const answered = await A.next("call:answered")
      assert.deepEqual(answered, {callId, answeredBy: b, answeredByDevice: "phone"})
      const elsewhere = await laptop.next("call:ended")
      assert.deepEqual(elsewhere, {callId, reason: "answered_elsewhere"})

      assert.deepEqual(assertOk(await A.push("webrtc:offer", {callId, sdp: "v=0 glare-offer"}), "A's offer"), {})
      const offer = await phone.next("webrtc:offer")
      assert.deepEqual(offer, {callId, from: a, fromDeviceId: "a1", sdp: "v=0 glare-offer"})
      assert.deepEqual(assertOk(await phone.push("webrtc:answer", {callId, sdp: "v=0 glare-answer"}), "B's answer"), {})
      const answer = await A.next("webrtc:answer")
      assert.deepEqual(answer, {callId, from: b, fromDeviceId: "phone", sdp: "v=0 glare-answer"})
      await assertExactly([
        [A, [["call:answered", answered], ["webrtc:answer", answer]]],
        [phone, [["call:incoming", inPhone], ["webrtc:offer", offer]]],
        [laptop, [["call:incoming", inLaptop], ["call:ended", elsewhere]]],
      ])
    })

    it(`ring timeout: unanswered, both get call:ended no_answer after CALL_RING_TIMEOUT_SECS (${RING_SECS} s); a late answer gets call_ended`, async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const A = await device(a, "a1")
      const B = await device(b, "b1")
      const t0 = Date.now()
      const callId = await initiate(A, b)
      const inB = await incoming(B, callId, a, {after: t0})
      const ended = {callId, reason: "no_answer"}
      const bound = {timeoutMs: RING_SECS * 1000 + LATE_MS}
      assert.deepEqual(await A.next("call:ended", bound), ended)
      const atA = Date.now() - t0
      assert.deepEqual(await B.next("call:ended", bound), ended)
      const atB = Date.now() - t0
      for(const [who, ms] of [["A", atA], ["B", atB]]){
        assert.ok(ms >= RING_SECS * 1000 - 50 && ms <= RING_SECS * 1000 + LATE_MS,
          `${who} got no_answer ${ms} ms after call:initiate, not within [${RING_SECS * 1000}, ${RING_SECS * 1000 + LATE_MS}] ms`)
      }
      console.log(`ring timeout [${mode}]: call:ended no_answer after ${atA} ms (A), ${atB} ms (B); CALL_RING_TIMEOUT_SECS=${RING_SECS}`)
      assertError(await B.push("call:answer", {callId}), {reason: "call_ended"}, "call:answer after the ring timeout")
      await assertExactly([
        [A, [["call:ended", ended]]],
        [B, [["call:incoming", inB], ["call:ended", ended]]],
      ])
    })

    it("cancel: A's call:end while it rings: every device of both gets call:ended {reason: cancelled, endedBy: A}", async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const A = await device(a, "a1")
      const phone = await device(b, "phone")
      const laptop = await device(b, "laptop")
      const callId = await initiate(A, b)
      const inPhone = await incoming(phone, callId, a)
      const inLaptop = await incoming(laptop, callId, a)
      assert.deepEqual(assertOk(await A.push("call:end", {callId}), "call:end"), {callId})
      const ended = {callId, reason: "cancelled", endedBy: a}
      for(const dev of [phone, laptop, A]){ assert.deepEqual(await dev.next("call:ended"), ended) }
      // ending it again is a no-op; answering it is refused
      assert.deepEqual(assertOk(await A.push("call:end", {callId}), "second call:end"), {callId})
      assertError(await phone.push("call:answer", {callId}), {reason: "call_ended"}, "call:answer after the cancel")
      await assertExactly([
        [A, [["call:ended", ended]]],
        [phone, [["call:incoming", inPhone], ["call:ended", ended]]],
        [laptop, [["call:incoming", inLaptop], ["call:ended", ended]]],
      ])
    })

    it("hangup after connect: both get call:ended {reason: hangup, endedBy, durationMs >= 0}; both are free to call again", async () => {
      const {a, b, A, B, callId} = await connected()
      const answeredAt = Date.now()
      await sleep(300)
      assert.deepEqual(assertOk(await B.push("call:end", {callId}), "call:end"), {callId})
      const talk = Date.now() - answeredAt
      const atA = await A.next("call:ended")
      const atB = await B.next("call:ended")
      assert.deepEqual(atB, atA, "the parties got different call:ended")
      assert.deepEqual(Object.keys(atA).sort(), ["callId", "durationMs", "endedBy", "reason"], JSON.stringify(atA))
      assert.deepEqual(atA, {callId, reason: "hangup", endedBy: b, durationMs: atA.durationMs})
      assert.ok(Number.isInteger(atA.durationMs) && atA.durationMs >= 0, `durationMs: ${JSON.stringify(atA)}`)
      assert.ok(atA.durationMs <= talk + 1000, `durationMs ${atA.durationMs} > the ${talk} ms between the answer and the hangup`)
      assertError(await A.push("webrtc:offer", {callId, sdp: "v=0 late"}), {reason: "call_ended"}, "relay after the hangup")
      const next = await initiate(A, b)
      assert.notEqual(next, callId)
      const inB = await incoming(B, next, a)
      assert.deepEqual(assertOk(await A.push("call:end", {callId: next}), "call:end"), {callId: next})
      const cancelled = {callId: next, reason: "cancelled", endedBy: a}
      assert.deepEqual(await B.next("call:ended", {where: (p) => p.callId === next}), cancelled)
      await assertExactly([
        [A, [["call:answered", {callId, answeredBy: b, answeredByDevice: "phone"}], ["call:ended", atA], ["call:ended", cancelled]]],
        [B, [["call:incoming", B.events()[0][1]], ["call:ended", atB], ["call:incoming", inB], ["call:ended", cancelled]]],
      ])
    })

    it("relays go only between the call's two devices: offer, answer, ice-candidate (single and batched); a third user and B's other device are forbidden", async () => {
      const [c] = [ids.user("c")]
      const {a, b, A, Bs: [phone, laptop], callId} = await connected({bDevices: ["phone", "laptop"]})
      const C = await device(c, "c1")
      const sdpOffer = {type: "offer", sdp: "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"}
      const candidate = {candidate: "candidate:1 1 udp 2122260223 10.0.0.1 50000 typ host", sdpMid: "0", sdpMLineIndex: 0}
      const batch = [
        {candidate: "candidate:2 1 udp 1686052607 203.0.113.7 50001 typ srflx", sdpMid: "0", sdpMLineIndex: 0},
        {candidate: "candidate:3 1 tcp 1518280447 10.0.0.2 9 typ host tcptype active", sdpMid: "0", sdpMLineIndex: 0},
      ]
      const got = {A: [], phone: []}

      assert.deepEqual(assertOk(await A.push("webrtc:offer", {callId, sdp: sdpOffer}), "A's offer"), {})
      const offer = await phone.next("webrtc:offer")
      assert.deepEqual(offer, {callId, from: a, fromDeviceId: "a1", sdp: sdpOffer})
      got.phone.push(["webrtc:offer", offer])

      assert.deepEqual(assertOk(await phone.push("webrtc:answer", {callId, sdp: "v=0 answer"}), "B's answer"), {})
      const answer = await A.next("webrtc:answer")
      assert.deepEqual(answer, {callId, from: b, fromDeviceId: "phone", sdp: "v=0 answer"})
      got.A.push(["webrtc:answer", answer])

      assert.deepEqual(assertOk(await A.push("webrtc:ice-candidate", {callId, candidate}), "A's candidate"), {})
      const single = await phone.next("webrtc:ice-candidate")
      assert.deepEqual(single, {callId, from: a, fromDeviceId: "a1", candidate})
      got.phone.push(["webrtc:ice-candidate", single])

      assert.deepEqual(assertOk(await phone.push("webrtc:ice-candidate", {callId, candidates: batch}), "B's batch"), {})
      const batched = await A.next("webrtc:ice-candidate")
      assert.deepEqual(batched, {callId, from: b, fromDeviceId: "phone", candidates: batch})
      got.A.push(["webrtc:ice-candidate", batched])

      const forbidden = {reason: "forbidden"}
      assertError(await C.push("webrtc:offer", {callId, sdp: "v=0 intruder"}), forbidden, "C's offer on A and B's call")
      assertError(await C.push("webrtc:ice-candidate", {callId, candidate}), forbidden, "C's candidate on A and B's call")
      assertError(await C.push("call:end", {callId}), forbidden, "C's call:end on A and B's call")
      assertError(await laptop.push("webrtc:offer", {callId, sdp: "v=0 laptop"}), forbidden, "B's laptop's offer")
      assertError(await laptop.push("webrtc:ice-candidate", {callId, candidates: batch}), forbidden, "B's laptop's candidates")
      assertError(await laptop.push("webrtc:answer", {callId, sdp: "v=0 laptop"}), forbidden, "B's laptop's answer")

      await assertExactly([
        [A, [["call:answered", {callId, answeredBy: b, answeredByDevice: "phone"}], ...got.A]],
        [phone, [["call:incoming", phone.events()[0][1]], ...got.phone]],
        [laptop, [["call:incoming", laptop.events()[0][1]], ["call:ended", {callId, reason: "answered_elsewhere"}]]],
        [C, []],
      ])
    })

    it(`disconnect grace: B's socket drops and a new one joins within ${GRACE_SECS} s: activeCall {state: connected, onThisDevice: true}, the call goes on`, {timeout: 60_000}, async () => {
      const {a, b, A, B, callId} = await connected({callType: "video"})
      const goneAt = Date.now()
      await disconnectPhoenix(B.socket)
      const B2 = await device(b, "phone")
      const back = Date.now() - goneAt
      assert.ok(back < GRACE_SECS * 1000, `B took ${back} ms to reconnect and join, not within the ${GRACE_SECS} s grace: the test proves nothing`)
      const active = B2.joinReply.activeCall
      assert.ok(active, `no activeCall in the join reply: ${JSON.stringify(B2.joinReply)}`)
      assert.match(String(active.createdAt), ISO_UTC, JSON.stringify(active))
      assert.match(String(active.answeredAt), ISO_UTC, JSON.stringify(active))
      assert.deepEqual(active, {
        callId, callerId: a, calleeId: b, callType: "video", conversationId: null, state: "connected",
        createdAt: active.createdAt, answeredAt: active.answeredAt, onThisDevice: true,
      })
      assert.ok(Array.isArray(B2.joinReply.iceServers) && B2.joinReply.iceServers.length === 2, JSON.stringify(B2.joinReply))

      // relays reach the new socket, and it may relay
      assert.deepEqual(assertOk(await A.push("webrtc:offer", {callId, sdp: "v=0 renegotiate"}), "A's offer after the resume"), {})
      const offer = await B2.next("webrtc:offer")
      assert.deepEqual(offer, {callId, from: a, fromDeviceId: "a1", sdp: "v=0 renegotiate"})
      assert.deepEqual(assertOk(await B2.push("webrtc:answer", {callId, sdp: "v=0 again"}), "B's answer after the resume"), {})
      const answer = await A.next("webrtc:answer")
      assert.deepEqual(answer, {callId, from: b, fromDeviceId: "phone", sdp: "v=0 again"})

      // the grace timer was cancelled: nothing ends the call once the grace is over
      const waitFor = GRACE_SECS * 1000 + 1500 - (Date.now() - goneAt)
      if(waitFor > 0){ await sleep(waitFor) }
      await assertExactly([
        [A, [["call:answered", {callId, answeredBy: b, answeredByDevice: "phone"}], ["webrtc:answer", answer]]],
        [B2, [["webrtc:offer", offer]]],
      ])
      // and it is still the same call: A's join on a second device sees it, not on that device
      const A2 = await device(a, "a2")
      assert.equal(A2.joinReply.activeCall?.callId, callId, JSON.stringify(A2.joinReply))
      assert.equal(A2.joinReply.activeCall?.state, "connected", JSON.stringify(A2.joinReply))
      assert.equal(A2.joinReply.activeCall?.onThisDevice, false, JSON.stringify(A2.joinReply))
      assert.deepEqual(assertOk(await B2.push("call:end", {callId}), "call:end"), {callId})
      const ended = await A.next("call:ended")
      assert.equal(ended.reason, "hangup", JSON.stringify(ended))
    })

    it("the same device on a new socket takes the call over before its old socket closes; the old one closing later ends nothing", {timeout: 60_000}, async () => {
      const {a, b, A, B, callId} = await connected()
      // The phone comes back on a new socket while the old one still looks open (mobile networks).
      const B2 = await device(b, "phone")
      assert.equal(B2.joinReply.activeCall?.callId, callId, JSON.stringify(B2.joinReply))
      assert.equal(B2.joinReply.activeCall?.onThisDevice, true, JSON.stringify(B2.joinReply))
      const goneAt = Date.now()
      await disconnectPhoenix(B.socket)
      assert.deepEqual(assertOk(await A.push("webrtc:offer", {callId, sdp: "v=0 restart"}), "A's offer"), {})
      const offer = await B2.next("webrtc:offer")
      assert.deepEqual(offer, {callId, from: a, fromDeviceId: "a1", sdp: "v=0 restart"})
      const waitFor = GRACE_SECS * 1000 + 1500 - (Date.now() - goneAt)
      if(waitFor > 0){ await sleep(waitFor) }
      await assertExactly([
        [A, [["call:answered", {callId, answeredBy: b, answeredByDevice: "phone"}]]],
        [B2, [["webrtc:offer", offer]]],
      ])
      assert.deepEqual(assertOk(await A.push("call:end", {callId}), "call:end"), {callId})
      const ended = await B2.next("call:ended")
      assert.equal(ended.reason, "hangup", JSON.stringify(ended))
    })

    it(`disconnect grace: B stays away longer than ${GRACE_SECS} s: A gets call:ended {reason: disconnected, endedBy: B}`, {timeout: 60_000}, async () => {
      const {b, A, B, callId} = await connected()
      const goneAt = Date.now()
      await disconnectPhoenix(B.socket)
      const ended = await A.next("call:ended", {timeoutMs: GRACE_SECS * 1000 + LATE_MS})
      const after = Date.now() - goneAt
      assert.deepEqual(Object.keys(ended).sort(), ["callId", "durationMs", "endedBy", "reason"], JSON.stringify(ended))
      assert.deepEqual(ended, {callId, reason: "disconnected", endedBy: b, durationMs: ended.durationMs})
      assert.ok(Number.isInteger(ended.durationMs) && ended.durationMs >= 0, JSON.stringify(ended))
      assert.ok(after >= GRACE_SECS * 1000 - 50, `call:ended disconnected ${after} ms after B began closing its socket, before the ${GRACE_SECS} s grace`)
      console.log(`disconnect grace [${mode}]: call:ended disconnected ${after} ms after the callee began closing its socket; CALL_DISCONNECT_GRACE_SECS=${GRACE_SECS}`)
      // back too late: no call to resume
      const B2 = await device(b, "phone")
      assert.deepEqual(Object.keys(B2.joinReply), ["iceServers"], `join reply after the call ended: ${JSON.stringify(B2.joinReply)}`)
      await assertExactly([
        [A, [["call:answered", {callId, answeredBy: b, answeredByDevice: "phone"}], ["call:ended", ended]]],
        [B2, []],
      ])
    })

    it("a call naming a conversation: both must be members (not_found / forbidden); when it ends the conversation gets its system message", {timeout: 60_000}, async () => {
      const [a, b, c] = [ids.user("a"), ids.user("b"), ids.user("c")]
      const conv = ids.conv()
      await srv.putConversation(conv, [a, b])
      const A = await device(a, "a1")
      const B = await device(b, "phone")
      const chatA = A.socket.channel(`chat:${conv}`)
      const messages = listen(chatA, "message:new")
      assertOk(await join(chatA), `A joining chat:${conv}`)
      assertError(await A.push("call:initiate", {calleeId: b, conversationId: ids.conv()}), {reason: "not_found"}, "an unknown conversation")
      assertError(await A.push("call:initiate", {calleeId: c, conversationId: conv}), {reason: "forbidden"}, "a callee outside the conversation")
      const callId = await initiate(A, b, {conversationId: conv})
      await incoming(B, callId, a, {conversationId: conv})
      assert.deepEqual(assertOk(await B.push("call:reject", {callId}), "call:reject"), {callId})
      const message = await messages.next({timeoutMs: 15_000, where: (m) => m.message?.clientMessageId === `call-${callId}`})
      assert.equal(message.message.type, "system", JSON.stringify(message))
      assert.equal(message.message.senderId, a, JSON.stringify(message))
      assert.equal(message.message.content, "Declined voice call", JSON.stringify(message))
      assert.deepEqual(message.message.metadata, {call: {callId, callType: "audio", callerId: a, calleeId: b, reason: "rejected", durationMs: null}})
    })

    it("refused payloads: missing calleeId / callId, unknown callId, an SDP over 64 KiB, calling oneself, an unknown callType", async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const A = await device(a, "a1")
      const B = await device(b, "b1")
      assertError(await A.push("call:initiate", {}), {reason: "invalid payload: calleeId is required"}, "call:initiate {}")
      assertError(await A.push("call:answer", {}), {reason: "invalid payload: callId is required"}, "call:answer {}")
      assertError(await A.push("call:initiate", {calleeId: a}), {reason: "invalid payload: calleeId must be another user than the caller"}, "calling oneself")
      assertError(await A.push("call:initiate", {calleeId: b, callType: "hologram"}), {reason: "invalid payload: callType must be \"audio\" or \"video\""}, "callType hologram")
      const unknown = unknownCallId()
      for(const [event, payload] of [["call:answer", {}], ["call:reject", {}], ["call:end", {}], ["webrtc:offer", {sdp: "v=0"}],
        ["webrtc:ice-candidate", {candidate: {candidate: "x"}}]]){
        assertError(await B.push(event, {callId: unknown, ...payload}), {reason: "not_found"}, `${event} on an unknown callId`)
      }

      // a connected call: the SDP limit is on the JSON of the sdp (64 KiB); one byte under it is relayed
      const callId = await initiate(A, b)
      const inB = await incoming(B, callId, a)
      assertOk(await B.push("call:answer", {callId}), "call:answer")
      const answered = await A.next("call:answered")
      const fits = "s".repeat(MAX_RELAY_BYTES - 2) // JSON "…" = exactly 64 KiB
      assert.deepEqual(assertOk(await A.push("webrtc:offer", {callId, sdp: fits}), "an SDP of exactly 64 KiB"), {})
      const offer = await B.next("webrtc:offer")
      assert.equal(offer.sdp, fits, "the 64 KiB SDP arrived changed")
      const tooLarge = {reason: "payload too large", limit: MAX_RELAY_BYTES}
      assertError(await A.push("webrtc:offer", {callId, sdp: "s".repeat(MAX_RELAY_BYTES + 100)}), tooLarge, "an SDP over 64 KiB")
      assertError(await B.push("webrtc:answer", {callId, sdp: "s".repeat(MAX_RELAY_BYTES - 1)}), tooLarge, "an SDP one byte over 64 KiB")
      const candidates = Array.from({length: 700}, (_, i) => ({candidate: `candidate:${i} 1 udp 2122260223 10.0.${i >> 8}.${i & 255} 50000 typ host`, sdpMid: "0", sdpMLineIndex: 0}))
      assert.ok(JSON.stringify(candidates).length > MAX_RELAY_BYTES && JSON.stringify(candidates).length < FRAME_BYTES / 2)
      assertError(await A.push("webrtc:ice-candidate", {callId, candidates}), tooLarge, "candidates over 64 KiB")
      await assertExactly([
        [A, [["call:answered", answered]]],
        [B, [["call:incoming", inB], ["webrtc:offer", offer]]],
      ])
    })
  })
}
