// /dev/dashboard in a real browser: headless Chromium (Debian's `chromium`, driven by
// playwright-core) loads the page, its figures change when a phoenix client joins and sends, and
// a screenshot is kept in e2e/artifacts/. All-in-one serves it by default to local requests; the
// distributed gateway here runs with DASHBOARD_ENABLED=true and a DASHBOARD_TOKEN.
//
// Chromium is a prerequisite (scripts/deps.sh installs it): without it these tests fail, they do
// not skip. CHROMIUM_PATH overrides /usr/bin/chromium.
import {describe, it, after} from "node:test"
import assert from "node:assert/strict"
import {existsSync, mkdirSync} from "node:fs"
import {randomBytes} from "node:crypto"
import path from "node:path"

import {chromium} from "playwright-core"

import {modes, useServerSet, ids, E2E_DIR} from "../lib/harness.js"
import {join, push} from "../lib/phx.js"
import {sleep} from "../lib/util.js"

const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium"
const ARTIFACTS = path.join(E2E_DIR, "artifacts")
const WAIT_MS = 15_000

async function get(url, headers = {}){
  const res = await fetch(url, {headers, signal: AbortSignal.timeout(5000)})
  return {status: res.status, body: await res.text()}
}

async function launchChromium(){
  if(!existsSync(CHROMIUM)){
    throw new Error(`Chromium is missing at ${CHROMIUM}: run scripts/deps.sh (it installs Debian's ` +
      "`chromium` package: apt-get install --no-install-recommends chromium) or set CHROMIUM_PATH")
  }
  // Chromium's sandbox refuses to run as root (containers, CI).
  const args = process.getuid?.() === 0 ? ["--no-sandbox"] : []
  return chromium.launch({executablePath: CHROMIUM, headless: true, args})
}

/** The figures as the page shows them (their data-value attributes). */
function figures(page){
  return page.evaluate(() => {
    const v = (id) => Number(document.getElementById(id).dataset.value)
    return {
      updates: Number(document.body.dataset.updates ?? 0),
      live: document.getElementById("live").className,
      liveText: document.getElementById("live").textContent,
      status: document.getElementById("status").dataset.value,
      connections: v("connections"),
      topics: v("topics"),
      events: v("events-total"),
      eventsRate: v("events-rate"),
      memory: v("memory"),
      checks: Object.fromEntries([...document.querySelectorAll("#checks tr[data-check]")]
        .map((tr) => [tr.dataset.check, tr.dataset.status])),
    }
  })
}

