// Per-socket limits (README: SOCKET_OUTBOUND_QUEUE, SOCKET_MAX_CHANNELS): a socket that stops
// reading is closed with 1013 once its outbound queue overflows and recovers by rejoining with
// lastSeq; a socket may join at most SOCKET_MAX_CHANNELS channels.
import {describe, it} from "node:test"
import assert from "node:assert/strict"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {waitUntil} from "../lib/util.js"

const OUTBOUND_QUEUE = 32
const MAX_CHANNELS = 3
const LIMITS = {
  SOCKET_OUTBOUND_QUEUE: String(OUTBOUND_QUEUE),
  // long enough that only the queue overflow can close the stalled socket during the test
  SOCKET_WRITE_TIMEOUT_SECS: "300",
  SOCKET_IDLE_TIMEOUT_SECS: "300",
  SOCKET_MAX_CHANNELS: String(MAX_CHANNELS),
  // the flood below is paced by its replies; the rate limit is not what this file tests
  SOCKET_RATE_LIMIT_PER_SEC: "10000",
}
/** a large message fills the TCP buffers between the gateway and the stalled client quickly */
const BIG = 9000
/** upper bound on the flood: kernel buffers on loopback hold a few MiB (~500 such messages) */
const MAX_FLOOD = 2000

/** Sum of a Prometheus counter (all label sets) in the exposition text; 0 when absent. */
function counter(text, name){
  let sum = 0
  for(const line of text.split("\n")){
    if(line.startsWith(name) && (line[name.length] === " " || line[name.length] === "{")){
      sum += Number(line.slice(line.lastIndexOf(" ") + 1))
    }
  }
  return sum
}

async function slowConsumers(url){
  const res = await fetch(`${url}/metrics`, {signal: AbortSignal.timeout(5000)})
  return counter(await res.text(), "quckchat_gateway_slow_consumers_total")
}

const seqOf = (f) => f.payload?.message?.seq

