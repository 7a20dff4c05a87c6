// node-postgres scenarios of pgwarden's compatibility matrix; driven by tests/compat/test_node.py.
//
// Usage: PGW_DSN=postgresql://user:pw@host:port/shop PGW_LOOKUP_SQL=... (every PGW_* variable
//        test_node.py sets: the scenario's statements and the customer) node scenario.js [feature ...]
//
// Prints one JSON line per feature: {"feature", "facts": {...}, "received": [...]}, or
// {"feature", "crash": "..."} when the scenario itself failed. The program judges nothing:
// it reports what the driver did (rows, SQLSTATEs, counts) and every value it received
// (rows, error fields, notices, notification payloads) so that the test can assert on
// them and run the PII leak check. It never prints anything but those JSON lines.
'use strict'

const pg = require('pg')
const Cursor = require('pg-cursor')

const env = (name) => {
  const value = process.env[name]
  if (value === undefined) throw new Error(`${name} is not set`)
  return value
}
const DSN = env('PGW_DSN')
const CANCEL_LIMIT_MS = 20000 // statement_timeout of the cancel scenario: a cancel that never lands fails, not hangs

// --- recording ----------------------------------------------------------------------

class Recorder {
  constructor () {
    this.received = []
    this.facts = {}
  }

  rows (result) {
    for (const row of result.rows) this.received.push(JSON.stringify(row, jsonValue))
    return result.rows
  }

  error (err) {
    const fields = {
      code: err.code,
      severity: err.severity,
      message: err.message,
      detail: err.detail,
      hint: err.hint,
    }
    for (const value of Object.values(fields)) if (value) this.received.push(String(value))
    return { code: err.code || null, message: err.message || '', hint: err.hint || '' }
  }

  client (client) {
    client.on('notice', (msg) => this.received.push(String(msg.message || '')))
    client.on('notification', (msg) => this.received.push(String(msg.payload || '')))
    client.on('error', (err) => this.error(err))
    return client
  }
}

function jsonValue (_key, value) {
  if (typeof value === 'bigint') return value.toString()
  if (value && value.type === 'Buffer' && Array.isArray(value.data)) {
    return Buffer.from(value.data).toString('utf8')
  }
  return value
}

async function connect (rec, extra = {}) {
  const client = rec.client(new pg.Client({ connectionString: DSN, ...extra }))
  await client.connect()
  return client
}

// {ok: true, value} or, for an error the server (or pgwarden) sent, {ok: false, error}
async function attempt (rec, fn) {
  try {
    const value = await fn()
    const isResult = value && Array.isArray(value.rows) && 'command' in value
    return { ok: true, value: isResult ? rec.rows(value).length : value }
  } catch (err) {
    if (!err || err.code === undefined) throw err // not a server error: the scenario crashed
    return { ok: false, error: rec.error(err) }
  }
}

async function withClient (rec, fn, extra = {}) {
  const client = await connect(rec, extra)
  try {
    return await fn(client)
  } finally {
    await client.end()
  }
}

// --- features -----------------------------------------------------------------------

