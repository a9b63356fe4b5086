// Graceful shutdown (README: SHUTDOWN_DRAIN_SECS): on SIGTERM the gateway answers /health/ready 503,
// refuses new WebSockets (503) while its port stays open, closes its open sockets with 1012 spread over the drain window (so
// clients do not all reconnect at once) and exits with code 0 within the window.
import {describe, it} from "node:test"
import assert from "node:assert/strict"

import {modes, useServerSet, ids} from "../lib/harness.js"
import {tryUpgrade} from "../lib/raw.js"
import {sleep, withTimeout} from "../lib/util.js"

const DRAIN_SECS = 5
/** sockets open at SIGTERM: with their closes spread uniformly over 0.8 × DRAIN_SECS, all of
 * them within MIN_SPREAD_MS of each other has a probability of about 1e-7 */
const SOCKETS = 10
const MIN_SPREAD_MS = 500
/** load on a shared machine delays closes and the exit; it never makes them early */
const SLACK_MS = 5000

/** GET /health/ready once: its HTTP status, or the connection error's code (e.g. ECONNREFUSED). */
async function readiness(url){
  try {
    const res = await fetch(`${url}/health/ready`, {signal: AbortSignal.timeout(2000)})
    await res.arrayBuffer()
    return res.status
  } catch (err){
    return err.cause?.code ?? err.name ?? String(err)
  }
}

for(const mode of modes){
  describe(`shutdown [${mode}] (SHUTDOWN_DRAIN_SECS=${DRAIN_SECS})`, () => {
    const srv = useServerSet(mode, {env: {SHUTDOWN_DRAIN_SECS: String(DRAIN_SECS)}})

    it("SIGTERM: not ready, new connections refused, sockets closed with 1012 spread over the window, exit 0 within it", {timeout: 60_000}, async () => {
      const user = ids.user()
      const conv = ids.conv()
      await srv.putConversation(conv, [user])
      const clients = []
      for(let i = 0; i < SOCKETS; i++){
        const client = await srv.raw(user)
        const joined = await client.join(`chat:${conv}`, "1")
        assert.equal(joined.payload.status, "ok", joined.text)
        clients.push(client)
      }
      const url = srv.httpUrl
      const wsUrl = srv.rawUrl({token: await srv.token(user)})
      assert.equal(await readiness(url), 200, "not ready before SIGTERM")

      const {at, proc} = srv.terminateGateway(0)
      const exited = withTimeout(proc.exited, srv.stopBoundMs, `the server to exit after SIGTERM (${proc.name})`)
      exited.catch(() => {})
      const closes = clients.map((c) => c.waitClosed(DRAIN_SECS * 1000 + SLACK_MS))
      closes.forEach((p) => p.catch(() => {}))
      const stillOpen = () => clients.filter((c) => c.isOpen).length

      // readiness goes away (the signal is handled asynchronously: wait for it, bounded) ...
      const answers = []
      let notReadyAt = null
      while(Date.now() - at < DRAIN_SECS * 1000 + SLACK_MS){
        const answer = await readiness(url)
        answers.push(answer)
        if(answer !== 200){ notReadyAt = Date.now(); break }
        await sleep(50)
      }
      assert.ok(notReadyAt !== null, `/health/ready still 200 ${Date.now() - at} ms after SIGTERM: ${answers.join(",")}`)
      assert.equal(answers.at(-1), 503, `/health/ready must answer 503 while draining, not close the port: ${answers.join(",")}`)
      const openWhenNotReady = stillOpen()

      // ... and stays away; a new WebSocket is refused
      const upgrade = await tryUpgrade(wsUrl, {timeoutMs: 5000})
      assert.equal(upgrade.opened, false, "a new WebSocket was accepted during the drain")
      const later = await readiness(url)
      assert.equal(later, 503, `/health/ready during the drain: ${later}`)
      const openDuringChecks = stillOpen()

      const closed = await Promise.all(closes).catch((err) => {
        throw new Error(`${err.message}; still open: ${stillOpen()}/${SOCKETS}\n${srv.logs()}`)
      })
      const exit = await exited.catch((err) => { throw new Error(`${err.message}\n${srv.logs()}`) })
      const exitAt = Date.now()

      const after = closed.map((c) => c.at - at).sort((x, y) => x - y)
      const report = `closes (ms after SIGTERM): ${after.join(", ")}; readiness ${answers.join(",")} then ${later}; ` +
        `upgrade ${JSON.stringify(upgrade)}; exit after ${exitAt - at} ms: ${JSON.stringify(exit)}`
      console.log(`shutdown [${mode}]: ${report}`)
      for(const c of closed){ assert.equal(c.code, 1012, `a socket closed with ${JSON.stringify(c)}; ${report}`) }
      assert.ok(after.at(-1) - after[0] >= MIN_SPREAD_MS, `closes not spread over the drain window: ${report}`)
      assert.ok(after.at(-1) <= DRAIN_SECS * 1000 + SLACK_MS, `a socket closed after the drain window: ${report}`)
      // the checks above ran during the drain, not after it
      assert.ok(openWhenNotReady > 0 || openDuringChecks > 0, `every socket had closed before readiness was checked: ${report}`)
      assert.equal(exit.code, 0, `exit after SIGTERM: ${JSON.stringify(exit)}\n${proc.output}`)
      assert.equal(exit.signal, null, `exit after SIGTERM: ${JSON.stringify(exit)}`)
    })
  })
}
