// docs/protocol.md#heartbeat: heartbeat and idle timeout.
import {describe, it} from "node:test"
import assert from "node:assert/strict"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {withTimeout, sleep} from "../lib/util.js"

const IDLE_SECS = 2

for(const mode of modes){
  describe(`heartbeat [${mode}]`, () => {
    const srv = useServerSet(mode)

    it("a raw heartbeat gets exactly [null,ref,\"phoenix\",\"phx_reply\",{status:ok,response:{}}]", async () => {
      const client = await srv.raw(ids.user())
      client.send('[null,"1","phoenix","heartbeat",{}]')
      const reply = await client.reply("1")
      assert.deepEqual(reply.raw, [null, "1", "phoenix", "phx_reply", {status: "ok", response: {}}])
    })

    it("phoenix's socket.ping() (a heartbeat) gets its reply", async () => {
      const socket = await srv.connect(ids.user())
      const rtt = await withTimeout(new Promise((resolve) => {
        assert.equal(socket.ping(resolve), true)
      }), 5000, "ping reply")
      assert.equal(typeof rtt, "number")
    })
  })

  describe(`idle timeout [${mode}] (SOCKET_IDLE_TIMEOUT_SECS=${IDLE_SECS})`, () => {
    const srv = useServerSet(mode, {env: {SOCKET_IDLE_TIMEOUT_SECS: String(IDLE_SECS)}})

    it("a raw socket that sends nothing is closed by the server", async () => {
      const client = await srv.raw(ids.user())
      const openedAt = Date.now()
      const closed = await client.waitClosed((IDLE_SECS + 4) * 1000)
      const after = closed.at - openedAt
      assert.ok(after >= IDLE_SECS * 1000 - 500, `closed after only ${after} ms, before the idle timeout`)
    })

    it("a phoenix client heartbeating every 500 ms stays open past the timeout", async () => {
      const socket = await srv.connect(ids.user(), {socketOpts: {heartbeatIntervalMs: 500}})
      await sleep((IDLE_SECS * 2 + 1) * 1000)
      assert.equal(socket.isConnected(), true, `socket closed: ${JSON.stringify(socket.closes)}`)
      assert.deepEqual(socket.closes, [], "the socket was closed (and reconnected) in between")
    })
  })
}
