// docs/protocol.md#chat-events: every chat event with the phoenix client: replies, edits, deletes,
// reactions, typing,
// read receipts, history, recovery after a rejoin with lastSeq, and removal from a conversation.
import {describe, it} from "node:test"
import assert from "node:assert/strict"
import {randomBytes} from "node:crypto"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {join, push, listen, dumpFrames, disconnectPhoenix} from "../lib/phx.js"
import {ISO_UTC, withTimeout, waitUntil, sleep} from "../lib/util.js"

const MESSAGE_KEYS = ["id", "conversationId", "seq", "senderId", "type", "content", "clientMessageId", "replyTo",
  "metadata", "reactions", "createdAt", "editedAt", "deletedAt"]
const CHAT_EVENTS = ["message:new", "message:edited", "message:deleted", "message:reaction:added",
  "message:reaction:removed", "typing:start", "typing:stop", "message:read"]
const THUMBS = "👍"
/** 24 hex digits, like a Mongo ObjectId, that no message has */
const unknownId = () => randomBytes(12).toString("hex")

function assertOk(reply, what){
  assert.equal(reply.status, "ok", `${what} refused: ${JSON.stringify(reply.response)}`)
  return reply.response
}

function assertErrorReason(reply, reason, what){
  assert.equal(reply.status, "error", `${what}: expected an error, got ${JSON.stringify(reply)}`)
  assert.equal(reply.response?.reason, reason, `${what}: ${JSON.stringify(reply.response)}`)
}

function assertMessageShape(message, what = "message"){
  assert.ok(message && typeof message === "object", `${what} is not an object: ${JSON.stringify(message)}`)
  for(const key of MESSAGE_KEYS){
    assert.ok(Object.hasOwn(message, key), `${what} lacks ${key}: ${JSON.stringify(message)}`)
  }
  assert.equal(typeof message.id, "string")
  assert.equal(typeof message.seq, "number")
  assert.ok(message.reactions && typeof message.reactions === "object" && !Array.isArray(message.reactions),
    `${what}.reactions: ${JSON.stringify(message.reactions)}`)
  assert.match(message.createdAt, ISO_UTC)
}

