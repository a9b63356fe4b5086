// HS256 JWT minting with node:crypto, for tokens the `quckchat token` command cannot
// produce: expired ones, ones signed with the wrong secret, or with unusual claims.
import {createHmac} from "node:crypto"

const b64url = (input) => Buffer.from(input).toString("base64url")

/**
 * @param {object} claims - e.g. {sub: "u1", exp: 1700000000}; `iat` is added unless given
 * @param {string} secret - HMAC secret
 */
export function mintJwt(claims, secret){
  const now = Math.floor(Date.now() / 1000)
  const header = b64url(JSON.stringify({alg: "HS256", typ: "JWT"}))
  const body = b64url(JSON.stringify({iat: now, ...claims}))
  const signature = createHmac("sha256", secret).update(`${header}.${body}`).digest("base64url")
  return `${header}.${body}.${signature}`
}

/** A token for `userId` valid for `ttlSecs` (negative: already expired). */
export function mintUserToken(userId, secret, ttlSecs = 3600, extraClaims = {}){
  const now = Math.floor(Date.now() / 1000)
  return mintJwt({sub: userId, exp: now + ttlSecs, ...extraClaims}, secret)
}

/** What the phoenix client puts in Sec-WebSocket-Protocol for `authToken` (see socket.js). */
export function authTokenProtocol(token){
  return `base64url.bearer.phx.${Buffer.from(token).toString("base64").replace(/=/g, "")}`
}
