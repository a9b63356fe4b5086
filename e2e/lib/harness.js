// Starts a QuckChat server set (all-in-one, or N gateways + chat-svc + presence-svc +
// signaling-svc, huddle-svc over NATS/MongoDB/Redis) on free ports, waits until it is ready, hands out URLs and client
// helpers, and tears everything down again: processes get SIGTERM and must exit with code 0
// within the drain window (SHUTDOWN_DRAIN_SECS + E2E_STOP_TIMEOUT_MS), else they are
// SIGKILLed and the stop fails; temp dirs, the set's MongoDB database and its Redis keys are
// removed.
import {spawn, execFile} from "node:child_process"
import {existsSync, mkdtempSync, rmSync} from "node:fs"
import {createServer} from "node:net"
import {tmpdir} from "node:os"
import path from "node:path"
import {fileURLToPath} from "node:url"
import {randomBytes} from "node:crypto"
import {before, after, afterEach} from "node:test"

import {connectPhoenix, disconnectPhoenix} from "./phx.js"
import {RawClient} from "./raw.js"
import {mintUserToken, authTokenProtocol} from "./jwt.js"
import {redisDeletePattern} from "./redis.js"
import {sleep, withTimeout, randomId} from "./util.js"

export const E2E_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..")
export const BIN_DIR = path.resolve(E2E_DIR, process.env.QUCKCHAT_BIN_DIR ?? "../target/debug")

const READY_TIMEOUT_MS = Number(process.env.E2E_READY_TIMEOUT_MS ?? 30_000)
const STOP_TIMEOUT_MS = Number(process.env.E2E_STOP_TIMEOUT_MS ?? 5_000)
const CLI_TIMEOUT_MS = 15_000
const LOG_TAIL_BYTES = 64 * 1024
const SHOW_LOGS = process.env.E2E_SERVER_LOGS === "1"

export const ALL_MODES = ["allinone", "distributed"]

/** Modes to run, from E2E_MODES (comma separated), default both. */
export const modes = (() => {
  const raw = process.env.E2E_MODES ?? ALL_MODES.join(",")
  const list = raw.split(",").map((m) => m.trim()).filter(Boolean)
  for(const m of list){
    if(!ALL_MODES.includes(m)){ throw new Error(`E2E_MODES: unknown mode ${JSON.stringify(m)} (known: ${ALL_MODES.join(", ")})`) }
  }
  return list
})()

// ---------------------------------------------------------------------------------------------
// process bookkeeping: whatever happens to the test process, no server outlives it

const liveChildren = new Set()
const liveDirs = new Set()

function killEverythingNow(){
  for(const child of liveChildren){
    try { child.kill("SIGKILL") } catch { /* gone */ }
  }
  for(const dir of liveDirs){
    try { rmSync(dir, {recursive: true, force: true}) } catch { /* best effort */ }
  }
}
process.on("exit", killEverythingNow)
for(const signal of ["SIGINT", "SIGTERM", "SIGHUP"]){
  process.once(signal, () => {
    killEverythingNow()
    process.exit(128 + ({SIGINT: 2, SIGTERM: 15, SIGHUP: 1}[signal]))
  })
}

// ---------------------------------------------------------------------------------------------

export function binPath(name){
  return path.join(BIN_DIR, name)
}

function requireBin(name){
  const p = binPath(name)
  if(!existsSync(p)){
    throw new Error(`server binary not found: ${p} (build it with \`cargo build --workspace\`, or set QUCKCHAT_BIN_DIR)`)
  }
  return p
}

/** A free TCP port on 127.0.0.1 (bound then released). */
export function freePort(){
  return new Promise((resolve, reject) => {
    const srv = createServer()
    srv.unref()
    srv.on("error", reject)
    srv.listen(0, "127.0.0.1", () => {
      const {port} = srv.address()
      srv.close(() => resolve(port))
    })
  })
}

/** Inserts a database path into a MongoDB URL: mongodb://h:1/?x=y + db → mongodb://h:1/db?x=y */
export function mongoUrlWithDb(base, db){
  const m = /^(mongodb(?:\+srv)?:\/\/[^/?]+)(\/[^?]*)?(\?.*)?$/.exec(base)
  if(!m){ throw new Error(`TEST_MONGODB_URL is not a mongodb:// URL: ${base}`) }
  return `${m[1]}/${db}${m[3] ?? ""}`
}

