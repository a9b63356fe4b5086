// A small TCP load balancer for tests: one loopback address in front of several backends (the
// gateways), as production puts one address in front of them. Each accepted connection goes to
// the next backend in round-robin order; a backend that refuses the TCP connection (stopped,
// not yet listening) is skipped and the next one tried; when every backend refuses, the client
// connection is closed. Bytes are piped both ways untouched (the WebSocket upgrade included), so
// a gateway's HTTP 503 while draining reaches the client as it is. Every connection is recorded
// (which backend, the client's port, when it opened and closed) for the test to check.
import {createServer, connect} from "node:net"

import {withTimeout} from "./util.js"

export class Balancer {
  /**
   * @param {{name: string, port: number, host?: string}[]} backends
   * @param {object} [opts]
   * @param {number} [opts.connectTimeoutMs] - a backend that does not accept within this is skipped
   */
  constructor(backends, {connectTimeoutMs = 1000} = {}){
    if(!backends.length){ throw new Error("Balancer: no backends") }
    this.backends = backends.map((b) => ({host: "127.0.0.1", ...b}))
    this.connectTimeoutMs = connectTimeoutMs
    this.next = 0
    this.server = null
    this.port = null
    /** every client connection: {id, clientPort, backend (name or null), openedAt, closedAt, skipped: [names that refused]} */
    this.connections = []
    /** client connections no backend accepted */
    this.rejected = 0
    this.sockets = new Set()
  }

  /** Listens on a free loopback port; resolves with this. */
  listen(){
    this.server = createServer((client) => this.#accept(client))
    return new Promise((resolve, reject) => {
      this.server.once("error", reject)
      this.server.listen(0, "127.0.0.1", () => {
        this.port = this.server.address().port
        resolve(this)
      })
    })
  }

  get address(){ return `127.0.0.1:${this.port}` }

  /** The connection record of the client whose local port is `clientPort` (the newest one). */
  byClientPort(clientPort){
    for(let i = this.connections.length - 1; i >= 0; i--){
      if(this.connections[i].clientPort === clientPort){ return this.connections[i] }
    }
    return null
  }

  /** Client connections open to backend `name` right now. */
  openTo(name){ return this.connections.filter((c) => c.backend === name && c.closedAt === null) }

  #track(socket){
    this.sockets.add(socket)
    socket.once("close", () => this.sockets.delete(socket))
  }

  #accept(client){
    this.#track(client)
    client.pause()
    client.setNoDelay(true)
    const rec = {id: this.connections.length, clientPort: client.remotePort, backend: null, openedAt: Date.now(), closedAt: null, skipped: []}
    this.connections.push(rec)
    client.once("close", () => { rec.closedAt = Date.now() })
    client.on("error", () => {})
    const start = this.next
    this.next = (this.next + 1) % this.backends.length
    const tryBackend = (k) => {
      if(client.destroyed){ return }
      if(k >= this.backends.length){
        this.rejected++
        client.destroy()
        return
      }
      const b = this.backends[(start + k) % this.backends.length]
      const upstream = connect({host: b.host, port: b.port})
      this.#track(upstream)
      upstream.setNoDelay(true)
      const timer = setTimeout(() => upstream.destroy(new Error("connect timeout")), this.connectTimeoutMs)
      const failed = () => {
        clearTimeout(timer)
        upstream.destroy()
        rec.skipped.push(b.name)
        tryBackend(k + 1)
      }
      upstream.once("error", failed)
      upstream.once("connect", () => {
        clearTimeout(timer)
        upstream.off("error", failed)
        rec.backend = b.name
        upstream.on("error", () => client.destroy())
        client.on("error", () => upstream.destroy())
        // a half-close is passed on; a full close of either side ends the other
        upstream.once("close", () => client.destroy())
        client.once("close", () => upstream.destroy())
        client.pipe(upstream)
        upstream.pipe(client)
        client.resume()
      })
    }
    tryBackend(0)
  }

  /** Stops listening and closes every connection (bounded). */
  async close(){
    if(!this.server){ return }
    const closed = new Promise((resolve) => this.server.close(() => resolve()))
    for(const s of this.sockets){ s.destroy() }
    await withTimeout(closed, 2000, "balancer to close").catch(() => {})
    this.server = null
  }
}
