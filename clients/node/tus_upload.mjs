// Upload one file with the official tus JavaScript client (tus-js-client, Node build).
//
// Usage:
//   node tus_upload.mjs --endpoint URL --file PATH [--token TOKEN] [--session ID]
//                       [--sha256] [--chunk-size BYTES] [--stop-after BYTES]
//                       [--resume-url URL]
//
// Output (stdout, one JSON line):
//   {"url": "...", "bytes": N, "complete": true}            upload finished
//   {"url": "...", "bytes": ACKED, "complete": false}       stopped by --stop-after (exit 0)
// On error: message on stderr (with HTTP status and body when available), exit 1.
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { basename } from 'node:path'
import * as tus from 'tus-js-client'

const USAGE =
  'usage: node tus_upload.mjs --endpoint URL --file PATH [--token TOKEN] [--session ID] ' +
  '[--sha256] [--chunk-size BYTES] [--stop-after BYTES] [--resume-url URL]'

function fail(msg, code = 1) {
  process.stderr.write(`${msg}\n`)
  process.exit(code)
}

function parseArgs(argv) {
  const valued = new Set([
    'endpoint',
    'file',
    'token',
    'session',
    'chunk-size',
    'stop-after',
    'resume-url',
  ])
  const flags = new Set(['sha256'])
  const out = { sha256: false }
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]
    if (arg === '-h' || arg === '--help') {
      process.stdout.write(`${USAGE}\n`)
      process.exit(0)
    }
    if (!arg.startsWith('--')) fail(`unexpected argument: ${arg}\n${USAGE}`, 2)
    const name = arg.slice(2)
    if (flags.has(name)) {
      out[name] = true
    } else if (valued.has(name)) {
      if (i + 1 >= argv.length) fail(`missing value for --${name}\n${USAGE}`, 2)
      out[name] = argv[++i]
    } else {
      fail(`unknown option: ${arg}\n${USAGE}`, 2)
    }
  }
  return out
}

function positiveInt(name, value) {
  if (value === undefined) return undefined
  if (!/^\d+$/.test(value) || Number(value) <= 0 || !Number.isSafeInteger(Number(value))) {
    fail(`--${name} must be a positive integer, got ${JSON.stringify(value)}`, 2)
  }
  return Number(value)
}

const args = parseArgs(process.argv.slice(2))
if (!args.file) fail(`--file is required\n${USAGE}`, 2)
if (!args.endpoint && !args['resume-url']) fail(`--endpoint (or --resume-url) is required\n${USAGE}`, 2)
const chunkSize = positiveInt('chunk-size', args['chunk-size'])
const stopAfter = positiveInt('stop-after', args['stop-after'])

let data
try {
  data = readFileSync(args.file)
} catch (err) {
  fail(`cannot read ${args.file}: ${err.message}`)
}

const metadata = { filename: basename(args.file) }
if (args.session !== undefined) metadata.session = args.session
if (args.sha256) metadata.sha256 = createHash('sha256').update(data).digest('hex')

const headers = {}
if (args.token !== undefined) headers.Authorization = `Bearer ${args.token}`

function describeError(err) {
  let msg = err && err.message ? err.message : String(err)
  const res = err && err.originalResponse
  if (res) {
    const req = err.originalRequest
    const what = req ? `${req.getMethod()} ${req.getURL()}` : 'request'
    msg += `\nHTTP status ${res.getStatus()} for ${what}; response body: ${JSON.stringify(res.getBody() ?? '')}`
  }
  return msg
}

// Same byte layout as Python's json.dumps: {"url": "...", "bytes": N, "complete": true}
function report(url, bytes, complete) {
  process.stdout.write(`{"url": ${JSON.stringify(url)}, "bytes": ${bytes}, "complete": ${complete}}\n`)
}

let acked = 0
let stopped = false

const options = {
  // With --resume-url the endpoint is deliberately not passed: tus-js-client would
  // otherwise silently create a brand-new upload when the HEAD on the resume URL fails
  // with a non-2xx status. Without an endpoint it reports the error instead.
  endpoint: args['resume-url'] ? null : args.endpoint,
  uploadUrl: args['resume-url'] ?? null,
  metadata,
  headers,
  retryDelays: [0, 500, 1000],
  storeFingerprintForResuming: false,
  removeFingerprintOnSuccess: true,
  onChunkComplete(_chunk, bytesAccepted, bytesTotal) {
    acked = bytesAccepted
    if (stopAfter !== undefined && !stopped && bytesAccepted >= stopAfter && bytesAccepted < bytesTotal) {
      stopped = true
      upload.abort().then(() => {
        report(upload.url, acked, false)
        process.exit(0)
      })
    }
  },
  onSuccess() {
    report(upload.url, data.length, true)
    process.exit(0)
  },
  onError(err) {
    fail(describeError(err))
  },
}
if (chunkSize !== undefined) options.chunkSize = chunkSize

const upload = new tus.Upload(data, options)
upload.start()
