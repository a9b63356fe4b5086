// A frame-level WebSocket client (npm `ws`) for tests the phoenix client cannot express:
// malformed frames, exact frame contents, vsn 1.0.0 object frames, upgrade refusals.
import WebSocket from "ws"

import {withTimeout} from "./util.js"

const DEFAULT_WAIT_MS = 5000

/**
 * Parses one received message into
 * `{join_ref, ref, topic, event, payload, raw, text}` (raw = the parsed JSON, array or object).
 * Binary messages give `{binary: true, data}`, unparsable text `{invalid: true, text}`.
 */
export function parseFrame(data, isBinary){
  if(isBinary){ return {binary: true, data} }
  const text = data.toString("utf8")
  let raw
  try { raw = JSON.parse(text) } catch { return {invalid: true, text} }
  if(Array.isArray(raw)){
    const [join_ref, ref, topic, event, payload] = raw
    return {join_ref, ref, topic, event, payload, raw, text}
  }
  if(raw && typeof raw === "object"){
    const {join_ref, ref, topic, event, payload} = raw
    return {join_ref, ref, topic, event, payload, raw, text}
  }
  return {invalid: true, text, raw}
}

const describeFrame = (f) => f.text ?? (f.binary ? `<binary ${f.data.length} bytes>` : JSON.stringify(f))

export class RawClient {
  /**
   * @param {string} url - full ws:// URL including /socket/websocket and query
   * @param {object} [opts]
   * @param {string[]} [opts.protocols] - Sec-WebSocket-Protocol values
   * @param {number} [opts.maxPayload] - client side max message size
   */
  constructor(url, {protocols, maxPayload} = {}){
    this.url = url
    this.ws = new WebSocket(url, protocols, {maxPayload: maxPayload ?? 16 * 1024 * 1024})
    /** every frame ever received, in order */
    this.frames = []
    /** received frames not yet taken by next() */
    this.pending = []
    this.waiters = []
    this.closeInfo = null
    this.errors = []
    this.opened = new Promise((resolve, reject) => {
      this.ws.once("open", resolve)
      this.ws.once("unexpected-response", (req, res) => {
        res.resume()
        reject(Object.assign(new Error(`upgrade refused with HTTP ${res.statusCode}`), {statusCode: res.statusCode}))
        req.destroy()
      })
      this.ws.once("close", (code) => reject(new Error(`closed before open (code ${code})`)))
      this.ws.once("error", reject)
    })
    this.opened.catch(() => {})
    this.closed = new Promise((resolve) => {
      this.ws.on("close", (code, reason) => {
        this.closeInfo = {code, reason: reason.toString("utf8"), at: Date.now()}
        resolve(this.closeInfo)
        for(const w of this.waiters.splice(0)){
          w.reject(new Error(`socket closed (code ${code}) while waiting for ${w.what}`))
        }
      })
    })
    this.ws.on("error", (err) => { this.errors.push(err) })
    this.ws.on("message", (data, isBinary) => this.#onFrame(parseFrame(data, isBinary)))
  }

  /** Opens a client and waits (bounded) until the upgrade succeeded. */
  static async connect(url, opts = {}){
    const client = new RawClient(url, opts)
    try {
      await withTimeout(client.opened, opts.timeoutMs ?? DEFAULT_WAIT_MS, `websocket open ${url}`)
    } catch (err){
      client.terminate()
      throw err
    }
    return client
  }

  get protocol(){ return this.ws.protocol }
  get isOpen(){ return this.ws.readyState === WebSocket.OPEN }

  #onFrame(frame){
    this.frames.push(frame)
    const idx = this.waiters.findIndex((w) => w.pred(frame))
    if(idx >= 0){
      const [w] = this.waiters.splice(idx, 1)
      w.resolve(frame)
    } else {
      this.pending.push(frame)
    }
  }

  /** Sends a frame: strings as-is (text frame), Buffers as binary, anything else as JSON text. */
  send(frame){
    if(typeof frame === "string"){ this.ws.send(frame) }
    else if(Buffer.isBuffer(frame) || frame instanceof ArrayBuffer){ this.ws.send(frame, {binary: true}) }
    else { this.ws.send(JSON.stringify(frame)) }
  }

