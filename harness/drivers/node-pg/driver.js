#!/usr/bin/env node
// pgfault driver for node-postgres: one pg.Pool (pg 8, pg-pool 3), driven over
// the JSON-lines protocol of docs/driver-protocol.md.
//
//   cd harness/drivers/node-pg && npm ci
//   pgfault driver-check exec:'node harness/drivers/node-pg/driver.js'
//
// The driver is thin: it uses pg.Pool the way a Node service does and nothing
// more. It never retries, never repairs what the pool did, and never catches
// what the pool throws outside a request: an 'error' event nobody listens to
// (driver setting error_listener=off), an unhandled rejection of init_sql, an
// error on a checked-out client -- each ends the process as it would end a
// service, and the runner reports that as CRASH. That is a finding, not a
// driver bug: do not add process.on('uncaughtException') or
// process.on('unhandledRejection') here.
'use strict'

const fs = require('fs')
const path = require('path')
const readline = require('readline')
const pg = require('pg')

// ---- versions ------------------------------------------------------------------
// pg-pool does not export its package.json, so both are read from disk.
function versionOf(dir) {
  return JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')).version
}
const PG_DIR = path.dirname(require.resolve('pg/package.json'))
const PG_VERSION = versionOf(PG_DIR)
const POOL_VERSION = versionOf(path.dirname(require.resolve('pg-pool', { paths: [PG_DIR] })))

// ---- what each scenario `pool` key becomes -------------------------------------
const mapped = (option) => ({ status: 'mapped', option })
const ignored = (reason) => ({ status: 'ignored', reason })
const unsupported = (reason) => ({ status: 'unsupported', reason })

const SETTINGS = {
  max: mapped('max'),
  // pg-pool 3.x: `min` is read in index.js only by _isAboveMin(), which keeps the
  // idle timeout from closing a client while the pool holds <= min clients (all
  // clients, not only idle ones). Nothing ever opens a client to reach it.
  min_idle: mapped(
    'min (pg-pool: clients the idle timeout leaves open, counting every client; ' +
      'the pool never opens clients to reach it)'
  ),
  acquire_timeout: mapped(
    "connectionTimeoutMillis (pg.Pool's one deadline, for waiting for a free client " +
      'and for connecting a new one)'
  ),
  // No connect deadline of its own: a new client's connect is bounded by the same
  // connectionTimeoutMillis. At open: na unless acquire_timeout <= connect_timeout.
  connect_timeout: mapped(
    'connectionTimeoutMillis (shared with acquire_timeout: honoured only when ' +
      'acquire_timeout <= connect_timeout, else na)'
  ),
  idle_timeout: mapped(
    'idleTimeoutMillis (pg.Pool default 10000 when unset; not applied while the ' +
      'pool holds min clients or fewer)'
  ),
  max_lifetime: mapped('maxLifetimeSeconds (whole seconds only, else na)'),
  validate_idle: mapped('(none: pg.Pool never validates an idle client; only never is honoured)'),
  validation_timeout: unsupported(
    'pg.Pool never validates a client before handing it out, so there is no ' +
      'validation to bound'
  ),
  auth_retry_after: unsupported(
    'pg.Pool has no auth back-off: every acquire that needs a new client connects ' +
      'to the server again'
  ),
  backoff_initial: unsupported(
    'pg.Pool has no reconnect back-off: it never retries a failed connect, the ' +
      'next acquire simply connects again'
  ),
  backoff_max: unsupported(
    'pg.Pool has no reconnect back-off: it never retries a failed connect, the ' +
      'next acquire simply connects again'
  ),
  release_timeout: unsupported(
    'client.release() takes no deadline: it is synchronous and does no cleanup ' +
      '(no rollback, no cancel of a running query)'
  ),
  housekeeping: ignored(
    'pg.Pool has no maintenance thread: its idle and lifetime timers are ' +
      'per-client setTimeouts on the event loop'
  ),
  init_sql: mapped(
    "pool.on('connect', (client) => { client.query(init_sql) }) (pg's documented " +
      'idiom; not awaited, so a failure is an unhandled rejection)'
  ),
  application_name: mapped('application_name (client option)'),
  dbname: mapped('database (client option)'),
  password: mapped('password (an async function returning the current value; pg calls it ' +
    'for each new client)'),
}

const DRIVER_SETTINGS = {
  error_listener: {
    values: ['on', 'off'],
    default: 'on',
    meaning:
      "whether the application attached pool.on('error') (without it, an idle " +
      "client's error is an uncaught exception and the process exits)",
  },
}

