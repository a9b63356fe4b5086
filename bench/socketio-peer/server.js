// Socket.IO 4.x peer of QuckChat for the bench (`bench/`): the same semantics
// as the `idle` and `fanout` scenarios need, nothing more.
//
//   client "join" (room, ack)           -> socket joins the room; ack({ok: true})
//   client "send" (room, content, ack)  -> io.to(room) emits "message" {content}
//                                          to every member, sender included;
//                                          ack({ok: true})
//   GET /health                         -> 200 "ok"
//
// No persistence and no auth check (QuckChat verifies a JWT per connection and
// persists every message; the bench's RESULTS.md says so next to the figures).
// Env: PORT (default 4100), BIND_ADDRESS (default 127.0.0.1).
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");

const port = Number(process.env.PORT || 4100);
const host = process.env.BIND_ADDRESS || "127.0.0.1";

const httpServer = http.createServer((req, res) => {
  if (req.url === "/health") {
    res.writeHead(200, { "content-type": "text/plain" });
    res.end("ok");
    return;
  }
  res.writeHead(404);
  res.end();
});
httpServer.maxConnections = 0; // unlimited; the process fd limit is the bound

const io = new Server(httpServer, {
  transports: ["websocket"],
  serveClient: false,
  perMessageDeflate: false,
  maxHttpBufferSize: 65536,
});

io.on("connection", (socket) => {
  socket.on("join", (room, ack) => {
    if (typeof room !== "string") {
      if (typeof ack === "function") ack({ ok: false, reason: "invalid room" });
      return;
    }
    socket.join(room);
    if (typeof ack === "function") ack({ ok: true });
  });
  socket.on("send", (room, content, ack) => {
    if (typeof room !== "string" || !socket.rooms.has(room)) {
      if (typeof ack === "function") ack({ ok: false, reason: "not joined" });
      return;
    }
    io.to(room).emit("message", { content });
    if (typeof ack === "function") ack({ ok: true });
  });
});

httpServer.listen(port, host, () => {
  console.log(`socketio-peer listening on ${host}:${port}`);
});

const stop = () => {
  io.close();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
