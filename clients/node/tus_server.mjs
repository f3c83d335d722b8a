// Reference tus 1.0 server: the official tus Node server (@tus/server + @tus/file-store),
// with no options besides the path and the data directory. Used as the comparison
// baseline in benchmarks.
//
// Usage: node tus_server.mjs <port> <dir>
// Listens on 127.0.0.1:<port>, creation URL http://127.0.0.1:<port>/files,
// prints "listening <port>" once ready.
import { Server } from '@tus/server'
import { FileStore } from '@tus/file-store'

const [portArg, dir] = process.argv.slice(2)
const port = Number.parseInt(portArg ?? '', 10)
if (!Number.isInteger(port) || port < 0 || port > 65535 || !dir) {
  process.stderr.write('usage: node tus_server.mjs <port> <dir>\n')
  process.exit(2)
}

const server = new Server({
  path: '/files',
  datastore: new FileStore({ directory: dir }),
})

const httpServer = server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`listening ${httpServer.address().port}\n`)
})
httpServer.on('error', (err) => {
  process.stderr.write(`tus_server: ${err.message}\n`)
  process.exit(1)
})

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    httpServer.close()
    process.exit(0)
  })
}
