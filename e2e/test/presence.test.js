// docs/protocol.md#presence: presence on chat topics: Phoenix Presence (presence_state after the
// join, presence_diff
// on changes, key = userId, metas {phx_ref, deviceId, onlineAt}) with the phoenix client's
// Presence class, user:online / user:offline, the reconnect grace window, and (distributed)
// cleanup after a gateway is SIGKILLed.
import {describe, it} from "node:test"
import assert from "node:assert/strict"
import {Presence} from "phoenix"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {join, listen, push, dumpFrames, disconnectPhoenix} from "../lib/phx.js"
import {ISO_UTC, waitUntil, sleep} from "../lib/util.js"

const GRACE_SECS = 1
const NODE_TTL_SECS = 3
const TIMING = {
  PRESENCE_GRACE_SECS: String(GRACE_SECS),
  PRESENCE_NODE_TTL_SECS: String(NODE_TTL_SECS),
  NODE_HEARTBEAT_SECS: "1",
}
/** the reconnect test needs disconnect + reconnect + join to fit in the grace window, even on a loaded machine */
const RECONNECT_GRACE_SECS = 5
/** deadline for an event that is due after a grace window or TTL: load delays events, so it is generous */
const SLACK_MS = 20_000

/**
 * A's view of a conversation: a joined channel with the phoenix Presence class and inboxes for
 * user:online / user:offline / presence_diff (each item stamped with its arrival time).
 */
async function observer(srv, user, conv, {gateway = 0} = {}){
  const socket = await srv.connect(user, {params: {deviceId: "desk"}, gateway})
  const channel = socket.channel(`chat:${conv}`)
  const presence = new Presence(channel)
  const syncs = []
  presence.onSync(() => syncs.push(Date.now()))
  const stamp = (name) => {
    const inbox = listen(channel, name)
    channel.on(name, (payload) => { payload && Object.defineProperty(payload, "receivedAt", {value: Date.now()}) })
    return inbox
  }
  const inbox = {online: stamp("user:online"), offline: stamp("user:offline"), diff: stamp("presence_diff")}
  const reply = await join(channel)
  assert.equal(reply.status, "ok", `join refused: ${JSON.stringify(reply.response)}`)
  await waitUntil(() => syncs.length > 0, {timeoutMs: SLACK_MS, what: "the first presence sync (presence_state after the join)"})
  /** B's metas as A's Presence lists them, or null when B is not listed */
  const metasOf = (userId) => presence.list((id, p) => ({id, metas: p.metas})).find((p) => p.id === userId)?.metas ?? null
  const devicesOf = (userId) => metasOf(userId)?.map((m) => m.deviceId).sort() ?? null
  const frames = () => dumpFrames(socket, `chat:${conv}`)
  const about = (userId) => ({
    online: inbox.online.items.filter((p) => p.userId === userId),
    offline: inbox.offline.items.filter((p) => p.userId === userId),
    diffs: inbox.diff.items.filter((d) => Object.hasOwn(d.joins ?? {}, userId) || Object.hasOwn(d.leaves ?? {}, userId)),
  })
  return {user, socket, channel, presence, inbox, metasOf, devicesOf, frames, about}
}

/** B on one device: connected (deviceId) and joined to the conversation. */
async function device(srv, user, conv, deviceId, {gateway = 0} = {}){
  const socket = await srv.connect(user, {params: {deviceId}, gateway})
  const reply = await join(socket.channel(`chat:${conv}`))
  assert.equal(reply.status, "ok", `${user}/${deviceId} join refused: ${JSON.stringify(reply.response)}`)
  return socket
}

async function pair(srv){
  const [a, b] = [ids.user("a"), ids.user("b")]
  const conv = ids.conv()
  await srv.putConversation(conv, [a, b])
  return {a, b, conv}
}