/** Runs a CLI command, resolving with trimmed stdout; rejects with its output on failure. */
export function runCli(file, args, {env, timeoutMs = CLI_TIMEOUT_MS} = {}){
  return new Promise((resolve, reject) => {
    execFile(file, args, {env, timeout: timeoutMs, killSignal: "SIGKILL", maxBuffer: 4 * 1024 * 1024}, (err, stdout, stderr) => {
      if(err){
        const how = err.killed ? `killed after ${timeoutMs} ms` : `exit code ${err.code}`
        reject(new Error(`${path.basename(file)} ${args.join(" ")} failed (${how})\nstdout: ${stdout}\nstderr: ${stderr}`))
      } else {
        resolve(stdout.trim())
      }
    })
  })
}

export class ManagedProcess {
  constructor(name, file, args, env){
    this.name = name
    /** how it was started (ServerSet.restart starts it again with the same) */
    this.spec = {file, args, env}
    this.output = ""
    this.exit = null
    this.child = spawn(file, args, {env, stdio: ["ignore", "pipe", "pipe"]})
    liveChildren.add(this.child)
    const capture = (chunk) => {
      const text = chunk.toString("utf8")
      this.output = (this.output + text).slice(-LOG_TAIL_BYTES)
      if(SHOW_LOGS){ process.stderr.write(text.replace(/^(?=.)/gm, `[${this.name}] `)) }
    }
    this.child.stdout.on("data", capture)
    this.child.stderr.on("data", capture)
    this.exited = new Promise((resolve) => {
      this.child.on("error", (err) => {
        this.output += `\n[spawn error] ${err.message}`
        this.exit = {code: null, signal: null, error: err}
        liveChildren.delete(this.child)
        resolve(this.exit)
      })
      this.child.on("exit", (code, signal) => {
        this.exit = {code, signal}
        liveChildren.delete(this.child)
        resolve(this.exit)
      })
    })
  }

  describeExit(){
    if(!this.exit){ return "still running" }
    return this.exit.error ? `failed to start: ${this.exit.error.message}` : `exited with code ${this.exit.code} signal ${this.exit.signal}`
  }

  /** Sends SIGTERM (once) and returns the time it was sent (Date.now()). */
  terminate(){
    if(this.sigtermAt === undefined && !this.exit){
      this.sigtermAt = Date.now()
      this.child.kill("SIGTERM")
    }
    return this.sigtermAt
  }

  /**
   * SIGTERM, then SIGKILL after `graceMs`; resolves once the process is gone (bounded) with
   * `{code, signal, killed, ms}`: `killed` when SIGTERM did not stop it within `graceMs`, `ms`
   * from SIGTERM to exit. A process that had already exited resolves with its exit as is.
   */
  async stop(graceMs = STOP_TIMEOUT_MS){
    if(this.exit){ return {...this.exit, killed: false, ms: null, before: true} }
    const at = this.terminate()
    const exit = await withTimeout(this.exited, graceMs, `${this.name} to exit after SIGTERM`).catch(() => null)
    if(exit){ return {...exit, killed: false, ms: Date.now() - at} }
    this.child.kill("SIGKILL")
    const killed = await withTimeout(this.exited, 2000, `${this.name} to exit after SIGKILL`)
      .catch(() => ({code: null, signal: "SIGKILL (no exit seen)"}))
    return {...killed, killed: true, ms: Date.now() - at}
  }
}

/** Why `exit` (from ManagedProcess.stop) is not a clean exit after SIGTERM, or null. */
export function uncleanExit(exit){
  if(exit.killed){ return `did not exit within ${exit.ms} ms of SIGTERM (SIGKILLed)` }
  if(exit.error){ return `failed: ${exit.error.message}` }
  if(exit.code !== 0){ return `exited with code ${exit.code} signal ${exit.signal} after SIGTERM` }
  return null
}

/**
 * Call settings every set gets (all-in-one and signaling-svc; the other processes ignore them):
 * short ring and disconnect windows keep the call tests fast; TURN uses coturn REST credentials
 * with the set's own `TURN_SECRET` (ServerSet.turnSecret). A test file may override any of them.
 */
export const CALL_DEFAULTS = {
  CALL_RING_TIMEOUT_SECS: "3",
  CALL_DISCONNECT_GRACE_SECS: "3",
  TURN_SERVER_URL: "turn:turn.example.test:3478",
  TURN_CREDENTIAL_TTL_SECS: "600",
}

