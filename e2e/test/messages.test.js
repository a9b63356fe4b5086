// docs/protocol.md#chat-events: message:send, payload validation, unknown events and unjoined
// topics.
import {describe, it} from "node:test"
import assert from "node:assert/strict"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {join, push, listen} from "../lib/phx.js"
import {ISO_UTC} from "../lib/util.js"

for(const mode of modes){
  describe(`messages [${mode}]`, () => {
    const srv = useServerSet(mode)

    /** A and B, both members of a fresh conversation, both joined with the phoenix client. */
    async function twoMembers(){
      const a = ids.user("a")
      const b = ids.user("b")
      const conv = ids.conv()
      await srv.putConversation(conv, [a, b])
      const sa = await srv.connect(a)
      const sb = await srv.connect(b, {authStyle: "subprotocol"})
      const ca = sa.channel(`chat:${conv}`)
      const cb = sb.channel(`chat:${conv}`)
      const inboxA = listen(ca, "message:new")
      const inboxB = listen(cb, "message:new")
      for(const [who, ch] of [["A", ca], ["B", cb]]){
        const r = await join(ch)
        assert.equal(r.status, "ok", `${who} join refused: ${JSON.stringify(r.response)}`)
      }
      return {a, b, conv, ca, cb, inboxA, inboxB}
    }

    it("message:send replies {message} and broadcasts message:new to every member", async () => {
      const {a, conv, ca, inboxA, inboxB} = await twoMembers()
      const reply = await push(ca, "message:send", {type: "text", content: "hi", clientMessageId: "c1"})
      assert.equal(reply.status, "ok", `send refused: ${JSON.stringify(reply.response)}`)
      const {message} = reply.response
      assert.ok(message && typeof message === "object", `reply has no message: ${JSON.stringify(reply.response)}`)
      assert.equal(typeof message.id, "string")
      assert.ok(message.id.length > 0)
      assert.equal(message.conversationId, conv)
      assert.equal(message.seq, 1)
      assert.equal(message.senderId, a)
      assert.equal(message.type, "text")
      assert.equal(message.content, "hi")
      assert.equal(message.clientMessageId, "c1")
      assert.equal(typeof message.createdAt, "string")
      assert.match(message.createdAt, ISO_UTC)
      assert.ok(!Number.isNaN(Date.parse(message.createdAt)))
      assert.ok(Math.abs(Date.parse(message.createdAt) - Date.now()) < 60_000, `createdAt ${message.createdAt} is not now`)
      assert.deepEqual(message.reactions, {})

      const atB = await inboxB.next({where: (p) => p.message?.id === message.id})
      assert.equal(atB.message.seq, 1)
      assert.deepEqual(atB.message, message, "B's message:new differs from A's reply")
      const atA = await inboxA.next({where: (p) => p.message?.id === message.id})
      assert.equal(atA.message.seq, 1)

      const second = await push(ca, "message:send", {type: "text", content: "again", clientMessageId: "c2"})
      assert.equal(second.status, "ok", `second send refused: ${JSON.stringify(second.response)}`)
      assert.equal(second.response.message.seq, 2)
      assert.notEqual(second.response.message.id, message.id)
      const secondAtB = await inboxB.next({where: (p) => p.message?.id === second.response.message.id})
      assert.equal(secondAtB.message.seq, 2)
    })

    it("message:send from B reaches A, with B as senderId", async () => {
      const {b, cb, inboxA} = await twoMembers()
      const reply = await push(cb, "message:send", {type: "text", content: "from b"})
      assert.equal(reply.status, "ok", `send refused: ${JSON.stringify(reply.response)}`)
      assert.equal(reply.response.message.senderId, b)
      const atA = await inboxA.next({where: (p) => p.message?.id === reply.response.message.id})
      assert.equal(atA.message.content, "from b")
    })

    it("content of the wrong type: error \"invalid payload: content must be a string\", nothing broadcast", async () => {
      const {ca, inboxB} = await twoMembers()
      const reply = await push(ca, "message:send", {type: "text", content: 5})
      assert.equal(reply.status, "error")
      assert.equal(reply.response.reason, "invalid payload: content must be a string")
      assert.deepEqual(await inboxB.quiet(300), [], "B received a message:new")
    })

    it("missing content: error whose reason mentions content, nothing broadcast", async () => {
      const {ca, inboxB} = await twoMembers()
      const reply = await push(ca, "message:send", {type: "text"})
      assert.equal(reply.status, "error")
      assert.equal(typeof reply.response.reason, "string")
      assert.match(reply.response.reason, /content/)
      assert.deepEqual(await inboxB.quiet(300), [], "B received a message:new")
    })

    it("an unknown message type: error whose reason mentions type, nothing broadcast", async () => {
      const {ca, inboxB} = await twoMembers()
      const reply = await push(ca, "message:send", {type: "bogus", content: "x"})
      assert.equal(reply.status, "error")
      assert.equal(typeof reply.response.reason, "string")
      assert.match(reply.response.reason, /type/)
      assert.deepEqual(await inboxB.quiet(300), [], "B received a message:new")
    })

    it("an unknown event on a joined chat topic: {reason: \"unknown event\", event}", async () => {
      const {ca} = await twoMembers()
      const reply = await push(ca, "foo:bar", {})
      assert.equal(reply.status, "error")
      assert.equal(reply.response.reason, "unknown event")
      assert.equal(reply.response.event, "foo:bar")
    })

    it("a push to a topic not joined: {reason: \"unmatched topic\"} with the push's refs", async () => {
      const user = ids.user()
      const conv = ids.conv()
      await srv.putConversation(conv, [user])
      const client = await srv.raw(user)
      client.push("9", "10", `chat:${conv}`, "message:send", {type: "text", content: "hi"})
      const reply = await client.reply("10")
      assert.deepEqual(reply.raw.slice(0, 4), ["9", "10", `chat:${conv}`, "phx_reply"])
      assert.equal(reply.payload.status, "error", reply.text)
      assert.equal(reply.payload.response?.reason, "unmatched topic", reply.text)
      // nothing was sent on the side
      assert.deepEqual((await client.drain(300)).map((f) => f.text), [])
    })
  })
}
