// Helpers around the official `phoenix` JS client: promise-wrapped joins and pushes with
// bounded waits, and event inboxes.
import {Socket} from "phoenix"
import WebSocket from "ws"

import {withTimeout, sleep} from "./util.js"

export const DEFAULT_REPLY_MS = 5000

/**
 * Creates a phoenix Socket for `endpoint` (e.g. ws://127.0.0.1:4000/socket) and waits until it
 * is open. Node 20 has no global WebSocket, so the `ws` package is the transport.
 *
 * @param {string} endpoint
 * @param {string} token - JWT
 * @param {object} [opts]
 * @param {"param"|"subprotocol"} [opts.authStyle] - `params: {token}` or phoenix's `authToken`
 * @param {object} [opts.socketOpts] - extra options for `new Socket`
 * @param {boolean} [opts.waitOpen] - wait for the open event (default true)
 */
export async function connectPhoenix(endpoint, token, {authStyle = "param", params = {}, socketOpts = {}, waitOpen = true, timeoutMs = DEFAULT_REPLY_MS} = {}){
  const opts = {
    transport: WebSocket,
    timeout: DEFAULT_REPLY_MS,
    // failed joins in tests must not be retried behind the test's back
    rejoinAfterMs: () => 60_000,
    ...socketOpts,
    params: authStyle === "param" ? {token, ...params} : params,
  }
  if(authStyle === "subprotocol"){ opts.authToken = token }
  else if(authStyle !== "param"){ throw new Error(`unknown authStyle ${authStyle}`) }
  const socket = new Socket(endpoint, opts)
  socket.errors = []
  socket.closes = []
  /** every decoded message received, in order: {join_ref, ref, topic, event, payload, at} */
  socket.frames = []
  socket.onMessage((msg) => socket.frames.push({...msg, at: Date.now()}))
  socket.onError((err) => socket.errors.push(err))
  socket.onClose((event) => socket.closes.push({code: event?.code, reason: event?.reason, at: Date.now()}))
  if(!waitOpen){
    socket.connect()
    return socket
  }
  const opened = new Promise((resolve, reject) => {
    const refs = []
    refs.push(socket.onOpen(() => { socket.off(refs); resolve() }))
    refs.push(socket.onError((err) => {
      socket.off(refs)
      reject(new Error(`phoenix socket error before open: ${err?.message ?? err?.type ?? err}`))
    }))
  })
  socket.connect()
  try {
    await withTimeout(opened, timeoutMs, `phoenix socket to open at ${endpoint}`)
  } catch (err){
    socket.disconnect()
    throw err
  }
  return socket
}

/** Disconnects a phoenix socket and waits (bounded) until its transport is closed. */
export async function disconnectPhoenix(socket, timeoutMs = 2000){
  // a refused join leaves a pending rejoin timer, which would keep the test process alive
  for(const channel of socket.channels){ channel.rejoinTimer.reset() }
  await withTimeout(new Promise((resolve) => socket.disconnect(resolve)), timeoutMs, "phoenix disconnect")
    .catch(() => {})
}

function awaitPush(push, what, timeoutMs){
  const result = new Promise((resolve, reject) => {
    push
      .receive("ok", (response) => resolve({status: "ok", response}))
      .receive("error", (response) => resolve({status: "error", response}))
      .receive("timeout", () => reject(new Error(`no reply to ${what} within ${timeoutMs} ms (phoenix push timeout)`)))
  })
  // the guard covers pushes that never get sent (e.g. buffered on a closed socket)
  return withTimeout(result, timeoutMs + 1000, `reply to ${what}`)
}

/**
 * Joins `channel` and resolves with `{status: "ok"|"error", response}`; rejects on timeout.
 * (The sockets made by connectPhoenix do not retry a refused join within a test.)
 */
export function join(channel, timeoutMs = DEFAULT_REPLY_MS){
  return awaitPush(channel.join(timeoutMs), `phx_join ${channel.topic}`, timeoutMs)
}

/** Pushes `event` and resolves with `{status, response}`; rejects on timeout. */
export function push(channel, event, payload = {}, timeoutMs = DEFAULT_REPLY_MS){
  return awaitPush(channel.push(event, payload, timeoutMs), `${event} on ${channel.topic}`, timeoutMs)
}

/**
 * Records every `event` on `channel`. `next()` takes the next unseen one (bounded wait),
 * `items` holds all of them.
 */
export function listen(channel, event){
  const items = []
  let cursor = 0
  const waiters = []
  channel.on(event, (payload) => {
    items.push(payload)
    for(const w of waiters.splice(0)){ w() }
  })
  return {
    items,
    async next({timeoutMs = DEFAULT_REPLY_MS, where = () => true} = {}){
      const deadline = Date.now() + timeoutMs
      for(;;){
        while(cursor < items.length){
          const item = items[cursor++]
          if(where(item)){ return item }
        }
        const left = deadline - Date.now()
        if(left <= 0){
          throw new Error(`no ${event} on ${channel.topic} within ${timeoutMs} ms (got ${items.length} in total)`)
        }
        await Promise.race([new Promise((r) => waiters.push(r)), sleep(Math.min(left, 100))])
      }
    },
    /** Waits `ms` and returns the items that arrived since the last next(). */
    async quiet(ms){
      await sleep(ms)
      const rest = items.slice(cursor)
      cursor = items.length
      return rest
    },
  }
}

/** The frames `socket` received (optionally only on `topic`), one JSON array per line, for failure messages. */
export function dumpFrames(socket, topic, last = 40){
  const frames = socket.frames.filter((f) => topic === undefined || f.topic === topic).slice(-last)
  return frames.map((f) => JSON.stringify([f.join_ref, f.ref, f.topic, f.event, f.payload])).join("\n")
}
