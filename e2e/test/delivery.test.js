// Delivery guarantees end to end: live message:new in seq order without gaps under concurrent
// senders, across gateways (distributed), recovery with lastSeq through another gateway, and a
// replay past its 200-message cap (replayComplete: false, replayFromSeq, history paging).
import {describe, it} from "node:test"
import assert from "node:assert/strict"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {join, push, listen, dumpFrames, disconnectPhoenix} from "../lib/phx.js"
import {waitUntil} from "../lib/util.js"

/** README / chat-svc MAX_REPLAY */
const MAX_REPLAY = 200
const SENDERS = 4
const PER_SENDER = 20
/** generous: every wait ends as soon as its event is there */
const WAIT_MS = 60_000

for(const mode of modes){
  const gateways = mode === "distributed" ? 2 : 1
  describe(`delivery [${mode}, ${gateways} gateway(s)]`, () => {
    // the bursts below are not about the rate limit
    const srv = useServerSet(mode, {gateways, env: {SOCKET_RATE_LIMIT_PER_SEC: "10000"}})

    /** `user` connected to gateway `gateway` and joined to `conv` (with {lastSeq} when given), with a message:new inbox. */
    async function member(user, conv, {gateway = 0, lastSeq} = {}){
      const socket = await srv.connect(user, {gateway})
      const channel = socket.channel(`chat:${conv}`, lastSeq === undefined ? {} : {lastSeq})
      const inbox = listen(channel, "message:new")
      const reply = await join(channel, 30_000)
      assert.equal(reply.status, "ok", `${user} join refused: ${JSON.stringify(reply.response)}`)
      return {user, socket, channel, inbox, joinReply: reply.response, gateway}
    }

    async function send(who, content){
      const r = await push(who.channel, "message:send", {type: "text", content}, 30_000)
      assert.equal(r.status, "ok", `send refused: ${JSON.stringify(r.response)}`)
      return r.response.message
    }

    /** Waits until `who` got message:new up to seq `last`; returns the seqs in arrival order. */
    async function seqsUpTo(who, last){
      await who.inbox.next({timeoutMs: WAIT_MS, where: (p) => p.message?.seq === last}).catch((err) => {
        throw new Error(`${who.user} on gateway ${who.gateway}: ${err.message}\n${dumpFrames(who.socket)}`)
      })
      return who.inbox.items.map((p) => p.message.seq)
    }

    it(`${SENDERS} concurrent senders: every member gets message:new in strictly increasing seq without gaps`, {timeout: 120_000}, async () => {
      const users = Array.from({length: SENDERS + 2}, (_, i) => ids.user(i < SENDERS ? "s" : "r"))
      const conv = ids.conv()
      await srv.putConversation(conv, users)
      // members alternate between the gateways; the last two only receive
      const members = []
      for(const [i, user] of users.entries()){ members.push(await member(user, conv, {gateway: i % gateways})) }
      const senders = members.slice(0, SENDERS)

      // every sender pushes all its messages at once, without waiting for replies
      const replies = await Promise.all(senders.map((s, si) => Promise.all(Array.from({length: PER_SENDER}, (_, k) =>
        push(s.channel, "message:send", {type: "text", content: `s${si} m${k}`, clientMessageId: `s${si}-${k}`}, WAIT_MS)))))
      const total = SENDERS * PER_SENDER
      for(const [si, rs] of replies.entries()){
        for(const r of rs){ assert.equal(r.status, "ok", `sender ${si}: ${JSON.stringify(r.response)}`) }
        // pushes on one channel are handled in order: a sender's seqs increase in push order
        const seqs = rs.map((r) => r.response.message.seq)
        assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y), `sender ${si}'s seqs are not in push order: ${seqs}`)
      }
      const all = replies.flat().map((r) => r.response.message.seq).sort((x, y) => x - y)
      assert.deepEqual(all, Array.from({length: total}, (_, i) => i + 1), "the stored seqs are not 1..n")

      const expected = Array.from({length: total}, (_, i) => i + 1)
      for(const m of members){
        const got = await seqsUpTo(m, total)
        assert.deepEqual(got, expected, `${m.user} on gateway ${m.gateway} got message:new out of order, twice or with gaps`)
      }
    })

    it(`a rejoin with {lastSeq} past the ${MAX_REPLAY}-message cap: replayComplete false, replayFromSeq, the newest ${MAX_REPLAY} in order, history for the rest`, {timeout: 120_000}, async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const conv = ids.conv()
      await srv.putConversation(conv, [a, b])
      const A = await member(a, conv)
      const B = await member(b, conv, {gateway: gateways - 1})
      await send(A, "seen 1")
      await send(A, "seen 2")
      await seqsUpTo(B, 2)
      await disconnectPhoenix(B.socket)

      const missed = MAX_REPLAY + 5
      const rs = await Promise.all(Array.from({length: missed}, (_, k) =>
        push(A.channel, "message:send", {type: "text", content: `missed ${k}`}, WAIT_MS)))
      for(const r of rs){ assert.equal(r.status, "ok", JSON.stringify(r.response)) }
      const total = 2 + missed

      const B2 = await member(b, conv, {gateway: gateways - 1, lastSeq: 2})
      const reply = B2.joinReply
      const fromSeq = total - MAX_REPLAY + 1
      assert.equal(reply.lastSeq, total, JSON.stringify(reply))
      assert.equal(reply.replayComplete, false, `join reply: ${JSON.stringify(reply)}`)
      assert.equal(reply.replayFromSeq, fromSeq, `join reply: ${JSON.stringify(reply)}`)
      const replayed = await seqsUpTo(B2, total)
      assert.deepEqual(replayed, Array.from({length: MAX_REPLAY}, (_, i) => fromSeq + i), "the replay is not the newest messages in order")

      const page = await push(B2.channel, "message:history", {beforeSeq: fromSeq, limit: 100}, 30_000)
      assert.equal(page.status, "ok", JSON.stringify(page.response))
      const older = page.response.messages.map((m) => m.seq)
      assert.deepEqual(older, Array.from({length: fromSeq - 1}, (_, i) => i + 1), "history before replayFromSeq")
    })

    if(mode !== "distributed"){ return }

    it("a message sent through gateway 0 reaches a member on gateway 1, and back", {timeout: 60_000}, async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const conv = ids.conv()
      await srv.putConversation(conv, [a, b])
      const A = await member(a, conv, {gateway: 0})
      const B = await member(b, conv, {gateway: 1})
      const there = await send(A, "through gateway 0")
      const atB = await B.inbox.next({timeoutMs: WAIT_MS, where: (p) => p.message?.id === there.id})
        .catch((err) => { throw new Error(`${err.message}\n${dumpFrames(B.socket)}`) })
      assert.deepEqual(atB.message, there)
      const back = await send(B, "through gateway 1")
      const atA = await A.inbox.next({timeoutMs: WAIT_MS, where: (p) => p.message?.id === back.id})
        .catch((err) => { throw new Error(`${err.message}\n${dumpFrames(A.socket)}`) })
      assert.deepEqual(atA.message, back)
    })

    it("a member who left gateway 0 rejoins through gateway 1 with {lastSeq} and gets what it missed, then live messages", {timeout: 60_000}, async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const conv = ids.conv()
      await srv.putConversation(conv, [a, b])
      const A = await member(a, conv, {gateway: 0})
      const B = await member(b, conv, {gateway: 0})
      const seen = [await send(A, "m1"), await send(A, "m2"), await send(A, "m3")]
      await seqsUpTo(B, seen[2].seq)
      await disconnectPhoenix(B.socket)
      const missed = [await send(A, "m4"), await send(A, "m5")]

      const B2 = await member(b, conv, {gateway: 1, lastSeq: seen[2].seq})
      assert.equal(B2.joinReply.lastSeq, missed[1].seq, JSON.stringify(B2.joinReply))
      assert.equal(B2.joinReply.replayComplete, true, JSON.stringify(B2.joinReply))
      await B2.inbox.next({timeoutMs: WAIT_MS, where: (p) => p.message?.id === missed[1].id})
        .catch((err) => { throw new Error(`${err.message}\n${dumpFrames(B2.socket)}`) })
      const live = await send(A, "m6 live")
      await waitUntil(() => B2.inbox.items.some((p) => p.message?.id === live.id), {timeoutMs: WAIT_MS, what: "m6 at B on gateway 1"})
        .catch((err) => { throw new Error(`${err.message}\n${dumpFrames(B2.socket)}`) })
      assert.deepEqual(B2.inbox.items.map((p) => p.message.id), [...missed, live].map((m) => m.id),
        `B on gateway 1: not exactly the missed messages in order, then the live one\n${dumpFrames(B2.socket)}`)
    })
  })
}