for(const mode of modes){
  describe(`socket limits [${mode}] (queue ${OUTBOUND_QUEUE}, ${MAX_CHANNELS} channels)`, () => {
    const srv = useServerSet(mode, {env: LIMITS})

    it("a socket that stops reading is closed with 1013 once its queue overflows; rejoining with lastSeq recovers what it missed", {timeout: 180_000}, async () => {
      const [sender, reader] = [ids.user("s"), ids.user("r")]
      const conv = ids.conv()
      const topic = `chat:${conv}`
      await srv.putConversation(conv, [sender, reader])
      const tx = await srv.raw(sender)
      assert.equal((await tx.join(topic, "1")).payload.status, "ok")
      const slow = await srv.raw(reader)
      assert.equal((await slow.join(topic, "1")).payload.status, "ok")

      let seq = 0
      let ref = 1
      const send = async (content) => {
        const r = String(++ref)
        tx.push("1", r, topic, "message:send", {type: "text", content})
        const reply = await tx.reply(r, {topic, timeoutMs: 30_000})
        assert.equal(reply.payload.status, "ok", reply.text.slice(0, 300))
        seq = reply.payload.response.message.seq
      }
      await send("before the stall")
      await slow.event("message:new", {topic, timeoutMs: 10_000})

      // the client stops reading; the sender floods until the gateway reports a slow consumer
      const before = await slowConsumers(srv.httpUrl)
      slow.ws.pause()
      const big = "z".repeat(BIG)
      let overflowAt = null
      for(let i = 0; i < MAX_FLOOD && overflowAt === null; i++){
        await send(big)
        if(i % 5 === 4 && await slowConsumers(srv.httpUrl) > before){ overflowAt = seq }
      }
      assert.ok(overflowAt !== null, `no slow consumer after ${MAX_FLOOD} messages of ${BIG} chars (queue ${OUTBOUND_QUEUE})`)
      assert.ok(slow.closeInfo === null, `the stalled socket was closed before it read anything: ${JSON.stringify(slow.closeInfo)}`)
      for(let i = 0; i < 3; i++){ await send(`after the overflow ${i}`) }
      const total = seq

      // it reads again: what the gateway had written arrives, then the close with 1013
      slow.ws.resume()
      const closed = await slow.waitClosed(60_000)
      assert.equal(closed.code, 1013, `closed with ${JSON.stringify(closed)} (overflow at seq ${overflowAt} of ${total})`)
      const seen = new Set(slow.frames.filter((f) => f.event === "message:new" && f.topic === topic).map(seqOf))
      let lastSeq = 0
      while(seen.has(lastSeq + 1)){ lastSeq++ }
      assert.ok(lastSeq < total, `the slow socket got every message (${total}) before its close`)

      // it reconnects and rejoins with lastSeq; replay (and history paging past the replay cap) fills the gap
      const again = await srv.raw(reader)
      again.push("1", "1", topic, "phx_join", {lastSeq})
      const joined = await again.reply("1", {topic, timeoutMs: 30_000})
      assert.equal(joined.payload.status, "ok", joined.text.slice(0, 300))
      const {response} = joined.payload
      assert.equal(response.lastSeq, total, JSON.stringify(response))
      const got = new Set()
      const firstReplayed = response.replayComplete ? lastSeq + 1 : response.replayFromSeq
      assert.ok(Number.isInteger(firstReplayed) && firstReplayed > lastSeq, `join reply: ${JSON.stringify(response)}`)
      await waitUntil(() => {
        for(const f of again.frames){ if(f.event === "message:new" && f.topic === topic){ got.add(seqOf(f)) } }
        return got.has(total)
      }, {timeoutMs: 30_000, what: `the replay up to seq ${total}`})
      for(let s = firstReplayed; s <= total; s++){ assert.ok(got.has(s), `seq ${s} missing from the replay (${JSON.stringify(response)})`) }
      let beforeSeq = firstReplayed
      let r = 10
      while(beforeSeq > lastSeq + 1){
        again.push("1", String(++r), topic, "message:history", {beforeSeq, limit: 100})
        const page = await again.reply(String(r), {topic, timeoutMs: 30_000})
        assert.equal(page.payload.status, "ok", page.text.slice(0, 300))
        const messages = page.payload.response.messages
        assert.ok(messages.length > 0, `empty history page before ${beforeSeq}`)
        for(const m of messages){ got.add(m.seq) }
        beforeSeq = messages[0].seq
      }
      console.log(`slow consumer [${mode}]: overflow seen at seq ${overflowAt}, ${total} sent, socket had 1..${lastSeq}, ` +
        `join reply ${JSON.stringify(response)}`)
      const missing = []
      for(let s = lastSeq + 1; s <= total; s++){ if(!got.has(s)){ missing.push(s) } }
      assert.deepEqual(missing, [], `missed messages not recovered after the rejoin with lastSeq ${lastSeq}`)
    })

    it(`a socket joins at most ${MAX_CHANNELS} channels: the next join gets "too many channels"`, async () => {
      const user = ids.user()
      const convs = Array.from({length: MAX_CHANNELS + 1}, () => ids.conv())
      for(const conv of convs){ await srv.putConversation(conv, [user]) }
      const client = await srv.raw(user)
      for(const [i, conv] of convs.slice(0, MAX_CHANNELS).entries()){
        const ok = await client.join(`chat:${conv}`, `j${i}`)
        assert.equal(ok.payload.status, "ok", ok.text)
      }
      const extra = `chat:${convs[MAX_CHANNELS]}`
      const refused = await client.join(extra, "x1")
      assert.deepEqual(refused.raw, ["x1", "x1", extra, "phx_reply", {status: "error", response: {reason: "too many channels"}}])
      // joining a topic again replaces its channel: not one more
      const rejoined = await client.join(`chat:${convs[0]}`, "j0b")
      assert.equal(rejoined.payload.status, "ok", rejoined.text)
      // after a leave there is room again
      client.push("j1", "l1", `chat:${convs[1]}`, "phx_leave", {})
      assert.equal((await client.reply("l1")).payload.status, "ok")
      const now = await client.join(extra, "x2")
      assert.equal(now.payload.status, "ok", now.text)
      assert.equal(client.isOpen, true)
    })
  })
}
