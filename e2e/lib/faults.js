// Fault suite shared by fault/faults.test.js (short; not in CI until its findings are fixed, see e2e/README.md) and fault/soak.js (soak): a distributed
// set (3 gateways, 2 chat-svc replicas, presence-svc, signaling-svc) on its own nats-server,
// redis-server and SecantusDB (free loopback ports; the database on a WiredTiger dir of its own that
// survives a SIGKILL), a steady chat load (K senders retrying one clientMessageId
// until acked, R receivers recording every message:new and rejoining with lastSeq), faults
// injected one at a time, and exact invariant checks after each fault.
//
// Invariants (checked after every fault, cumulatively since the start of the run):
//  store      every acked send is stored exactly once: per conversation, history has seqs 1..N
//             without gaps, no id or clientMessageId twice, each ack's (seq, id) is the stored
//             one, and N = number of acked sends (the load is paused and every send acked first);
//  delivery   every receiver has every stored seq (the same id as stored); and within each join
//             session (one phx_join ok until its socket/channel ends) the message:new first
//             arrivals (dedupe by id) are exactly start+1, start+2, ... in order, where start is the
//             lastSeq the join sent (replayFromSeq-1 when the replay was cut, the rest is paged with
//             message:history);
//  stall      the largest gap between consecutive acks (all senders) during the fault phase is
//             <= STALL_MS (5 s), not counting the outage windows of NATS and the database (kill ..
//             the server answers again); after such a restart the first ack comes within STALL_MS;
//             during a chat-svc
//             SIGKILL the largest ack gap from the kill to 5 s after it is <= CHAT_KILL_STALL_MS;
//  presence   the "leaver" (connects before the fault, closes its socket during it) is not in a
//             fresh presence_state within PRESENCE_CONVERGE_MS, and every sender and receiver
//             (connected throughout, reconnecting when dropped) is;
//  membership (database fault; also once before the first fault) chat-svc still follows the
//             database's change stream: a probe member removed directly in the database (as the
//             backend would) gets phx_close within PROBE_CLOSE_MS (5 s, below the 10 s membership
//             cache TTL) — chat-svc watches again after any break, so the probe is the check.
import {spawn, spawnSync} from "node:child_process"
import {mkdtempSync, rmSync, readFileSync, existsSync} from "node:fs"
import {connect as tcpConnect} from "node:net"
import {tmpdir} from "node:os"
import path from "node:path"

import {ServerSet, ManagedProcess, freePort} from "./harness.js"
import {connectPhoenix, disconnectPhoenix, push} from "./phx.js"
import {sleep, withTimeout, randomId} from "./util.js"

export const LIMITS = {
  /** no ack gap (all senders) above this outside the NATS and database outages */
  STALL_MS: Number(process.env.E2E_FAULT_STALL_MS ?? 5000),
  /** the surviving chat-svc replica keeps serving: largest ack gap in the 5 s after the SIGKILL */
  CHAT_KILL_STALL_MS: Number(process.env.E2E_FAULT_CHAT_KILL_STALL_MS ?? 2500),
  /** how long the database fault keeps SecantusDB down (chat-svc's server selection timeout is 5 s) */
  DB_DOWN_MS: Number(process.env.E2E_FAULT_DB_DOWN_MS ?? 3000),
  /** a closed user is gone from presence_state / connected ones listed, within this */
  PRESENCE_CONVERGE_MS: 30_000,
  /** pausing: every in-flight send acked within this */
  IDLE_MS: 45_000,
  /** after the pause: every receiver has every stored seq within this */
  CONVERGE_MS: 30_000,
}

/** Server settings of the fault set: short presence windows, a short drain, no rate limit noise. */
export const FAULT_ENV = {
  PRESENCE_GRACE_SECS: "1",
  PRESENCE_NODE_TTL_SECS: "5",
  NODE_HEARTBEAT_SECS: "1",
  SHUTDOWN_DRAIN_SECS: "2",
  SOCKET_RATE_LIMIT_PER_SEC: "10000",
}

const LEAVERS = 256
const PUSH_TIMEOUT_MS = 7000 // > the gateway's REQUEST_TIMEOUT_MS (5000): its `timeout` reply comes first
const JOIN_TIMEOUT_MS = 7000
const RETRY_MS = 200
const PROBE_CLOSE_MS = 5000 // < chat-svc's MEMBERSHIP_TTL (10 s): only the change stream can close the channel in time

// ---------------------------------------------------------------------------------------------
// own nats-server and redis-server on free loopback ports

/** OP_MSG {hello: 1, $db: "admin"} (MongoDB wire protocol) */
function mongoHello(){
  const el = (type, name, value) => Buffer.concat([Buffer.from([type]), Buffer.from(`${name}\0`), value])
  const int32 = (n) => { const b = Buffer.alloc(4); b.writeInt32LE(n); return b }
  const body = Buffer.concat([el(0x10, "hello", int32(1)), el(0x02, "$db", Buffer.concat([int32(6), Buffer.from("admin\0")])), Buffer.from([0])])
  const doc = Buffer.concat([int32(body.length + 4), body])
  const header = Buffer.alloc(16)
  header.writeInt32LE(16 + 4 + 1 + doc.length, 0)
  header.writeInt32LE(1, 4)
  header.writeInt32LE(0, 8)
  header.writeInt32LE(2013, 12)
  return Buffer.concat([header, int32(0), Buffer.from([0]), doc])
}

/** Whether a complete OP_MSG reply holds {ok: 1} (a double) */
function mongoOk(buf){
  if(buf.length < 16 || buf.length < buf.readInt32LE(0)){ return null }
  if(buf.readInt32LE(12) !== 2013){ return false }
  const at = buf.indexOf(Buffer.from([0x01, 0x6f, 0x6b, 0x00]), 21) // double "ok"
  return at > 0 && at + 12 <= buf.length && buf.readDoubleLE(at + 4) === 1
}

