// Zero-loss rolling restart (distributed only): two gateways behind one address (lib/balancer.js,
// a round-robin TCP balancer) and two chat-svc replicas, under a steady send load from 6 official
// phoenix clients over 3 conversations (4 members each, members on both gateways). Each client
// sends one message at a time every SEND_EVERY_MS with a unique clientMessageId and retries it
// with the SAME clientMessageId (error or phoenix push timeout) until acked; the phoenix Socket
// reconnects by itself (its URL is the balancer's) and its channels rejoin with
// `() => ({lastSeq})`, the highest seq the client holds without a gap.
//
// Sequence: load; SIGTERM gateway A (the clients on it get 1012 within the first 80% of the
// drain window, reconnect through the balancer to B, rejoin); load; SIGTERM chat-svc1 (the other
// replica carries on); load; stop sending; quiescence.
//
// Checked: every send acked (none lost); per conversation the acks' seqs are exactly 1..N with N
// distinct ids and history stores exactly those; every member holds every acked id exactly once
// after dedupe by id, at its acked seq, gap-free 1..N, nothing else; A's clients saw 1012 (and only
// they) and came back through B; B's clients kept their socket; the SIGTERMed gateway and chat-svc
// exited with code 0 within SHUTDOWN_DRAIN_SECS + E2E_ROLLING_EXIT_MARGIN_MS (see e2e/README.md).
import {describe, it, before, after} from "node:test"
import assert from "node:assert/strict"

import {modes, useServerSet} from "../lib/harness.js"
import {Balancer} from "../lib/balancer.js"
import {connectPhoenix, disconnectPhoenix, push} from "../lib/phx.js"
import {maxAckGap} from "../lib/faults.js"
import {sleep, withTimeout, randomId} from "../lib/util.js"

const DRAIN_SECS = 2
const ENV = {
  SHUTDOWN_DRAIN_SECS: String(DRAIN_SECS),
  SOCKET_RATE_LIMIT_PER_SEC: "10000",
  PRESENCE_GRACE_SECS: "1",
  PRESENCE_NODE_TTL_SECS: "5",
}
const SEND_EVERY_MS = Number(process.env.E2E_ROLLING_SEND_MS ?? 100)
/** a SIGTERMed process exits within its drain window plus this */
const EXIT_MARGIN_MS = Number(process.env.E2E_ROLLING_EXIT_MARGIN_MS ?? 1500)
const PUSH_TIMEOUT_MS = 3000
const RETRY_MS = 100
const LOAD_MS = 2500
/** after stopping: every send in flight acked within this */
const SETTLE_MS = 30_000
/** then: every member holds every acked message within this */
const CONVERGE_MS = 15_000
/** a 1012'd client has all its channels joined again within this of the close */
const REJOIN_MS = 10_000

const log = (line) => console.log(`rolling: ${line}`)
const t = (x) => x ? new Date(x).toISOString().slice(11, 23) : "-"

class Client {
  constructor(srv, balancer, user, convs, runId){
    this.srv = srv
    this.balancer = balancer
    this.user = user
    this.convs = convs
    this.runId = runId
    this.socket = null
    this.channels = new Map()
    /** conv -> {bySeq: Map(seq -> id), byId: Map(id -> seq), contig, received, dupes} */
    this.state = new Map(convs.map((c) => [c, {bySeq: new Map(), byId: new Map(), contig: 0, received: 0, dupes: 0, firstSeen: new Map()}]))
    /** every join ok: {conv, at, lastSeq (sent), reply, backend} */
    this.joins = []
    /** conv -> the join session is live (joined on the current socket) */
    this.joined = new Map(convs.map((c) => [c, false]))
    /** backend of every socket open: {at, backend} */
    this.opens = []
    this.problems = []
    this.sends = [] // {cmid, conv, firstAt, ackAt, seq, id, attempts, errors}
    this.stopping = false
    this.loop = null
    this.n = 0
  }

  get backend(){ return this.opens.at(-1)?.backend ?? null }
  get closes(){ return this.socket?.closes ?? [] }