for(const mode of modes){
  const token = mode === "distributed" ? `dash-${randomBytes(16).toString("hex")}` : null
  const env = token ? {DASHBOARD_ENABLED: "true", DASHBOARD_TOKEN: token} : {}

  describe(`dashboard [${mode}]`, () => {
    const srv = useServerSet(mode, {env})
    let browser = null

    // launched by the browser test itself: without Chromium that test fails (not cancelled)
    after(async () => { await browser?.close() })

    const pageUrl = () => `${srv.httpUrl}/dev/dashboard${token ? `?token=${token}` : ""}`

    it("is served to whom it should be, and to no one else", async () => {
      if(token){
        for(const p of ["/dev/dashboard", "/dev/dashboard/stats"]){
          const res = await get(`${srv.httpUrl}${p}`)
          assert.equal(res.status, 401, `${p} without the token: ${res.body}`)
          assert.match(res.body, /DASHBOARD_TOKEN/)
          assert.equal((await get(`${srv.httpUrl}${p}`, {Authorization: `Bearer ${token}`})).status, 200, p)
        }
        // the services serve no dashboard
        for(const {name, url} of srv.admins.filter((a) => !a.name.startsWith("gateway"))){
          assert.equal((await get(`${url}/dev/dashboard`)).status, 404, name)
        }
      } else {
        assert.equal((await get(`${srv.httpUrl}/dev/dashboard/stats`)).status, 200)
        const proxied = await get(`${srv.httpUrl}/dev/dashboard/stats`, {"X-Forwarded-For": "203.0.113.9"})
        assert.equal(proxied.status, 403, `a proxied request is not local: ${proxied.body}`)
      }
    })

    it("loads in Chromium and its figures follow a client's joins and sends", async () => {
      browser = await launchChromium()
      const page = await browser.newPage({viewport: {width: 1280, height: 900}})
      const problems = []
      page.on("pageerror", (err) => problems.push(`page error: ${err.message}`))
      page.on("console", (msg) => { if(msg.type() === "error"){ problems.push(`console: ${msg.text()}`) } })
      page.on("requestfailed", (req) => problems.push(`request failed: ${req.url()} ${req.failure()?.errorText}`))
      try {
        const res = await page.goto(pageUrl(), {waitUntil: "load"})
        assert.equal(res.status(), 200)
        assert.equal(await page.title(), "QuckChat dashboard")
        // two polls at least: rates need a previous sample
        await page.waitForFunction(() => Number(document.body.dataset.updates ?? 0) >= 2, null, {timeout: WAIT_MS})
        const before = await figures(page)
        assert.equal(before.live, "ok", before.liveText)
        assert.equal(before.status, "ok")
        assert.ok(before.memory > 0, `memory: ${JSON.stringify(before)}`)
        assert.equal(before.checks.bus, "ok", JSON.stringify(before.checks))
        if(mode === "allinone"){
          for(const c of ["store", "calls", "huddles", "devices"]){ assert.equal(before.checks[c], "ok", c) }
        }

        // A client connects, joins a conversation and sends for a while.
        const user = ids.user()
        const conv = ids.conv()
        await srv.putConversation(conv, [user])
        const socket = await srv.connect(user)
        const channel = socket.channel(`chat:${conv}`)
        assert.equal((await join(channel)).status, "ok")
        const sends = 12
        let sent = 0
        const sending = (async () => {
          for(let i = 0; i < sends; i++){
            const r = await push(channel, "message:send", {type: "text", content: `dashboard ${i}`})
            assert.equal(r.status, "ok", JSON.stringify(r.response))
            sent++
            await sleep(200)
          }
        })()
        // While it sends, the page shows a non-zero rate.
        await page.waitForFunction(() => Number(document.getElementById("events-rate").dataset.value) > 0,
          null, {timeout: WAIT_MS})
        await sending
        assert.equal(sent, sends)
        await page.waitForFunction(({connections, topics, events}) => {
          const v = (id) => Number(document.getElementById(id).dataset.value)
          return v("connections") >= connections + 1 && v("topics") >= topics + 1 && v("events-total") >= events + 1 + 12
        }, before, {timeout: WAIT_MS})
        const after = await figures(page)
        assert.ok(after.connections > before.connections, `connections ${before.connections} → ${after.connections}`)
        assert.ok(after.topics > before.topics, `topics ${before.topics} → ${after.topics}`)
        assert.ok(after.events >= before.events + 1 + sends, `events ${before.events} → ${after.events}`)
        if(mode === "allinone"){
          // per event type, from the services in this process
          const row = await page.waitForSelector('#events tr[data-event="chat message:send"]', {timeout: WAIT_MS})
          assert.ok(Number(await row.getAttribute("data-total")) >= sends)
        } else {
          // a gateway counts by topic kind
          await page.waitForSelector("#kinds tr[data-kind=chat]", {timeout: WAIT_MS})
        }
        await page.waitForFunction(() => document.getElementById("latency-p50").dataset.value !== "", null, {timeout: WAIT_MS})

        // The evidence.
        mkdirSync(ARTIFACTS, {recursive: true})
        const shot = path.join(ARTIFACTS, mode === "allinone" ? "dashboard.png" : `dashboard-${mode}.png`)
        await page.screenshot({path: shot, fullPage: true})
        assert.ok(existsSync(shot), shot)

        // The client leaves: the page follows.
        await srv.closeClients()
        await page.waitForFunction((n) => Number(document.getElementById("connections").dataset.value) < n,
          after.connections, {timeout: WAIT_MS})
        assert.deepEqual(problems, [], problems.join("\n"))
      } finally {
        await page.close()
      }
    })
  })
}