  /**
   * Takes the first not-yet-taken frame matching `pred`, waiting up to `timeoutMs` for it.
   */
  next(pred = () => true, {timeoutMs = DEFAULT_WAIT_MS, what = "a frame"} = {}){
    const idx = this.pending.findIndex(pred)
    if(idx >= 0){ return Promise.resolve(this.pending.splice(idx, 1)[0]) }
    if(this.closeInfo){
      return Promise.reject(new Error(`socket already closed (code ${this.closeInfo.code}) while waiting for ${what}`))
    }
    let waiter
    const p = new Promise((resolve, reject) => {
      waiter = {pred, resolve, reject, what}
      this.waiters.push(waiter)
    })
    return withTimeout(p, timeoutMs, `${what}; received so far: ${this.frames.slice(-5).map(describeFrame).join(" | ") || "nothing"}`)
      .finally(() => {
        const i = this.waiters.indexOf(waiter)
        if(i >= 0){ this.waiters.splice(i, 1) }
      })
  }

  /** The phx_reply with the given ref (and topic, when given). */
  reply(ref, {topic, timeoutMs} = {}){
    return this.next(
      (f) => f.event === "phx_reply" && f.ref === ref && (topic === undefined || f.topic === topic),
      {timeoutMs, what: `phx_reply to ref ${JSON.stringify(ref)}`}
    )
  }

  /** The next frame with the given event (and topic, when given). */
  event(event, {topic, timeoutMs} = {}){
    return this.next(
      (f) => f.event === event && (topic === undefined || f.topic === topic),
      {timeoutMs, what: `event ${event}${topic ? " on " + topic : ""}`}
    )
  }

  /** Waits `ms`, then returns (and takes) every pending frame matching `pred`. */
  async drain(ms, pred = () => true){
    await new Promise((r) => setTimeout(r, ms))
    const taken = this.pending.filter(pred)
    this.pending = this.pending.filter((f) => !pred(f))
    return taken
  }

  /** Sends a vsn 2.0.0 push `[join_ref, ref, topic, event, payload]`. */
  push(joinRef, ref, topic, event, payload = {}){
    this.send([joinRef, ref, topic, event, payload])
  }

  /** Joins `topic` with join_ref = ref = `ref` and returns the reply frame. */
  async join(topic, ref, payload = {}, opts = {}){
    this.push(ref, ref, topic, "phx_join", payload)
    return this.reply(ref, {topic, ...opts})
  }

  /** Sends a heartbeat with `ref` and returns its reply frame. */
  async heartbeat(ref, opts = {}){
    this.push(null, ref, "phoenix", "heartbeat", {})
    return this.reply(ref, {topic: "phoenix", ...opts})
  }

  /** Waits (bounded) for the server to close the socket. */
  waitClosed(timeoutMs = DEFAULT_WAIT_MS){
    return withTimeout(this.closed, timeoutMs, "the server to close the socket")
  }

  close(){
    if(this.ws.readyState === WebSocket.OPEN){ this.ws.close(1000) }
    else { this.terminate() }
  }

  terminate(){
    try { this.ws.terminate() } catch { /* already gone */ }
  }
}

/**
 * Attempts a WebSocket upgrade and reports what happened, without throwing:
 * `{opened: true, protocol}` or `{opened: false, statusCode}` (statusCode from the
 * 'unexpected-response' event) or `{opened: false, error}`.
 */
export function tryUpgrade(url, {protocols, timeoutMs = DEFAULT_WAIT_MS} = {}){
  let timer
  const result = new Promise((resolve) => {
    const ws = new WebSocket(url, protocols)
    timer = setTimeout(() => { resolve({opened: false, error: "timeout"}); ws.terminate() }, timeoutMs)
    ws.on("error", (error) => resolve({opened: false, error: error.message}))
    ws.once("unexpected-response", (req, res) => {
      res.resume()
      resolve({opened: false, statusCode: res.statusCode, headers: res.headers})
      req.destroy()
    })
    ws.once("open", () => {
      resolve({opened: true, protocol: ws.protocol})
      ws.close(1000)
    })
  })
  return result.finally(() => clearTimeout(timer))
}
