// Service worker: the app shell (page, modules, styles, vendored libraries,
// icons) from a cache, so the page opens offline and after a reload without
// a connection; the API is never cached (it is not even seen here: only
// same-origin GETs of the shell's own paths are answered).
const CACHE = 'relaypacs-shell-v1';
const SHELL = [
  '/',
  '/index.html',
  '/app.js',
  '/upload.js',
  '/studies.js',
  '/style.css',
  '/manifest.webmanifest',
  '/icons/icon.svg',
  '/icons/icon-192.png',
  '/icons/icon-512.png',
  '/vendor/tus-js-client/tus.min.js',
  '/vendor/dicom-parser/dicomParser.min.js',
  '/vendor/hash-wasm/sha256.umd.min.js',
];
// Loaded when present (other views); a missing one is not an error.
const OPTIONAL = [
  '/views/analytics.js',
  '/views/admin.js',
  '/views/reports.js',
  '/views/analytics.css',
  '/views/admin.css',
  '/views/reports.css',
  '/vendor/uplot/uPlot.esm.js',
  '/vendor/uplot/uPlot.min.css',
];

self.addEventListener('install', (event) => {
  event.waitUntil(
    (async () => {
      const cache = await caches.open(CACHE);
      await cache.addAll(SHELL);
      // One at a time, and the body of a refusal read to its end: an
      // unread body keeps its keep-alive connection busy, and a few of them
      // exhaust the browser's connections to this origin.
      for (const p of OPTIONAL) {
        try {
          const res = await fetch(p, { cache: 'no-cache' });
          if (res.ok) await cache.put(p, res);
          else await res.arrayBuffer();
        } catch {
          /* offline at install: the next visit fills it */
        }
      }
      await self.skipWaiting();
    })(),
  );
});

self.addEventListener('activate', (event) => {
  event.waitUntil(
    (async () => {
      for (const k of await caches.keys()) if (k !== CACHE) await caches.delete(k);
      await self.clients.claim();
    })(),
  );
});

function isShell(url) {
  return (
    url.origin === self.location.origin &&
    !url.pathname.startsWith('/api/') &&
    !url.pathname.startsWith('/files') &&
    !url.pathname.startsWith('/dicomweb') &&
    (SHELL.includes(url.pathname) || OPTIONAL.includes(url.pathname) || url.pathname.startsWith('/views/'))
  );
}

// Network first (the server answers 304 while a file is unchanged), the
// cache when the network fails.
self.addEventListener('fetch', (event) => {
  const req = event.request;
  if (req.method !== 'GET') return;
  const url = new URL(req.url);
  if (!isShell(url)) return;
  event.respondWith(
    (async () => {
      const cache = await caches.open(CACHE);
      try {
        const res = await fetch(req);
        if (res.ok) await cache.put(req, res.clone());
        return res;
      } catch (e) {
        const hit = (await cache.match(req)) || (req.mode === 'navigate' ? await cache.match('/') : undefined);
        if (hit) return hit;
        throw e;
      }
    })(),
  );
});
