// Fakes of the push providers for the e2e tests, on 127.0.0.1 random ports, that check what the
// real ones check (so a request they accept would be accepted by Google and Apple):
//
// - `startFakeGoogle(creds)`: one HTTP/1.1 server with
//   - the OAuth2 token endpoint (the service account's `token_uri`, POST /token): the JWT-bearer
//     grant form (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`, `assertion`), the
//     RS256 assertion verified with the service account's PUBLIC key, `iss` (client_email), `aud`
//     (token_uri), `scope` (firebase.messaging), `iat`/`exp` (now, at most an hour); issues
//     `{access_token, expires_in, token_type}`;
//   - FCM HTTP v1 (POST /v1/projects/<project>/messages:send): a bearer it issued, the body's
//     shape (`{message}` with one `token`, string `data` values, known fields, `android.priority`
//     and `android.ttl`, string `apns.headers`).
// - `startFakeApns(creds)`: HTTP/2 cleartext with prior knowledge (node:http2 `createServer`),
//   POST /3/device/<hex token>: the ES256 provider token verified with the P-256 PUBLIC key
//   (`kid` header = key id, `iss` = team id, `iat` within the hour), `apns-topic` (the bundle; the
//   bundle + `.voip` exactly when `apns-push-type: voip`), push type, priority, expiration,
//   collapse id, the JSON payload with its `aps` and size.
//
// Accepted requests are recorded (`sends`, with `at`); refused ones are kept in `rejections` with
// the reason (for failure messages). Each device token can be scripted to answer its next attempts
// with errors (`script`, `unregistered`, `tooMany`); every attempt at a token, scripted or not, is
// in `sends` with the status it got.
//
// `pushCredentials()` generates the keys (RSA 2048 service account, P-256 `.p8`) at test start;
// `credentials.env(google, apns)` is the server set's environment for them.
// `startJetStreamNats()` starts a nats-server with JetStream of the test's own (push-svc's work queue
// stream then lives and dies with it).
import http from "node:http"
import http2 from "node:http2"
import {connect as tcpConnect} from "node:net"
import {mkdtempSync, rmSync} from "node:fs"
import {tmpdir} from "node:os"
import path from "node:path"
import {generateKeyPairSync, createPublicKey, verify as cryptoVerify, randomBytes, randomUUID} from "node:crypto"

import {ManagedProcess, freePort} from "./harness.js"
import {sleep, waitUntil} from "./util.js"

export const FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
export const JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
/** the access tokens the fake issues live this long (seconds) */
const ACCESS_TOKEN_SECS = 3600
const MAX_APNS_PAYLOAD = 4096
const MAX_VOIP_PAYLOAD = 5120

// ---------------------------------------------------------------------------------------------
// credentials

/**
 * Fresh provider credentials: a Google service account (RSA 2048, PKCS#8 PEM) whose `token_uri` is
 * filled in once the fake Google runs, and an APNS `.p8` key (P-256, PKCS#8 PEM).
 */