/** Polls GET url until 200; fails early if the process exits, and after `timeoutMs`. */
async function waitReady(proc, url, timeoutMs = READY_TIMEOUT_MS){
  const deadline = Date.now() + timeoutMs
  let last = "no answer yet"
  while(Date.now() < deadline){
    if(proc.exit){
      throw new Error(`${proc.name} ${proc.describeExit()} before ${url} was ready; output:\n${proc.output}`)
    }
    try {
      const res = await fetch(url, {signal: AbortSignal.timeout(1000)})
      await res.arrayBuffer()
      if(res.status === 200){ return }
      last = `HTTP ${res.status}`
    } catch (err){
      last = err.cause?.code ?? err.message
    }
    await sleep(100)
  }
  throw new Error(`${proc.name} not ready at ${url} within ${timeoutMs} ms (last: ${last}); output:\n${proc.output}`)
}

const looksLikePortClash = (proc) => /address (already )?in use|EADDRINUSE|os error 98/i.test(proc.output)

/**
 * Starts `file` on a fresh port, waiting until /health/ready answers 200. Retries with
 * another port when the first one was taken in the meantime.
 */
async function startOnFreePort(name, file, args, envFor){
  for(let attempt = 1; ; attempt++){
    const port = await freePort()
    const proc = new ManagedProcess(name, file, args, envFor(port))
    try {
      await waitReady(proc, `http://127.0.0.1:${port}/health/ready`)
      return {proc, port}
    } catch (err){
      await proc.stop(1000)
      if(attempt < 3 && looksLikePortClash(proc)){ continue }
      throw err
    }
  }
}

/** `n` distinct free ports. */
async function distinctFreePorts(n){
  const ports = new Set()
  while(ports.size < n){ ports.add(await freePort()) }
  return [...ports]
}

/**
 * Starts several processes that need each other's ports up front (chat-svc ⇄ presence-svc):
 * picks every port first, starts them all, waits until each is ready. Retries with other
 * ports when one was taken in the meantime.
 * @param {{name: string, file: string, envFor: (ports: number[]) => object}[]} specs
 * @returns {Promise<{name: string, proc: ManagedProcess, port: number}[]>}
 */
async function startGroupOnFreePorts(specs){
  for(let attempt = 1; ; attempt++){
    const ports = await distinctFreePorts(specs.length)
    const started = specs.map((spec, i) => ({name: spec.name, port: ports[i], proc: new ManagedProcess(spec.name, spec.file, [], spec.envFor(ports))}))
    const results = await Promise.allSettled(started.map((s) => waitReady(s.proc, `http://127.0.0.1:${s.port}/health/ready`)))
    const failed = results.find((r) => r.status === "rejected")
    if(!failed){ return started }
    await Promise.all(started.map((s) => s.proc.stop(1000)))
    if(attempt < 3 && started.some((s) => looksLikePortClash(s.proc))){ continue }
    throw failed.reason
  }
}

function baseEnv(){
  const env = {...process.env}
  // the all-in-one server must not pick up a developer's distributed settings by accident
  for(const key of ["NATS_URL", "NATS_SUBJECT_PREFIX", "MONGODB_URL", "REDIS_URL", "REDIS_KEY_PREFIX", "PORT", "DATA_DIR",
    "NODE_NAME", "CHAT_GRPC_URL", "PRESENCE_GRPC_URL", "STUN_SERVER_URL", "TURN_SERVER_URL", "TURN_USERNAME", "TURN_CREDENTIAL",
    "TURN_SECRET", "TURN_CREDENTIAL_TTL_SECS", "CALL_RING_TIMEOUT_SECS", "CALL_DISCONNECT_GRACE_SECS"]){ delete env[key] }
  env.RUST_LOG = process.env.E2E_RUST_LOG ?? process.env.RUST_LOG ?? "info"
  return env
}

/** Why `mode` cannot run here, or null. */
export function missingPrerequisite(mode){
  if(mode === "distributed" && !process.env.TEST_MONGODB_URL){
    return "distributed mode needs a MongoDB: set TEST_MONGODB_URL (e.g. mongodb://127.0.0.1:27018/?directConnection=true), " +
      "or run only the all-in-one mode with E2E_MODES=allinone"
  }
  return null
}

