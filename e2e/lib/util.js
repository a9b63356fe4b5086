// Small helpers shared by the harness and the tests. Every wait here is bounded.
import {randomBytes} from "node:crypto"

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** A short random id made of [a-z0-9], usable in conversation and user ids. */
export function randomId(prefix = "", bytes = 6){
  return `${prefix}${randomBytes(bytes).toString("hex")}`
}

/**
 * Races `promise` against a timer. On timeout rejects with an Error naming `what`.
 * The timer never keeps the process alive.
 */
export function withTimeout(promise, ms, what = "operation"){
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

/** Polls `check` (sync or async, truthy = done) every `intervalMs` until `timeoutMs`. */
export async function waitUntil(check, {timeoutMs = 5000, intervalMs = 50, what = "condition"} = {}){
  const deadline = Date.now() + timeoutMs
  let lastError
  for(;;){
    try {
      const value = await check()
      if(value){ return value }
    } catch (err){
      lastError = err
    }
    if(Date.now() >= deadline){
      const suffix = lastError ? ` (last error: ${lastError.message})` : ""
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${suffix}`)
    }
    await sleep(intervalMs)
  }
}

/** ISO-8601 UTC timestamp, e.g. 2026-11-25T17:21:53.123Z (also accepts +00:00). */
export const ISO_UTC = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]00:?00)$/