export function pushCredentials({projectId = `quckchat-e2e-${randomBytes(3).toString("hex")}`, bundle = "chat.quck.e2e"} = {}){
  const rsa = generateKeyPairSync("rsa", {
    modulusLength: 2048,
    privateKeyEncoding: {type: "pkcs8", format: "pem"},
    publicKeyEncoding: {type: "spki", format: "pem"},
  })
  const ec = generateKeyPairSync("ec", {
    namedCurve: "prime256v1",
    privateKeyEncoding: {type: "pkcs8", format: "pem"},
    publicKeyEncoding: {type: "spki", format: "pem"},
  })
  const creds = {
    projectId,
    clientEmail: `push-e2e@${projectId}.iam.gserviceaccount.com`,
    rsaPrivatePem: rsa.privateKey,
    rsaPublicKey: createPublicKey(rsa.publicKey),
    apnsKeyId: randomBytes(5).toString("hex").toUpperCase(),
    apnsTeamId: randomBytes(5).toString("hex").toUpperCase(),
    apnsPrivatePem: ec.privateKey,
    apnsPublicKey: createPublicKey(ec.publicKey),
    bundle,
    /** the service account JSON (as the Firebase console hands it out) with `tokenUri` */
    serviceAccount(tokenUri){
      return {
        type: "service_account",
        project_id: projectId,
        private_key_id: randomBytes(20).toString("hex"),
        private_key: rsa.privateKey,
        client_email: creds.clientEmail,
        client_id: String(100000000000000000000n + BigInt(`0x${randomBytes(6).toString("hex")}`)),
        auth_uri: "https://accounts.google.com/o/oauth2/auth",
        token_uri: tokenUri,
        auth_provider_x509_cert_url: "https://www.googleapis.com/oauth2/v1/certs",
        client_x509_cert_url: `https://www.googleapis.com/robot/v1/metadata/x509/${encodeURIComponent(creds.clientEmail)}`,
        universe_domain: "googleapis.com",
      }
    },
    /** the server set's environment: FIREBASE_* / FCM_API_URL at `google`, APNS_* at `apns` */
    env(google, apns){
      return {
        FIREBASE_SERVICE_ACCOUNT: JSON.stringify(creds.serviceAccount(google.tokenUri)),
        FCM_API_URL: google.url,
        APNS_KEY_ID: creds.apnsKeyId,
        APNS_TEAM_ID: creds.apnsTeamId,
        APNS_PRIVATE_KEY: creds.apnsPrivatePem,
        APNS_TOPIC: bundle,
        APNS_URL: apns.url,
      }
    },
  }
  return creds
}

// ---------------------------------------------------------------------------------------------
// JWT

const b64urlJson = (part) => JSON.parse(Buffer.from(part, "base64url").toString("utf8"))

/**
 * Verifies a compact JWS with `publicKey`; returns {header, claims} or throws naming what is wrong.
 * `alg`: RS256 (PKCS#1 v1.5 SHA-256) or ES256 (P-256 SHA-256, the 64-byte r||s signature).
 */
export function verifyJwt(jwt, publicKey, alg){
  const parts = String(jwt).split(".")
  if(parts.length !== 3 || parts.some((p) => !/^[A-Za-z0-9_-]*$/.test(p))){ throw new Error("not a compact JWS") }
  let header, claims
  try { header = b64urlJson(parts[0]) } catch { throw new Error("header is not base64url JSON") }
  try { claims = b64urlJson(parts[1]) } catch { throw new Error("claims are not base64url JSON") }
  if(header.alg !== alg){ throw new Error(`alg ${JSON.stringify(header.alg)}, expected ${alg}`) }
  const data = Buffer.from(`${parts[0]}.${parts[1]}`)
  const sig = Buffer.from(parts[2], "base64url")
  const ok = alg === "RS256"
    ? cryptoVerify("RSA-SHA256", data, publicKey, sig)
    : sig.length === 64 && cryptoVerify("SHA256", data, {key: publicKey, dsaEncoding: "ieee-p1363"}, sig)
  if(!ok){ throw new Error(`${alg} signature does not verify with the public key`) }
  return {header, claims}
}

// ---------------------------------------------------------------------------------------------
// shared: records, scripts, waits

class Recorder {
  constructor(name){
    this.name = name
    /** every attempt at a device token: {token, status, at, ...} */
    this.sends = []
    /** requests refused for being malformed or unauthenticated: {at, path, status, reason} */
    this.rejections = []
    this.scripts = new Map()
  }

  /** Scripts the next attempts at `token`: each `{status, body, headers}` answers one, in order. */
  script(token, responses){
    const queue = this.scripts.get(token) ?? []
    queue.push(...responses)
    this.scripts.set(token, queue)
  }

  nextScripted(token){
    const queue = this.scripts.get(token)
    if(!queue || queue.length === 0){ return null }
    return queue.shift()
  }

  /** Attempts at `token` (every status), in order. */
  attempts(token){ return this.sends.filter((s) => s.token === token) }