export class ServerSet {
  /**
   * @param {string} mode - "allinone" | "distributed"
   * @param {object} [opts]
   * @param {number} [opts.gateways] - gateways of a distributed set (default 1; all-in-one has one)
   * @param {number} [opts.chatReplicas] - chat-svc replicas of a distributed set (default 1); replica 0 is
   *   "chat-svc" (the one presence-svc, signaling-svc and the CLI talk gRPC to), the others "chat-svc1", ...
   * @param {string} [opts.natsUrl] - NATS of a distributed set (default NATS_URL, else nats://127.0.0.1:4222)
   * @param {string} [opts.redisUrl] - Redis of a distributed set (default REDIS_URL, else redis://127.0.0.1:6379)
   * @param {string} [opts.mongoUrl] - MongoDB base URL of a distributed set (default TEST_MONGODB_URL); the set's
   *   database `e2e_<random>` is put into it
   */
  constructor(mode, {gateways = 1, chatReplicas = 1, natsUrl, redisUrl, mongoUrl, push = false} = {}){
    this.mode = mode
    this.gatewayCount = mode === "distributed" ? gateways : 1
    if(!(Number.isInteger(this.gatewayCount) && this.gatewayCount >= 1)){ throw new Error(`gateways: ${gateways}`) }
    this.chatReplicaCount = mode === "distributed" ? chatReplicas : 1
    if(!(Number.isInteger(this.chatReplicaCount) && this.chatReplicaCount >= 1)){ throw new Error(`chatReplicas: ${chatReplicas}`) }
    this.natsUrlOpt = natsUrl
    this.redisUrlOpt = redisUrl
    this.mongoBaseOpt = mongoUrl
    /** distributed: also start push-svc (its JetStream stream lives on the set's NATS: give a
     * `natsUrl` of a server the test owns, so no stream is left behind on the shared one) */
    this.pushOpt = push
    this.jwtSecret = `e2e-secret-${randomBytes(16).toString("hex")}`
    /** GRPC_AUTH_TOKEN of every process and of the CLI (gRPC refuses calls without it) */
    this.grpcToken = `e2e-grpc-${randomBytes(16).toString("hex")}`
    /** TURN_SECRET of the set (coturn REST credentials); a test's env may replace it */
    this.turnSecret = `e2e-turn-${randomBytes(16).toString("hex")}`
    /** the call settings the set runs with (CALL_DEFAULTS and the test's overrides) */
    this.callEnv = null
    this.procs = []
    /** the socket-facing processes (the all-in-one server, or each gateway): {name, nodeName, proc, port} */
    this.gateways = []
    this.clients = new Set()
    this.tokens = new Map()
    this.dataDir = null
    /** port of HTTP + WebSocket + gRPC of the (first) socket-facing process (all-in-one or gateway 0) */
    this.port = null
    /** port of the process serving the conversation gRPC API */
    this.grpcPort = null
    /** distributed: port of signaling-svc (admin HTTP + gRPC) */
    this.signalingPort = null
    /** distributed: port of huddle-svc (admin HTTP + gRPC) */
    this.huddlePort = null
    /** distributed, with `push`: port of push-svc (admin HTTP + gRPC) */
    this.pushPort = null
    this.cliEnv = null
    /** distributed: Redis URL and key prefix of this set (its keys are deleted at stop) */
    this.redisUrl = null
    this.redisPrefix = null
    /** SHUTDOWN_DRAIN_SECS of the set's processes (the server default unless given) */
    this.drainSecs = 10
  }

  /** How long a process may take to exit after SIGTERM: its drain window plus E2E_STOP_TIMEOUT_MS. */
  get stopBoundMs(){ return this.drainSecs * 1000 + STOP_TIMEOUT_MS }

  get httpUrl(){ return `http://127.0.0.1:${this.port}` }
  /** endpoint for the phoenix client (it appends /websocket) */
  get socketUrl(){ return this.socketUrlFor(0) }
  get grpcAddr(){ return `http://127.0.0.1:${this.grpcPort}` }
  /** every process of the set with its admin base URL */
  get admins(){ return this.procs.map((p) => ({name: p.name, url: `http://127.0.0.1:${p.port}`})) }