for(const mode of modes){
  describe(`presence [${mode}] (grace ${GRACE_SECS} s, node TTL ${NODE_TTL_SECS} s)`, () => {
    const srv = useServerSet(mode, {env: TIMING})

    it("Presence class: B with two devices has two metas, then one after the laptop leaves, then none and user:offline", {timeout: 90_000}, async () => {
      const {a, b, conv} = await pair(srv)
      const A = await observer(srv, a, conv)
      assert.deepEqual(A.devicesOf(a), ["desk"], `A does not see itself: ${A.frames()}`)
      const phone = await device(srv, b, conv, "phone")
      const laptop = await device(srv, b, conv, "laptop")
      await waitUntil(() => JSON.stringify(A.devicesOf(b)) === JSON.stringify(["laptop", "phone"]), {
        timeoutMs: SLACK_MS, what: "B's two metas in A's Presence",
      }).catch((err) => { throw new Error(`${err.message}; devices ${JSON.stringify(A.devicesOf(b))}\n${A.frames()}`) })
      for(const meta of A.metasOf(b)){
        assert.equal(typeof meta.phx_ref, "string", JSON.stringify(meta))
        assert.ok(meta.phx_ref.length > 0)
        assert.match(String(meta.onlineAt), ISO_UTC, JSON.stringify(meta))
      }
      assert.notEqual(A.metasOf(b)[0].phx_ref, A.metasOf(b)[1].phx_ref, "both metas have the same phx_ref")

      await disconnectPhoenix(laptop)
      const laptopGone = Date.now()
      await waitUntil(() => JSON.stringify(A.devicesOf(b)) === JSON.stringify(["phone"]), {
        timeoutMs: GRACE_SECS * 1000 + SLACK_MS, what: "B's laptop meta to go",
      }).catch((err) => { throw new Error(`${err.message}; devices ${JSON.stringify(A.devicesOf(b))}\n${A.frames()}`) })
      const took = Date.now() - laptopGone
      assert.deepEqual(A.about(b).offline, [], `user:offline although B's phone is still online:\n${A.frames()}`)
      assert.ok(took >= GRACE_SECS * 1000 - 200, `laptop meta left after ${took} ms, before the ${GRACE_SECS} s grace`)

      await disconnectPhoenix(phone)
      await A.inbox.offline.next({timeoutMs: GRACE_SECS * 1000 + SLACK_MS, where: (p) => p.userId === b}).then((off) => {
        assert.match(String(off.lastSeenAt), ISO_UTC, `user:offline ${JSON.stringify(off)}`)
      }).catch((err) => { throw new Error(`${err.message}\n${A.frames()}`) })
      await waitUntil(() => A.metasOf(b) === null, {timeoutMs: SLACK_MS, what: "B to leave A's Presence"})
        .catch((err) => { throw new Error(`${err.message}; devices ${JSON.stringify(A.devicesOf(b))}\n${A.frames()}`) })
      assert.deepEqual(A.devicesOf(a), ["desk"])
    })

    it("a conversation of 1,001 members: presence_state {}, no presence broadcast on its topic, presence:get answers; a small one of the same users still hears", {timeout: 60_000}, async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const [big, small] = [ids.conv(), ids.conv()]
      const others = Array.from({length: 999}, (_, i) => `${b}_m${i}`)
      await srv.putConversation(big, [a, b, ...others])
      await srv.putConversation(small, [a, b])
      const A = await observer(srv, a, big)
      const As = await observer(srv, a, small)
      assert.deepEqual(A.presence.list(), [], `A's Presence of the big conversation lists someone:\n${A.frames()}`)

      await device(srv, b, small, "phone")
      await waitUntil(() => JSON.stringify(As.devicesOf(b)) === JSON.stringify(["phone"]), {
        timeoutMs: SLACK_MS, what: "B's phone in A's Presence of the small conversation",
      }).catch((err) => { throw new Error(`${err.message}\n${As.frames()}`) })
      // Announcements go to a user's topics one after another: give the big one time to show up.
      await sleep(500)
      assert.deepEqual(A.about(b), {online: [], offline: [], diffs: []}, `B's presence on the big topic:\n${A.frames()}`)
      assert.deepEqual(A.presence.list(), [])

      const got = await push(A.channel, "presence:get", {userIds: [b, others[0], "not_a_member"]})
      assert.equal(got.status, "ok", JSON.stringify(got.response))
      assert.deepEqual(Object.keys(got.response.presence), [b], JSON.stringify(got.response))
      assert.deepEqual(got.response.presence[b].metas.map((m) => m.deviceId), ["phone"])
      const bad = await push(A.channel, "presence:get", {userIds: []})
      assert.equal(bad.status, "error")
      assert.match(bad.response.reason, /^invalid payload: userIds/)
    })

    it("user:online {userId} for B when B connects (socket only, no join) after A joined", {timeout: 20_000}, async () => {
      const {a, b, conv} = await pair(srv)
      const A = await observer(srv, a, conv)
      await srv.connect(b, {params: {deviceId: "phone"}})
      const online = await A.inbox.online.next({where: (p) => p.userId === b})
        .catch((err) => { throw new Error(`${err.message}\n${A.frames()}`) })
      assert.equal(online.userId, b, JSON.stringify(online))
      await sleep(300)
      assert.equal(A.about(b).online.length, 1, `more than one user:online for B:\n${A.frames()}`)
      assert.deepEqual(A.about(b).offline, [])
    })
  })

  // The grace window here is long enough for a disconnect + reconnect + join on a loaded
  // machine. That nothing arrives for B is checked once A has seen user:offline for C, who
  // disconnected after B and did not come back: B's grace expiry, had it not been cancelled,
  // was due before C's.
  describe(`presence reconnect [${mode}] (grace ${RECONNECT_GRACE_SECS} s)`, () => {
    const srv = useServerSet(mode, {env: {...TIMING, PRESENCE_GRACE_SECS: String(RECONNECT_GRACE_SECS)}})

    it("a reconnect of B's device within the grace window: no user:offline, user:online or presence_diff for B", {timeout: 90_000}, async () => {
      const [a, b, c] = [ids.user("a"), ids.user("b"), ids.user("c")]
      const conv = ids.conv()
      await srv.putConversation(conv, [a, b, c])
      const A = await observer(srv, a, conv)
      const first = await device(srv, b, conv, "phone")
      const witness = await device(srv, c, conv, "tablet")
      await waitUntil(() => A.metasOf(b)?.length === 1 && A.metasOf(c)?.length === 1, {timeoutMs: SLACK_MS, what: "B and C in A's Presence"})
        .catch((err) => { throw new Error(`${err.message}\n${A.frames()}`) })
      // B's user:online and join diff have arrived once C's have (C connected after B)
      await A.inbox.online.next({timeoutMs: SLACK_MS, where: (p) => p.userId === c})
        .catch((err) => { throw new Error(`${err.message}\n${A.frames()}`) })
      const before = A.about(b)

      await disconnectPhoenix(first)
      const goneAt = Date.now()
      await disconnectPhoenix(witness)
      await device(srv, b, conv, "phone")
      const back = Date.now() - goneAt
      assert.ok(back < RECONNECT_GRACE_SECS * 1000, `B took ${back} ms to reconnect and join, not within the ${RECONNECT_GRACE_SECS} s grace: the test proves nothing`)

      const dump = () => `\nA's frames:\n${A.frames()}`
      await A.inbox.offline.next({timeoutMs: RECONNECT_GRACE_SECS * 1000 + SLACK_MS, where: (p) => p.userId === c})
        .catch((err) => { throw new Error(`${err.message} (C's user:offline, after its grace)${dump()}`) })
      await waitUntil(() => A.metasOf(c) === null, {timeoutMs: SLACK_MS, what: "C to leave A's Presence"})
        .catch((err) => { throw new Error(`${err.message}${dump()}`) })
      const after = A.about(b)
      assert.deepEqual(after.offline.slice(before.offline.length), [], `user:offline for B${dump()}`)
      assert.deepEqual(after.online.slice(before.online.length), [], `user:online for B${dump()}`)
      assert.deepEqual(after.diffs.slice(before.diffs.length), [], `presence_diff for B${dump()}`)
      assert.deepEqual(A.devicesOf(b), ["phone"], `B's devices in A's Presence${dump()}`)
    })
  })

  if(mode !== "distributed"){ continue }

  // Layout: 3 gateways. A (the observer) on gateway 2, never killed; B's phone on gateway 0,
  // B's laptop on gateway 1; gateway 0 is SIGKILLed first, then gateway 1.
  describe(`presence after a gateway crash [${mode}, 3 gateways] (node TTL ${NODE_TTL_SECS} s)`, () => {
    const srv = useServerSet(mode, {env: TIMING, gateways: 3})

    it("B stays online while one of its gateways lives; user:offline once the last one is SIGKILLed", {timeout: 120_000}, async () => {
      const {a, b, conv} = await pair(srv)
      const A = await observer(srv, a, conv, {gateway: 2})
      await device(srv, b, conv, "phone", {gateway: 0})
      await device(srv, b, conv, "laptop", {gateway: 1})
      await waitUntil(() => JSON.stringify(A.devicesOf(b)) === JSON.stringify(["laptop", "phone"]), {
        timeoutMs: SLACK_MS, what: "B's two metas in A's Presence",
      }).catch((err) => { throw new Error(`${err.message}; devices ${JSON.stringify(A.devicesOf(b))}\n${A.frames()}`) })

      await srv.killGateway(0)
      const dump = () => `\nA's frames:\n${A.frames()}`
      // the dead gateway's sockets are dropped after the node TTL: the phone leaves, the laptop stays
      await waitUntil(() => JSON.stringify(A.devicesOf(b)) === JSON.stringify(["laptop"]), {
        timeoutMs: NODE_TTL_SECS * 1000 + SLACK_MS, what: "the phone on the dead gateway to leave A's Presence",
      }).catch((err) => { throw new Error(`${err.message}; devices ${JSON.stringify(A.devicesOf(b))}${dump()}`) })
      assert.deepEqual(A.about(b).offline, [], `user:offline for B while its laptop is connected${dump()}`)

      const killedAt = await srv.killGateway(1)
      const off = await A.inbox.offline.next({timeoutMs: NODE_TTL_SECS * 1000 + SLACK_MS, where: (p) => p.userId === b})
        .catch((err) => { throw new Error(`${err.message} after the second SIGKILL${dump()}`) })
      const secs = (off.receivedAt - killedAt) / 1000
      console.log(`presence cleanup after SIGKILL: ${secs.toFixed(1)} s (PRESENCE_NODE_TTL_SECS=${NODE_TTL_SECS}, NODE_HEARTBEAT_SECS=1, PRESENCE_GRACE_SECS=${GRACE_SECS})`)
      assert.match(String(off.lastSeenAt), ISO_UTC, `user:offline ${JSON.stringify(off)}`)
      await waitUntil(() => A.metasOf(b) === null, {timeoutMs: SLACK_MS, what: "B to leave A's Presence"})
        .catch((err) => { throw new Error(`${err.message}; devices ${JSON.stringify(A.devicesOf(b))}${dump()}`) })
      assert.equal(A.about(b).offline.length, 1, `user:offline for B more than once${dump()}`)
      assert.ok(srv.gateways[2].proc.exit === null, "the observer's gateway died")
    })
  })
}