const FEATURES = {
  async login (rec) {
    await withClient(rec, async (client) => {
      const result = await client.query(
        "SELECT version() AS version, current_setting('server_version_num') AS num, " +
          "current_database() AS db, current_setting('application_name') AS app"
      )
      const [row] = rec.rows(result)
      rec.facts.version = row.version
      rec.facts.server_version_num = Number(row.num)
      rec.facts.database = row.db
      rec.facts.application_name = row.app
      rec.facts.backend_key = Boolean(client.processID) && Boolean(client.secretKey)
    }, { application_name: 'pgwarden compat (node-postgres)' })
  },

  async lookup_by_email (rec) {
    await withClient(rec, async (client) => {
      const result = await client.query(env('PGW_LOOKUP_SQL'), [env('PGW_LOOKUP_EMAIL')])
      rec.facts.rows = rec.rows(result).map(Object.values)
    })
  },

  async list_tickets (rec) {
    await withClient(rec, async (client) => {
      const result = await client.query(env('PGW_TICKETS_SQL'), [Number(env('PGW_CUSTOMER_ID'))])
      rec.facts.rows = rec.rows(result).map(Object.values)
    })
  },

  async refused_sqlstate (rec) {
    await withClient(rec, async (client) => {
      const refused = await attempt(rec, async () => rec.rows(await client.query(env('PGW_REFUSED_SQL'))).length)
      rec.facts.refused = refused
      rec.facts.usable_after = await usable(rec, client)
    })
  },

  async row_cap (rec) {
    await withClient(rec, async (client) => {
      // a Query emits 'row' for every DataRow as it arrives: counts what reached the client
      const query = client.query(new pg.Query(env('PGW_ROW_CAP_SQL')))
      let seen = 0
      query.on('row', (row) => { seen++; rec.rows({ rows: [row] }) })
      rec.facts.all = await new Promise((resolve) => {
        query.on('end', () => resolve({ ok: true, value: seen }))
        query.on('error', (err) => resolve({ ok: false, error: rec.error(err) }))
      })
      rec.facts.rows_seen = seen
      rec.facts.usable_after = await usable(rec, client)
    })
  },

  async prepared_reuse (rec) {
    await withClient(rec, async (client) => {
      const runs = Number(env('PGW_PREPARED_RUNS'))
      const rows = []
      for (let i = 0; i < runs; i++) {
        // a named statement: Parse once, then Bind/Execute on every run
        const result = await client.query({ name: 'compat_by_id', text: env('PGW_PREPARED_SQL'), values: [i + 1] })
        rows.push(...rec.rows(result).map(Object.values))
      }
      rec.facts.rows = rows
    })
  },

  async transaction_rollback (rec) {
    await withClient(rec, async (client) => {
      await client.query('BEGIN')
      rec.rows(await client.query('SELECT count(*) AS n FROM orders'))
      rec.facts.failed = await attempt(rec, () => client.query('SELECT 1 / 0'))
      rec.facts.aborted = await attempt(rec, () => client.query('SELECT 1'))
      await client.query('ROLLBACK')
      rec.facts.usable_after = await usable(rec, client)
      // a write rolled back (a role that may not write is refused: that is asserted too)
      rec.facts.write = await attempt(rec, async () => {
        await client.query('BEGIN')
        try {
          await client.query('CREATE TEMP TABLE compat_tx (x int)')
          await client.query('INSERT INTO compat_tx VALUES (1), (2)')
        } finally {
          await client.query('ROLLBACK')
        }
        return await attempt(rec, () => client.query('SELECT x FROM compat_tx'))
      })
      rec.facts.usable_at_end = await usable(rec, client)
    })
  },

  async cancel (rec) {
    const app = `pgwarden compat cancel ${process.pid}`
    await withClient(rec, async (client) => {
      // SET, not the statement_timeout connection option: pgwarden refuses that startup parameter
      await client.query(`SET statement_timeout = ${CANCEL_LIMIT_MS}`)
      const query = client.query(new pg.Query(env('PGW_LONG_SQL')))
      const outcome = new Promise((resolve) => {
        query.on('end', (result) => resolve({ ok: true, value: rec.rows(result).length }))
        query.on('error', (err) => resolve({ ok: false, error: rec.error(err) }))
      })
      rec.facts.running = await waitUntilActive(app)
      // the driver's cancel API: a second Client's cancel(client, query) sends a CancelRequest
      const canceller = new pg.Client({ connectionString: DSN })
      canceller.on('error', (err) => rec.error(err))
      canceller.cancel(client, query)
      rec.facts.result = await outcome
      rec.facts.usable_after = await usable(rec, client)
    }, { application_name: app })
  },

  async listen_notify (rec) {
    const channel = env('PGW_CHANNEL')
    await withClient(rec, async (listener) => {
      const heard = new Promise((resolve) => listener.once('notification', resolve))
      rec.facts.listen = await attempt(rec, () => listener.query(`LISTEN ${channel}`))
      if (rec.facts.listen.ok) {
        await withClient(rec, (notifier) => notifier.query('SELECT pg_notify($1, $2)', [channel, 'hello from node-postgres']))
        const msg = await heard
        rec.facts.notification = [msg.channel, msg.payload]
        await listener.query(`UNLISTEN ${channel}`)
      }
      rec.facts.usable_after = await usable(rec, listener)
    })
  },

  async metadata (rec) {
    await withClient(rec, async (client) => {
      const tables = await client.query(
        'SELECT table_name FROM information_schema.tables ' +
          "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
      )
      rec.facts.tables = rec.rows(tables).map((r) => r.table_name)
      const columns = await client.query(
        'SELECT column_name, data_type FROM information_schema.columns ' +
          "WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
        ['customers']
      )
      rec.facts.columns = rec.rows(columns).map(Object.values)
      const pk = await client.query(
        'SELECT a.attname FROM pg_catalog.pg_index i ' +
          'JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) ' +
          'WHERE i.indrelid = $1::regclass AND i.indisprimary',
        ['public.customers']
      )
      rec.facts.primary_key = rec.rows(pk).map((r) => r.attname)
      // every type, as an admin panel's type map reads it: more rows than support's row cap
      const types = await client.query('SELECT oid, typname FROM pg_catalog.pg_type ORDER BY oid')
      rec.facts.types = rec.rows(types).length
      // the RowDescription node-postgres builds its result fields from
      const fields = await client.query(
        'SELECT c.id, c.email, t.created_at FROM customers c JOIN support_tickets t ON t.customer_id = c.id WHERE false'
      )
      rec.facts.fields = fields.fields.map((f) => [f.name, f.dataTypeID])
    })
  },

  async binary (rec) {
    await withClient(rec, async (client) => {
      // every result column in binary format (node-postgres' binary option)
      const lookup = await client.query({ text: env('PGW_LOOKUP_SQL'), values: [env('PGW_LOOKUP_EMAIL')], binary: true })
      rec.facts.lookup = rec.rows(lookup).map(Object.values)
      const tickets = await client.query({ text: env('PGW_TICKETS_SQL'), values: [Number(env('PGW_CUSTOMER_ID'))], binary: true })
      rec.facts.tickets = rec.rows(tickets).map(Object.values)
      const bytes = await client.query({
        text: "SELECT convert_to(email, 'UTF8') AS email, convert_to(phone, 'UTF8') AS phone FROM customers WHERE id = $1",
        values: [Number(env('PGW_CUSTOMER_ID'))],
        binary: true,
      })
      rec.facts.bytes = rec.rows(bytes).map((r) => [r.email.toString('utf8'), r.phone.toString('utf8')])
    })
  },

  async server_cursor (rec) {
    await withClient(rec, async (client) => {
      const small = client.query(new Cursor('SELECT id, email FROM customers WHERE id <= $1 ORDER BY id', [40]))
      const batches = []
      for (;;) {
        const rows = await small.read(15)
        rec.rows({ rows })
        if (rows.length === 0) break
        batches.push(rows.length)
      }
      await small.close()
      rec.facts.batches = batches
      const big = client.query(new Cursor(env('PGW_ROW_CAP_SQL')))
      let delivered = 0
      rec.facts.big = await attempt(rec, async () => {
        for (;;) {
          const rows = await big.read(20)
          rec.rows({ rows })
          delivered += rows.length
          if (rows.length === 0) return delivered
        }
      })
      rec.facts.big_delivered = delivered
      await big.close()
      rec.facts.usable_after = await usable(rec, client)
    })
  },

  async pool (rec) {
    const pool = new pg.Pool({ connectionString: DSN, max: 3 })
    pool.on('error', (err) => rec.error(err))
    pool.on('connect', (client) => rec.client(client))
    try {
      const jobs = []
      for (let i = 1; i <= 12; i++) jobs.push(pool.query(env('PGW_PREPARED_SQL'), [i]))
      rec.facts.rows = (await Promise.all(jobs)).map((result) => rec.rows(result).map(Object.values)[0])
      rec.facts.clients = pool.totalCount
      const client = await pool.connect()
      try {
        await client.query('BEGIN')
        rec.rows(await client.query('SELECT count(*) AS n FROM orders'))
        await client.query('COMMIT')
        rec.facts.checkout = true
      } finally {
        client.release()
      }
    } finally {
      await pool.end()
    }
  },
}

