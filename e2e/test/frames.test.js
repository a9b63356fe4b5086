// docs/protocol.md#frames, #channels: frames at the wire level: malformed input, channel lifecycle
// (duplicate join, leave),
// serializer 1.0.0, oversized frames.
import {describe, it} from "node:test"
import assert from "node:assert/strict"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {sleep} from "../lib/util.js"

const MAX_FRAME_BYTES = 65536

for(const mode of modes){
  describe(`frames [${mode}]`, () => {
    const srv = useServerSet(mode)

    async function memberRaw(opts){
      const user = ids.user()
      const conv = ids.conv()
      await srv.putConversation(conv, [user])
      const client = await srv.raw(user, opts)
      return {user, conv, topic: `chat:${conv}`, client}
    }

    it("malformed frames without a usable ref get no reply and the socket keeps working", async () => {
      const client = await srv.raw(ids.user())
      client.send("this is not json")
      client.send("{\"topic\":\"phoenix\",\"event\":\"heartbeat\",\"payload\":{},\"ref\":\"5\"}") // object on vsn 2.0.0
      client.send("[1,2]") // wrong arity, no usable ref
      client.send("42")
      const reply = await client.heartbeat("2")
      assert.deepEqual(reply.raw, [null, "2", "phoenix", "phx_reply", {status: "ok", response: {}}])
      await client.drain(300)
      const others = client.frames.filter((f) => f !== reply)
      assert.deepEqual(others.map((f) => f.text ?? f), [], "the server answered a malformed frame")
      assert.equal(client.isOpen, true)
    })

    it("a wrong-arity array with a string ref and topic gets an \"invalid frame\" error reply", async () => {
      const client = await srv.raw(ids.user())
      client.send('[null,"7","phoenix","heartbeat"]')
      const reply = await client.reply("7")
      assert.equal(reply.topic, "phoenix")
      assert.equal(reply.join_ref, null)
      assert.equal(reply.payload.status, "error")
      assert.equal(typeof reply.payload.response?.reason, "string", JSON.stringify(reply.raw))
      assert.ok(reply.payload.response.reason.startsWith("invalid frame"), `reason: ${reply.payload.response.reason}`)
      const hb = await client.heartbeat("8")
      assert.equal(hb.payload.status, "ok")
    })

    it("persistent malformed input closes the socket with 1008 (policy)", async () => {
      const client = await srv.raw(ids.user())
      // one frame at a time: frames still unread when the server closes could turn its
      // close into a TCP reset (1006) instead of the close frame we want to see
      for(let i = 0; i < 100 && !client.closeInfo; i++){
        client.send(`garbage ${i}`)
        await Promise.race([client.closed, sleep(30)])
      }
      const closed = await client.waitClosed(5000)
      assert.equal(closed.code, 1008, `closed with ${JSON.stringify(closed)}`)
    })

    it("a duplicate join closes the old channel (phx_close with its join_ref) and joins anew", async () => {
      const {topic, client} = await memberRaw()
      const first = await client.join(topic, "1")
      assert.equal(first.join_ref, "1")
      assert.equal(first.payload.status, "ok", JSON.stringify(first.raw))

      client.push("3", "3", topic, "phx_join", {})
      const close = await client.event("phx_close", {topic})
      assert.deepEqual(close.raw, ["1", "1", topic, "phx_close", {}])
      const second = await client.reply("3", {topic})
      assert.equal(second.join_ref, "3")
      assert.equal(second.payload.status, "ok", JSON.stringify(second.raw))

      // the new channel works and answers with its own join_ref
      client.push("3", "4", topic, "message:send", {type: "text", content: "after rejoin"})
      const sent = await client.reply("4", {topic})
      assert.equal(sent.join_ref, "3")
      assert.equal(sent.payload.status, "ok", JSON.stringify(sent.raw))
      const broadcast = await client.event("message:new", {topic})
      assert.equal(broadcast.payload.message.content, "after rejoin")
    })

    it("phx_leave replies ok, then phx_close with that join_ref; the topic is then unmatched", async () => {
      const {topic, client} = await memberRaw()
      const joined = await client.join(topic, "5")
      assert.equal(joined.payload.status, "ok", JSON.stringify(joined.raw))
      client.push("5", "6", topic, "phx_leave", {})
      const left = await client.reply("6", {topic})
      assert.deepEqual(left.raw, ["5", "6", topic, "phx_reply", {status: "ok", response: {}}])
      const close = await client.event("phx_close", {topic})
      assert.deepEqual(close.raw, ["5", "5", topic, "phx_close", {}])
      assert.ok(client.frames.indexOf(left) < client.frames.indexOf(close), "phx_close came before the leave reply")

      client.push("5", "7", topic, "message:send", {type: "text", content: "gone"})
      const after = await client.reply("7", {topic})
      assert.equal(after.payload.status, "error")
      assert.equal(after.payload.response.reason, "unmatched topic")
    })

    it("every reply carries the join_ref of the push it answers", async () => {
      const {topic, client} = await memberRaw()
      const joined = await client.join(topic, "11")
      assert.equal(joined.join_ref, "11")
      const pushes = [
        ["12", "message:send", {type: "text", content: "one"}],
        ["13", "foo:bar", {}],
        ["14", "message:send", {type: "text", content: 5}],
      ]
      for(const [ref, event, payload] of pushes){ client.push("11", ref, topic, event, payload) }
      for(const [ref, event] of pushes){
        const reply = await client.reply(ref, {topic})
        assert.equal(reply.join_ref, "11", `reply to ${event}: ${reply.text}`)
      }
      const hb = await client.heartbeat("15")
      assert.equal(hb.join_ref, null)
    })

    it("vsn 1.0.0: object frames for heartbeat, join, message:send and the broadcast", async () => {
      const {user, topic, conv, client} = await memberRaw({vsn: "1.0.0"})
      client.send({topic: "phoenix", event: "heartbeat", payload: {}, ref: "1"})
      const hb = await client.reply("1")
      assert.deepEqual(hb.raw, {topic: "phoenix", event: "phx_reply", payload: {status: "ok", response: {}}, ref: "1", join_ref: null})

      client.send({topic, event: "phx_join", payload: {}, ref: "2", join_ref: "2"})
      const joined = await client.reply("2")
      assert.ok(!Array.isArray(joined.raw), `not an object frame: ${joined.text}`)
      assert.equal(joined.raw.topic, topic)
      assert.equal(joined.raw.payload.status, "ok", joined.text)
      assert.equal(joined.raw.payload.response.conversationId, conv)
      assert.equal(joined.raw.join_ref, "2")

      client.send({topic, event: "message:send", payload: {type: "text", content: "v1"}, ref: "3", join_ref: "2"})
      const sent = await client.reply("3")
      assert.ok(!Array.isArray(sent.raw), `not an object frame: ${sent.text}`)
      assert.equal(sent.raw.payload.status, "ok", sent.text)
      assert.equal(sent.raw.payload.response.message.senderId, user)
      const broadcast = await client.event("message:new", {topic})
      assert.ok(!Array.isArray(broadcast.raw), `not an object frame: ${broadcast.text}`)
      assert.equal(broadcast.raw.ref ?? null, null)
      assert.equal(broadcast.raw.payload.message.id, sent.raw.payload.response.message.id)
      assert.equal(broadcast.raw.payload.message.content, "v1")
    })

    it("vsn 1.0.0 also works without join_ref (old clients)", async () => {
      const {topic, client} = await memberRaw({vsn: "1.0.0"})
      client.send({topic, event: "phx_join", payload: {}, ref: "1"})
      const joined = await client.reply("1")
      assert.equal(joined.raw.payload.status, "ok", joined.text)
      client.send({topic, event: "message:send", payload: {type: "text", content: "old"}, ref: "2"})
      const sent = await client.reply("2")
      assert.equal(sent.raw.payload.status, "ok", sent.text)
    })

    it("a frame over MAX_FRAME_BYTES with a ref gets {reason: \"payload too large\"} and the socket keeps working", async () => {
      const {topic, client} = await memberRaw()
      const joined = await client.join(topic, "1")
      assert.equal(joined.payload.status, "ok", JSON.stringify(joined.raw))
      const content = "x".repeat(70 * 1024)
      assert.ok(content.length > MAX_FRAME_BYTES && content.length < 4 * MAX_FRAME_BYTES)
      client.push("1", "2", topic, "message:send", {type: "text", content})
      const reply = await client.reply("2")
      assert.equal(reply.join_ref, "1")
      assert.equal(reply.payload.status, "error", reply.text)
      assert.equal(reply.payload.response?.reason, "payload too large", reply.text)
      assert.deepEqual((await client.drain(300, (f) => f.event === "message:new")), [], "the oversized message was broadcast")

      assert.equal(client.isOpen, true)
      const hb = await client.heartbeat("3")
      assert.equal(hb.payload.status, "ok")
      client.push("1", "4", topic, "message:send", {type: "text", content: "small"})
      const ok = await client.reply("4")
      assert.equal(ok.payload.status, "ok", JSON.stringify(ok.raw))
    })

    it("a frame over 4x MAX_FRAME_BYTES closes the socket with 1009 (message too big)", async () => {
      const {topic, client} = await memberRaw()
      const joined = await client.join(topic, "1")
      assert.equal(joined.payload.status, "ok", JSON.stringify(joined.raw))
      client.push("1", "2", topic, "message:send", {type: "text", content: "y".repeat(5 * MAX_FRAME_BYTES)})
      // the close rejects the wait for a reply; a reply instead of the close fails the test
      const reply = await client.reply("2", {timeoutMs: 10_000}).then(
        (f) => f,
        (err) => { if(client.closeInfo){ return null } throw err },
      )
      assert.equal(reply, null, `the oversized frame got a reply instead of a close: ${reply?.text.slice(0, 200)}`)
      const closed = await client.waitClosed(10_000)
      assert.equal(closed.code, 1009, `closed with ${JSON.stringify(closed)}`)
    })

    it("a binary push frame gets {reason: \"binary payloads are not supported\"} and the socket keeps working", async () => {
      const {topic, client} = await memberRaw()
      const joined = await client.join(topic, "1")
      assert.equal(joined.payload.status, "ok", JSON.stringify(joined.raw))
      // Phoenix binary serializer, kind 0 (push): sizes of join_ref, ref, topic, event, then those and the data
      const [joinRef, ref, event] = ["1", "2", "message:send"]
      const header = Buffer.from([0, joinRef.length, ref.length, Buffer.byteLength(topic), event.length])
      client.send(Buffer.concat([header, Buffer.from(joinRef + ref + topic + event), Buffer.from([1, 2, 3, 4])]))
      const reply = await client.reply(ref, {topic})
      assert.equal(reply.join_ref, joinRef, reply.text)
      assert.equal(reply.payload.status, "error", reply.text)
      assert.deepEqual(reply.payload.response, {reason: "binary payloads are not supported"}, reply.text)
      // nothing was stored or broadcast, and the socket still works
      client.push("1", "3", topic, "message:send", {type: "text", content: "text works"})
      const ok = await client.reply("3", {topic})
      assert.equal(ok.payload.status, "ok", ok.text)
      assert.equal(ok.payload.response.message.seq, 1, `the binary push was stored: ${ok.text}`)
      assert.equal(client.isOpen, true)
    })
  })
}