  #backendNow(){
    const port = this.socket?.conn?._socket?.localPort
    return port ? this.balancer.byClientPort(port)?.backend ?? null : null
  }

  async connect(){
    const token = await this.srv.token(this.user)
    this.socket = await connectPhoenix(`ws://${this.balancer.address}/socket`, token, {
      params: {deviceId: "rolling"},
      timeoutMs: 5000,
      socketOpts: {reconnectAfterMs: () => 100, rejoinAfterMs: () => 200, timeout: PUSH_TIMEOUT_MS},
    })
    this.opens.push({at: Date.now(), backend: this.#backendNow()})
    this.socket.onOpen(() => this.opens.push({at: Date.now(), backend: this.#backendNow()}))
    this.socket.onClose(() => { for(const c of this.convs){ this.joined.set(c, false) } })
    for(const conv of this.convs){ this.#open(conv) }
  }

  #note(conv, m){
    const st = this.state.get(conv)
    st.received++
    const seqOfId = st.byId.get(m.id)
    if(seqOfId !== undefined){
      st.dupes++
      if(seqOfId !== m.seq){ this.problems.push(`${this.user} ${conv}: id ${m.id} arrived as seq ${m.seq} and earlier as seq ${seqOfId}`) }
      return
    }
    const idOfSeq = st.bySeq.get(m.seq)
    if(idOfSeq !== undefined && idOfSeq !== m.id){
      this.problems.push(`${this.user} ${conv}: seq ${m.seq} arrived as id ${m.id} and earlier as id ${idOfSeq} (a seq given twice)`)
    }
    st.byId.set(m.id, m.seq)
    st.bySeq.set(m.seq, m.id)
    st.firstSeen.set(m.id, Date.now())
    while(st.bySeq.has(st.contig + 1)){ st.contig++ }
  }

  #open(conv){
    let sent = null
    // evaluated by phoenix each time it sends the join: every rejoin asks for what was missed
    const channel = this.socket.channel(`chat:${conv}`, () => {
      sent = this.state.get(conv).contig
      return {lastSeq: sent}
    })
    this.channels.set(conv, channel)
    channel.on("message:new", (p) => { if(p?.message){ this.#note(conv, p.message) } })
    channel.onError(() => this.joined.set(conv, false))
    channel.onClose(() => {
      this.joined.set(conv, false)
      if(!this.stopping){ this.problems.push(`${this.user} ${conv}: phx_close at ${t(Date.now())}`) }
    })
    channel.join()
      .receive("ok", (reply) => {
        this.joins.push({conv, at: Date.now(), lastSeq: sent, reply, backend: this.#backendNow()})
        this.joined.set(conv, true)
        if(reply?.replayComplete === false && Number.isInteger(reply.replayFromSeq)){
          this.#fill(conv, channel, sent, reply.replayFromSeq).catch((err) => this.problems.push(`${this.user} ${conv}: history fill failed: ${err.message}`))
        }
      })
      .receive("error", (r) => this.problems.push(`${this.user} ${conv}: join refused at ${t(Date.now())}: ${JSON.stringify(r)}`))
  }

  /** a cut replay: page the rest with message:history */
  async #fill(conv, channel, after, before){
    let beforeSeq = before
    while(beforeSeq > after + 1){
      const r = await push(channel, "message:history", {beforeSeq, limit: 100}, PUSH_TIMEOUT_MS)
      if(r.status !== "ok"){ throw new Error(JSON.stringify(r.response)) }
      const msgs = r.response.messages
      for(const m of msgs){ if(m.seq > after){ this.#note(conv, m) } }
      if(msgs.length === 0 || !r.response.hasMore){ break }
      beforeSeq = msgs[0].seq
    }
  }

  allJoined(){ return this.convs.every((c) => this.joined.get(c)) }

  /** one message at a time, round-robin over its conversations, every SEND_EVERY_MS */
  run(acks){
    this.loop = (async () => {
      let next = Date.now()
      for(let k = 0; !this.stopping; k++){
        const wait = next - Date.now()
        if(wait > 0){ await sleep(wait) }
        if(this.stopping){ break }
        next = Math.max(next + SEND_EVERY_MS, Date.now())
        await this.#send(this.convs[k % this.convs.length], acks)
      }
    })()
  }

  async #send(conv, acks){
    const cmid = `${this.runId}-${this.user}-${++this.n}`
    const rec = {cmid, conv, user: this.user, firstAt: Date.now(), ackAt: null, seq: null, id: null, attempts: 0, errors: [], failed: []}
    this.sends.push(rec)
    const channel = this.channels.get(conv)
    const payload = {type: "text", content: `rolling ${cmid}`, clientMessageId: cmid}
    // retried with the same clientMessageId until acked (the give-up bound is only for a broken run)
    while(Date.now() - rec.firstAt < SETTLE_MS + 30_000){
      rec.attempts++
      const start = Date.now()
      const r = await withTimeout(new Promise((resolve) => {
        channel.push("message:send", payload, PUSH_TIMEOUT_MS)
          .receive("ok", (response) => resolve({status: "ok", response}))
          .receive("error", (response) => resolve({status: "error", response}))
          .receive("timeout", () => resolve({status: "timeout", response: {reason: `no reply within ${PUSH_TIMEOUT_MS} ms`}}))
      }), PUSH_TIMEOUT_MS + 2000, "push reply").catch((err) => ({status: "guard", response: {reason: err.message}}))
      if(r.status === "ok"){
        const m = r.response.message
        rec.lastAttemptAt = start
        rec.ackAt = Date.now()
        rec.seq = m.seq
        rec.id = m.id
        acks.push(rec.ackAt)
        return
      }
      rec.failed.push({start, end: Date.now(), status: r.status})
      if(rec.errors.length < 10){ rec.errors.push(`${t(Date.now())} +${Date.now() - rec.firstAt}ms ${r.status}: ${r.response?.reason ?? JSON.stringify(r.response)}`) }
      await sleep(RETRY_MS)
    }
  }

  async stopSending(){
    this.stopping = true
    await this.loop
  }

  async close(){
    this.stopping = true
    if(this.socket){ await disconnectPhoenix(this.socket) }
  }
}

/** Waits (bounded) for `proc` to exit after `at`; {code, signal, ms} or {timedOut}. */
async function exitOf(proc, at, boundMs){
  const exit = await withTimeout(proc.exited, boundMs, `${proc.name} to exit`).catch(() => null)
  return exit ? {code: exit.code, signal: exit.signal, ms: Date.now() - at} : {timedOut: true, ms: Date.now() - at}
}

/** message:send commands a chat-svc answered so far (its quckchat_commands_total), or null */
async function sendsServed(port){
  try {
    const res = await fetch(`http://127.0.0.1:${port}/metrics`, {signal: AbortSignal.timeout(2000)})
    const text = await res.text()
    let n = 0
    for(const line of text.split("\n")){
      if(line.startsWith("quckchat_commands_total{") && line.includes('event="message:send"')){ n += Number(line.split(" ").pop()) }
    }
    return n
  } catch { return null }
}

const pct = (xs, p) => xs.length ? xs[Math.min(xs.length - 1, Math.floor(xs.length * p))] : null

if(modes.includes("distributed")){
  describe("rolling restart under load [distributed, 2 gateways behind a balancer, 2 chat-svc replicas]", () => {
    const srv = useServerSet("distributed", {gateways: 2, chatReplicas: 2, env: ENV})
    let balancer = null
    let clients = []

    before(async () => {
      balancer = await new Balancer(srv.gateways.map((g) => ({name: g.name, port: g.port}))).listen()
    })

    after(async () => {
      await Promise.all(clients.map((c) => c.close().catch(() => {})))
      await balancer?.close()
    })

    it("SIGTERM one gateway, then one chat-svc: every send acked, every ack delivered once to every member, drained processes exit in time", {timeout: 180_000}, async (ctx) => {
      // the clients and the balancer go before the set stops (its gateways would 1012 them)
      ctx.after(async () => {
        await Promise.all(clients.map((c) => c.close().catch(() => {})))
        await balancer?.close()
      })
      const runId = randomId("r", 3)
      const users = Array.from({length: 6}, (_, i) => `${runId}_u${i}`)
      const convIds = Array.from({length: 3}, (_, i) => randomId(`roll${i}-`, 4))
      // conversation k: users 2k .. 2k+3 (mod 6): every user in two conversations
      const members = convIds.map((_, k) => [0, 1, 2, 3].map((j) => users[(2 * k + j) % 6]))
      for(const [k, conv] of convIds.entries()){ await srv.putConversation(conv, members[k]) }
      clients = users.map((u) => new Client(srv, balancer, u, convIds.filter((_, k) => members[k].includes(u)), runId))
      // one by one: the balancer's round-robin puts them on A, B, A, B, ...
      for(const c of clients){ await c.connect() }
      const [gwA, gwB] = srv.gateways.map((g) => g.name)
      const onA = clients.filter((c) => c.backend === gwA)
      const onB = clients.filter((c) => c.backend === gwB)
      assert.ok(onA.length > 0 && onB.length > 0 && onA.length + onB.length === clients.length,
        `clients on both gateways: ${clients.map((c) => `${c.user}@${c.backend}`).join(", ")}`)
      const deadline = Date.now() + 20_000
      while(!clients.every((c) => c.allJoined()) && Date.now() < deadline){ await sleep(50) }
      assert.ok(clients.every((c) => c.allJoined()), `not every client joined: ${clients.filter((c) => !c.allJoined()).map((c) => c.user).join(", ")}; ${clients.flatMap((c) => c.problems).join("; ")}`)

      const acks = []
      const errors = []
      const loadStart = Date.now()
      for(const c of clients){ c.run(acks) }
      await sleep(LOAD_MS)

      // --- gateway A: SIGTERM, its clients get 1012 and come back through the balancer
      const openToA = balancer.openTo(gwA).length
      const gwTerm = srv.terminateGateway(0)
      const gwExit = await exitOf(gwTerm.proc, gwTerm.at, DRAIN_SECS * 1000 + 10_000)
      // every 1012'd client has all its channels joined again (on B)
      const rejoinDeadline = Date.now() + REJOIN_MS
      while(Date.now() < rejoinDeadline && !onA.every((c) => c.allJoined() && c.backend === gwB)){ await sleep(50) }
      const reconnects = onA.map((c) => {
        const close = c.closes.find((x) => x.at >= gwTerm.at)
        const open = close ? c.opens.find((o) => o.at >= close.at) : null
        const rejoinedAt = close ? Math.max(...c.convs.map((conv) => c.joins.find((j) => j.conv === conv && j.at >= close.at)?.at ?? Infinity)) : Infinity
        return {user: c.user, code: close?.code ?? null, closeMs: close ? close.at - gwTerm.at : null, reopenedOn: open?.backend ?? null,
          reconnectMs: open ? open.at - close.at : null, rejoinMs: Number.isFinite(rejoinedAt) ? rejoinedAt - close.at : null,
          rejoinLastSeq: Object.fromEntries(c.convs.map((conv) => [conv, c.joins.find((j) => j.conv === conv && j.at >= (close?.at ?? Infinity))?.lastSeq ?? null]))}
      })
      await sleep(LOAD_MS)

      // --- chat-svc1: SIGTERM, the other replica carries on
      const chat = srv.process("chat-svc1")
      // both replicas serve the load (so the SIGTERM drains real traffic)
      const servedBefore = Object.fromEntries(await Promise.all(["chat-svc", "chat-svc1"].map(async (name) => [name, await sendsServed(srv.process(name).port)])))
      const chatAt = chat.proc.terminate()
      const chatExit = await exitOf(chat.proc, chatAt, DRAIN_SECS * 1000 + 10_000)
      await sleep(LOAD_MS)

      // --- stop sending; every send in flight acked; quiescence
      const stopAt = Date.now()
      await withTimeout(Promise.all(clients.map((c) => c.stopSending())), SETTLE_MS + 40_000, "the senders to finish").catch((err) => errors.push(err.message))
      const loadEnd = Date.now()
      const sends = clients.flatMap((c) => c.sends)
      const acked = sends.filter((r) => r.ackAt !== null)
      const unacked = sends.filter((r) => r.ackAt === null)
      if(unacked.length){ errors.push(`lost sends: ${unacked.length} of ${sends.length} never acked, e.g. ${JSON.stringify(unacked.slice(0, 3))}`) }

      // the acks: per conversation seqs exactly 1..N, N distinct ids
      const expected = new Map() // conv -> Map(seq -> id)
      for(const conv of convIds){
        const mine = acked.filter((r) => r.conv === conv).sort((a, b) => a.seq - b.seq)
        const bySeq = new Map()
        const ids = new Set()
        for(const r of mine){
          if(bySeq.has(r.seq)){ errors.push(`${conv}: seq ${r.seq} acked twice: ${bySeq.get(r.seq)} and ${r.id} (${r.cmid})`) }
          if(ids.has(r.id)){ errors.push(`${conv}: id ${r.id} acked for two sends (again ${r.cmid})`) }
          bySeq.set(r.seq, r.id)
          ids.add(r.id)
        }
        for(let s = 1; s <= mine.length; s++){
          if(!bySeq.has(s)){ errors.push(`${conv}: no acked send has seq ${s} (acked seqs ${mine.length ? `${mine[0].seq}..${mine.at(-1).seq}` : "none"}, ${mine.length} acks)`); break }
        }
        expected.set(conv, bySeq)
      }

      // every member holds every acked message, once after dedupe by id, gap-free, nothing else
      const behind = () => clients.flatMap((c) => c.convs.filter((conv) => c.state.get(conv).contig < expected.get(conv).size).map((conv) => `${c.user} ${conv}: has 1..${c.state.get(conv).contig} of ${expected.get(conv).size} (on ${c.backend}, ${c.joined.get(conv) ? "joined" : "not joined"})`))
      const convergeEnd = Date.now() + CONVERGE_MS
      while(behind().length && Date.now() < convergeEnd){ await sleep(100) }
      const convergedMs = Date.now() - loadEnd
      await sleep(500) // anything late (a stray duplicate or extra) shows up too
      for(const b of behind()){ errors.push(`not delivered: ${b} ${CONVERGE_MS} ms after the load stopped`) }
      let dupes = 0
      for(const c of clients){
        errors.push(...c.problems)
        for(const conv of c.convs){
          const st = c.state.get(conv)
          const want = expected.get(conv)
          dupes += st.dupes
          for(const [seq, id] of st.bySeq){
            if(!want.has(seq)){ errors.push(`${c.user} ${conv}: holds seq ${seq} (id ${id}) that no acked send has`) }
            else if(want.get(seq) !== id){ errors.push(`${c.user} ${conv}: holds seq ${seq} as id ${id}, acked as ${want.get(seq)}`) }
          }
          if(st.bySeq.size !== st.byId.size){ errors.push(`${c.user} ${conv}: ${st.bySeq.size} seqs but ${st.byId.size} ids`) }
        }
      }

      // the store holds exactly the acked messages
      const reader = clients.find((c) => c.backend === gwB && c.allJoined())
      for(const conv of convIds){
        const channel = reader?.channels.get(conv)
        if(!channel){ continue }
        const stored = []
        let beforeSeq
        for(;;){
          const r = await push(channel, "message:history", beforeSeq === undefined ? {limit: 100} : {beforeSeq, limit: 100}, 10_000)
          if(r.status !== "ok"){ errors.push(`${conv}: message:history failed: ${JSON.stringify(r.response)}`); break }
          stored.unshift(...r.response.messages)
          if(!r.response.hasMore || r.response.messages.length === 0){ break }
          beforeSeq = r.response.messages[0].seq
        }
        const want = expected.get(conv)
        if(stored.length !== want.size){ errors.push(`${conv}: ${stored.length} messages stored, ${want.size} sends acked`) }
        for(const m of stored){
          if(want.get(m.seq) !== m.id){ errors.push(`${conv}: stored seq ${m.seq} id ${m.id} (${m.clientMessageId}), acked: ${want.get(m.seq) ?? "nothing"}`) }
        }
      }

      // A's clients: 1012, back through the balancer on B, every channel rejoined; B's clients untouched
      for(const r of reconnects){
        if(r.code !== 1012){ errors.push(`${r.user} (on ${gwA}): close code ${r.code} after the SIGTERM, expected 1012`) }
        if(r.closeMs !== null && r.closeMs > DRAIN_SECS * 1000 * 0.8 + 1000){ errors.push(`${r.user}: closed ${r.closeMs} ms after the SIGTERM, past 80% of the ${DRAIN_SECS} s drain window`) }
        if(r.reopenedOn !== gwB){ errors.push(`${r.user}: reconnected through the balancer to ${r.reopenedOn}, expected ${gwB}`) }
        if(r.rejoinMs === null){ errors.push(`${r.user}: not every channel rejoined within ${REJOIN_MS} ms of the close`) }
        // the rejoin asked for what was missed: the lastSeq it held (messages had arrived before the SIGTERM)
        for(const [conv, lastSeq] of Object.entries(r.rejoinLastSeq)){
          if(r.rejoinMs !== null && !(lastSeq > 0)){ errors.push(`${r.user} ${conv}: rejoined with lastSeq ${lastSeq}, expected the seq it held (> 0)`) }
        }
      }
      if(onA.length !== openToA){ errors.push(`${openToA} connections were open to ${gwA} at the SIGTERM, ${onA.length} clients were on it`) }
      for(const c of onB){
        const closes = c.closes.filter((x) => x.at >= loadStart)
        if(closes.length){ errors.push(`${c.user} (on ${gwB}): its socket closed ${JSON.stringify(closes)}`) }
      }

      if(!(servedBefore["chat-svc1"] > 0)){ errors.push(`chat-svc1 had answered no message:send before its SIGTERM (${JSON.stringify(servedBefore)}): the test did not exercise its drain`) }

      // the drained processes exited, code 0, within the window
      const bound = DRAIN_SECS * 1000 + EXIT_MARGIN_MS
      for(const [name, exit] of [[gwA, gwExit], ["chat-svc1", chatExit]]){
        if(exit.timedOut){ errors.push(`${name} still running ${exit.ms} ms after SIGTERM`) }
        else if(exit.code !== 0){ errors.push(`${name} exited with code ${exit.code} signal ${exit.signal} after SIGTERM`) }
        if(exit.ms > bound){ errors.push(`${name} took ${exit.ms} ms to exit after SIGTERM (bound ${bound} ms = drain ${DRAIN_SECS} s + ${EXIT_MARGIN_MS} ms)`) }
      }

      // figures
      const lat = acked.map((r) => r.ackAt - r.firstAt).sort((a, b) => a - b)
      const gap = maxAckGap(acks, loadStart + 200, stopAt)
      const perClientGap = (c, from, to) => maxAckGap(c.sends.filter((r) => r.ackAt !== null).map((r) => r.ackAt), from, to).max
      const retried = acked.filter((r) => r.attempts > 1)
      // why each failed attempt failed: its socket closed while it was in flight (the gateway's 1012),
      // it was in flight while chat-svc1 drained (SIGTERM .. exit), or something else
      const failedByCause = {socketClosed: 0, chatSvcDrain: 0, other: 0}
      for(const c of clients){
        for(const r of c.sends){
          for(const f of r.failed){
            if(c.closes.some((x) => x.at >= f.start && x.at <= f.end)){ failedByCause.socketClosed++ }
            else if(f.start <= chatAt + chatExit.ms && f.end >= chatAt){ failedByCause.chatSvcDrain++ }
            else { failedByCause.other++ }
          }
        }
      }
      const figures = {
        sends: sends.length, acked: acked.length, lost: unacked.length, retried: retried.length,
        attempts: sends.reduce((n, r) => n + r.attempts, 0),
        perConv: Object.fromEntries(convIds.map((c) => [c, expected.get(c).size])),
        ackRatePerSec: Math.round(acked.length / ((stopAt - loadStart) / 1000)),
        maxAckGapMs: gap.max, maxAckGapAt: t(gap.at),
        maxClientAckGapMs: {gatewaySigterm: Math.max(...clients.map((c) => perClientGap(c, gwTerm.at, chatAt))), chatSigterm: Math.max(...clients.map((c) => perClientGap(c, chatAt, stopAt)))},
        sendLatencyMs: {p50: pct(lat, 0.5), p99: pct(lat, 0.99), max: lat.at(-1) ?? null},
        gateway: {name: gwA, exitCode: gwExit.code ?? null, exitMs: gwExit.ms, clients: onA.length},
        reconnects,
        chatSvc: {name: "chat-svc1", exitCode: chatExit.code ?? null, exitMs: chatExit.ms, sendsServedBeforeSigterm: servedBefore},
        failedAttemptsByCause: failedByCause,
        // retried sends whose message a member had already received before the retry that got the ack was sent
        // (the failed attempt was stored; only its reply was lost)
        retriedStoredBeforeRetry: retried.filter((r) => clients.some((c) => c.state.get(r.conv)?.firstSeen.get(r.id) < r.lastAttemptAt)).length,
        retryReasons: [...new Set(retried.flatMap((r) => r.errors.map((e) => e.replace(/^\S+ \+\d+ms /, ""))))].slice(0, 6),
        duplicatesDedupedById: dupes, convergedMs,
        balancer: {connections: balancer.connections.length, skippedRefused: balancer.connections.filter((c) => c.skipped.length).length,
          toAAfterSigterm: balancer.connections.filter((c) => c.backend === gwA && c.openedAt >= gwTerm.at).length},
        at: {load: t(loadStart), gatewaySigterm: t(gwTerm.at), chatSigterm: t(chatAt), stop: t(stopAt)},
      }
      log(JSON.stringify(figures))
      if(retried.length){ log(`slowest retried sends: ${JSON.stringify([...retried].sort((a, b) => (b.ackAt - b.firstAt) - (a.ackAt - a.firstAt)).slice(0, 3).map((r) => ({cmid: r.cmid, user: r.user, firstAt: t(r.firstAt), ms: r.ackAt - r.firstAt, attempts: r.attempts, errors: r.errors})))}`) }
      if(errors.length){
        assert.fail(`${errors.length} invariant(s) failed:\n${errors.slice(0, 40).join("\n")}${errors.length > 40 ? `\n... ${errors.length - 40} more` : ""}`)
      }
    })
  })
}