/** Whether the server on `port` answers: TCP connect, or with `expect` its protocol's greeting/ping. */
function tcpAnswers(port, {expect} = {}){
  return new Promise((resolve) => {
    const s = tcpConnect({host: "127.0.0.1", port})
    let buf = Buffer.alloc(0)
    const done = (ok) => { s.destroy(); resolve(ok) }
    s.setTimeout(1000, () => done(false))
    s.on("error", () => done(false))
    s.on("connect", () => {
      if(!expect){ done(true) } else if(expect === "redis"){ s.write("PING\r\n") } else if(expect === "mongo"){ s.write(mongoHello()) }
    })
    s.on("data", (d) => {
      buf = Buffer.concat([buf, d])
      const text = buf.toString("latin1")
      if(expect === "nats" && text.includes("\n")){ done(text.startsWith("INFO")) }
      if(expect === "redis" && text.includes("\n")){ done(text.startsWith("+PONG")) }
      if(expect === "mongo"){ const ok = mongoOk(buf); if(ok !== null){ done(ok) } }
    })
  })
}

async function waitTcp(proc, port, expect, timeoutMs = 15_000){
  const deadline = Date.now() + timeoutMs
  while(Date.now() < deadline){
    if(proc.exit){ throw new Error(`${proc.name} ${proc.describeExit()}; output:\n${proc.output}`) }
    if(await tcpAnswers(port, {expect})){ return }
    await sleep(100)
  }
  throw new Error(`${proc.name} not answering on 127.0.0.1:${port} within ${timeoutMs} ms; output:\n${proc.output}`)
}

const ownDirs = new Set()
process.on("exit", () => { for(const d of ownDirs){ try { rmSync(d, {recursive: true, force: true}) } catch { /* best effort */ } } })

/** A server of our own (nats-server / redis-server / SecantusDB) that can be killed and started again on its port. */
class OwnServer {
  constructor(name, file, argsFor, expect, {readyMs = 15_000} = {}){
    this.name = name
    this.file = file
    this.argsFor = argsFor
    this.expect = expect
    this.readyMs = readyMs
    this.port = null
    this.proc = null
    this.dir = mkdtempSync(path.join(tmpdir(), `quckchat-fault-${name}-`))
    ownDirs.add(this.dir)
  }
  async start(){
    for(let attempt = 1; ; attempt++){
      this.port = this.port ?? await freePort()
      this.proc = new ManagedProcess(this.name, this.file, this.argsFor(this.port, this.dir), process.env)
      try {
        await waitTcp(this.proc, this.port, this.expect, this.readyMs)
        return this
      } catch (err){
        await this.proc.stop(1000)
        if(attempt < 3 && /in use|EADDRINUSE/i.test(this.proc.output)){ this.port = null; continue }
        throw err
      }
    }
  }
  /** SIGKILL; resolves with the time of the kill */
  async kill(){
    const at = Date.now()
    this.proc.child.kill("SIGKILL")
    await withTimeout(this.proc.exited, 5000, `${this.name} to exit after SIGKILL`)
    return at
  }
  /** starts again on the same port (and data dir); resolves with the time it answers */
  async restart(){
    const deadline = Date.now() + this.readyMs
    for(;;){
      this.proc = new ManagedProcess(this.name, this.file, this.argsFor(this.port, this.dir), process.env)
      try {
        await waitTcp(this.proc, this.port, this.expect, this.readyMs)
        return Date.now()
      } catch (err){
        await this.proc.stop(1000)
        if(Date.now() > deadline){ throw err }
        await sleep(300) // the port (or SecantusDB's WiredTiger lock) may still be held for a moment
      }
    }
  }
  rss(){ return rssKb(this.proc?.child.pid) }
  async stop(){
    if(this.proc && !this.proc.exit){ await this.proc.stop(5000) }
    rmSync(this.dir, {recursive: true, force: true})
    ownDirs.delete(this.dir)
  }
}

export function natsServer(){
  const bin = process.env.NATS_SERVER_BIN || "nats-server"
  return new OwnServer("nats-server", bin, (port) => ["-a", "127.0.0.1", "-p", String(port)], "nats")
}

/** Redis with an fsync'd AOF in its own dir, so a SIGKILL + restart keeps its data. */
export function redisServer(){
  const bin = process.env.REDIS_SERVER_BIN || "redis-server"
  return new OwnServer("redis-server", bin, (port, dir) => ["--bind", "127.0.0.1", "--port", String(port), "--save", "",
    "--appendonly", "yes", "--appendfsync", "always", "--dir", dir, "--daemonize", "no", "--protected-mode", "yes"], "redis")
}

export const PYTHON = process.env.PYTHON ?? "python3"

/**
 * SecantusDB (MongoDB wire protocol, as scripts/deps.sh starts it) on a WiredTiger dir of its own
 * that outlives a SIGKILL: the restart reopens it (journal replay) with every acked write. Ready
 * when it answers a `hello`. A second server on the same dir would refuse its lock, so the restart
 * starts only after the killed one exited.
 */
export function secantusServer(){
  return new OwnServer("secantus", PYTHON, (port, dir) => ["-m", "secantus", "--host", "127.0.0.1", "--port", String(port),
    "--storage-path", path.join(dir, "data"), "--cache-size", "128M", "--log-level", "WARNING"], "mongo", {readyMs: 60_000})
}

/** Runs `code` with PYTHON (args in sys.argv[1:]); resolves with {code, out} (stdout + stderr), bounded. */
export function runPython(code, args = [], timeoutMs = 30_000){
  return new Promise((resolve) => {
    const p = spawn(PYTHON, ["-c", code, ...args], {stdio: ["ignore", "pipe", "pipe"]})
    let out = ""
    p.stdout.on("data", (d) => { out += d })
    p.stderr.on("data", (d) => { out += d })
    const timer = setTimeout(() => p.kill("SIGKILL"), timeoutMs)
    p.on("error", (err) => { out += err.message })
    p.on("close", (code) => { clearTimeout(timer); resolve({code, out: out.trim()}) })
  })
}

/** VmRSS of `pid` in KiB from /proc, or null. */
export function rssKb(pid){
  if(!pid){ return null }
  try {
    const m = /VmRSS:\s+(\d+)\s+kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))
    return m ? Number(m[1]) : null
  } catch { return null }
}

// ---------------------------------------------------------------------------------------------
// clients

/**
 * One user's connection: a phoenix socket to some live gateway with channels on `convs`. When the
 * socket drops, it reconnects through any live gateway (starting with its preferred one) and
 * rejoins every conversation with {lastSeq: highest seq it has without a gap}. With `record`, it
 * records every message:new per join session.
 */
