// docs/protocol.md#limits: per-socket rate limit: {reason: "rate_limited"}, and every push gets
// exactly one reply.
import {describe, it} from "node:test"
import assert from "node:assert/strict"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {waitUntil, sleep} from "../lib/util.js"

const PUSHES = 300
/** the server default of SOCKET_RATE_LIMIT_PER_SEC; a socket may burst twice that */
const RATE_PER_SEC = 50

for(const mode of modes){
  describe(`rate limit [${mode}]`, () => {
    const srv = useServerSet(mode)

    it(`${PUSHES} pushes in a burst: some rate_limited, exactly one reply each`, {timeout: 60_000}, async () => {
      const user = ids.user()
      const conv = ids.conv()
      const topic = `chat:${conv}`
      await srv.putConversation(conv, [user])
      const client = await srv.raw(user)
      const joined = await client.join(topic, "1")
      assert.equal(joined.payload.status, "ok", joined.text)

      const refs = Array.from({length: PUSHES}, (_, i) => `r${i + 1}`)
      const startedAt = Date.now()
      for(const [i, ref] of refs.entries()){
        client.push("1", ref, topic, "message:send", {type: "text", content: `burst ${i + 1}`, clientMessageId: `burst-${i + 1}`})
      }
      const replies = () => client.frames.filter((f) => f.event === "phx_reply" && f.topic === topic && f.ref?.startsWith("r"))
      await waitUntil(() => replies().length >= PUSHES, {
        timeoutMs: 30_000,
        what: `${PUSHES} replies (socket open: ${client.isOpen})`,
      }).catch((err) => {
        throw new Error(`${err.message}; got ${replies().length}; close: ${JSON.stringify(client.closeInfo)}`)
      })
      const burstSecs = (Date.now() - startedAt) / 1000

      // the socket survives and the budget refills; accepted pushes on one channel are answered
      // in order, so once this one is, a duplicate reply to an earlier push would have arrived
      assert.equal(client.isOpen, true, `socket closed: ${JSON.stringify(client.closeInfo)}`)
      await sleep(1100)
      client.push("1", "after", topic, "message:send", {type: "text", content: "after the burst"})
      const after = await client.reply("after", {timeoutMs: 30_000})
      assert.equal(after.payload.status, "ok", after.text)

      const byRef = new Map()
      for(const f of replies()){ byRef.set(f.ref, [...(byRef.get(f.ref) ?? []), f]) }
      const missing = refs.filter((r) => !byRef.has(r))
      const duplicated = [...byRef].filter(([, fs]) => fs.length !== 1).map(([r]) => r)
      assert.deepEqual(missing, [], "pushes without a reply")
      assert.deepEqual(duplicated, [], "pushes with more than one reply")
      assert.equal(byRef.size, PUSHES)

      const all = refs.map((r) => byRef.get(r)[0])
      for(const f of all){ assert.equal(f.join_ref, "1", f.text) }
      const ok = all.filter((f) => f.payload.status === "ok")
      const limited = all.filter((f) => f.payload.status === "error" && f.payload.response?.reason === "rate_limited")
      const other = all.filter((f) => !ok.includes(f) && !limited.includes(f))
      assert.deepEqual(other.map((f) => f.text), [], "replies that are neither ok nor rate_limited")
      assert.ok(limited.length > 0, `no push was rate limited (${ok.length} ok)`)
      assert.ok(ok.length > 0, "every push was rate limited")
      // at most the burst plus what refilled while the server read the pushes (bounded by the
      // time the client saw them take): a limiter that lets more through is broken
      const bound = 2 * RATE_PER_SEC + Math.ceil(RATE_PER_SEC * burstSecs)
      assert.ok(ok.length <= bound, `${ok.length} pushes accepted in ${burstSecs.toFixed(2)} s; at most ${bound} may be`)

      // accepted messages got a gap-free seq
      const seqs = ok.map((f) => f.payload.response.message.seq).sort((x, y) => x - y)
      assert.deepEqual(seqs, Array.from({length: ok.length}, (_, i) => i + 1), "seq of the accepted messages is not 1..n")
      assert.equal(after.payload.response.message.seq, ok.length + 1, after.text)
    })
  })
}