  #gateway(index){
    const gw = this.gateways[index]
    if(!gw){ throw new Error(`no gateway ${index} in this ${this.mode} set (it has ${this.gateways.length})`) }
    return gw
  }

  /** The phoenix endpoint of gateway `index` (all-in-one: only 0). */
  socketUrlFor(index = 0){ return `ws://127.0.0.1:${this.#gateway(index).port}/socket` }

  /** The output (log tail) of every process, for failure messages. */
  logs(){
    return this.procs.map((p) => `----- ${p.name} (${p.proc.describeExit()}) -----\n${p.proc.output}`).join("\n")
  }

  /**
   * Environment: `extraEnv` goes to every process. Tests default NODE_HEARTBEAT_SECS to 1 and
   * the call settings to CALL_DEFAULTS (+ TURN_SECRET = turnSecret);
   * PRESENCE_GRACE_SECS / PRESENCE_NODE_TTL_SECS keep the servers' defaults unless given.
   */
  async start(extraEnv = {}){
    const quckchat = requireBin("quckchat")
    this.dataDir = mkdtempSync(path.join(tmpdir(), "quckchat-e2e-"))
    liveDirs.add(this.dataDir)
    const common = {
      ...baseEnv(),
      BIND_ADDRESS: "127.0.0.1",
      JWT_SECRET: this.jwtSecret,
      GRPC_AUTH_TOKEN: this.grpcToken,
      DATA_DIR: this.dataDir,
      NODE_HEARTBEAT_SECS: "1",
      ...CALL_DEFAULTS,
      TURN_SECRET: this.turnSecret,
      ...extraEnv,
    }
    this.turnSecret = common.TURN_SECRET
    this.callEnv = Object.fromEntries([...Object.keys(CALL_DEFAULTS), "TURN_SECRET", "STUN_SERVER_URL"]
      .filter((k) => common[k] !== undefined).map((k) => [k, common[k]]))
    this.cliEnv = {...baseEnv(), JWT_SECRET: this.jwtSecret, GRPC_AUTH_TOKEN: this.grpcToken}
    if(common.SHUTDOWN_DRAIN_SECS !== undefined){ this.drainSecs = Number(common.SHUTDOWN_DRAIN_SECS) }

    if(this.mode === "allinone"){
      const nodeName = randomId("e2e-aio-", 4)
      const {proc, port} = await startOnFreePort("quckchat", quckchat, [], (p) => ({...common, NODE_NAME: nodeName, PORT: String(p)}))
      this.procs.push({name: "quckchat", proc, port})
      this.gateways.push({name: "quckchat", nodeName, proc, port})
      this.port = port
      this.grpcPort = port
      return this
    }

    if(this.mode === "distributed"){
      const missing = this.mongoBaseOpt ? null : missingPrerequisite(this.mode)
      if(missing){ throw new Error(missing) }
      const mongoBase = this.mongoBaseOpt ?? process.env.TEST_MONGODB_URL
      const gatewayBin = requireBin("gateway")
      const chatBin = requireBin("chat-svc")
      const presenceBin = requireBin("presence-svc")
      const signalingBin = requireBin("signaling-svc")
      const huddleBin = requireBin("huddle-svc")
      const suffix = randomId("e2e_", 5)
      const dist = {
        ...common,
        NATS_URL: this.natsUrlOpt ?? process.env.NATS_URL ?? "nats://127.0.0.1:4222",
        NATS_SUBJECT_PREFIX: suffix,
      }
      this.mongoUrl = mongoUrlWithDb(mongoBase, suffix)
      this.natsPrefix = suffix
      this.natsUrl = dist.NATS_URL
      this.redisUrl = this.redisUrlOpt ?? process.env.REDIS_URL ?? "redis://127.0.0.1:6379"
      this.redisPrefix = suffix
      // chat-svc and presence-svc call each other over gRPC: both ports are chosen first
      const [chat, presence] = await startGroupOnFreePorts([
        {name: "chat-svc", file: chatBin, envFor: ([chatPort, presencePort]) => ({
          ...dist, PORT: String(chatPort), MONGODB_URL: this.mongoUrl,
          PRESENCE_GRPC_URL: `http://127.0.0.1:${presencePort}`,
        })},
        {name: "presence-svc", file: presenceBin, envFor: ([chatPort, presencePort]) => ({
          ...dist, PORT: String(presencePort), REDIS_URL: this.redisUrl, REDIS_KEY_PREFIX: this.redisPrefix,
          CHAT_GRPC_URL: `http://127.0.0.1:${chatPort}`,
        })},
      ])
      this.procs.push(chat, presence)
      this.grpcPort = chat.port
      // further chat-svc replicas share the bus queue group, the database and presence-svc
      for(let i = 1; i < this.chatReplicaCount; i++){
        const name = `chat-svc${i}`
        const {proc, port} = await startOnFreePort(name, chatBin, [], (p) => ({
          ...dist, PORT: String(p), MONGODB_URL: this.mongoUrl, PRESENCE_GRPC_URL: `http://127.0.0.1:${presence.port}`,
        }))
        this.procs.push({name, proc, port})
      }
      // signaling-svc and the gateways start side by side; a failure stops whatever did start
      const startGateway = async (i) => {
        const name = this.gatewayCount === 1 ? "gateway" : `gateway${i}`
        const nodeName = `${suffix}-gw${i}`
        const gw = await startOnFreePort(name, gatewayBin, [], (p) => ({...dist, NODE_NAME: nodeName, PORT: String(p)}))
        return {name, nodeName, ...gw}
      }
      const startHuddle = async () => {
        // live rooms under `<suffix>:huddle:*`; huddles in the set's database
        const {proc, port} = await startOnFreePort("huddle-svc", huddleBin, [], (p) => ({
          ...dist, PORT: String(p), REDIS_URL: this.redisUrl, REDIS_KEY_PREFIX: `${this.redisPrefix}:huddle`,
          MONGODB_URL: this.mongoUrl, CHAT_GRPC_URL: `http://127.0.0.1:${chat.port}`,
        }))
        return {name: "huddle-svc", proc, port}
      }
      // huddle-svc first: signaling-svc creates huddles there (call:escalate)
      const huddle = await startHuddle()
      this.procs.push(huddle)
      if(this.pushOpt){
        // the sent log under `<suffix>:push:*`; devices in the set's database
        const {proc, port} = await startOnFreePort("push-svc", requireBin("push-svc"), [], (p) => ({
          ...dist, PORT: String(p), REDIS_URL: this.redisUrl, REDIS_KEY_PREFIX: `${this.redisPrefix}:push`,
          MONGODB_URL: this.mongoUrl, CHAT_GRPC_URL: `http://127.0.0.1:${chat.port}`,
          PRESENCE_GRPC_URL: `http://127.0.0.1:${presence.port}`,
        }))
        this.procs.push({name: "push-svc", proc, port})
        this.pushPort = port
      }
      const startSignaling = async () => {
        // live calls under `<suffix>:signaling:*` (deleted with the set's keys); the call log in the set's database
        const {proc, port} = await startOnFreePort("signaling-svc", signalingBin, [], (p) => ({
          ...dist, PORT: String(p), REDIS_URL: this.redisUrl, REDIS_KEY_PREFIX: `${this.redisPrefix}:signaling`,
          MONGODB_URL: this.mongoUrl, CHAT_GRPC_URL: `http://127.0.0.1:${chat.port}`,
          HUDDLE_GRPC_URL: `http://127.0.0.1:${huddle.port}`,
        }))
        return {name: "signaling-svc", proc, port}
      }
      const results = await Promise.allSettled([startSignaling(), ...Array.from({length: this.gatewayCount}, (_, i) => startGateway(i))])
      const failed = results.find((r) => r.status === "rejected")
      const [signaling, ...gateways] = results.map((r) => r.status === "fulfilled" ? r.value : null)
      // the services behind the gateways are stopped after them (stop() goes in reverse)
      if(signaling){ this.procs.push(signaling) }
      for(const gw of gateways.filter(Boolean)){ this.procs.push({name: gw.name, proc: gw.proc, port: gw.port}) }
      if(failed){ throw failed.reason }
      this.signalingPort = signaling.port
      this.huddlePort = huddle.port
      for(const gw of gateways){ this.gateways.push(gw) }
      this.port = gateways[0].port
      return this
    }

    throw new Error(`unknown mode ${this.mode}`)
  }

  /** The process entry {name, proc, port} named `name` (e.g. "chat-svc1", "presence-svc", "gateway2"). */
  process(name){
    const p = this.procs.find((q) => q.name === name)
    if(!p){ throw new Error(`no process ${name} in this set (it has ${this.procs.map((q) => q.name).join(", ")})`) }
    return p
  }

  /**
   * Sends `signal` to process `name` and waits (bounded by `timeoutMs`) until it is gone.
   * Resolves with the time the signal was sent (Date.now()). SIGTERM uses the drain bound.
   */
  async signal(name, signal = "SIGKILL", timeoutMs = signal === "SIGKILL" ? 5000 : this.stopBoundMs){
    const p = this.process(name)
    if(p.proc.exit){ throw new Error(`${name} already ${p.proc.describeExit()}`) }
    const at = Date.now()
    if(signal === "SIGTERM"){ p.proc.terminate() } else { p.proc.child.kill(signal) }
    await withTimeout(p.proc.exited, timeoutMs, `${name} to exit after ${signal}`)
    return at
  }

  /**
   * Starts process `name` again (after it exited) with the same binary, environment and port,
   * and waits until /health/ready answers. Resolves with the time it became ready.
   */
  async restart(name){
    const p = this.process(name)
    if(!p.proc.exit){ throw new Error(`restart ${name}: it is still running`) }
    const {file, args, env} = p.proc.spec
    const proc = new ManagedProcess(name, file, args, env)
    p.proc = proc
    const gw = this.gateways.find((g) => g.name === name)
    if(gw){ gw.proc = proc }
    await waitReady(proc, `http://127.0.0.1:${p.port}/health/ready`)
    return Date.now()
  }

  /**
   * SIGKILLs gateway `index` (distributed only) and waits (bounded) until it is gone.
   * Resolves with the time of the kill (Date.now()).
   */
  async killGateway(index){
    if(this.mode !== "distributed"){ throw new Error("killGateway: only distributed sets have separate gateways") }
    const gw = this.#gateway(index)
    if(gw.proc.exit){ throw new Error(`${gw.name} already ${gw.proc.describeExit()}`) }
    const at = Date.now()
    gw.proc.child.kill("SIGKILL")
    await withTimeout(gw.proc.exited, 5000, `${gw.name} to exit after SIGKILL`)
    return at
  }

  /**
   * Sends SIGTERM to gateway `index` (all-in-one: the server) and returns
   * `{at, proc}`: the time it was sent and the process (`proc.exited` resolves with its exit).
   * The set's stop() then leaves that process to the test.
   */
  terminateGateway(index = 0){
    const gw = this.#gateway(index)
    if(gw.proc.exit){ throw new Error(`${gw.name} already ${gw.proc.describeExit()}`) }
    return {at: gw.proc.terminate(), proc: gw.proc}
  }

  /** A JWT for `userId` from `quckchat token` (cached per user). */
  async token(userId, {ttl = "1h"} = {}){
    const key = `${userId}\u0000${ttl}`
    if(!this.tokens.has(key)){
      const out = await runCli(binPath("quckchat"), ["token", userId, "--ttl", ttl], {env: this.cliEnv})
      const token = out.split(/\s+/).pop()
      if(!/^[\w-]+\.[\w-]+\.[\w-]+$/.test(token)){ throw new Error(`quckchat token printed no JWT: ${JSON.stringify(out)}`) }
      this.tokens.set(key, token)
    }
    return this.tokens.get(key)
  }

  /** A JWT minted in JS with this set's secret (ttlSecs < 0: expired). */
  mintToken(userId, ttlSecs = 3600, claims = {}){
    return mintUserToken(userId, this.jwtSecret, ttlSecs, claims)
  }

  /** Upserts a conversation's members through the gRPC API (`quckchat conversation put`). */
  async putConversation(conversationId, members){
    await runCli(binPath("quckchat"),
      ["conversation", "put", conversationId, "--members", members.join(","), "--addr", this.grpcAddr],
      {env: this.cliEnv})
  }

  /**
   * A connected phoenix Socket for `userId` (tracked; closed by closeClients()).
   * @param {object} [opts] - {authStyle: "param"|"subprotocol", token, socketOpts, params,
   *   gateway: index of the gateway to connect to (default 0)}
   */
  async connect(userId, opts = {}){
    const token = opts.token ?? await this.token(userId)
    const socket = await connectPhoenix(this.socketUrlFor(opts.gateway ?? 0), token, opts)
    this.clients.add({kind: "phoenix", socket})
    return socket
  }

  /** ws:// URL of the raw WebSocket endpoint with the given query (vsn defaults to 2.0.0). */
  rawUrl(query = {}, gateway = 0){
    const q = new URLSearchParams()
    for(const [k, v] of Object.entries({vsn: "2.0.0", ...query})){
      if(v !== undefined && v !== null){ q.set(k, v) }
    }
    const qs = q.toString()
    return `ws://127.0.0.1:${this.#gateway(gateway).port}/socket/websocket${qs ? "?" + qs : ""}`
  }

  /**
   * A raw, open WebSocket for `userId` (tracked).
   * @param {object} [opts] - {vsn, authStyle: "param"|"subprotocol", token, query, gateway}
   */
  async raw(userId, {vsn = "2.0.0", authStyle = "param", token, query = {}, timeoutMs, gateway = 0} = {}){
    token = token ?? await this.token(userId)
    let client
    if(authStyle === "param"){
      client = await RawClient.connect(this.rawUrl({vsn, token, ...query}, gateway), {timeoutMs})
    } else {
      client = await RawClient.connect(this.rawUrl({vsn, ...query}, gateway), {protocols: ["phoenix", authTokenProtocol(token)], timeoutMs})
    }
    this.clients.add({kind: "raw", client})
    return client
  }

  /** Closes every client opened through this set (bounded). */
  async closeClients(){
    const all = [...this.clients]
    this.clients.clear()
    await Promise.all(all.map(async (c) => {
      if(c.kind === "phoenix"){ await disconnectPhoenix(c.socket) }
      else { c.client.close(); await withTimeout(c.client.closed, 1000, "raw close").catch(() => c.client.terminate()) }
    }))
  }

  /**
   * Stops everything. Every process still running must exit with code 0 within
   * `stopBoundMs` of its SIGTERM; otherwise it is SIGKILLed and, after the clean-up, this
   * rejects naming it (with its log tail). Processes that had already exited (killGateway,
   * or a test's own SIGTERM) are that test's business.
   */
  async stop(){
    await this.closeClients().catch(() => {})
    // gateway first, then the services behind it
    const unclean = []
    for(const p of [...this.procs].reverse()){
      const exit = await p.proc.stop(this.stopBoundMs)
      const why = exit.before ? null : uncleanExit(exit)
      if(why){ unclean.push(`${p.name} ${why}`) }
    }
    try {
      await this.#cleanUp()
    } finally {
      if(unclean.length > 0){
        throw new Error(`unclean shutdown (drain window ${this.drainSecs} s + ${STOP_TIMEOUT_MS} ms): ${unclean.join("; ")}\n${this.logs()}`)
      }
    }
  }

  async #cleanUp(){
    if(this.dataDir){
      rmSync(this.dataDir, {recursive: true, force: true})
      liveDirs.delete(this.dataDir)
    }
    if(this.mongoUrl){ await dropDatabase(this.mongoUrl) }
    if(this.redisPrefix){ await deleteRedisKeys(this.redisUrl, `${this.redisPrefix}:*`) }
  }
}