const METRICS = ['total', 'idle', 'waiting', 'in_use', 'expired', 'created', 'removed',
  'ejected', 'errors', 'acquires']
const CAPABILITIES = ['health', 'txstatus', 'backend_pid', 'client_port', 'password']
const DURATIONS = ['acquire_timeout', 'connect_timeout', 'idle_timeout', 'max_lifetime',
  'validation_timeout', 'auth_retry_after', 'backoff_initial', 'backoff_max',
  'release_timeout']
const COUNTS = ['max', 'min_idle']
const STRINGS = ['init_sql', 'application_name', 'dbname', 'password']

// ---- plumbing --------------------------------------------------------------------
// One line per message. stdout is a pipe, and Node writes pipes synchronously on
// Linux from its one thread, so lines never interleave and nothing written is
// lost when process.exit() follows.
function send(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

function log(text) {
  process.stderr.write(text + '\n')
}

function event(name, message, conn) {
  const ev = { event: name }
  if (message != null) ev.message = message
  if (conn != null) ev.conn = conn
  send(ev)
}

class BadRequest extends Error {}

// Answers one request exactly once: from the request's task or from its
// deadline timer, whichever comes first. A late answer goes to stderr.
class Reply {
  constructor(id) {
    this.id = id
    this.sent = false
    this.timer = null
  }

  send(fields) {
    if (this.sent) {
      log(`request ${this.id}: late answer dropped: ${JSON.stringify(fields)}`)
      return
    }
    this.sent = true
    if (this.timer) clearTimeout(this.timer)
    send(Object.assign({ id: this.id }, fields))
  }

  // Answers `timeout` at t0 + ms unless answered before. The harness's
  // deadline only: nothing is passed to pg.
  deadline(ms, t0) {
    this.timer = setTimeout(() => {
      this.send({ ok: true, outcome: 'timeout', message: `no answer within ${ms} ms`,
        elapsed_us: usSince(t0) })
    }, ms)
  }
}

const now = () => process.hrtime.bigint()
const usSince = (t0) => Number((now() - t0) / 1000n)

const SQLSTATE = /^[0-9A-Z]{5}$/

function describe(err) {
  if (err == null) return 'null'
  if (typeof err !== 'object') return String(err)
  const code = typeof err.code === 'string' ? ` (${err.code})` : ''
  return `${err.message}${code}`
}

// The acquire outcome for what pool.connect() rejected with.
function classify(err) {
  const m = String((err && err.message) || err)
  const code = err && typeof err.code === 'string' ? err.code : ''
  // pg-pool's own deadline, connectionTimeoutMillis: "timeout exceeded when
  // trying to connect" ends a wait in the queue, "Connection terminated due to
  // connection timeout" ends a connect that ran out of the same deadline. Both
  // are the pool's one acquire deadline expiring: timeout.
  if (m === 'timeout exceeded when trying to connect') return 'timeout'
  if (m === 'Connection terminated due to connection timeout') return 'timeout'
  if (m === 'Cannot use a pool after calling end on the pool') return 'closed'
  if (code === '28P01' || code === '28000') return 'auth'
  if (code === '3D000') return 'config'
  if (code.startsWith('08') || code.startsWith('57P') || code === '53300') return 'connect'
  if (['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EPIPE',
    'ENOTFOUND', 'EAI_AGAIN'].includes(code)) return 'connect'
  if (m === 'Connection terminated unexpectedly' || m === 'Connection terminated') return 'connect'
  return 'other'
}

// ---- the driver ------------------------------------------------------------------
let pool = null
let acquireTimeout = null // settings.acquire_timeout, ms
let currentPassword = ''
let nextHandle = 1
const conns = new Map() // handle -> client; handles are never reused
const handleOf = new WeakMap() // client -> the handle of its latest checkout
const counts = { created: 0, removed: 0, ejected: 0, errors: 0, acquires: 0 }

function clientConn(client) {
  return client ? handleOf.get(client) : undefined
}

function pidOf(client) {
  return client && client.processID ? `backend pid ${client.processID}` : undefined
}

function lookup(req) {
  if (typeof req.conn !== 'string' || !conns.has(req.conn)) {
    throw new BadRequest(`${req.op}: unknown conn ${JSON.stringify(req.conn)}`)
  }
  return conns.get(req.conn)
}

function checkSettings(s) {
  for (const [key, value] of Object.entries(s)) {
    if (DURATIONS.includes(key) || COUNTS.includes(key)) {
      if (!Number.isInteger(value) || value < 0) {
        throw new BadRequest(`open: settings.${key} must be a non-negative integer`)
      }
    } else if (STRINGS.includes(key)) {
      if (typeof value !== 'string') throw new BadRequest(`open: settings.${key} must be a string`)
    } else if (key === 'validate_idle' || key === 'housekeeping') {
      if (!(typeof value === 'string' || (Number.isInteger(value) && value >= 0))) {
        throw new BadRequest(`open: settings.${key} must be a duration or a word`)
      }
    }
  }
}

// The reason the pool cannot honour the settings, or null.
function notHonoured(s) {
  for (const [key, value] of Object.entries(s)) {
    const st = SETTINGS[key] || unsupported('the driver does not know this key')
    if (st.status === 'unsupported') return `${key}=${value}: ${st.reason}`
  }
  if ('validate_idle' in s && s.validate_idle !== 'never') {
    return `validate_idle=${s.validate_idle}: pg.Pool never validates an idle client before ` +
      'handing it out'
  }
  if ('max' in s && s.max === 0) return 'max=0: pg.Pool reads 0 as "unset" and uses 10'
  // pg.Pool reads 0 as "no deadline" / "never" for these; the scenario would
  // mean an immediate one.
  if (s.acquire_timeout === 0) {
    return 'acquire_timeout=0: pg.Pool reads connectionTimeoutMillis=0 as no deadline'
  }
  if (s.idle_timeout === 0) {
    return 'idle_timeout=0: pg.Pool reads idleTimeoutMillis=0 as never closing idle clients'
  }
  if ('max_lifetime' in s && (s.max_lifetime === 0 || s.max_lifetime % 1000 !== 0)) {
    return `max_lifetime=${s.max_lifetime}: pg.Pool's maxLifetimeSeconds is whole seconds ` +
      '(0 meaning no lifetime)'
  }
  if ('connect_timeout' in s) {
    if (!('acquire_timeout' in s)) {
      return `connect_timeout=${s.connect_timeout}: pg.Pool has no connect deadline of its own; ` +
        'a connect is bounded only by connectionTimeoutMillis, which acquire_timeout sets, and ' +
        'the scenario sets none'
    }
    if (s.connect_timeout < s.acquire_timeout) {
      return `connect_timeout=${s.connect_timeout}: pg.Pool has no connect deadline of its own; ` +
        `a connect runs until connectionTimeoutMillis=${s.acquire_timeout} (acquire_timeout)`
    }
  }
  return null
}

const ops = {
  hello() {
    return {
      protocol: 1,
      driver: 'node-pg',
      pool: 'pg.Pool (pg-pool)',
      version: `pg ${PG_VERSION}, pg-pool ${POOL_VERSION}`,
      settings: SETTINGS,
      metrics: METRICS,
      capabilities: CAPABILITIES,
      driver_settings: DRIVER_SETTINGS,
    }
  },

  open(req) {
    if (pool) throw new BadRequest('open: the pool is already open')
    const s = req.settings || {}
    if (typeof s !== 'object' || Array.isArray(s)) throw new BadRequest('open: settings must be an object')
    checkSettings(s)
    const ds = req.driver_settings || {}
    const listener = ds.error_listener == null ? DRIVER_SETTINGS.error_listener.default : ds.error_listener
    if (!DRIVER_SETTINGS.error_listener.values.includes(listener)) {
      throw new BadRequest(`open: driver_settings.error_listener must be on or off, not ${JSON.stringify(listener)}`)
    }
    for (const key of Object.keys(ds)) {
      if (!(key in DRIVER_SETTINGS)) throw new BadRequest(`open: unknown driver setting ${key}`)
    }
    const na = notHonoured(s)
    if (na) return { na }

    currentPassword = 'password' in s ? s.password : req.password
    const options = {
      host: req.host,
      port: req.port,
      user: req.user,
      database: 'dbname' in s ? s.dbname : req.dbname,
      // Called by pg for every new client: the rotating-token idiom.
      password: async () => currentPassword,
    }
    if ('max' in s) options.max = s.max
    if ('min_idle' in s) options.min = s.min_idle
    if ('acquire_timeout' in s) options.connectionTimeoutMillis = s.acquire_timeout
    if ('idle_timeout' in s) options.idleTimeoutMillis = s.idle_timeout
    if ('max_lifetime' in s) options.maxLifetimeSeconds = s.max_lifetime / 1000
    if ('application_name' in s) options.application_name = s.application_name
    acquireTimeout = 'acquire_timeout' in s ? s.acquire_timeout : null

    pool = new pg.Pool(options)

    // The pool's events, as the protocol's events.
    pool.on('connect', (client) => {
      counts.created++
      event('connect', pidOf(client))
    })
    pool.on('acquire', (client) => {
      // Named here, synchronously before pool.connect() resolves with this
      // client, so the event carries the handle the acquire will answer.
      counts.acquires++
      const handle = `c${nextHandle++}`
      handleOf.set(client, handle)
      conns.set(handle, client)
      event('acquire', pidOf(client), handle)
    })
    pool.on('release', (err, client) => {
      const why = err ? (err === true ? 'destroy requested' : describe(err)) : undefined
      event('release', why, clientConn(client))
    })
    pool.on('remove', (client) => {
      counts.removed++
      // pg-pool gives no reason; a removal while end() runs is the close.
      if (!pool.ending) counts.ejected++
      event('remove', pidOf(client), clientConn(client))
    })
    if (listener === 'on') {
      // What a careful service writes: log it, nothing else.
      pool.on('error', (err, client) => {
        counts.errors++
        event('error', describe(err), clientConn(client))
      })
    }
    // error_listener=off: no listener at all. An idle client's error then
    // throws from EventEmitter.emit('error') and the process exits.
    if ('init_sql' in s) {
      const sql = s.init_sql
      // pg's documented idiom (node-postgres.com, pool 'connect' event), and
      // what services write: not awaited, no .catch(). The query is queued on
      // the client before the acquirer gets it, so it runs first; its failure
      // is an unhandled rejection, which ends a Node 20 process. pg-pool 3.14
      // also has an `onConnect` option that fails the acquire instead; it is
      // recent and rarely used, so it is not what this driver models.
      pool.on('connect', (client) => {
        client.query(sql)
      })
    }
    return {}
  },

  async acquire(req) {
    const ms = req.timeout_ms
    if (ms != null && ms !== acquireTimeout) {
      // pool.connect() takes no deadline: the only one is connectionTimeoutMillis.
      throw new BadRequest(`acquire: pg.Pool has no per-call acquire timeout (asked ${ms} ms; ` +
        `connectionTimeoutMillis is ${acquireTimeout == null ? 'unset' : acquireTimeout + ' ms'})`)
    }
    const t0 = now()
    let client
    try {
      client = await pool.connect()
    } catch (err) {
      const us = usSince(t0)
      const res = { outcome: classify(err), message: describe(err), elapsed_us: us }
      if (err && typeof err.code === 'string' && SQLSTATE.test(err.code)) res.sqlstate = err.code
      return res
    }
    const us = usSince(t0)
    return { outcome: 'ok', conn: handleOf.get(client), elapsed_us: us }
  },

  release(req) {
    return giveBack(req, undefined)
  },

  discard(req) {
    // pg documents client.release(destroy?: boolean | Error): truthy destroys.
    return giveBack(req, true)
  },

  async query(req, reply) {
    const client = lookup(req)
    if (typeof req.sql !== 'string') throw new BadRequest('query: sql must be a string')
    const t0 = now()
    reply.deadline(req.timeout_ms == null ? 10000 : req.timeout_ms, t0)
    try {
      await client.query(req.sql)
      return { outcome: 'ok', elapsed_us: usSince(t0) }
    } catch (err) {
      const res = { outcome: 'error', message: describe(err), elapsed_us: usSince(t0) }
      if (err && typeof err.code === 'string' && SQLSTATE.test(err.code)) res.sqlstate = err.code
      return res
    }
  },

  conn_info(req) {
    const client = lookup(req)
    const stream = client.connection && client.connection.stream
    const port = stream && Number.isInteger(stream.localPort) ? stream.localPort : null
    return { backend_pid: client.processID || null, client_port: port, txstatus: txstatus(client) }
  },

  metric(req) {
    const values = {
      total: pool.totalCount,
      idle: pool.idleCount,
      waiting: pool.waitingCount,
      in_use: pool.totalCount - pool.idleCount,
      expired: pool.expiredCount,
      created: counts.created,
      removed: counts.removed,
      ejected: counts.ejected,
      errors: counts.errors,
      acquires: counts.acquires,
    }
    if (!(req.name in values) || values[req.name] === undefined) {
      throw new BadRequest(`metric: no metric ${JSON.stringify(req.name)}`)
    }
    return { value: values[req.name] }
  },

  async health(req, reply) {
    // pg.Pool has no readiness check: SELECT 1 through pool.query, which
    // acquires, queries and releases (destroying the client on error).
    const t0 = now()
    reply.deadline(req.timeout_ms == null ? 10000 : req.timeout_ms, t0)
    try {
      await pool.query('SELECT 1')
      return { outcome: 'ok', elapsed_us: usSince(t0) }
    } catch (err) {
      return { outcome: 'error', message: describe(err), elapsed_us: usSince(t0) }
    }
  },

  password(req) {
    if (typeof req.password !== 'string') throw new BadRequest('password: password must be a string')
    currentPassword = req.password // the password function returns it from the next connect on
    return {}
  },

  async close() {
    // end() resolves once every client is closed, so it waits for checked-out
    // clients to be released; waiters in the queue are not woken by it.
    try {
      await pool.end()
      return { outcome: 'ok' }
    } catch (err) {
      return { outcome: 'error', message: describe(err) }
    }
  },
}

function giveBack(req, destroy) {
  const client = lookup(req)
  // What an application holding this client object does. pg-pool replaces
  // client.release at each checkout, so a stale second release after someone
  // else checked the client out releases *their* checkout, as in a service.
  try {
    if (destroy) client.release(destroy)
    else client.release()
  } catch (err) {
    return { outcome: 'error', message: describe(err) }
  }
  return { outcome: 'ok' }
}

// pg keeps the status byte of the last ReadyForQuery (client.getTransactionStatus(),
// public in pg 8.x: 'I', 'T', 'E' or null). While a query is in flight that byte
// is stale, so `active` comes from client.readyForQuery; a client whose socket
// died is `unknown` (libpq says the same). _queryable and _ending are private
// fields, the ones pg-pool itself reads on release.
function txstatus(client) {
  if (client._queryable === false || client._ending) return 'unknown'
  if (client.readyForQuery === false) return 'active'
  const st = typeof client.getTransactionStatus === 'function' ? client.getTransactionStatus() : null
  return { I: 'idle', T: 'intrans', E: 'inerror' }[st] || 'unknown'
}

async function run(req) {
  const reply = new Reply(req.id)
  const op = req.op
  try {
    const fn = typeof op === 'string' && Object.prototype.hasOwnProperty.call(ops, op) ? ops[op] : null
    if (!fn) throw new BadRequest(`unknown op ${JSON.stringify(op)}`)
    if (op !== 'hello' && op !== 'open' && !pool) throw new BadRequest(`${op}: no pool (send open first)`)
    const ms = req.timeout_ms
    if (ms != null && !(Number.isInteger(ms) && ms >= 0)) {
      throw new BadRequest(`${op}: timeout_ms must be a non-negative integer`)
    }
    const fields = await fn(req, reply)
    reply.send(Object.assign({ ok: true }, fields))
  } catch (err) {
    if (err instanceof BadRequest) reply.send({ ok: false, error: err.message })
    else reply.send({ ok: false, error: `${op}: driver error: ${err && err.stack ? err.stack : err}` })
  }
}

function main() {
  // Logging only: 'uncaughtExceptionMonitor' cannot keep the process alive (Node
  // still prints the error and exits 1). It puts a one-line cause in the trace
  // ahead of Node's own dump, which for a pool 'error' prints the whole client.
  process.on('uncaughtExceptionMonitor', (err, origin) => {
    log(`uncaught (${origin}), the process exits: ${describe(err)}`)
  })
  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity, terminal: false })
  rl.on('line', (line) => {
    if (line.trim() === '') return
    let req
    try {
      req = JSON.parse(line)
      if (req === null || typeof req !== 'object' || Array.isArray(req) || !Number.isInteger(req.id)) {
        throw new Error('no integer id')
      }
    } catch (err) {
      log(`bad request ignored: ${JSON.stringify(line)}: ${err.message}`)
      return
    }
    run(req) // not awaited: every request is served concurrently
  })
  // stdin closed: the runner is done with us. Requests still in flight are
  // abandoned; everything already answered has been written (pipe writes are
  // synchronous). An open stdin keeps the process alive however idle it is.
  rl.on('close', () => process.exit(0))
}

main()
