// docs/protocol.md#push-notifications: FCM and APNS pushes to users with no live connection, against
// fakes of Google (OAuth2 token endpoint + FCM HTTP v1) and APNS (HTTP/2) that verify what the real
// ones verify (lib/push-fakes.js): each message once per offline member's fcm/apns device (none to
// online members or the sender), VoIP + high-priority FCM data pushes for a ringing call, dead tokens
// tried once and removed, 429 + Retry-After retried no earlier, refused device registrations and
// credentials, and (distributed) a push queued while push-svc is SIGKILLed sent once after its
// restart. Devices are registered with `quckchat device add` (all-in-one: the server's gRPC port;
// distributed: push-svc's). The distributed set runs on a nats-server with JetStream of its own.
import {describe, it, before, after, afterEach} from "node:test"
import assert from "node:assert/strict"
import {execFile} from "node:child_process"
import {mkdtempSync, rmSync} from "node:fs"
import {tmpdir} from "node:os"
import path from "node:path"
import {randomBytes} from "node:crypto"
import {Presence} from "phoenix"

import {modes, startServerSet, missingPrerequisite, ids, binPath, freePort, ManagedProcess} from "../lib/harness.js"
import {join, push} from "../lib/phx.js"
import {sleep, waitUntil, withTimeout} from "../lib/util.js"
import {pushCredentials, startFakeGoogle, startFakeApns, startJetStreamNats} from "../lib/push-fakes.js"

/** after the expected pushes arrived, this long without another one counts as "no more" */
const QUIET_MS = 1500
/** a push is due within this (presence, chat and the provider round trips on a loaded machine) */
const PUSH_DUE_MS = 15_000
const RING_SECS = 3
const DRAIN_SECS = 2
const CLI_TIMEOUT_MS = 15_000
const STARTUP_EXIT_MS = 30_000

const fcmToken = (name) => `fcm-${name}-${randomBytes(20).toString("base64url")}`
const apnsToken = () => randomBytes(32).toString("hex")

/** Runs the CLI; resolves with {code, stdout, stderr} (never rejects on a non-zero exit). */
function cli(args, env){
  return new Promise((resolve) => {
    execFile(binPath("quckchat"), args, {env, timeout: CLI_TIMEOUT_MS, killSignal: "SIGKILL"}, (err, stdout, stderr) => {
      resolve({code: err ? (err.killed ? `killed after ${CLI_TIMEOUT_MS} ms` : err.code) : 0, stdout: stdout.trim(), stderr: stderr.trim()})
    })
  })
}