class Member {
  constructor(rig, user, convs, {gateway = 0, record = false, role = "member"} = {}){
    this.rig = rig
    this.user = user
    this.convs = convs
    this.preferred = gateway
    this.record = record
    this.role = role
    this.socket = null
    this.gateway = null
    this.stopped = false
    this.reconnecting = null
    this.reconnects = 0
    /** conv -> the channel of the current socket */
    this.channels = new Map()
    /** conv -> the active session (joined) or null */
    this.active = new Map()
    /** conv -> Map(seq -> id) of every message:new received, over all sessions */
    this.got = new Map(convs.map((c) => [c, new Map()]))
    /** conv -> highest seq n with 1..n all received */
    this.contig = new Map(convs.map((c) => [c, 0]))
    /** every join session: {conv, gateway, startSeq, reply, joinedAt, endedAt, endReason, arrivals: [seq], ids: Set} */
    this.sessions = []
    /** resolves when the current socket closes (a pending push gets no reply then) */
    this.lost = new Promise(() => {})
    this.problems = []
    this.socketCloses = []
  }

  async start(){ await this.#connectAnywhere() }

  #noteGot(conv, seq, id){
    const got = this.got.get(conv)
    const known = got.get(seq)
    if(known !== undefined && known !== id){
      this.problems.push(`${this.user} ${conv}: seq ${seq} arrived with id ${id} and earlier with id ${known}`)
    }
    got.set(seq, id)
    let c = this.contig.get(conv)
    while(got.has(c + 1)){ c++ }
    this.contig.set(conv, c)
  }

  #endSessions(reason){
    for(const [conv, s] of this.active){
      if(s){ s.endedAt = Date.now(); s.endReason = reason }
      this.active.set(conv, null)
    }
  }

  #openChannel(socket, gateway, conv){
    const channel = socket.channel(`chat:${conv}`, () => ({lastSeq: this.contig.get(conv)}))
    this.channels.set(conv, channel)
    channel.on("message:new", (p) => {
      const m = p?.message
      if(!m){ return }
      this.#noteGot(conv, m.seq, m.id)
      const s = this.active.get(conv)
      if(s && this.record){
        if(!s.ids.has(m.id)){ s.ids.add(m.id); s.arrivals.push(m.seq) }
      }
    })
    channel.onError(() => {
      const s = this.active.get(conv)
      if(s){ s.endedAt = Date.now(); s.endReason = "channel error"; this.active.set(conv, null) }
    })
    channel.onClose(() => {
      const s = this.active.get(conv)
      if(s){ s.endedAt = Date.now(); s.endReason = "channel closed"; this.active.set(conv, null) }
      // a phx_close from the server is not expected here: note it and rejoin through a new socket
      if(!this.stopped && socket === this.socket){ this.problems.push(`${this.user} ${conv}: phx_close at ${new Date().toISOString()}`) }
    })
    const sentLastSeq = () => this.contig.get(conv)
    let lastSent = null
    // remember what each (re)join sent: phoenix evaluates the params closure when it sends the join
    const origSend = channel.joinPush.send.bind(channel.joinPush)
    channel.joinPush.send = () => { lastSent = sentLastSeq(); return origSend() }
    channel.join(JOIN_TIMEOUT_MS)
      .receive("ok", (reply) => {
        if(socket !== this.socket){ return }
        // the join payload is computed when the join is (re)sent; the session starts after what it named
        const sent = lastSent ?? sentLastSeq()
        let startSeq = sent
        if(reply?.replayComplete === false && Number.isInteger(reply.replayFromSeq)){
          startSeq = reply.replayFromSeq - 1
          this.#fillHistory(conv, channel, sent, reply.replayFromSeq).catch((err) => {
            this.problems.push(`${this.user} ${conv}: history fill after a cut replay failed: ${err.message}`)
          })
        }
        const s = {conv, user: this.user, gateway, startSeq, reply, joinedAt: Date.now(), endedAt: null, endReason: null, arrivals: [], ids: new Set()}
        this.sessions.push(s)
        this.active.set(conv, s)
      })
  }

  async #fillHistory(conv, channel, after, before){
    let beforeSeq = before
    while(beforeSeq > after + 1){
      const r = await push(channel, "message:history", {beforeSeq, limit: 100}, PUSH_TIMEOUT_MS)
      if(r.status !== "ok"){ throw new Error(JSON.stringify(r.response)) }
      const msgs = r.response.messages
      if(msgs.length === 0){ break }
      for(const m of msgs){ if(m.seq > after){ this.#noteGot(conv, m.seq, m.id) } }
      beforeSeq = msgs[0].seq
      if(!r.response.hasMore){ break }
    }
  }

  async #connectAnywhere(){
    const token = await this.rig.srv.token(this.user)
    const n = this.rig.srv.gateways.length
    for(let attempt = 0; !this.stopped; attempt++){
      const live = this.rig.liveGateways()
      const order = Array.from({length: n}, (_, k) => (this.preferred + k) % n).filter((i) => live.includes(i))
      const gw = order[attempt % Math.max(order.length, 1)]
      if(gw !== undefined){
        try {
          const socket = await connectPhoenix(this.rig.srv.socketUrlFor(gw), token, {
            params: {deviceId: `${this.role}-dev`},
            timeoutMs: 3000,
            socketOpts: {reconnectAfterMs: () => 3_600_000, rejoinAfterMs: () => 300, timeout: JOIN_TIMEOUT_MS},
          })
          if(this.stopped){ await disconnectPhoenix(socket); return }
          this.socket = socket
          this.gateway = gw
          let lost
          this.lost = new Promise((resolve) => { lost = resolve })
          socket.onClose((ev) => {
            lost({status: "socket closed", response: {reason: `socket to gateway ${gw} closed (code ${ev?.code})`}})
            if(socket !== this.socket || this.stopped){ return }
            this.socketCloses.push({at: Date.now(), gateway: gw, code: ev?.code})
            this.#reconnect("socket closed")
          })
          for(const conv of this.convs){ this.#openChannel(socket, gw, conv) }
          return
        } catch { /* next gateway */ }
      }
      await sleep(RETRY_MS)
    }
  }

  #reconnect(reason){
    if(this.reconnecting || this.stopped){ return this.reconnecting }
    this.reconnects++
    this.#endSessions(reason)
    const old = this.socket
    this.socket = null
    this.reconnecting = (async () => {
      if(old){
        for(const ch of old.channels){ ch.rejoinTimer.reset() }
        old.disconnect()
      }
      await this.#connectAnywhere()
    })().finally(() => { this.reconnecting = null })
    return this.reconnecting
  }

  /** The joined channel for `conv`, waiting (bounded) for a session. */
  async ready(conv, timeoutMs){
    const deadline = Date.now() + timeoutMs
    while(Date.now() < deadline && !this.stopped){
      if(this.active.get(conv) && this.socket){ return this.channels.get(conv) }
      await sleep(50)
    }
    return null
  }

  /** Closes its socket for good (no reconnect). */
  async close(){
    this.stopped = true
    this.#endSessions("closed by the test")
    await this.reconnecting?.catch(() => {})
    if(this.socket){ await disconnectPhoenix(this.socket) }
  }
}

