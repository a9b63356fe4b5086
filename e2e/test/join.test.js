// docs/protocol.md#chat-join: joining chat:<conversationId>, and topic validation
// (docs/protocol.md#topics).
import {describe, it} from "node:test"
import assert from "node:assert/strict"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {join} from "../lib/phx.js"

/** An error reply with `reason` (extra response fields are allowed). */
function assertError(reply, reason, context = ""){
  assert.equal(reply.status, "error", `${context} expected an error, got ${JSON.stringify(reply)}`)
  assert.equal(reply.response?.reason, reason, `${context} ${JSON.stringify(reply.response)}`)
}

for(const mode of modes){
  describe(`join [${mode}]`, () => {
    const srv = useServerSet(mode)

    it("a member joins chat:<conv>: ok with conversationId, lastSeq, readUpTo", async () => {
      const [a, b] = [ids.user("a"), ids.user("b")]
      const conv = ids.conv()
      await srv.putConversation(conv, [a, b])
      const socket = await srv.connect(a)
      const reply = await join(socket.channel(`chat:${conv}`))
      assert.equal(reply.status, "ok", `join refused: ${JSON.stringify(reply.response)}`)
      assert.equal(reply.response.conversationId, conv)
      assert.equal(typeof reply.response.lastSeq, "number", `lastSeq: ${JSON.stringify(reply.response)}`)
      assert.equal(typeof reply.response.readUpTo, "number", `readUpTo: ${JSON.stringify(reply.response)}`)
    })

    it("a 64-character conversation id is valid", async () => {
      const user = ids.user()
      const conv = (ids.conv() + "x".repeat(64)).slice(0, 64)
      await srv.putConversation(conv, [user])
      const socket = await srv.connect(user)
      const reply = await join(socket.channel(`chat:${conv}`))
      assert.equal(reply.status, "ok", `join refused: ${JSON.stringify(reply.response)}`)
      assert.equal(reply.response.conversationId, conv)
    })

    it("a non-member is refused with {reason: \"unauthorized\"}", async () => {
      const [a, b, outsider] = [ids.user("a"), ids.user("b"), ids.user("x")]
      const conv = ids.conv()
      await srv.putConversation(conv, [a, b])
      const socket = await srv.connect(outsider)
      const reply = await join(socket.channel(`chat:${conv}`))
      assertError(reply, "unauthorized")
    })

    it("an unknown conversation is refused with {reason: \"unauthorized\"}", async () => {
      const socket = await srv.connect(ids.user())
      const reply = await join(socket.channel(`chat:${ids.conv("never-created")}`))
      assertError(reply, "unauthorized")
    })

    it("an invalid conversation id is refused with {reason: \"invalid topic\"}", async () => {
      const socket = await srv.connect(ids.user())
      for(const topic of ["chat:bad id!", `chat:${"a".repeat(65)}`, "chat:", "chat:a/b", "chat:ü"]){
        const reply = await join(socket.channel(topic))
        assertError(reply, "invalid topic", `topic ${JSON.stringify(topic)}`)
      }
    })

    it("an unknown topic kind is refused with {reason: \"unmatched topic\"}", async () => {
      const socket = await srv.connect(ids.user())
      const reply = await join(socket.channel("foo:bar"))
      assertError(reply, "unmatched topic")
    })
  })
}