// Poll pg_stat_activity on a direct superuser connection (PGW_ADMIN_DSN, not through
// pgwarden) until a query of application_name app runs upstream: the cancel then lands.
async function waitUntilActive (app) {
  const admin = new pg.Client({ connectionString: env('PGW_ADMIN_DSN') })
  await admin.connect()
  try {
    for (let i = 0; i < 750; i++) {
      const result = await admin.query(
        "SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'",
        [app]
      )
      if (result.rows[0].n > 0) return true
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
    return false
  } finally {
    await admin.end()
  }
}

async function usable (rec, client) {
  const rows = rec.rows(await client.query('SELECT 1 AS one'))
  return rows.length === 1 && rows[0].one === 1
}

async function main () {
  const wanted = process.argv.slice(2)
  const names = wanted.length ? wanted : Object.keys(FEATURES)
  for (const name of names) {
    const rec = new Recorder()
    let line
    try {
      if (!FEATURES[name]) throw new Error(`unknown feature ${name}`)
      await FEATURES[name](rec)
      line = { feature: name, facts: rec.facts, received: rec.received }
    } catch (err) {
      line = { feature: name, crash: String((err && err.stack) || err), facts: rec.facts, received: rec.received }
    }
    process.stdout.write(JSON.stringify(line, jsonValue) + '\n')
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(String((err && err.stack) || err) + '\n')
    process.exit(1)
  }
)