for(const mode of modes){
  describe(`chat events [${mode}]`, () => {
    const srv = useServerSet(mode)

    /** One member's socket and channel with an inbox per chat event (registered before the join). */
    async function member(user, conv, {params, lastSeq, socket} = {}){
      socket = socket ?? await srv.connect(user, {params})
      const channel = socket.channel(`chat:${conv}`, lastSeq === undefined ? {} : {lastSeq})
      const inbox = Object.fromEntries(CHAT_EVENTS.map((e) => [e, listen(channel, e)]))
      const reply = await join(channel)
      return {user, socket, channel, inbox, joinReply: reply}
    }

    /** A and B, both members of a fresh conversation, both joined. */
    async function twoMembers(){
      const [a, b] = [ids.user("a"), ids.user("b")]
      const conv = ids.conv()
      await srv.putConversation(conv, [a, b])
      const A = await member(a, conv)
      assertOk(A.joinReply, "A's join")
      const B = await member(b, conv)
      assertOk(B.joinReply, "B's join")
      return {conv, A, B}
    }

    async function send(who, content, extra = {}){
      const r = await push(who.channel, "message:send", {type: "text", content, ...extra})
      return assertOk(r, `message:send ${JSON.stringify(content)}`).message
    }

    it("message:send with replyTo: an existing id is kept, an unknown one is refused (reason mentions replyTo)", async () => {
      const {conv, A, B} = await twoMembers()
      const first = await send(A, "first")
      assertMessageShape(first, "reply.message")
      assert.equal(first.conversationId, conv)
      assert.equal(first.editedAt, null, `fresh message has editedAt: ${JSON.stringify(first)}`)
      assert.equal(first.deletedAt, null, `fresh message has deletedAt: ${JSON.stringify(first)}`)

      const answer = await send(A, "answer", {replyTo: first.id, metadata: {k: "v"}})
      assertMessageShape(answer)
      assert.equal(answer.replyTo, first.id)
      assert.deepEqual(answer.metadata, {k: "v"})
      const atB = await B.inbox["message:new"].next({where: (p) => p.message?.id === answer.id})
      assert.deepEqual(atB.message, answer, "B's message:new differs from A's reply")

      const bogus = unknownId()
      const refused = await push(A.channel, "message:send", {type: "text", content: "x", replyTo: bogus})
      assert.equal(refused.status, "error", `replyTo ${bogus} accepted: ${JSON.stringify(refused.response)}`)
      assert.match(String(refused.response?.reason), /replyTo/, JSON.stringify(refused.response))
      const news = await B.inbox["message:new"].quiet(300)
      assert.deepEqual(news, [], "a refused send was broadcast")
    })

    it("clientMessageId retried: the same message (id, seq), published again with the same id (its first broadcast may be the one lost), seq stays gap-free", async () => {
      const {A, B} = await twoMembers()
      const first = await send(A, "once", {clientMessageId: "retry-1"})
      await B.inbox["message:new"].next({where: (p) => p.message?.id === first.id})
      const again = await send(A, "once", {clientMessageId: "retry-1"})
      assert.equal(again.id, first.id)
      assert.equal(again.seq, first.seq)
      const republished = await B.inbox["message:new"].next({where: (p) => p.message?.id === first.id})
      assert.equal(republished.message.seq, first.seq, JSON.stringify(republished))
      const extra = await B.inbox["message:new"].quiet(700)
      assert.deepEqual(extra, [], `B got a third message:new:\n${dumpFrames(B.socket)}`)
      const next = await send(A, "next", {clientMessageId: "retry-2"})
      assert.equal(next.seq, first.seq + 1, "seq is not gap-free after a retried send")
    })

    it("message:edit: reply {message} with editedAt, message:edited to others; forbidden, not_found, message deleted", async () => {
      const {A, B} = await twoMembers()
      const original = await send(A, "draft")
      const edited = assertOk(await push(A.channel, "message:edit", {messageId: original.id, content: "final"}), "edit").message
      assertMessageShape(edited, "edit reply.message")
      assert.equal(edited.id, original.id)
      assert.equal(edited.seq, original.seq)
      assert.equal(edited.content, "final")
      assert.equal(typeof edited.editedAt, "string", `editedAt not set: ${JSON.stringify(edited)}`)
      assert.match(edited.editedAt, ISO_UTC)
      const atB = await B.inbox["message:edited"].next({where: (p) => p.message?.id === original.id})
      assert.equal(atB.message.content, "final")
      assert.deepEqual(atB.message, edited, "B's message:edited differs from A's reply")

      assertErrorReason(await push(B.channel, "message:edit", {messageId: original.id, content: "hijack"}), "forbidden", "edit by a non-sender")
      assertErrorReason(await push(A.channel, "message:edit", {messageId: unknownId(), content: "x"}), "not_found", "edit of an unknown id")

      assertOk(await push(A.channel, "message:delete", {messageId: original.id}), "delete")
      assertErrorReason(await push(A.channel, "message:edit", {messageId: original.id, content: "zombie"}), "message deleted", "edit after delete")
      const editsAtB = B.inbox["message:edited"].items.filter((p) => p.message?.id === original.id)
      assert.equal(editsAtB.length, 1, `B got refused edits: ${JSON.stringify(editsAtB)}`)
    })

    it("message:delete: reply {messageId}, message:deleted broadcast, history keeps a tombstone (same id and seq)", async () => {
      const {conv, A, B} = await twoMembers()
      const keep = await send(A, "keep")
      const doomed = await send(A, "doomed")
      const reply = assertOk(await push(A.channel, "message:delete", {messageId: doomed.id}), "delete")
      assert.equal(reply.messageId, doomed.id)
      for(const [who, m] of [["B", B], ["A", A]]){
        const ev = await m.inbox["message:deleted"].next({where: (p) => p.messageId === doomed.id})
        assert.equal(ev.conversationId, conv, `${who}: ${JSON.stringify(ev)}`)
        assert.equal(typeof ev.deletedAt, "string", `${who}: ${JSON.stringify(ev)}`)
        assert.match(ev.deletedAt, ISO_UTC)
      }
      const history = assertOk(await push(B.channel, "message:history", {}), "history")
      const byId = new Map(history.messages.map((m) => [m.id, m]))
      const tomb = byId.get(doomed.id)
      assert.ok(tomb, `deleted message missing from history: ${JSON.stringify(history)}`)
      assertMessageShape(tomb, "tombstone")
      assert.equal(tomb.seq, doomed.seq)
      assert.equal(tomb.content, "")
      assert.equal(typeof tomb.deletedAt, "string", `tombstone without deletedAt: ${JSON.stringify(tomb)}`)
      assert.match(tomb.deletedAt, ISO_UTC)
      assert.equal(byId.get(keep.id)?.content, "keep")
    })

    it("reactions: add replies {messageId, reactions}, broadcasts once; re-add is idempotent; bad emoji refused; remove broadcasts", async () => {
      const {A, B} = await twoMembers()
      const msg = await send(B, "react to me")
      const added = assertOk(await push(A.channel, "message:reaction:add", {messageId: msg.id, emoji: THUMBS}), "reaction:add")
      assert.deepEqual(added, {messageId: msg.id, reactions: {[THUMBS]: [A.user]}})
      const ev = await B.inbox["message:reaction:added"].next({where: (p) => p.messageId === msg.id})
      assert.deepEqual(ev, {messageId: msg.id, userId: A.user, emoji: THUMBS})

      const again = assertOk(await push(A.channel, "message:reaction:add", {messageId: msg.id, emoji: THUMBS}), "second reaction:add")
      assert.deepEqual(again, added)
      assert.deepEqual(await B.inbox["message:reaction:added"].quiet(700), [], "a repeated add was broadcast again")

      const bad = await push(A.channel, "message:reaction:add", {messageId: msg.id, emoji: "nope"})
      assert.equal(bad.status, "error", `emoji "nope" accepted: ${JSON.stringify(bad.response)}`)
      assert.match(String(bad.response?.reason), /emoji/, JSON.stringify(bad.response))

      const removed = assertOk(await push(A.channel, "message:reaction:remove", {messageId: msg.id, emoji: THUMBS}), "reaction:remove")
      assert.equal(removed.messageId, msg.id)
      assert.ok(!(removed.reactions?.[THUMBS] ?? []).includes(A.user), `still reacted: ${JSON.stringify(removed)}`)
      const gone = await B.inbox["message:reaction:removed"].next({where: (p) => p.messageId === msg.id})
      assert.deepEqual(gone, {messageId: msg.id, userId: A.user, emoji: THUMBS})
    })

    it("typing:start / typing:stop: reply {}, the other member gets {userId, conversationId}, the sender does not", async () => {
      const {conv, A, B} = await twoMembers()
      for(const event of ["typing:start", "typing:stop"]){
        const reply = await push(A.channel, event, {})
        assert.deepEqual(reply, {status: "ok", response: {}}, event)
        const ev = await B.inbox[event].next()
        assert.deepEqual(ev, {userId: A.user, conversationId: conv}, event)
      }
      await sleep(300)
      assert.deepEqual(A.inbox["typing:start"].items, [], "the sender got its own typing:start")
      assert.deepEqual(A.inbox["typing:stop"].items, [], "the sender got its own typing:stop")
    })

    it("typing:start without stop: the other member gets typing:stop by itself after ~8 s", {timeout: 60_000}, async () => {
      const {conv, A, B} = await twoMembers()
      // measured from before the push: the server's 8 s start no earlier; load only delays the stop
      const startedAt = Date.now()
      assertOk(await push(A.channel, "typing:start", {}), "typing:start")
      await B.inbox["typing:start"].next({timeoutMs: 10_000})
      const stop = await B.inbox["typing:stop"].next({timeoutMs: 40_000})
      const after = (Date.now() - startedAt) / 1000
      assert.deepEqual(stop, {userId: A.user, conversationId: conv})
      assert.ok(after >= 7.5, `typing:stop after ${after.toFixed(1)} s, before the 8 s expiry`)
      assert.deepEqual(A.inbox["typing:stop"].items, [], "the typer got its own typing:stop")
    })

    it("message:read: reply {readUpTo}, the other member gets message:read; an older seq changes nothing; join shows readUpTo", async () => {
      const {conv, A, B} = await twoMembers()
      const m1 = await send(A, "one")
      const m2 = await send(A, "two")
      const reply = assertOk(await push(B.channel, "message:read", {seq: m2.seq}), "read")
      assert.deepEqual(reply, {readUpTo: m2.seq})
      const ev = await A.inbox["message:read"].next({where: (p) => p.userId === B.user})
      assert.equal(ev.conversationId, conv)
      assert.equal(ev.messageId, m2.id)
      assert.equal(ev.seq, m2.seq)
      assert.match(String(ev.readAt), ISO_UTC)

      assert.deepEqual(assertOk(await push(B.channel, "message:read", {seq: m1.seq}), "older read"), {readUpTo: m2.seq})
      assert.deepEqual(assertOk(await push(B.channel, "message:read", {messageId: m1.id}), "older read by id"), {readUpTo: m2.seq})
      const more = await A.inbox["message:read"].quiet(700)
      assert.deepEqual(more.filter((p) => p.userId === B.user), [], "reading an older message was broadcast")

      const again = await member(B.user, conv)
      const joined = assertOk(again.joinReply, "B's second join")
      assert.equal(joined.readUpTo, m2.seq, JSON.stringify(joined))
    })

    it("message:read by messageId works like by seq", async () => {
      const {A, B} = await twoMembers()
      await send(A, "one")
      const m2 = await send(A, "two")
      assert.deepEqual(assertOk(await push(B.channel, "message:read", {messageId: m2.id}), "read by id"), {readUpTo: m2.seq})
      const ev = await A.inbox["message:read"].next({where: (p) => p.userId === B.user})
      assert.equal(ev.messageId, m2.id)
      assert.equal(ev.seq, m2.seq)
    })

    it("message:history: oldest first, beforeSeq/limit paging with hasMore; limit 101 refused", async () => {
      const {A, B} = await twoMembers()
      const sent = []
      for(let i = 1; i <= 5; i++){ sent.push(await send(A, `h${i}`)) }
      const seqs = (r) => r.messages.map((m) => m.seq)
      const all = assertOk(await push(B.channel, "message:history", {}), "history")
      assert.deepEqual(seqs(all), sent.map((m) => m.seq))
      assert.equal(all.hasMore, false)
      for(const m of all.messages){ assertMessageShape(m, "history message") }
      assert.deepEqual(all.messages.map((m) => m.content), ["h1", "h2", "h3", "h4", "h5"])

      const last2 = assertOk(await push(B.channel, "message:history", {limit: 2}), "history limit 2")
      assert.deepEqual(seqs(last2), [4, 5])
      assert.equal(last2.hasMore, true)
      const page = assertOk(await push(B.channel, "message:history", {beforeSeq: 4, limit: 2}), "history beforeSeq 4")
      assert.deepEqual(seqs(page), [2, 3])
      assert.equal(page.hasMore, true)
      const first = assertOk(await push(B.channel, "message:history", {beforeSeq: 2, limit: 2}), "history beforeSeq 2")
      assert.deepEqual(seqs(first), [1])
      assert.equal(first.hasMore, false)

      assertOk(await push(B.channel, "message:history", {limit: 100}), "history limit 100")
      const tooMany = await push(B.channel, "message:history", {limit: 101})
      assert.equal(tooMany.status, "error", `limit 101 accepted: ${JSON.stringify(tooMany.response).slice(0, 300)}`)
    })

    /**
     * B saw m1..m3 and went away (`away()`); A sends m4, m5, edits m1, deletes m2; B comes back
     * with {lastSeq: 3} (`back()`) and must get the edit, the delete and m4, m5, in order,
     * with the new channel's join_ref, before a message sent after its join.
     */
    async function recovery(away, back){
      const {conv, A, B} = await twoMembers()
      const topic = `chat:${conv}`
      const old = [await send(A, "m1"), await send(A, "m2"), await send(A, "m3")]
      await B.inbox["message:new"].next({where: (p) => p.message?.id === old[2].id})
      await away(B)
      const m4 = await send(A, "m4")
      const m5 = await send(A, "m5")
      assertOk(await push(A.channel, "message:edit", {messageId: old[0].id, content: "m1 edited"}), "edit m1")
      assertOk(await push(A.channel, "message:delete", {messageId: old[1].id}), "delete m2")

      const B2 = await back(B, conv, old[2].seq)
      const joined = assertOk(B2.joinReply, "B's rejoin")
      assert.equal(joined.replayComplete, true, `join reply: ${JSON.stringify(joined)}`)
      assert.equal(joined.lastSeq, m5.seq, `join reply: ${JSON.stringify(joined)}`)
      const joinRef = B2.channel.joinRef()
      await B2.inbox["message:new"].next({where: (p) => p.message?.id === m5.id}).catch((err) => {
        throw new Error(`${err.message}; B's frames:\n${dumpFrames(B2.socket, topic)}`)
      })
      const live = await send(A, "m6 live")
      await B2.inbox["message:new"].next({where: (p) => p.message?.id === live.id})

      // the frames of B's new channel after its join reply, chat events only
      const frames = B2.socket.frames
      const replyAt = frames.findIndex((f) => f.topic === topic && f.event === "phx_reply" && f.ref === joinRef)
      assert.ok(replyAt >= 0, `no join reply seen:\n${dumpFrames(B2.socket, topic)}`)
      const after = frames.slice(replyAt + 1).filter((f) => f.topic === topic && CHAT_EVENTS.includes(f.event))
      const dump = `B's frames on ${topic}:\n${dumpFrames(B2.socket, topic)}`
      const describe = (f) => f.event === "message:deleted" ? `deleted ${f.payload.messageId}`
        : `${f.event.slice(8)} ${f.payload.message?.id}`
      const got = after.map(describe)
      const idx = (label) => got.indexOf(label)
      for(const label of [`edited ${old[0].id}`, `deleted ${old[1].id}`, `new ${m4.id}`, `new ${m5.id}`, `new ${live.id}`]){
        assert.ok(idx(label) >= 0, `missing ${label}; got ${JSON.stringify(got)}\n${dump}`)
      }
      assert.equal(got.filter((l) => l === `new ${m4.id}`).length, 1, `m4 twice: ${JSON.stringify(got)}`)
      assert.ok(idx(`new ${m4.id}`) < idx(`new ${m5.id}`), `missed messages not oldest first: ${JSON.stringify(got)}`)
      for(const label of [`edited ${old[0].id}`, `deleted ${old[1].id}`, `new ${m4.id}`, `new ${m5.id}`]){
        assert.ok(idx(label) < idx(`new ${live.id}`), `${label} came after a newer live message: ${JSON.stringify(got)}\n${dump}`)
      }
      assert.ok(!got.some((l) => old.some((m) => l === `new ${m.id}`)), `messages B had seen were replayed: ${JSON.stringify(got)}`)
      // replayed frames belong to the new channel: they carry its join_ref (live broadcasts carry null)
      for(const label of [`edited ${old[0].id}`, `deleted ${old[1].id}`, `new ${m4.id}`, `new ${m5.id}`]){
        assert.equal(after[idx(label)].join_ref, joinRef, `replayed ${label} without the channel's join_ref ${joinRef}:\n${dump}`)
      }
      const edit = after.find((f) => f.event === "message:edited" && f.payload.message?.id === old[0].id)
      assert.equal(edit.payload.message.content, "m1 edited")
      const del = after.find((f) => f.event === "message:deleted" && f.payload.messageId === old[1].id)
      assert.equal(del.payload.conversationId, conv)
      assert.match(String(del.payload.deletedAt), ISO_UTC)
    }

    it("recovery after leave: rejoin with {lastSeq} replays edits, deletes and missed messages before newer ones", async () => {
      await recovery(
        async (B) => { assertOk(await withTimeout(new Promise((resolve) => {
          B.channel.leave().receive("ok", (r) => resolve({status: "ok", response: r})).receive("error", (r) => resolve({status: "error", response: r}))
        }), 5000, "B's leave"), "leave") },
        (B, conv, lastSeq) => member(B.user, conv, {socket: B.socket, lastSeq}),
      )
    })

    it("recovery after disconnect: a new socket joining with {lastSeq} gets what it missed", async () => {
      await recovery(
        async (B) => { await disconnectPhoenix(B.socket) },
        (B, conv, lastSeq) => member(B.user, conv, {lastSeq}),
      )
    })

    it("removal: conversation put without B closes B's channel (onClose) and B's next join is unauthorized", async () => {
      const {conv, A, B} = await twoMembers()
      const closed = new Promise((resolve) => B.channel.onClose(() => resolve(Date.now())))
      await srv.putConversation(conv, [A.user])
      await withTimeout(closed, 5000, "B's channel onClose").catch((err) => {
        throw new Error(`${err.message}; B's frames:\n${dumpFrames(B.socket)}`)
      })
      const phxClose = B.socket.frames.find((f) => f.topic === `chat:${conv}` && f.event === "phx_close")
      assert.ok(phxClose, `no phx_close frame:\n${dumpFrames(B.socket)}`)
      assert.equal(phxClose.join_ref, B.channel.joinRef(), `phx_close for another join_ref:\n${dumpFrames(B.socket)}`)
      // A is unaffected
      const still = await send(A, "still here")
      assert.equal(still.senderId, A.user)
      assert.deepEqual(B.inbox["message:new"].items.filter((p) => p.message?.id === still.id), [], "B still receives messages")
      // B tries again
      const rejoin = await join(B.socket.channel(`chat:${conv}`))
      assertErrorReason(rejoin, "unauthorized", "B's rejoin")
    })

    it("removal (raw frames): phx_close with the join_ref; a push on the closed topic is unmatched, a rejoin unauthorized", async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const conv = ids.conv()
      const topic = `chat:${conv}`
      await srv.putConversation(conv, [a, b])
      const client = await srv.raw(b)
      assert.equal((await client.join(topic, "1")).payload.status, "ok")
      await srv.putConversation(conv, [a])
      const close = await client.event("phx_close", {topic})
      assert.deepEqual(close.raw, ["1", "1", topic, "phx_close", {}])
      // the channel is gone: like any topic not joined (docs/protocol.md#channels)
      client.push("1", "2", topic, "message:send", {type: "text", content: "let me in"})
      const reply = await client.reply("2")
      assert.equal(reply.payload.status, "error", reply.text)
      assert.equal(reply.payload.response?.reason, "unmatched topic", reply.text)
      const rejoin = await client.join(topic, "3")
      assert.deepEqual(rejoin.raw, ["3", "3", topic, "phx_reply", {status: "error", response: {reason: "unauthorized"}}])
    })
  })
}