/** A sender: one message at a time at `ratePerSec`, each retried with its clientMessageId until acked. */
class Sender {
  constructor(rig, index, member, conv, ratePerSec){
    this.rig = rig
    this.index = index
    this.member = member
    this.conv = conv
    this.intervalMs = 1000 / ratePerSec
    this.sends = [] // {cmid, conv, firstAt, ackAt, seq, id, attempts, errors}
    this.paused = true
    this.stopped = false
    this.busy = false
    this.n = 0
    this.loop = null
  }

  run(){
    this.loop = (async () => {
      let next = Date.now()
      while(!this.stopped){
        if(this.paused){ await sleep(50); next = Date.now(); continue }
        const wait = next - Date.now()
        if(wait > 0){ await sleep(wait); continue }
        next = Math.max(next + this.intervalMs, Date.now())
        this.busy = true
        try { await this.#sendOne() } finally { this.busy = false }
      }
    })()
  }

  async #sendOne(){
    const cmid = `${this.rig.runId}-s${this.index}-${++this.n}`
    const rec = {cmid, conv: this.conv, sender: this.member.user, firstAt: Date.now(), ackAt: null, seq: null, id: null, attempts: 0, errors: []}
    this.sends.push(rec)
    const content = `fault load ${cmid}`
    while(!this.stopped){
      const channel = await this.member.ready(this.conv, 2000)
      if(!channel){ continue }
      rec.attempts++
      let r
      try {
        // a push on a socket that closes gets no reply: retry on the next socket at once
        r = await Promise.race([push(channel, "message:send", {type: "text", content, clientMessageId: cmid}, PUSH_TIMEOUT_MS), this.member.lost])
      } catch (err){
        r = {status: "client timeout", response: {reason: err.message}}
      }
      if(r.status === "ok"){
        const m = r.response.message
        rec.ackAt = Date.now()
        rec.seq = m.seq
        rec.id = m.id
        this.rig.acks.push(rec.ackAt)
        return
      }
      if(rec.errors.length < 20){ rec.errors.push(`${Date.now() - rec.firstAt}ms ${r.status}: ${r.response?.reason ?? JSON.stringify(r.response)}`) }
      await sleep(RETRY_MS)
    }
  }
}

// ---------------------------------------------------------------------------------------------
// the rig

export class FaultRig {
  /**
   * @param {object} [opts] {senders = 4, receivers = 3, convs = 2, rate = 3 (messages/s per sender), log}
   */
  constructor({senders = 4, receivers = 3, convs = 2, rate = Number(process.env.E2E_FAULT_RATE ?? 3), log = () => {}} = {}){
    this.opts = {senders, receivers, convs, rate}
    this.log = log
    this.runId = randomId("f", 3)
    this.acks = []
    this.srv = null
    this.nats = null
    this.redis = null
    this.db = null
    this.senders = []
    this.receivers = []
    this.checker = null
    this.convIds = Array.from({length: convs}, (_, i) => randomId(`fault${i}-`, 4))
    this.users = {
      senders: Array.from({length: senders}, (_, i) => `${this.runId}_s${i}`),
      receivers: Array.from({length: receivers}, (_, i) => `${this.runId}_r${i}`),
      /** one leaver per fault (a presence leak in one fault must not mask the next) */
      leavers: Array.from({length: LEAVERS}, (_, i) => `${this.runId}_leaver${i}`),
      checker: `${this.runId}_checker`,
    }
    /** conv -> {verified: n, cmids: Set} (store check is incremental) */
    this.storeState = new Map(this.convIds.map((c) => [c, {verified: 0, cmids: new Set(), ids: new Set(), seqIds: new Map()}]))
    /** outages of a dependency every send needs (NATS, the database): [{what, from: kill, to: ready again}] */
    this.outages = []
    this.faultCount = 0
    /** the membership probe: a conversation of its own and a user the probe removes behind chat-svc's back */
    this.probe = {conv: randomId("probe-", 4), user: `${this.runId}_probe`, runs: 0}
  }

  static prerequisite(){
    const py = spawnSync(PYTHON, ["-c", "import secantus, pymongo"], {encoding: "utf8", timeout: 30_000})
    if(py.status !== 0){ return `the fault suite runs its own SecantusDB: \`${PYTHON} -c "import secantus, pymongo"\` failed (scripts/deps.sh installs them): ${(py.stderr || py.error?.message || "").trim().split("\n").pop()}` }
    const nats = process.env.NATS_SERVER_BIN
    if(nats && !existsSync(nats)){ return `NATS_SERVER_BIN ${nats} does not exist (scripts/deps.sh writes it to /tmp/quckchat-test/env)` }
    return null
  }

