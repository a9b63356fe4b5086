#!/usr/bin/env node
// Fault soak: the fault suite of fault/faults.test.js (lib/faults.js) repeated for
// E2E_SOAK_MINUTES (default 30) under the same steady load, checking every invariant after every
// fault, plus memory: the RSS of every process (from /proc/<pid>/status) is sampled after each
// fault (load paused, same point of the cycle); after the warm-up (the first full cycle of faults)
// a process that kept running (same pid) must not grow more than E2E_SOAK_RSS_GROWTH (0.5 = 50%).
// Processes the faults restart (chat-svc1, presence-svc, gateway2, nats-server, redis-server,
// secantus) are reported per incarnation, not checked.
//
//   source /tmp/quckchat-test/env && E2E_SOAK_MINUTES=30 node e2e/fault/soak.js   (or: cd e2e && npm run soak)
//
// Exit code 0 when every invariant held and memory stayed flat, 1 otherwise. Stops by itself;
// everything it started is stopped and removed (on SIGINT the harness SIGKILLs the servers).
import {FaultRig, FAULT_ORDER, LIMITS, runFault} from "../lib/faults.js"

const MINUTES = Number(process.env.E2E_SOAK_MINUTES ?? 30)
const GROWTH = Number(process.env.E2E_SOAK_RSS_GROWTH ?? 0.5)
const t0 = Date.now()
const log = (line) => console.log(`[soak +${((Date.now() - t0) / 1000).toFixed(0)}s] ${line}`)
const mb = (kb) => kb === null || kb === undefined ? "-" : `${(kb / 1024).toFixed(1)}MB`

async function main(){
  const missing = FaultRig.prerequisite()
  if(missing){ throw new Error(missing) }
  const rig = new FaultRig({log})
  const interrupted = false // SIGINT/SIGTERM: the harness SIGKILLs every server at once and exits
  const errors = []
  const results = []
  /** name -> [{pid, kb, at, cycle}] */
  const samples = new Map()
  const sample = (cycle) => {
    const pids = Object.fromEntries(rig.srv.procs.map((p) => [p.name, p.proc.child.pid]))
    pids["nats-server"] = rig.nats.proc.child.pid
    pids["redis-server"] = rig.redis.proc.child.pid
    pids.secantus = rig.db.proc.child.pid
    for(const [name, kb] of Object.entries(rig.rss())){
      if(!samples.has(name)){ samples.set(name, []) }
      samples.get(name).push({pid: pids[name], kb, at: Date.now(), cycle})
    }
  }
  try {
    await rig.start()
    log(`set up: ${rig.srv.procs.map((p) => p.name).join(", ")}; running ${MINUTES} min; bounds: ack gap <= ${LIMITS.STALL_MS} ms (not during the NATS and database outages), <= ${LIMITS.CHAT_KILL_STALL_MS} ms after a chat-svc SIGKILL`)
    sample(0)
    const deadline = t0 + MINUTES * 60_000
    let cycle = 0
    while(!interrupted && (cycle === 0 || Date.now() < deadline)){
      cycle++
      for(const name of FAULT_ORDER){
        if(interrupted || (cycle > 1 && Date.now() >= deadline)){ break }
        const res = await runFault(rig, name)
        results.push({cycle, ...res})
        sample(cycle)
        const f = res.figures
        log(`cycle ${cycle} ${name}: acked ${f.acked} (retried ${f.retried}), max ack gap ${f.maxAckGapMs} ms, send p50/max ${f.p50SendLatencyMs}/${f.maxSendLatencyMs} ms, recovery ${f.recoveryMs} ms, receiver joins ${f.receiverJoins}${res.errors.length ? `, ${res.errors.length} INVARIANT FAILURE(S)` : ""}`)
        for(const e of res.errors){ log(`  ${e}`) }
        errors.push(...res.errors.map((e) => `cycle ${cycle}: ${e}`))
      }
    }

    // memory: the warm-up is cycle 1; baseline = the last sample of cycle 1 with the same pid as the end
    log("RSS per process (start = after set-up, warm = end of cycle 1, end = last sample):")
    for(const [name, list] of samples){
      const end = list.at(-1)
      const start = list[0]
      const warm = [...list].reverse().find((s) => s.cycle <= 1 && s.pid === end.pid)
      const restarted = start.pid !== end.pid
      let verdict = ""
      if(warm && warm.kb && end.kb && end.cycle > 1){
        const growth = end.kb / warm.kb - 1
        verdict = `growth after warm-up ${(growth * 100).toFixed(0)}%`
        if(growth > GROWTH){
          verdict += ` > ${(GROWTH * 100).toFixed(0)}%: FAIL`
          errors.push(`memory: ${name} (pid ${end.pid}) grew from ${mb(warm.kb)} after the warm-up to ${mb(end.kb)} (${(growth * 100).toFixed(0)}% > ${(GROWTH * 100).toFixed(0)}%); samples: ${list.filter((s) => s.pid === end.pid).map((s) => mb(s.kb)).join(" ")}`)
        }
      } else if(restarted){
        const perPid = new Map()
        for(const s of list){ perPid.set(s.pid, s.kb) }
        verdict = `restarted by the faults (${perPid.size} incarnations; last RSS of each: ${[...perPid.values()].map(mb).join(" ")})`
      } else {
        verdict = "too short to compare (needs a second cycle)"
      }
      log(`  ${name}: start ${mb(start.kb)} (pid ${start.pid}), warm ${mb(warm?.kb)}, end ${mb(end.kb)} (pid ${end.pid}); ${verdict}`)
    }
    // per fault kind
    for(const name of FAULT_ORDER){
      const rs = results.filter((r) => r.fault === name).map((r) => r.figures)
      if(!rs.length){ continue }
      const max = (k) => Math.max(...rs.map((f) => f[k] ?? 0))
      log(`${name}: ${rs.length}x, acked ${rs.reduce((n, f) => n + f.acked, 0)}, max ack gap ${max("maxAckGapMs")} ms, max send latency ${max("maxSendLatencyMs")} ms, max recovery ${max("recoveryMs")} ms`)
    }
  } finally {
    await rig.stop().catch((err) => errors.push(`stop: ${err.message.split("\n")[0]}`))
  }
  log(errors.length ? `FAILED: ${errors.length} problem(s)` : `PASSED: ${results.length} faults in ${((Date.now() - t0) / 60_000).toFixed(1)} min, every invariant held, memory flat`)
  for(const e of errors.slice(0, 50)){ console.log(`  ${e}`) }
  return errors.length ? 1 : 0
}

main().then((code) => process.exit(code), (err) => { console.error(`soak: ${err.stack ?? err}`); process.exit(1) })