for(const mode of modes){
  describe(`push [${mode}] (FCM + APNS fakes)`, () => {
    let srv = null
    let google = null
    let apns = null
    let nats = null
    let creds = null

    before(async () => {
      const missing = missingPrerequisite(mode)
      if(missing){ throw new Error(missing) }
      creds = pushCredentials()
      google = await startFakeGoogle(creds)
      apns = await startFakeApns(creds)
      if(mode === "distributed"){ nats = await startJetStreamNats() }
      srv = await startServerSet(mode, {
        push: true,
        natsUrl: nats?.url,
        env: {
          ...creds.env(google, apns),
          PUSH_PREVIEW: "true",
          CALL_RING_TIMEOUT_SECS: String(RING_SECS),
          SHUTDOWN_DRAIN_SECS: String(DRAIN_SECS),
        },
      })
    }, {timeout: 120_000})

    afterEach(async () => { await srv?.closeClients() }, {timeout: 10_000})

    after(async () => {
      try {
        await srv?.stop()
      } finally {
        await nats?.stop().catch(() => {})
        await google?.close()
        await apns?.close()
      }
    }, {timeout: 8 * (DRAIN_SECS * 1000 + 5000 + 2000) + 30_000})

    /** gRPC address of the device registry: the server (all-in-one) or push-svc */
    const pushAddr = () => mode === "distributed" ? `http://127.0.0.1:${srv.pushPort}` : srv.grpcAddr
    const pushProcess = () => mode === "distributed" ? "push-svc" : "quckchat"

    async function addDevice(user, platform, token){
      const r = await cli(["device", "add", user, "--platform", platform, "--token", token, "--addr", pushAddr()], srv.cliEnv)
      assert.equal(r.code, 0, `device add ${user} ${platform} failed: ${JSON.stringify(r)}`)
      return token
    }

    /** `quckchat device list` as [{user, platform, token, app}] */
    async function listDevices(user){
      const r = await cli(["device", "list", user, "--addr", pushAddr()], srv.cliEnv)
      assert.equal(r.code, 0, `device list ${user} failed: ${JSON.stringify(r)}`)
      return r.stdout.split("\n").filter(Boolean).map((line) => {
        const [u, platform, token, app] = line.split(" ")
        return {user: u, platform, token, app}
      })
    }

    /** Every request the fakes refused (a malformed or unauthenticated push is a server bug). */
    function assertNoRejections(){
      assert.deepEqual(google.rejections, [], `the fake FCM/OAuth refused requests: ${google.describe()}`)
      assert.deepEqual(apns.rejections, [], `the fake APNS refused requests: ${apns.describe()}`)
    }

    /**
     * `user` connected and joined to chat:`conv`, waiting (bounded) until its Presence lists every
     * one of `online` (so presence, which push asks, knows they are connected).
     */
    async function joinedSeeing(user, conv, online){
      const socket = await srv.connect(user, {params: {deviceId: `${user}-desk`}})
      const channel = socket.channel(`chat:${conv}`)
      const presence = new Presence(channel)
      const r = await join(channel)
      assert.equal(r.status, "ok", `${user} join chat:${conv} refused: ${JSON.stringify(r.response)}`)
      await waitUntil(() => online.every((u) => presence.list((id) => id).includes(u)),
        {timeoutMs: 15_000, what: `${user}'s presence to list ${online.join(", ")} (lists ${JSON.stringify(presence.list((id) => id))})`})
      return {socket, channel}
    }

    async function send(channel, content, clientMessageId = randomBytes(6).toString("hex")){
      const r = await push(channel, "message:send", {type: "text", content, clientMessageId})
      assert.equal(r.status, "ok", `message:send refused: ${JSON.stringify(r.response)}`)
      return r.response.message
    }

    /** Checks an FCM message push for `message` (conversation alert with preview, data, collapse). */
    function assertFcmMessage(sent, token, message, {badge} = {}){
      const m = sent.message
      assert.equal(m.token, token)
      assert.deepEqual(m.notification, {title: "New message", body: message.content}, JSON.stringify(m))
      assert.deepEqual(m.data, {
        type: "message",
        conversationId: message.conversationId,
        messageId: message.id,
        seq: String(message.seq),
        senderId: message.senderId,
        messageType: "text",
      }, JSON.stringify(m))
      assert.equal(m.android.priority, "normal", JSON.stringify(m))
      assert.equal(m.android.collapse_key, message.conversationId, JSON.stringify(m))
      assert.equal(m.android.notification?.tag, message.conversationId, JSON.stringify(m))
      assert.equal(m.apns.headers["apns-collapse-id"], message.conversationId, JSON.stringify(m))
      assert.equal(m.apns.headers["apns-push-type"], "alert", JSON.stringify(m))
      if(badge !== undefined){ assert.equal(m.apns.payload.aps.badge, badge, `FCM badge: ${JSON.stringify(m)}`) }
    }

    /** Checks an APNS alert for `message`. */
    function assertApnsMessage(sent, message, {badge} = {}){
      assert.equal(sent.pushType, "alert", JSON.stringify(sent))
      assert.equal(sent.topic, creds.bundle)
      assert.equal(sent.headers["apns-priority"], "10", JSON.stringify(sent.headers))
      assert.equal(sent.headers["apns-collapse-id"], message.conversationId, JSON.stringify(sent.headers))
      const {aps, ...data} = sent.payload
      assert.deepEqual(aps.alert, {title: "New message", body: message.content}, JSON.stringify(sent.payload))
      assert.equal(aps.sound, "default", JSON.stringify(sent.payload))
      if(badge !== undefined){ assert.equal(aps.badge, badge, `APNS badge: ${JSON.stringify(sent.payload)}`) }
      assert.deepEqual(data, {
        type: "message",
        conversationId: message.conversationId,
        messageId: message.id,
        seq: String(message.seq),
        senderId: message.senderId,
        messageType: "text",
      }, JSON.stringify(sent.payload))
    }

    it("a message: one push per offline member's fcm and apns device, none to an online member or the sender", {timeout: 60_000}, async () => {
      const [a, b, c] = [ids.user("snd"), ids.user("onl"), ids.user("off")]
      const conv = ids.conv("push")
      await srv.putConversation(conv, [a, b, c])
      const tok = {
        aF: await addDevice(a, "fcm", fcmToken("a")), aA: await addDevice(a, "apns", apnsToken()),
        bF: await addDevice(b, "fcm", fcmToken("b")), bA: await addDevice(b, "apns", apnsToken()),
        cF: await addDevice(c, "fcm", fcmToken("c")), cA: await addDevice(c, "apns", apnsToken()),
        cV: await addDevice(c, "apns-voip", apnsToken()),
      }
      // B online: a socket (no join needed: presence follows sockets)
      await srv.connect(b, {params: {deviceId: `${b}-phone`}})
      const A = await joinedSeeing(a, conv, [a, b])

      const m1 = await send(A.channel, `hello ${randomBytes(4).toString("hex")}`)
      const [f1] = await google.waitAttempts(tok.cF, 1, {timeoutMs: PUSH_DUE_MS})
      const [p1] = await apns.waitAttempts(tok.cA, 1, {timeoutMs: PUSH_DUE_MS})
      const m2 = await send(A.channel, `again ${randomBytes(4).toString("hex")}`)
      const [, f2] = await google.waitAttempts(tok.cF, 2, {timeoutMs: PUSH_DUE_MS})
      const [, p2] = await apns.waitAttempts(tok.cA, 2, {timeoutMs: PUSH_DUE_MS})
      await sleep(QUIET_MS)

      assert.equal(google.attempts(tok.cF).length, 2, `C's fcm device: not exactly one push per message: ${google.describe()}`)
      assert.equal(apns.attempts(tok.cA).length, 2, `C's apns device: not exactly one push per message: ${apns.describe()}`)
      assert.deepEqual(apns.attempts(tok.cV), [], "an alert went to C's VoIP token")
      for(const t of [tok.aF, tok.bF]){ assert.deepEqual(google.attempts(t), [], `FCM push to the sender or the online member: ${google.describe()}`) }
      for(const t of [tok.aA, tok.bA]){ assert.deepEqual(apns.attempts(t), [], `APNS push to the sender or the online member: ${apns.describe()}`) }
      assert.equal(f1.status, 200)
      assertFcmMessage(f1, tok.cF, m1, {badge: 1})
      assertFcmMessage(f2, tok.cF, m2, {badge: 2})
      assertApnsMessage(p1, m1, {badge: 1})
      assertApnsMessage(p2, m2, {badge: 2})
      assert.ok(google.tokenRequests.length >= 1, "no OAuth token was fetched")
      assertNoRejections()
    })

    it("a call to a callee with no connection: a VoIP push (apns-voip, topic <bundle>.voip) and a high-priority FCM data push", {timeout: 60_000}, async () => {
      const [a, c] = [ids.user("caller"), ids.user("callee")]
      const tok = {
        cV: await addDevice(c, "apns-voip", apnsToken()),
        cF: await addDevice(c, "fcm", fcmToken("callee")),
        cA: await addDevice(c, "apns", apnsToken()),
      }
      const socket = await srv.connect(a, {params: {deviceId: `${a}-phone`}})
      const lobby = socket.channel("webrtc:lobby")
      assert.equal((await join(lobby)).status, "ok", "caller's lobby join refused")
      const before = Date.now()
      const r = await push(lobby, "call:initiate", {calleeId: c, callType: "video"})
      assert.equal(r.status, "ok", `call:initiate refused: ${JSON.stringify(r.response)}`)
      const {callId} = r.response

      const [voip] = await apns.waitAttempts(tok.cV, 1, {timeoutMs: PUSH_DUE_MS})
      const [fcm] = await google.waitAttempts(tok.cF, 1, {timeoutMs: PUSH_DUE_MS})
      const ringing = apns.attempts(tok.cA).filter((s) => s.payload.type === "incoming_call")
      assert.deepEqual(ringing, [], `an incoming-call push went to C's apns (alert) token: ${apns.describe()}`)

      // VoIP push
      assert.equal(voip.headers["apns-push-type"], "voip", JSON.stringify(voip.headers))
      assert.equal(voip.topic, `${creds.bundle}.voip`)
      assert.equal(voip.headers["apns-priority"], "10", JSON.stringify(voip.headers))
      assert.equal(voip.headers["apns-collapse-id"], callId, JSON.stringify(voip.headers))
      const {aps, ...vdata} = voip.payload
      assert.deepEqual(aps, {}, `a VoIP push carries no alert: ${JSON.stringify(voip.payload)}`)
      assert.equal(vdata.type, "incoming_call", JSON.stringify(voip.payload))
      assert.equal(vdata.callId, callId)
      assert.equal(vdata.callerId, a)
      assert.equal(vdata.callType, "video")
      const ringExpires = Number(vdata.ringExpiresAtMs)
      assert.ok(ringExpires >= before + RING_SECS * 1000 - 1000 && ringExpires <= Date.now() + RING_SECS * 1000 + 1000,
        `ringExpiresAtMs ${vdata.ringExpiresAtMs} is not the ring's end (~now + ${RING_SECS} s)`)
      const expiration = Number(voip.headers["apns-expiration"])
      assert.ok(expiration >= Math.floor(before / 1000) && expiration <= Math.ceil(ringExpires / 1000) + 1,
        `apns-expiration ${expiration} is not the ring's end (${ringExpires} ms)`)

      // FCM high-priority data
      const m = fcm.message
      assert.equal(m.token, tok.cF)
      assert.equal(m.notification, undefined, `an incoming-call FCM push is data only: ${JSON.stringify(m)}`)
      assert.equal(m.android.priority, "high", JSON.stringify(m))
      assert.equal(m.android.notification, undefined, JSON.stringify(m))
      assert.match(m.android.ttl, /^[0-3]s$/, `android.ttl is not the ring's remaining time: ${JSON.stringify(m)}`)
      assert.deepEqual(m.data, {...vdata}, `FCM data differs from the VoIP push's: ${JSON.stringify(m.data)} vs ${JSON.stringify(vdata)}`)

      await sleep(QUIET_MS)
      assert.equal(apns.attempts(tok.cV).filter((s) => s.payload.type === "incoming_call").length, 1, apns.describe())
      assert.equal(google.attempts(tok.cF).filter((s) => s.message.data?.type === "incoming_call").length, 1, google.describe())
      assertNoRejections()
    })

    it("an unanswered call: call_ended to the rung devices and a missed-call alert on fcm and apns after the ring timeout", {timeout: 60_000}, async () => {
      const [a, c] = [ids.user("caller"), ids.user("missed")]
      const tok = {
        cV: await addDevice(c, "apns-voip", apnsToken()),
        cF: await addDevice(c, "fcm", fcmToken("missed")),
        cA: await addDevice(c, "apns", apnsToken()),
      }
      const socket = await srv.connect(a, {params: {deviceId: `${a}-phone`}})
      const lobby = socket.channel("webrtc:lobby")
      assert.equal((await join(lobby)).status, "ok", "caller's lobby join refused")
      const r = await push(lobby, "call:initiate", {calleeId: c})
      assert.equal(r.status, "ok", `call:initiate refused: ${JSON.stringify(r.response)}`)
      const {callId} = r.response
      const types = (list) => list.map((s) => s.payload?.type ?? s.message?.data?.type)
      // VoIP: incoming_call, call_ended; FCM: incoming_call, call_ended, missed_call; apns: missed_call
      await apns.waitAttempts(tok.cV, 2, {timeoutMs: RING_SECS * 1000 + PUSH_DUE_MS})
      await google.waitAttempts(tok.cF, 3, {timeoutMs: RING_SECS * 1000 + PUSH_DUE_MS})
      await apns.waitAttempts(tok.cA, 1, {timeoutMs: RING_SECS * 1000 + PUSH_DUE_MS})
      await sleep(QUIET_MS)
      assert.deepEqual(types(apns.attempts(tok.cV)), ["incoming_call", "call_ended"], apns.describe())
      assert.deepEqual(types(google.attempts(tok.cF)).sort(), ["call_ended", "incoming_call", "missed_call"], google.describe())
      assert.deepEqual(types(apns.attempts(tok.cA)), ["missed_call"], apns.describe())

      const ended = apns.attempts(tok.cV)[1]
      assert.equal(ended.pushType, "voip")
      assert.equal(ended.topic, `${creds.bundle}.voip`)
      assert.equal(ended.payload.callId, callId)
      assert.equal(ended.payload.reason, "no_answer", JSON.stringify(ended.payload))
      const missed = apns.attempts(tok.cA)[0]
      assert.equal(missed.pushType, "alert")
      assert.equal(missed.topic, creds.bundle)
      assert.deepEqual(missed.payload.aps.alert, {title: "Missed call", body: "Missed voice call"}, JSON.stringify(missed.payload))
      assert.equal(missed.payload.callId, callId)
      const fcmMissed = google.attempts(tok.cF).find((s) => s.message.data?.type === "missed_call").message
      assert.deepEqual(fcmMissed.notification, {title: "Missed call", body: "Missed voice call"}, JSON.stringify(fcmMissed))
      const fcmEnded = google.attempts(tok.cF).find((s) => s.message.data?.type === "call_ended").message
      assert.equal(fcmEnded.android.priority, "high", JSON.stringify(fcmEnded))
      assert.equal(fcmEnded.notification, undefined, JSON.stringify(fcmEnded))
      assertNoRejections()
    })

    it("dead tokens (FCM UNREGISTERED, APNS 410) are tried once and removed; the next message skips them", {timeout: 60_000}, async () => {
      const [a, d] = [ids.user("snd"), ids.user("dead")]
      const conv = ids.conv("dead")
      await srv.putConversation(conv, [a, d])
      const tok = {
        deadF: await addDevice(d, "fcm", fcmToken("dead")),
        deadA: await addDevice(d, "apns", apnsToken()),
        liveF: await addDevice(d, "fcm", fcmToken("live")),
      }
      google.unregistered(tok.deadF)
      apns.unregistered(tok.deadA)
      const A = await joinedSeeing(a, conv, [a])

      await send(A.channel, "first")
      await google.waitAttempts(tok.deadF, 1, {timeoutMs: PUSH_DUE_MS})
      await apns.waitAttempts(tok.deadA, 1, {timeoutMs: PUSH_DUE_MS})
      await google.waitAttempts(tok.liveF, 1, {timeoutMs: PUSH_DUE_MS})
      assert.equal(google.attempts(tok.deadF)[0].status, 404)
      assert.equal(apns.attempts(tok.deadA)[0].status, 410)
      let listed
      await waitUntil(async () => {
        listed = await listDevices(d)
        return listed.length === 1
      }, {timeoutMs: 10_000, intervalMs: 250, what: `the dead tokens to be gone from \`quckchat device list ${d}\` (lists ${JSON.stringify(listed)})`})
      assert.deepEqual(listed, [{user: d, platform: "fcm", token: tok.liveF, app: "app=default"}])

      await send(A.channel, "second")
      await google.waitAttempts(tok.liveF, 2, {timeoutMs: PUSH_DUE_MS})
      await sleep(QUIET_MS)
      assert.equal(google.attempts(tok.deadF).length, 1, `the dead FCM token was tried again: ${google.describe()}`)
      assert.equal(apns.attempts(tok.deadA).length, 1, `the dead APNS token was tried again: ${apns.describe()}`)
      assert.equal(google.attempts(tok.liveF).length, 2, google.describe())
      assertNoRejections()
    })

    it("429 with Retry-After: 1 is retried no earlier than 1 s later and then delivered, once (FCM and APNS)", {timeout: 60_000}, async () => {
      const [a, r] = [ids.user("snd"), ids.user("slow")]
      const conv = ids.conv("slow")
      await srv.putConversation(conv, [a, r])
      const tok = {f: await addDevice(r, "fcm", fcmToken("slow")), p: await addDevice(r, "apns", apnsToken())}
      google.tooMany(tok.f, 1)
      apns.tooMany(tok.p, 1)
      const A = await joinedSeeing(a, conv, [a])
      const m = await send(A.channel, "rate limited")
      const fs = await google.waitAttempts(tok.f, 2, {timeoutMs: PUSH_DUE_MS})
      const ps = await apns.waitAttempts(tok.p, 2, {timeoutMs: PUSH_DUE_MS})
      await sleep(QUIET_MS)
      for(const [name, fake, list] of [["FCM", google, fs], ["APNS", apns, ps]]){
        const all = fake.attempts(name === "FCM" ? tok.f : tok.p)
        assert.deepEqual(all.map((s) => s.status), [429, 200], `${name}: ${fake.describe()}`)
        const gap = list[1].at - list[0].at
        assert.ok(gap >= 950, `${name} retried ${gap} ms after a 429 with Retry-After: 1`)
        assert.ok(gap <= 5000, `${name} retried only ${gap} ms after a 429 with Retry-After: 1`)
      }
      assertFcmMessage(fs[1], tok.f, m)
      assertApnsMessage(ps[1], m)
      assertNoRejections()
    })

    it("`quckchat device add` with an unknown platform or an empty token exits non-zero naming the field", {timeout: 60_000}, async () => {
      const u = ids.user("bad")
      const unknown = await cli(["device", "add", u, "--platform", "windows-phone", "--token", "t1", "--addr", pushAddr()], srv.cliEnv)
      assert.notEqual(unknown.code, 0, `unknown platform accepted: ${JSON.stringify(unknown)}`)
      assert.match(unknown.stderr, /platform/, JSON.stringify(unknown))
      assert.match(unknown.stderr, /fcm, apns or apns-voip/, JSON.stringify(unknown))
      const empty = await cli(["device", "add", u, "--platform", "fcm", "--token", "", "--addr", pushAddr()], srv.cliEnv)
      assert.notEqual(empty.code, 0, `empty token accepted: ${JSON.stringify(empty)}`)
      assert.match(empty.stderr, /token/, JSON.stringify(empty))
      assert.deepEqual(await listDevices(u), [], "a refused device was registered")
    })

    it("a malformed FIREBASE_SERVICE_ACCOUNT: the process exits non-zero naming it, without printing the key", {timeout: 120_000}, async () => {
      const spec = srv.process(pushProcess()).proc.spec
      const good = creds.serviceAccount(google.tokenUri)
      const keyLine = creds.rsaPrivatePem.split("\n")[5]
      const variants = {
        "truncated JSON": JSON.stringify(good).slice(0, 80),
        "no private_key": JSON.stringify({...good, private_key: undefined}),
        "an EC private_key": JSON.stringify({...good, private_key: creds.apnsPrivatePem}),
        "neither JSON nor a file": "/nonexistent/service-account.json",
      }
      // every variant is tried; the problems are reported together
      const problems = []
      for(const [what, value] of Object.entries(variants)){
        const dataDir = mkdtempSync(path.join(tmpdir(), "quckchat-push-bad-"))
        try {
          const env = {...spec.env, FIREBASE_SERVICE_ACCOUNT: value, PORT: String(await freePort()), DATA_DIR: dataDir}
          const proc = new ManagedProcess(`${pushProcess()}-bad`, spec.file, spec.args, env)
          const exit = await withTimeout(proc.exited, STARTUP_EXIT_MS, `${pushProcess()} with ${what} to exit`)
            .catch(async (err) => { await proc.stop(1000); throw new Error(`${err.message}; output:\n${proc.output}`) })
          // the line the process ends with (its error), not the configuration it logged at start
          const last = proc.output.split("\n").map((l) => l.trim()).filter(Boolean).pop()
          if(exit.code === 0){ problems.push(`${what}: exited with code 0`) }
          if(!last){ problems.push(`${what}: no output (exit ${JSON.stringify(exit)})`) }
          else if(!last.includes("FIREBASE_SERVICE_ACCOUNT")){ problems.push(`${what}: the error does not name FIREBASE_SERVICE_ACCOUNT: ${JSON.stringify(last)} (exit code ${exit.code})`) }
          if(proc.output.includes(keyLine)){ problems.push(`${what}: the output shows the private key`) }
        } finally {
          rmSync(dataDir, {recursive: true, force: true})
        }
      }
      assert.deepEqual(problems, [], `${pushProcess()} start-up with a malformed FIREBASE_SERVICE_ACCOUNT:\n${problems.join("\n")}`)
    })

    if(mode === "distributed"){
      it("push-svc SIGKILLed: a message sent while it is down is pushed after its restart, exactly once", {timeout: 90_000}, async () => {
        const [a, c] = [ids.user("snd"), ids.user("wait")]
        const conv = ids.conv("kill")
        await srv.putConversation(conv, [a, c])
        const tok = {f: await addDevice(c, "fcm", fcmToken("wait")), p: await addDevice(c, "apns", apnsToken())}
        const A = await joinedSeeing(a, conv, [a])
        await srv.signal("push-svc", "SIGKILL")
        const m = await send(A.channel, "while push-svc is down")
        await sleep(1000)
        assert.deepEqual(google.attempts(tok.f), [], "pushed while push-svc was down?")
        const restarting = Date.now()
        await srv.restart("push-svc")
        const [f] = await google.waitAttempts(tok.f, 1, {timeoutMs: PUSH_DUE_MS})
        const [p] = await apns.waitAttempts(tok.p, 1, {timeoutMs: PUSH_DUE_MS})
        await sleep(QUIET_MS * 2)
        assert.equal(google.attempts(tok.f).length, 1, `FCM: not exactly once: ${google.describe()}`)
        assert.equal(apns.attempts(tok.p).length, 1, `APNS: not exactly once: ${apns.describe()}`)
        assert.ok(f.at >= restarting && p.at >= restarting, "pushed before the restart?")
        assertFcmMessage(f, tok.f, m, {badge: 1})
        assertApnsMessage(p, m, {badge: 1})
        assertNoRejections()
      })
    }
  })
}