  /** Accepted (200) pushes to `token`, in order. */
  delivered(token){ return this.attempts(token).filter((s) => s.status === 200) }

  /** Waits (bounded) until `token` has at least `n` attempts (or `delivered` ones); returns them. */
  async waitAttempts(token, n, {timeoutMs = 15_000, delivered = false} = {}){
    const list = () => delivered ? this.delivered(token) : this.attempts(token)
    await waitUntil(() => list().length >= n, {timeoutMs, intervalMs: 25,
      what: `${n} ${delivered ? "delivered pushes" : "attempts"} at ${this.name} token ${token} (has ${list().length}); ${this.describe()}`})
    return list()
  }

  /** What the fake saw, for failure messages. */
  describe(){
    const sends = this.sends.slice(-20).map((s) => `${s.token.slice(0, 16)}… ${s.status} ${s.summary ?? ""}`)
    const rejections = this.rejections.slice(-10).map((r) => `${r.status} ${r.path}: ${r.reason}`)
    return `${this.name} saw ${this.sends.length} attempts [${sends.join("; ")}], ${this.rejections.length} rejections [${rejections.join("; ")}]`
  }
}

function readBody(stream, limit = 1024 * 1024){
  return new Promise((resolve, reject) => {
    const chunks = []
    let size = 0
    stream.on("data", (c) => {
      size += c.length
      if(size > limit){ reject(new Error("body too large")); stream.destroy(); return }
      chunks.push(c)
    })
    stream.on("end", () => resolve(Buffer.concat(chunks)))
    stream.on("error", reject)
  })
}

const isPlainObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v)
const unknownKeys = (obj, known) => Object.keys(obj).filter((k) => !known.includes(k))

// ---------------------------------------------------------------------------------------------
// Google: OAuth2 token endpoint + FCM HTTP v1

/** FCM's error body: `{"error": {code, message, status, details}}` */
export function fcmError(code, status, message, details = []){
  return {error: {code, message, status, details}}
}

