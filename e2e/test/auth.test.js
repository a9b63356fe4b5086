// docs/protocol.md#connection: transport and handshake: the JWT as connect param or in
// Sec-WebSocket-Protocol
// (phoenix `authToken`), and HTTP 403 on the upgrade for anything else.
import {describe, it} from "node:test"
import assert from "node:assert/strict"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {join, connectPhoenix} from "../lib/phx.js"
import {mintUserToken, authTokenProtocol} from "../lib/jwt.js"
import {tryUpgrade} from "../lib/raw.js"

for(const mode of modes){
  describe(`auth [${mode}]`, () => {
    const srv = useServerSet(mode)

    async function memberConversation(user){
      const conv = ids.conv()
      await srv.putConversation(conv, [user])
      return conv
    }

    it("a token from `quckchat token` in params {token} connects and joins", async () => {
      const user = ids.user()
      const conv = await memberConversation(user)
      const socket = await srv.connect(user, {authStyle: "param"})
      assert.equal(socket.isConnected(), true)
      const reply = await join(socket.channel(`chat:${conv}`))
      assert.equal(reply.status, "ok", `join refused: ${JSON.stringify(reply.response)}`)
    })

    it("a token in phoenix's authToken option (subprotocol) connects and joins", async () => {
      const user = ids.user()
      const conv = await memberConversation(user)
      const socket = await srv.connect(user, {authStyle: "subprotocol"})
      assert.equal(socket.isConnected(), true)
      // the token travels in Sec-WebSocket-Protocol, not in the URL
      assert.doesNotMatch(socket.endPointURL(), /token=/)
      assert.equal(socket.conn.protocol, "phoenix")
      const reply = await join(socket.channel(`chat:${conv}`))
      assert.equal(reply.status, "ok", `join refused: ${JSON.stringify(reply.response)}`)
    })

    it("the server selects the `phoenix` subprotocol for a bearer subprotocol token (raw ws)", async () => {
      const user = ids.user()
      const client = await srv.raw(user, {authStyle: "subprotocol"})
      assert.equal(client.protocol, "phoenix")
      const reply = await client.heartbeat("1")
      assert.equal(reply.payload.status, "ok")
    })

    it("a token minted in JS with the right secret is accepted (control for the 403 cases)", async () => {
      const user = ids.user()
      const conv = await memberConversation(user)
      const token = mintUserToken(user, srv.jwtSecret, 600)
      const socket = await srv.connect(user, {token})
      const reply = await join(socket.channel(`chat:${conv}`))
      assert.equal(reply.status, "ok", `join refused: ${JSON.stringify(reply.response)}`)
    })

    const badTokens = {
      "a token signed with the wrong secret": (user) => mintUserToken(user, "not-the-secret", 600),
      "a token that expired an hour ago": (user) => mintUserToken(user, srv.jwtSecret, -3600),
      "a garbage token (not.a.jwt)": () => "not.a.jwt",
      "a non-JWT token": () => "garbage",
    }

    for(const [what, make] of Object.entries(badTokens)){
      it(`${what} is refused with HTTP 403 (connect param)`, async () => {
        const result = await tryUpgrade(srv.rawUrl({token: make(ids.user())}))
        assert.equal(result.opened, false, "the socket opened")
        assert.equal(result.statusCode, 403, `expected HTTP 403, got ${JSON.stringify(result)}`)
      })

      it(`${what} is refused with HTTP 403 (subprotocol)`, async () => {
        const result = await tryUpgrade(srv.rawUrl(), {protocols: ["phoenix", authTokenProtocol(make(ids.user()))]})
        assert.equal(result.opened, false, "the socket opened")
        assert.equal(result.statusCode, 403, `expected HTTP 403, got ${JSON.stringify(result)}`)
      })
    }

    it("a missing token is refused with HTTP 403", async () => {
      const result = await tryUpgrade(srv.rawUrl())
      assert.equal(result.opened, false, "the socket opened")
      assert.equal(result.statusCode, 403, `expected HTTP 403, got ${JSON.stringify(result)}`)
    })

    it("a missing token with only the `phoenix` subprotocol is refused with HTTP 403", async () => {
      const result = await tryUpgrade(srv.rawUrl(), {protocols: ["phoenix"]})
      assert.equal(result.opened, false, "the socket opened")
      assert.equal(result.statusCode, 403, `expected HTTP 403, got ${JSON.stringify(result)}`)
    })

    it("the phoenix client never opens with a bad token", async () => {
      await assert.rejects(
        connectPhoenix(srv.socketUrl, mintUserToken(ids.user(), "wrong", 600), {socketOpts: {reconnectAfterMs: () => 60_000}}),
        /error before open/
      )
    })
  })
}