/**
 * Drops a distributed set's database so runs leave nothing behind. Uses pymongo, which
 * scripts/deps.sh installs with SecantusDB; a failure is reported, not fatal.
 */
async function dropDatabase(url){
  const code = "import sys, pymongo; c = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=5000); " +
    "c.drop_database(c.get_default_database().name)"
  await new Promise((resolve) => {
    const p = spawn(process.env.PYTHON ?? "python3", ["-c", code, url], {stdio: ["ignore", "ignore", "pipe"]})
    let err = ""
    p.stderr.on("data", (d) => { err += d })
    const timer = setTimeout(() => p.kill("SIGKILL"), 15_000)
    p.on("close", (code) => {
      clearTimeout(timer)
      if(code !== 0){ process.stderr.write(`e2e: could not drop ${url}: ${err.trim().split("\n").pop()}\n`) }
      resolve()
    })
  })
}

/** Deletes a distributed set's Redis keys (after its processes stopped); a failure is reported, not fatal. */
async function deleteRedisKeys(url, pattern){
  try {
    await redisDeletePattern(url, pattern)
  } catch (err){
    process.stderr.write(`e2e: could not delete Redis keys ${pattern} at ${url}: ${err.message}\n`)
  }
}

/** Starts a server set for `mode`; on failure everything started so far is stopped. */
export async function startServerSet(mode, {env = {}, gateways = 1, ...opts} = {}){
  const set = new ServerSet(mode, {gateways, ...opts})
  try {
    return await set.start(env)
  } catch (err){
    await set.stop().catch(() => {})
    throw err
  }
}