  async start(){
    this.nats = await natsServer().start()
    this.redis = await redisServer().start()
    this.db = await secantusServer().start()
    this.log(`nats-server on ${this.nats.port}, redis-server on ${this.redis.port}, SecantusDB on ${this.db.port} (${this.db.dir})`)
    this.srv = new ServerSet("distributed", {gateways: 3, chatReplicas: 2, natsUrl: `nats://127.0.0.1:${this.nats.port}`, redisUrl: `redis://127.0.0.1:${this.redis.port}`,
      mongoUrl: `mongodb://127.0.0.1:${this.db.port}/?directConnection=true`})
    await this.srv.start(FAULT_ENV)
    const all = [...this.users.senders, ...this.users.receivers, ...this.users.leavers, this.users.checker]
    for(const conv of this.convIds){ await this.srv.putConversation(conv, all) }
    // the probe works before any fault (else a failure after the database fault would mean nothing)
    const probe = await this.probeMembershipWatch()
    if(probe.error){ throw new Error(`the membership probe fails before any fault: ${probe.error}`) }
    const g = this.srv.gateways.length
    this.receivers = this.users.receivers.map((u, i) => new Member(this, u, this.convIds, {gateway: i % g, record: true, role: "recv"}))
    const senderMembers = this.users.senders.map((u, i) => new Member(this, u, [this.convIds[i % this.convIds.length]], {gateway: (i + 1) % g, role: "send"}))
    this.checker = new Member(this, this.users.checker, this.convIds, {gateway: 0, role: "check"})
    const members = [...this.receivers, ...senderMembers, this.checker]
    await Promise.all(members.map((m) => m.start()))
    // every member joined before the first fault (bounded; a slow join is retried by phoenix)
    await Promise.all(members.flatMap((m) => m.convs.map(async (c) => {
      if(!await m.ready(c, 60_000)){ throw new Error(`${m.user} could not join chat:${c} within 60 s`) }
    })))
    this.senders = senderMembers.map((m, i) => new Sender(this, i, m, m.convs[0], this.opts.rate))
    for(const s of this.senders){ s.run() }
    return this
  }

  /** indices of gateways that run and are not draining */
  liveGateways(){
    return this.srv.gateways.map((gw, i) => ({gw, i})).filter(({gw}) => !gw.proc.exit && gw.proc.sigtermAt === undefined).map(({i}) => i)
  }

  resume(){ for(const s of this.senders){ s.paused = false } }

  /** Pauses the senders and waits until each has its current message acked. */
  async pause(){
    for(const s of this.senders){ s.paused = true }
    const deadline = Date.now() + LIMITS.IDLE_MS
    while(this.senders.some((s) => s.busy)){
      if(Date.now() > deadline){
        const stuck = this.senders.filter((s) => s.busy).map((s) => s.sends.at(-1))
        throw new Error(`sends not acked within ${LIMITS.IDLE_MS} ms of pausing: ${JSON.stringify(stuck)}`)
      }
      await sleep(50)
    }
  }

  allSends(){ return this.senders.flatMap((s) => s.sends) }

  /** RSS (KiB) of every process of the set and of our nats/redis */
  rss(){
    const out = {}
    for(const p of this.srv.procs){ out[p.name] = p.proc.exit ? null : rssKb(p.proc.child.pid) }
    out["nats-server"] = this.nats.rss()
    out["redis-server"] = this.redis.rss()
    out.secantus = this.db.rss()
    return out
  }

  /**
   * The membership change stream of chat-svc works: the probe user (made a member of the probe
   * conversation through chat-svc, joined, a few pushes so each replica caches the membership)
   * is `$pull`ed from `participants` directly in the database, as the backend would; chat-svc's
   * watcher must then close its channel (phx_close) within PROBE_CLOSE_MS. Two tries (a try can
   * lose a race with the change event of its own put). Resolves with {ms, tries} or {error}.
   */
  async probeMembershipWatch(){
    const {conv, user} = this.probe
    let last = null
    for(let attempt = 1; attempt <= 2; attempt++){
      this.probe.runs++
      let socket = null
      try {
        await this.srv.putConversation(conv, [user])
        await sleep(1000) // the put's own change event reaches the watchers first
        socket = await connectPhoenix(this.srv.socketUrlFor(this.liveGateways()[0] ?? 0), await this.srv.token(user), {timeoutMs: 5000, params: {deviceId: "probe"}})
        const channel = socket.channel(`chat:${conv}`, {})
        const closed = new Promise((resolve) => channel.onClose(() => resolve(Date.now())))
        await new Promise((resolve, reject) => channel.join(JOIN_TIMEOUT_MS).receive("ok", resolve)
          .receive("error", (r) => reject(new Error(`join refused: ${JSON.stringify(r)}`))).receive("timeout", () => reject(new Error("join timed out"))))
        for(let i = 0; i < 8; i++){
          const r = await push(channel, "message:history", {limit: 1}, PUSH_TIMEOUT_MS)
          if(r.status !== "ok"){ throw new Error(`message:history: ${r.status} ${JSON.stringify(r.response)}`) }
        }
        const at = Date.now() // (the python start, ~0.5-1 s, is part of the figure)
        const py = await runPython("import sys, pymongo; c = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=10000); " +
          "r = c.get_default_database().conversations.update_one({'_id': sys.argv[2]}, {'$pull': {'participants': sys.argv[3]}}); print(r.modified_count)",
          [this.srv.mongoUrl, conv, user])
        if(py.code !== 0 || py.out.split("\n").pop() !== "1"){ throw new Error(`the $pull in the database failed: ${py.out.split("\n").slice(-3).join(" | ")}`) }
        const closedAt = await withTimeout(closed, PROBE_CLOSE_MS, "phx_close").catch(() => null)
        if(closedAt){ return {closedMs: closedAt - at, tries: attempt} }
        last = `the probe member removed in the database kept its channel for ${PROBE_CLOSE_MS} ms (no phx_close; membership change stream dead?)`
      } catch (err){
        last = err.message
      } finally {
        if(socket){ await disconnectPhoenix(socket) }
      }
    }
    return {error: last}
  }

  async stop(){
    for(const s of this.senders){ s.stopped = true }
    await Promise.all(this.senders.map((s) => withTimeout(s.loop ?? Promise.resolve(), 10_000, "sender loop").catch(() => {})))
    await Promise.all([...this.receivers, ...this.senders.map((s) => s.member), this.checker].filter(Boolean).map((m) => m.close().catch(() => {})))
    let err = null
    try { await this.srv?.stop() } catch (e){ err = e }
    await this.nats?.stop()
    await this.redis?.stop()
    await this.db?.stop()
    if(err){ throw err }
  }