export const FCM_UNREGISTERED = fcmError(404, "NOT_FOUND", "Requested entity was not found.", [
  {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", errorCode: "UNREGISTERED"},
])

function fcmQuotaExceeded(){
  return fcmError(429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Send requests'.", [
    {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", errorCode: "QUOTA_EXCEEDED"},
  ])
}

const MESSAGE_FIELDS = ["name", "data", "notification", "android", "webpush", "apns", "fcm_options", "token", "topic", "condition"]
const NOTIFICATION_FIELDS = ["title", "body", "image"]
const ANDROID_FIELDS = ["collapse_key", "priority", "ttl", "restricted_package_name", "data", "notification", "fcm_options", "direct_boot_ok"]
const ANDROID_NOTIFICATION_FIELDS = ["title", "body", "icon", "color", "sound", "tag", "click_action", "body_loc_key", "body_loc_args",
  "title_loc_key", "title_loc_args", "channel_id", "ticker", "sticky", "event_time", "local_only", "notification_priority",
  "default_sound", "default_vibrate_timings", "default_light_settings", "vibrate_timings", "visibility", "notification_count",
  "light_settings", "image", "bypass_proxy_notification"]
const APNS_FIELDS = ["headers", "payload", "fcm_options", "live_activity_token"]

/** Why an FCM v1 send body is invalid (field, description), or null. */
function fcmBodyProblem(body){
  if(!isPlainObject(body)){ return ["", "the body must be a JSON object"] }
  const extra = unknownKeys(body, ["message", "validate_only"])
  if(extra.length){ return [extra[0], `Invalid JSON payload received. Unknown name "${extra[0]}"`] }
  const m = body.message
  if(!isPlainObject(m)){ return ["message", "message is required"] }
  const unknown = unknownKeys(m, MESSAGE_FIELDS)
  if(unknown.length){ return [`message.${unknown[0]}`, `Unknown name "${unknown[0]}" at 'message'`] }
  const targets = ["token", "topic", "condition"].filter((k) => m[k] !== undefined)
  if(targets.length !== 1){ return ["message", "exactly one of token, topic, condition is required"] }
  if(typeof m.token !== "string" || m.token === ""){ return ["message.token", "The registration token is not a valid FCM registration token"] }
  if(m.data !== undefined){
    if(!isPlainObject(m.data)){ return ["message.data", "data must be a map"] }
    for(const [k, v] of Object.entries(m.data)){
      if(typeof v !== "string"){ return [`message.data[${k}].value`, `Invalid value at 'message.data[${k}].value' (TYPE_STRING), ${JSON.stringify(v)}`] }
    }
  }
  if(m.notification !== undefined){
    if(!isPlainObject(m.notification)){ return ["message.notification", "notification must be an object"] }
    const bad = unknownKeys(m.notification, NOTIFICATION_FIELDS)
    if(bad.length){ return [`message.notification.${bad[0]}`, `Unknown name "${bad[0]}"`] }
    for(const [k, v] of Object.entries(m.notification)){
      if(typeof v !== "string"){ return [`message.notification.${k}`, "must be a string"] }
    }
  }
  if(m.android !== undefined){
    const a = m.android
    if(!isPlainObject(a)){ return ["message.android", "android must be an object"] }
    const bad = unknownKeys(a, ANDROID_FIELDS)
    if(bad.length){ return [`message.android.${bad[0]}`, `Unknown name "${bad[0]}"`] }
    if(a.priority !== undefined && !["normal", "high", "NORMAL", "HIGH"].includes(a.priority)){
      return ["message.android.priority", `Invalid value ${JSON.stringify(a.priority)}`]
    }
    if(a.ttl !== undefined && !(typeof a.ttl === "string" && /^\d+(\.\d{1,9})?s$/.test(a.ttl))){
      return ["message.android.ttl", `Invalid duration ${JSON.stringify(a.ttl)}`]
    }
    if(a.collapse_key !== undefined && typeof a.collapse_key !== "string"){ return ["message.android.collapse_key", "must be a string"] }
    if(a.notification !== undefined){
      if(!isPlainObject(a.notification)){ return ["message.android.notification", "must be an object"] }
      const badN = unknownKeys(a.notification, ANDROID_NOTIFICATION_FIELDS)
      if(badN.length){ return [`message.android.notification.${badN[0]}`, `Unknown name "${badN[0]}"`] }
    }
  }
  if(m.apns !== undefined){
    const a = m.apns
    if(!isPlainObject(a)){ return ["message.apns", "apns must be an object"] }
    const bad = unknownKeys(a, APNS_FIELDS)
    if(bad.length){ return [`message.apns.${bad[0]}`, `Unknown name "${bad[0]}"`] }
    if(a.headers !== undefined){
      if(!isPlainObject(a.headers)){ return ["message.apns.headers", "must be a map"] }
      for(const [k, v] of Object.entries(a.headers)){
        if(typeof v !== "string"){ return [`message.apns.headers[${k}].value`, `Invalid value (TYPE_STRING), ${JSON.stringify(v)}`] }
      }
    }
    if(a.payload !== undefined && !(isPlainObject(a.payload) && isPlainObject(a.payload.aps))){
      return ["message.apns.payload", "payload must be an object with an aps dictionary"]
    }
  }
  return null
}

/**
 * Starts the fake Google (OAuth2 token endpoint + FCM v1) for `creds` (from pushCredentials()).
 * Resolves with the fake: `url`, `tokenUri`, `tokenRequests`, `issued`, `sends` ({token, status,
 * message, at}), `rejections`, `script(token, responses)`, `unregistered(token)`,
 * `tooMany(token, retryAfterSecs)`, `waitAttempts`, `close()`.
 */
export async function startFakeGoogle(creds){
  const rec = new Recorder("FCM")
  const issued = new Map() // access token → expiry (ms)
  const tokenRequests = []
  const sockets = new Set()

  const send = (res, status, body, headers = {}) => {
    const text = JSON.stringify(body)
    res.writeHead(status, {"content-type": "application/json; charset=UTF-8", "content-length": Buffer.byteLength(text), ...headers})
    res.end(text)
  }
  const reject = (res, status, body, pathname, reason) => {
    rec.rejections.push({at: Date.now(), path: pathname, status, reason})
    send(res, status, body)
  }

  async function token(req, res, pathname){
    const type = String(req.headers["content-type"] ?? "")
    const raw = (await readBody(req)).toString("utf8")
    const oauthError = (error, description) => reject(res, 400, {error, error_description: description}, pathname, `${error}: ${description}`)
    if(!type.startsWith("application/x-www-form-urlencoded")){
      return oauthError("invalid_request", `content-type ${JSON.stringify(type)} is not application/x-www-form-urlencoded`)
    }
    const form = new URLSearchParams(raw)
    if(form.get("grant_type") !== JWT_BEARER_GRANT){ return oauthError("unsupported_grant_type", `Invalid grant_type: ${form.get("grant_type")}`) }
    const assertion = form.get("assertion")
    if(!assertion){ return oauthError("invalid_request", "Missing required parameter: assertion") }
    let claims
    try {
      ({claims} = verifyJwt(assertion, creds.rsaPublicKey, "RS256"))
    } catch (err){
      return oauthError("invalid_grant", `Invalid JWT Signature (${err.message})`)
    }
    const now = Math.floor(Date.now() / 1000)
    if(claims.iss !== creds.clientEmail){ return oauthError("invalid_grant", `iss ${JSON.stringify(claims.iss)} is not the service account ${creds.clientEmail}`) }
    if(claims.aud !== fake.tokenUri){ return oauthError("invalid_grant", `Invalid JWT: aud ${JSON.stringify(claims.aud)} is not ${fake.tokenUri}`) }
    const scopes = String(claims.scope ?? "").split(" ")
    if(!scopes.includes(FCM_SCOPE)){ return oauthError("invalid_scope", `scope ${JSON.stringify(claims.scope)} lacks ${FCM_SCOPE}`) }
    if(!Number.isInteger(claims.iat) || !Number.isInteger(claims.exp)){ return oauthError("invalid_grant", "Invalid JWT: iat and exp must be integers") }
    if(claims.iat > now + 60){ return oauthError("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe (iat in the future)") }
    if(claims.exp <= now){ return oauthError("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe (expired)") }
    if(claims.exp - claims.iat > 3600){ return oauthError("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe (exp - iat > 3600)") }
    const access = `ya29.e2e-${randomBytes(24).toString("base64url")}`
    issued.set(access, Date.now() + ACCESS_TOKEN_SECS * 1000)
    tokenRequests.push({at: Date.now(), claims})
    send(res, 200, {access_token: access, expires_in: ACCESS_TOKEN_SECS, token_type: "Bearer"}, {"cache-control": "no-cache, no-store, max-age=0, must-revalidate"})
  }

  async function fcmSend(req, res, pathname){
    const raw = (await readBody(req)).toString("utf8")
    const auth = /^Bearer (\S+)$/.exec(String(req.headers.authorization ?? ""))
    const expiry = auth && issued.get(auth[1])
    if(!expiry || expiry <= Date.now()){
      return reject(res, 401, fcmError(401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential."),
        pathname, auth ? "bearer not issued here (or expired)" : "no bearer")
    }
    if(!String(req.headers["content-type"] ?? "").startsWith("application/json")){
      return reject(res, 400, fcmError(400, "INVALID_ARGUMENT", "content-type must be application/json"), pathname, `content-type ${req.headers["content-type"]}`)
    }
    let body
    try { body = JSON.parse(raw) } catch {
      return reject(res, 400, fcmError(400, "INVALID_ARGUMENT", "Invalid JSON payload received."), pathname, "body is not JSON")
    }
    const problem = fcmBodyProblem(body)
    if(problem){
      const [field, description] = problem
      return reject(res, 400, fcmError(400, "INVALID_ARGUMENT", description, [
        {"@type": "type.googleapis.com/google.rpc.BadRequest", fieldViolations: [{field, description}]},
      ]), pathname, `${field}: ${description}`)
    }
    const message = body.message
    const scripted = rec.nextScripted(message.token)
    const status = scripted?.status ?? 200
    rec.sends.push({token: message.token, status, message, at: Date.now(), summary: message.data?.type ?? ""})
    if(scripted){ return send(res, scripted.status, scripted.body ?? {}, scripted.headers ?? {}) }
    send(res, 200, {name: `projects/${creds.projectId}/messages/${randomBytes(8).toString("hex")}`})
  }

  const server = http.createServer((req, res) => {
    const {pathname} = new URL(req.url, "http://x")
    const handle = async () => {
      if(req.method === "POST" && pathname === "/token"){ return token(req, res, pathname) }
      if(req.method === "POST" && pathname === `/v1/projects/${creds.projectId}/messages:send`){ return fcmSend(req, res, pathname) }
      await readBody(req).catch(() => {})
      reject(res, 404, fcmError(404, "NOT_FOUND", `no ${req.method} ${pathname} here`), pathname, `unknown ${req.method} ${pathname}`)
    }
    handle().catch((err) => {
      rec.rejections.push({at: Date.now(), path: pathname, status: 500, reason: `fake failed: ${err.message}`})
      if(!res.headersSent){ send(res, 500, fcmError(500, "INTERNAL", err.message)) } else { res.destroy() }
    })
  })
  server.on("connection", (s) => { sockets.add(s); s.on("close", () => sockets.delete(s)) })
  await new Promise((resolve, reject) => { server.once("error", reject); server.listen(0, "127.0.0.1", resolve) })
  const {port} = server.address()

  const fake = Object.assign(rec, {
    port,
    url: `http://127.0.0.1:${port}`,
    tokenUri: `http://127.0.0.1:${port}/token`,
    tokenRequests,
    issued,
    /** the next attempt at `token` answers 404 UNREGISTERED */
    unregistered(tok){ rec.script(tok, [{status: 404, body: FCM_UNREGISTERED}]) },
    /** the next attempt at `token` answers 429 with Retry-After */
    tooMany(tok, retryAfterSecs = 1){ rec.script(tok, [{status: 429, body: fcmQuotaExceeded(), headers: {"retry-after": String(retryAfterSecs)}}]) },
    async close(){
      server.close()
      for(const s of sockets){ s.destroy() }
    },
  })
  return fake
}

// ---------------------------------------------------------------------------------------------
// APNS (HTTP/2 cleartext, prior knowledge)

const APNS_PUSH_TYPES = ["alert", "background", "voip", "complication", "fileprovider", "mdm", "location", "liveactivity", "pushtotalk"]

/**
 * Starts the fake APNS for `creds`. Resolves with the fake: `url`, `sends` ({token, status, headers,
 * payload, at, pushType, topic}), `rejections`, `script(token, responses)`, `unregistered(token)`
 * (410), `tooMany(token, retryAfterSecs)` (429), `providerTokens` (distinct bearer JWTs seen),
 * `waitAttempts`, `close()`.
 */
export async function startFakeApns(creds){
  const rec = new Recorder("APNS")
  const sessions = new Set()
  const providerTokens = new Set()

  const respond = (stream, status, body, headers = {}) => {
    if(stream.destroyed || stream.closed){ return }
    const apnsId = headers["apns-id"] ?? randomUUID().toUpperCase()
    const text = body === undefined ? "" : JSON.stringify(body)
    stream.respond({":status": status, "apns-id": apnsId, ...(text ? {"content-type": "application/json"} : {}), ...headers})
    stream.end(text)
  }
  const reject = (stream, status, reason, pathname, detail) => {
    rec.rejections.push({at: Date.now(), path: pathname, status, reason: `${reason}${detail ? ` (${detail})` : ""}`})
    respond(stream, status, {reason})
  }

  async function handle(stream, headers){
    const pathname = String(headers[":path"] ?? "")
    const body = await readBody(stream, 64 * 1024)
    if(headers[":method"] !== "POST"){ return reject(stream, 405, "MethodNotAllowed", pathname) }
    const m = /^\/3\/device\/([^/?]*)$/.exec(pathname)
    if(!m){ return reject(stream, 404, "BadPath", pathname) }
    const token = m[1]
    if(!/^[0-9a-fA-F]+$/.test(token)){ return reject(stream, 400, "BadDeviceToken", pathname) }
    // provider token: authorization: bearer <ES256 JWT>
    const auth = /^bearer (\S+)$/i.exec(String(headers.authorization ?? ""))
    if(!auth){ return reject(stream, 403, "MissingProviderToken", pathname) }
    let header, claims
    try {
      ({header, claims} = verifyJwt(auth[1], creds.apnsPublicKey, "ES256"))
    } catch (err){
      return reject(stream, 403, "InvalidProviderToken", pathname, err.message)
    }
    if(header.kid !== creds.apnsKeyId){ return reject(stream, 403, "InvalidProviderToken", pathname, `kid ${JSON.stringify(header.kid)} is not ${creds.apnsKeyId}`) }
    if(claims.iss !== creds.apnsTeamId){ return reject(stream, 403, "InvalidProviderToken", pathname, `iss ${JSON.stringify(claims.iss)} is not ${creds.apnsTeamId}`) }
    const now = Math.floor(Date.now() / 1000)
    if(!Number.isInteger(claims.iat) || claims.iat > now + 60){ return reject(stream, 403, "InvalidProviderToken", pathname, `iat ${claims.iat}`) }
    if(claims.iat < now - 3600){ return reject(stream, 403, "ExpiredProviderToken", pathname) }
    providerTokens.add(auth[1])
    // headers
    const pushType = headers["apns-push-type"]
    const topic = headers["apns-topic"]
    if(pushType !== undefined && !APNS_PUSH_TYPES.includes(pushType)){ return reject(stream, 400, "InvalidPushType", pathname, String(pushType)) }
    if(pushType === undefined){ return reject(stream, 400, "InvalidPushType", pathname, "apns-push-type is required (watchOS 6+/iOS 13+)") }
    if(topic === undefined){ return reject(stream, 400, "MissingTopic", pathname) }
    const expectedTopic = pushType === "voip" ? `${creds.bundle}.voip` : creds.bundle
    if(topic !== expectedTopic){
      return reject(stream, 400, (topic === creds.bundle || topic === `${creds.bundle}.voip`) ? "TopicDisallowed" : "BadTopic", pathname,
        `topic ${topic} with apns-push-type ${pushType}, expected ${expectedTopic}`)
    }
    const priority = headers["apns-priority"]
    if(priority !== undefined && !["1", "5", "10"].includes(priority)){ return reject(stream, 400, "BadPriority", pathname, String(priority)) }
    if(pushType === "background" && priority !== "5"){ return reject(stream, 400, "BadPriority", pathname, "background pushes must have apns-priority 5") }
    const expiration = headers["apns-expiration"]
    if(expiration !== undefined && !/^\d+$/.test(expiration)){ return reject(stream, 400, "BadExpirationDate", pathname, String(expiration)) }
    const collapse = headers["apns-collapse-id"]
    if(collapse !== undefined && Buffer.byteLength(collapse) > 64){ return reject(stream, 400, "BadCollapseId", pathname) }
    // payload
    const limit = pushType === "voip" ? MAX_VOIP_PAYLOAD : MAX_APNS_PAYLOAD
    if(body.length > limit){ return reject(stream, 413, "PayloadTooLarge", pathname, `${body.length} bytes`) }
    if(body.length === 0){ return reject(stream, 400, "PayloadEmpty", pathname) }
    let payload
    try { payload = JSON.parse(body.toString("utf8")) } catch { return reject(stream, 400, "BadMessageId", pathname, "payload is not JSON") }
    if(!isPlainObject(payload) || !isPlainObject(payload.aps)){ return reject(stream, 400, "PayloadEmpty", pathname, "no aps dictionary") }
    if(pushType === "background" && payload.aps.alert !== undefined){ return reject(stream, 400, "InvalidPushType", pathname, "background push with an alert") }
    const scripted = rec.nextScripted(token)
    const status = scripted?.status ?? 200
    const lower = Object.fromEntries(Object.entries(headers).filter(([k]) => !k.startsWith(":")))
    rec.sends.push({token, status, headers: lower, payload, pushType, topic, at: Date.now(), summary: `${pushType} ${payload.type ?? ""}`})
    if(scripted){ return respond(stream, scripted.status, scripted.body, scripted.headers ?? {}) }
    respond(stream, 200, undefined)
  }

  const server = http2.createServer()
  server.on("session", (s) => { sessions.add(s); s.on("close", () => sessions.delete(s)) })
  server.on("stream", (stream, headers) => {
    stream.on("error", () => {})
    handle(stream, headers).catch((err) => {
      rec.rejections.push({at: Date.now(), path: String(headers[":path"]), status: 500, reason: `fake failed: ${err.message}`})
      try { respond(stream, 500, {reason: "InternalServerError"}) } catch { stream.destroy() }
    })
  })
  await new Promise((resolve, reject) => { server.once("error", reject); server.listen(0, "127.0.0.1", resolve) })
  const {port} = server.address()

  return Object.assign(rec, {
    port,
    url: `http://127.0.0.1:${port}`,
    providerTokens,
    /** the next attempt at `token` answers 410 Unregistered */
    unregistered(tok){ rec.script(tok, [{status: 410, body: {reason: "Unregistered", timestamp: Date.now()}}]) },
    /** the next attempt at `token` answers 429 TooManyRequests with Retry-After */
    tooMany(tok, retryAfterSecs = 1){ rec.script(tok, [{status: 429, body: {reason: "TooManyRequests"}, headers: {"retry-after": String(retryAfterSecs)}}]) },
    async close(){
      server.close()
      for(const s of sessions){ s.destroy() }
    },
  })
}

// ---------------------------------------------------------------------------------------------
// a nats-server with JetStream of the test's own

function natsAnswers(port){
  return new Promise((resolve) => {
    const s = tcpConnect({host: "127.0.0.1", port})
    let text = ""
    const done = (ok) => { s.destroy(); resolve(ok) }
    s.setTimeout(1000, () => done(false))
    s.on("error", () => done(false))
    s.on("data", (d) => { text += d.toString("latin1"); if(text.includes("\n")){ done(text.startsWith("INFO")) } })
  })
}

/**
 * Starts `nats-server -js` (NATS_SERVER_BIN, else nats-server on PATH) on a free loopback port with
 * its store in a temp dir. Resolves with `{url, port, proc, stop()}`; stop() ends it and removes
 * the dir (the streams go with it).
 */
export async function startJetStreamNats({readyMs = 15_000} = {}){
  const bin = process.env.NATS_SERVER_BIN || "nats-server"
  const dir = mkdtempSync(path.join(tmpdir(), "quckchat-push-nats-"))
  for(let attempt = 1; ; attempt++){
    const port = await freePort()
    const proc = new ManagedProcess("nats-server", bin, ["-a", "127.0.0.1", "-p", String(port), "-js", "-sd", dir], process.env)
    const deadline = Date.now() + readyMs
    let ready = false
    while(Date.now() < deadline && !proc.exit){
      if(await natsAnswers(port)){ ready = true; break }
      await sleep(100)
    }
    if(ready){
      return {
        url: `nats://127.0.0.1:${port}`,
        port,
        proc,
        async stop(){
          try { await proc.stop(5000) } finally { rmSync(dir, {recursive: true, force: true}) }
        },
      }
    }
    await proc.stop(1000)
    if(attempt < 3 && /in use|EADDRINUSE/i.test(proc.output)){ continue }
    rmSync(dir, {recursive: true, force: true})
    throw new Error(`nats-server -js not answering on 127.0.0.1:${port} within ${readyMs} ms (${proc.describeExit()}); output:\n${proc.output}`)
  }
}
