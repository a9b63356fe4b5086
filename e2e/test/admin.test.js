// Admin endpoints every process serves: /health, /health/live, /health/ready, /metrics.
import {describe, it, before} from "node:test"
import assert from "node:assert/strict"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {join, push} from "../lib/phx.js"

async function get(url){
  const res = await fetch(url, {signal: AbortSignal.timeout(5000)})
  return {status: res.status, type: res.headers.get("content-type") ?? "", body: await res.text()}
}

for(const mode of modes){
  describe(`admin endpoints [${mode}]`, () => {
    const srv = useServerSet(mode)

    // some traffic first, so that counters and histograms exist
    before(async () => {
      const user = ids.user()
      const conv = ids.conv()
      await srv.putConversation(conv, [user])
      const socket = await srv.connect(user)
      const channel = socket.channel(`chat:${conv}`)
      assert.equal((await join(channel)).status, "ok")
      assert.equal((await push(channel, "message:send", {type: "text", content: "metrics"})).status, "ok")
      await srv.closeClients()
    }, {timeout: 30_000})

    it("every process answers /health with 200 JSON carrying status", async () => {
      for(const {name, url} of srv.admins){
        const res = await get(`${url}/health`)
        assert.equal(res.status, 200, `${name} /health: ${res.status} ${res.body}`)
        assert.match(res.type, /application\/json/, `${name} /health content-type`)
        const body = JSON.parse(res.body)
        assert.ok(typeof body.status === "string" && body.status.length > 0, `${name} /health body: ${res.body}`)
      }
    })

    it("every process answers /health/live and /health/ready with 200", async () => {
      for(const {name, url} of srv.admins){
        for(const path of ["/health/live", "/health/ready"]){
          const res = await get(`${url}${path}`)
          assert.equal(res.status, 200, `${name} ${path}: ${res.status} ${res.body}`)
        }
      }
    })

    it("every process serves Prometheus text on /metrics with quckchat_ metrics", async () => {
      for(const {name, url} of srv.admins){
        const res = await get(`${url}/metrics`)
        assert.equal(res.status, 200, `${name} /metrics: ${res.status}`)
        assert.match(res.type, /text\/plain/, `${name} /metrics content-type`)
        assert.match(res.body, /\bquckchat_\w+/, `${name} /metrics has no quckchat_ metric:\n${res.body.slice(0, 2000)}`)
      }
    })
  })
}
