// A tiny Redis client (RESP2 over node:net) for cleaning up after a server set: SCAN the keys
// under a prefix and DEL them. Only what the harness needs; every wait is bounded.
import {connect} from "node:net"

import {withTimeout} from "./util.js"

const encode = (args) => {
  let out = `*${args.length}\r\n`
  for(const a of args){
    const s = String(a)
    out += `$${Buffer.byteLength(s)}\r\n${s}\r\n`
  }
  return out
}

/** Parses one RESP value from `buf` at `pos`: {value, pos} or null when incomplete. */
function parse(buf, pos){
  const eol = buf.indexOf("\r\n", pos)
  if(eol < 0){ return null }
  const type = String.fromCharCode(buf[pos])
  const line = buf.toString("utf8", pos + 1, eol)
  const after = eol + 2
  switch(type){
    case "+": return {value: line, pos: after}
    case "-": return {value: new Error(`redis: ${line}`), pos: after}
    case ":": return {value: Number(line), pos: after}
    case "$": {
      const len = Number(line)
      if(len < 0){ return {value: null, pos: after} }
      if(buf.length < after + len + 2){ return null }
      return {value: buf.toString("utf8", after, after + len), pos: after + len + 2}
    }
    case "*": {
      const n = Number(line)
      if(n < 0){ return {value: null, pos: after} }
      const items = []
      let p = after
      for(let i = 0; i < n; i++){
        const r = parse(buf, p)
        if(!r){ return null }
        items.push(r.value)
        p = r.pos
      }
      return {value: items, pos: p}
    }
    default: throw new Error(`redis: unexpected reply type ${JSON.stringify(type)}`)
  }
}

class RespClient {
  constructor(socket){
    this.socket = socket
    this.buf = Buffer.alloc(0)
    this.waiting = []
    socket.on("data", (chunk) => {
      this.buf = Buffer.concat([this.buf, chunk])
      for(;;){
        const r = this.waiting.length ? parse(this.buf, 0) : null
        if(!r){ break }
        this.buf = this.buf.subarray(r.pos)
        const w = this.waiting.shift()
        if(r.value instanceof Error){ w.reject(r.value) } else { w.resolve(r.value) }
      }
    })
    const fail = (err) => { for(const w of this.waiting.splice(0)){ w.reject(err) } }
    socket.on("error", fail)
    socket.on("close", () => fail(new Error("redis connection closed")))
  }

  command(...args){
    return withTimeout(new Promise((resolve, reject) => {
      this.waiting.push({resolve, reject})
      this.socket.write(encode(args))
    }), 5000, `redis ${args[0]}`)
  }

  close(){ this.socket.destroy() }
}

/** Opens a connection to a redis:// URL (host, port, optional password and db). */
export async function redisConnect(url){
  const u = new URL(url)
  if(u.protocol !== "redis:"){ throw new Error(`only redis:// URLs are supported here: ${url}`) }
  const socket = connect({host: u.hostname || "127.0.0.1", port: Number(u.port || 6379)})
  await withTimeout(new Promise((resolve, reject) => {
    socket.once("connect", resolve)
    socket.once("error", reject)
  }), 5000, `redis connect ${u.host}`)
  const client = new RespClient(socket)
  try {
    if(u.password){
      const user = decodeURIComponent(u.username)
      const pass = decodeURIComponent(u.password)
      await (user ? client.command("AUTH", user, pass) : client.command("AUTH", pass))
    }
    const db = u.pathname.replace(/^\//, "")
    if(db){ await client.command("SELECT", db) }
  } catch (err){
    client.close()
    throw err
  }
  return client
}

/** Deletes every key matching `pattern` (SCAN + DEL); resolves with how many were deleted. */
export async function redisDeletePattern(url, pattern){
  const client = await redisConnect(url)
  try {
    let cursor = "0"
    let deleted = 0
    do {
      const [next, keys] = await client.command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
      cursor = next
      if(keys.length){ deleted += await client.command("DEL", ...keys) }
    } while(cursor !== "0")
    return deleted
  } finally {
    client.close()
  }
}

/** Keys matching `pattern` (tests and leak checks). */
export async function redisKeys(url, pattern){
  const client = await redisConnect(url)
  try {
    const all = []
    let cursor = "0"
    do {
      const [next, keys] = await client.command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
      cursor = next
      all.push(...keys)
    } while(cursor !== "0")
    return all
  } finally {
    client.close()
  }
}