/**
 * Registers before/after hooks in the current describe: a server set for `mode` is started
 * before its tests and stopped after them; clients are closed after each test. Returns a
 * proxy to the set (usable inside tests once it started).
 */
export function useServerSet(mode, {env = {}, gateways = 1, ...opts} = {}){
  let set = null
  const missing = missingPrerequisite(mode)
  if(missing){
    // every test of the suite fails with the reason (counted as failures, not as cancellations)
    return new Proxy({}, {get(){ throw new Error(missing) }})
  }
  before(async () => { set = await startServerSet(mode, {env, gateways, ...opts}) }, {timeout: READY_TIMEOUT_MS * 2 + 20_000})
  afterEach(async () => { await set?.closeClients() }, {timeout: 10_000})
  // every process may use its whole drain window (stop() fails the suite if one needs more)
  const drainMs = Number(env.SHUTDOWN_DRAIN_SECS ?? process.env.SHUTDOWN_DRAIN_SECS ?? 10) * 1000
  // distributed: the gateways, chat-svc replicas, presence-svc, signaling-svc, huddle-svc (and push-svc)
  const processes = mode === "distributed" ? gateways + (opts.chatReplicas ?? 1) + 3 + (opts.push ? 1 : 0) : 1
  after(async () => { await set?.stop() }, {timeout: processes * (drainMs + STOP_TIMEOUT_MS + 2000) + 30_000})
  return new Proxy({}, {
    get(_target, prop){
      if(!set){ throw new Error(`server set for ${mode} is not running (its start failed)`) }
      const value = set[prop]
      return typeof value === "function" ? value.bind(set) : value
    },
  })
}

/** Fresh ids, unique per call: users and conversations never collide across tests. */
export const ids = {
  user: (name = "u") => randomId(`${name}_`, 4),
  conv: (name = "c") => randomId(`${name}-`, 5),
}