  // -------------------------------------------------------------------------------------------
  // checks

  /** Reads history newest-first down to the verified prefix and checks the store invariant. */
  async checkStore(fault){
    const errors = []
    const sends = this.allSends()
    for(const conv of this.convIds){
      const acked = sends.filter((r) => r.conv === conv && r.ackAt !== null)
      const unacked = sends.filter((r) => r.conv === conv && r.ackAt === null)
      if(unacked.length){ errors.push(`${conv}: ${unacked.length} sends not acked after the pause: ${unacked.slice(0, 3).map((r) => JSON.stringify(r)).join("; ")}`) }
      const st = this.storeState.get(conv)
      const channel = await this.checker.ready(conv, 20_000)
      if(!channel){ errors.push(`${conv}: the checker could not join to read history`); continue }
      const fresh = []
      let beforeSeq
      for(let page = 0; page < 10_000; page++){
        const payload = beforeSeq === undefined ? {limit: 100} : {beforeSeq, limit: 100}
        let r
        for(let attempt = 1; ; attempt++){
          r = await push(channel, "message:history", payload, PUSH_TIMEOUT_MS).catch((e) => ({status: "client timeout", response: {reason: e.message}}))
          if(r.status === "ok" || attempt >= 5){ break }
          await sleep(500)
        }
        if(r.status !== "ok"){ errors.push(`${conv}: message:history ${JSON.stringify(payload)} failed: ${JSON.stringify(r.response)}`); break }
        const msgs = r.response.messages
        const newer = msgs.filter((m) => m.seq > st.verified)
        fresh.unshift(...newer)
        if(msgs.length === 0 || newer.length < msgs.length || !r.response.hasMore){ break }
        beforeSeq = msgs[0].seq
      }
      // seqs verified+1 .. N without a gap, each once
      const seqs = fresh.map((m) => m.seq)
      for(let i = 0; i < seqs.length; i++){
        if(seqs[i] !== st.verified + i + 1){
          errors.push(`${conv}: stored seqs are not gap-free after ${st.verified}: expected ${st.verified + i + 1}, found ${seqs[i]} (around: ${seqs.slice(Math.max(0, i - 3), i + 4).join(",")})`)
          break
        }
      }
      for(const m of fresh){
        if(st.ids.has(m.id)){ errors.push(`${conv}: message id ${m.id} stored twice (seq ${m.seq} and ${[...st.seqIds].find(([, id]) => id === m.id)?.[0]})`) }
        if(m.clientMessageId !== null && st.cmids.has(`${m.senderId}/${m.clientMessageId}`)){
          errors.push(`${conv}: clientMessageId ${m.clientMessageId} of ${m.senderId} stored twice (again at seq ${m.seq})`)
        }
        st.ids.add(m.id)
        st.seqIds.set(m.seq, m.id)
        if(m.clientMessageId !== null){ st.cmids.add(`${m.senderId}/${m.clientMessageId}`) }
      }
      const total = st.verified + fresh.length
      for(const r of acked){
        const storedId = st.seqIds.get(r.seq)
        if(storedId !== r.id){ errors.push(`${conv}: ack of ${r.cmid} said seq ${r.seq} id ${r.id}, the store has ${storedId ?? "nothing"} at seq ${r.seq}`) }
      }
      const sentCmids = new Set(sends.filter((r) => r.conv === conv).map((r) => `${r.sender}/${r.cmid}`))
      const strangers = [...st.cmids].filter((c) => !sentCmids.has(c))
      if(strangers.length){ errors.push(`${conv}: stored messages nobody sent: ${strangers.slice(0, 5).join(", ")}`) }
      if(total !== acked.length){ errors.push(`${conv}: ${total} messages stored, ${acked.length} acked sends (each should be stored exactly once)`) }
      st.verified = Math.max(st.verified, seqs.length ? seqs.at(-1) : st.verified)
      st.total = total
    }
    return errors.map((e) => `[${fault}] store: ${e}`)
  }

  /** Waits until every receiver has every stored seq, then checks the per-session order. */
  async checkDelivery(fault, sinceSession){
    const errors = []
    const deadline = Date.now() + LIMITS.CONVERGE_MS
    const behind = () => this.receivers.flatMap((r) => this.convIds
      .filter((c) => r.contig.get(c) < (this.storeState.get(c).total ?? 0))
      .map((c) => `${r.user} ${c}: has 1..${r.contig.get(c)} of ${this.storeState.get(c).total} (missing ${[...Array((this.storeState.get(c).total ?? 0) - r.contig.get(c)).keys()].map((k) => r.contig.get(c) + 1 + k).filter((s) => !r.got.get(c).has(s)).slice(0, 8).join(",")}; gateway ${r.gateway}, session ${r.active.get(c) ? "open" : "none"})`))
    while(behind().length && Date.now() < deadline){ await sleep(200) }
    for(const b of behind()){ errors.push(`${b} ${LIMITS.CONVERGE_MS} ms after the pause`) }
    for(const r of this.receivers){
      for(const p of r.problems.splice(0)){ errors.push(p) }
      for(const conv of this.convIds){
        const st = this.storeState.get(conv)
        for(const [seq, id] of r.got.get(conv)){
          if(st.seqIds.has(seq) && st.seqIds.get(seq) !== id){ errors.push(`${r.user} ${conv}: got seq ${seq} as id ${id}, stored as ${st.seqIds.get(seq)}`) }
        }
      }
      for(const s of r.sessions.slice(sinceSession.get(r) ?? 0)){
        const bad = s.arrivals.findIndex((seq, i) => seq !== s.startSeq + i + 1)
        if(bad >= 0){
          const t = (x) => x ? new Date(x).toISOString().slice(11, 23) : "open"
          errors.push(`${r.user} ${s.conv} session on gateway ${s.gateway} (joined ${t(s.joinedAt)} with lastSeq ${s.startSeq}, reply ${JSON.stringify(s.reply)}, ended ${t(s.endedAt)} ${s.endReason ?? ""}): ` +
            `message:new #${bad + 1} was seq ${s.arrivals[bad]}, expected ${s.startSeq + bad + 1}; arrivals around it: ${s.arrivals.slice(Math.max(0, bad - 5), bad + 6).join(",")}; ` +
            `the sends of those seqs: ${this.describeSends(s.conv, [s.startSeq + bad + 1, s.arrivals[bad]])}`)
        }
      }
    }
    return errors.map((e) => `[${fault}] delivery: ${e}`)
  }

