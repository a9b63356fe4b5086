// Fault suite, short mode (distributed only): a distributed set with 3 gateways and 2 chat-svc
// replicas on its own nats-server, redis-server and SecantusDB, under a steady chat load (4 senders
// into 2 conversations, retrying each clientMessageId until acked; 3 receivers recording
// message:new and rejoining with lastSeq), with one fault at a time: chat-svc replica SIGKILL,
// presence-svc SIGKILL + restart, gateway SIGTERM, NATS SIGKILL + restart on its port, Redis
// SIGKILL + restart, SecantusDB SIGKILL + restart on its port and data dir. After each fault:
// stored exactly once and gap-free, every receiver has every seq (in order within a join session),
// no ack stall beyond the bounds (the NATS and database outages excluded), presence converges;
// after the database fault also: chat-svc's membership change stream still closes the channel of a
// member removed directly in the database. See lib/faults.js; the soak is fault/soak.js.
import {describe, it, before, after} from "node:test"
import assert from "node:assert/strict"

import {modes} from "../lib/harness.js"
import {FaultRig, FAULT_ORDER, LIMITS, runFault} from "../lib/faults.js"

const log = (line) => console.log(`faults: ${line}`)

if(modes.includes("distributed")){
  describe("faults under load [distributed, 3 gateways, 2 chat-svc replicas, own NATS + Redis + SecantusDB]", () => {
    let rig = null
    const results = []

    before(async () => {
      const missing = FaultRig.prerequisite()
      if(missing){ throw new Error(missing) }
      rig = new FaultRig({log})
      try {
        await rig.start()
      } catch (err){
        await rig.stop().catch(() => {})
        rig = null
        throw err
      }
    }, {timeout: 120_000})

    after(async () => {
      log(`bounds: ack gap <= ${LIMITS.STALL_MS} ms outside the NATS and database outages; <= ${LIMITS.CHAT_KILL_STALL_MS} ms in the 5 s after a chat-svc SIGKILL`)
      for(const r of results){ log(JSON.stringify(r.figures)) }
      await rig?.stop()
    }, {timeout: 120_000})

    for(const name of FAULT_ORDER){
      it(name, {timeout: 150_000}, async () => {
        assert.ok(rig, "the fault set did not start")
        const res = await runFault(rig, name)
        results.push(res)
        log(JSON.stringify(res.figures))
        if(res.errors.length){ assert.fail(`${res.errors.length} invariant(s) failed:\n${res.errors.join("\n")}`) }
      })
    }
  })
}