  /** The acked sends of `seqs` in `conv`, with their timings, for failure messages. */
  describeSends(conv, seqs){
    const t = (x) => x ? new Date(x).toISOString().slice(11, 23) : "-"
    return seqs.map((seq) => {
      const r = this.allSends().find((x) => x.conv === conv && x.seq === seq)
      return r ? `seq ${seq} = ${r.cmid} first sent ${t(r.firstAt)}, acked ${t(r.ackAt)} after ${r.attempts} attempt(s)${r.errors.length ? ` [${r.errors.join("; ")}]` : ""}` : `seq ${seq}: no acked send`
    }).join(" | ")
  }

  /**
   * Presence converges: a fresh presence_state on a conversation lists every sender and receiver
   * and not `absent` (users whose sockets all closed).
   */
  async checkPresence(fault, absent){
    const expectOnline = [...this.users.senders, ...this.users.receivers]
    const deadline = Date.now() + LIMITS.PRESENCE_CONVERGE_MS
    let last = "no presence_state yet"
    const token = await this.srv.token(this.users.checker)
    while(Date.now() < deadline){
      const live = this.liveGateways()
      let socket
      try {
        socket = await connectPhoenix(this.srv.socketUrlFor(live[0] ?? 0), token, {timeoutMs: 3000, params: {deviceId: "presence-probe"}})
        const channel = socket.channel(`chat:${this.convIds[0]}`, {})
        const state = new Promise((resolve) => channel.on("presence_state", resolve))
        channel.join(JOIN_TIMEOUT_MS)
        const st = await withTimeout(state, 3000, "presence_state")
        const online = Object.keys(st)
        const missing = expectOnline.filter((u) => !online.includes(u))
        const stale = absent.filter((u) => online.includes(u))
        last = `online ${JSON.stringify(online.sort())}; missing ${JSON.stringify(missing)}; should be offline ${JSON.stringify(stale)}`
        this.lastOnline = online
        if(!missing.length && !stale.length){ return [] }
      } catch (err){
        last = err.message
      } finally {
        if(socket){ await disconnectPhoenix(socket) }
      }
      await sleep(500)
    }
    const lines = this.srv.process("presence-svc").proc.output.replace(/\x1b\[[0-9;]*m/g, "").split("\n")
    const hints = [...lines.filter((l) => /close not recorded|resync|gateway unknown/.test(l)).slice(-4),
      ...lines.filter((l) => /WARN|ERROR/.test(l) && !/close not recorded|resync|gateway unknown/.test(l)).slice(-2)]
      .map((l) => `    presence-svc: ${l.slice(0, 300)}`)
    return [`[${fault}] presence: not converged ${LIMITS.PRESENCE_CONVERGE_MS} ms after the checks began: ${last}` +
      (hints.length ? `\n  presence-svc log (warnings):\n${hints.join("\n")}` : "")]
  }
}

// ---------------------------------------------------------------------------------------------
// the stall metrics

/** Largest gap between consecutive acks in [from, to], skipping the `exclude` windows ({from, to}). */
export function maxAckGap(acks, from, to, exclude = []){
  const pts = acks.filter((t) => t >= from && t <= to && !exclude.some((w) => t > w.from && t < w.to))
  for(const w of exclude){ if(w.from >= from && w.from <= to){ pts.push(w.from) } if(w.to >= from && w.to <= to){ pts.push(w.to) } }
  pts.push(from, to)
  pts.sort((a, b) => a - b)
  let max = 0, at = from
  for(let i = 1; i < pts.length; i++){
    const inside = exclude.some((w) => pts[i - 1] >= w.from && pts[i] <= w.to)
    if(!inside && pts[i] - pts[i - 1] > max){ max = pts[i] - pts[i - 1]; at = pts[i - 1] }
  }
  return {max, at}
}

// ---------------------------------------------------------------------------------------------
// the faults: each injects, waits through its disruption and restores; returns timing marks

const WARM_MS = 2500
const RECOVERY_MS = 6000

export const FAULTS = {
  "chat-svc SIGKILL": {
    recoverFrom: "kill",
    async run(rig, mark){
      mark.killAt = await rig.srv.signal("chat-svc1", "SIGKILL")
      await sleep(5000) // the other replica serves alone
      mark.restoredAt = await rig.srv.restart("chat-svc1")
    },
  },
  "presence-svc SIGKILL": {
    recoverFrom: "kill",
    async run(rig, mark){
      mark.killAt = await rig.srv.signal("presence-svc", "SIGKILL")
      await sleep(3000)
      mark.restoredAt = await rig.srv.restart("presence-svc")
    },
  },
  "gateway SIGTERM": {
    leaverGateway: 2,
    recoverFrom: "kill",
    async run(rig, mark){
      mark.killAt = await rig.srv.signal("gateway2", "SIGTERM")
      mark.exitedAt = Date.now()
      await sleep(1000)
      mark.restoredAt = await rig.srv.restart("gateway2")
    },
  },
  "NATS kill+restart": {
    async run(rig, mark){
      mark.killAt = await rig.nats.kill()
      await sleep(3000)
      mark.restoredAt = await rig.nats.restart()
      rig.outages.push({what: "nats", from: mark.killAt, to: mark.restoredAt})
    },
  },
  "Redis kill+restart": {
    async run(rig, mark){
      mark.killAt = await rig.redis.kill()
      await sleep(3000)
      mark.restoredAt = await rig.redis.restart()
    },
  },
  "database kill+restart": {
    membershipProbe: true,
    async run(rig, mark){
      mark.killAt = await rig.db.kill()
      await sleep(LIMITS.DB_DOWN_MS)
      try {
        mark.restoredAt = await rig.db.restart()
      } finally {
        rig.outages.push({what: "database", from: mark.killAt, to: mark.restoredAt ?? Date.now()})
      }
    },
  },
}

/**
 * Runs one fault under load and checks every invariant. Resolves with {fault, figures, errors}.
 */
export async function runFault(rig, name){
  const fault = FAULTS[name]
  const errors = []
  const sinceSession = new Map(rig.receivers.map((r) => [r, r.sessions.length]))
  // this phase's sends: per sender, those after its count at the start (allSends() concatenates the senders' lists)
  const sendsBefore = new Map(rig.senders.map((s) => [s, s.sends.length]))
  const phaseStart = Date.now()
  rig.resume()
  await sleep(WARM_MS)
  // the leaver: online before the fault, gone (socket closed) during it
  const leaverGw = fault.leaverGateway ?? 0
  const leaverId = rig.users.leavers[rig.faultCount++ % rig.users.leavers.length]
  let leaver
  try {
    leaver = await rig.srv.connect(leaverId, {gateway: leaverGw, params: {deviceId: "leaver"}})
  } catch (err){ errors.push(`[${name}] presence: the leaver could not connect: ${err.message}`) }
  await sleep(500)
  const mark = {}
  const run = fault.run(rig, mark)
  const inject = (async () => {
    await sleep(300)
    if(leaver){ await disconnectPhoenix(leaver); rig.srv.clients.clear() }
  })()
  await run.catch((err) => errors.push(`[${name}] the fault itself failed (injection or restart): ${err.message.split("\n").slice(0, 8).join("\n")}`))
  await inject
  await sleep(RECOVERY_MS)
  const recoveryEnd = Date.now()
  await rig.pause().catch((err) => errors.push(`[${name}] stall: ${err.message}`))
  const phaseEnd = Date.now()

  // figures
  const sends = rig.senders.flatMap((s) => s.sends.slice(sendsBefore.get(s)))
  const acked = sends.filter((r) => r.ackAt !== null)
  const latency = acked.reduce((m, r) => Math.max(m, r.ackAt - r.firstAt), 0)
  const slowest = acked.find((r) => r.ackAt - r.firstAt === latency)
  const gap = maxAckGap(rig.acks, phaseStart + 500, recoveryEnd, rig.outages)
  const outage = rig.outages.find((w) => w.from === mark.killAt)
  const afterRestore = fault.recoverFrom === "kill" ? mark.killAt : mark.restoredAt
  // recovery: from the kill (restore for the outages of NATS and Redis) until every sender had an ack of a send begun after it
  const perSender = rig.senders.map((s) => s.sends.find((r) => r.firstAt >= afterRestore && r.ackAt !== null)?.ackAt ?? null)
  const recoveryMs = perSender.every((t) => t !== null) ? Math.max(...perSender) - afterRestore : null
  const retried = acked.filter((r) => r.attempts > 1).length
  const lat = acked.map((r) => r.ackAt - r.firstAt).sort((a, b) => a - b)
  const p50 = lat.length ? lat[Math.floor(lat.length / 2)] : null
  const reconnects = rig.receivers.reduce((n, r) => n + r.sessions.length - (sinceSession.get(r) ?? 0), 0)
  const figures = {fault: name, acked: acked.length, retried, maxAckGapMs: gap.max, p50SendLatencyMs: p50, maxSendLatencyMs: latency, recoveryMs,
    outageMs: mark.restoredAt ? mark.restoredAt - mark.killAt : null, receiverJoins: reconnects, phaseMs: phaseEnd - phaseStart}

  // the stall the excluded outage itself caused (a figure, no bound)
  if(outage){ figures.ackGapWithOutageMs = maxAckGap(rig.acks, phaseStart + 500, recoveryEnd).max }
  if(gap.max > LIMITS.STALL_MS){
    errors.push(`[${name}] stall: no ack for ${gap.max} ms from ${new Date(gap.at).toISOString().slice(11, 23)} (bound ${LIMITS.STALL_MS} ms; fault at ${new Date(mark.killAt).toISOString().slice(11, 23)}, restored ${mark.restoredAt ? new Date(mark.restoredAt).toISOString().slice(11, 23) : "-"})`)
  }
  if(name === "chat-svc SIGKILL"){
    const g = maxAckGap(rig.acks, mark.killAt, mark.killAt + 5000)
    figures.ackGapAfterKillMs = g.max
    if(g.max > LIMITS.CHAT_KILL_STALL_MS){
      errors.push(`[${name}] stall: the surviving replica left a ${g.max} ms gap between acks from ${new Date(g.at).toISOString().slice(11, 23)} (kill at ${new Date(mark.killAt).toISOString().slice(11, 23)}; bound ${LIMITS.CHAT_KILL_STALL_MS} ms)`)
    }
  }
  if(recoveryMs === null){
    errors.push(`[${name}] stall: not every sender had a send acked after the restore: ${JSON.stringify(perSender)}`)
  }
  const t = (x) => x ? new Date(x).toISOString().slice(11, 23) : null
  figures.at = {resumed: t(phaseStart), fault: t(mark.killAt), restored: t(mark.restoredAt), paused: t(phaseEnd)}
  figures.slowestSend = slowest ? {cmid: slowest.cmid, attempts: slowest.attempts, errors: slowest.errors.slice(0, 4)} : null

  errors.push(...await rig.checkStore(name))
  errors.push(...await rig.checkDelivery(name, sinceSession))
  errors.push(...await rig.checkPresence(name, [leaverId]))
  if(fault.membershipProbe){
    const probe = await rig.probeMembershipWatch()
    figures.membershipProbe = probe
    if(probe.error){ errors.push(`[${name}] membership: ${probe.error}`) }
    // a replica whose watcher gave up logs this once; its backend membership changes then wait for the cache TTL
    figures.changeStreamErrors = Object.fromEntries(rig.srv.procs.filter((p) => p.name.startsWith("chat-svc"))
      .map((p) => [p.name, (p.proc.output.match(/conversation change stream error|cannot watch conversations/g) ?? []).length]))
  }
  // not this fault's invariant, but worth seeing: leavers of earlier faults still listed online
  const earlier = new Set(rig.users.leavers.slice(0, Math.min(rig.faultCount - 1, rig.users.leavers.length)))
  figures.earlierLeaversOnline = (rig.lastOnline ?? []).filter((u) => earlier.has(u) && u !== leaverId)
  return {fault: name, figures, errors}
}

export const FAULT_ORDER = Object.keys(FAULTS)
