// The web app's end-to-end test in Debian's Chromium, driven by
// playwright-core (no browser download). Started by
// relaypacs-http/tests/browser.rs, which runs the real server and Orthanc,
// generates the folder and checks the PACS byte for byte afterwards.
//
// Env: RELAYPACS_URL, CHROMIUM, USER1/PASSWORD1/TOTP1 (base32 secret),
// USER2/PASSWORD2, FOLDER (three studies), FOLDER2 (one study, for the
// browser restart), EXPECT (JSON: groups, skipped, refused, files, bytes,
// large, restart, sr_text), ARTIFACTS (screenshots). Protocol with the Rust side:
// this script prints "STEP delivered" when every study shows delivered and
// waits for the line "reports added" on stdin.
// Exit status 0 only if every check passed.

import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { chromium } from 'playwright-core';

const env = process.env;
const BASE = env.RELAYPACS_URL;
const EXPECT = JSON.parse(env.EXPECT);
const ART = env.ARTIFACTS;
const T0 = Date.now();
const DEADLINE_MS = 200_000;

setTimeout(() => {
  console.error(`deadline: the test took more than ${DEADLINE_MS / 1000} s`);
  process.exit(3);
}, DEADLINE_MS).unref();

function log(msg) {
  console.log(`[${((Date.now() - T0) / 1000).toFixed(1)} s] ${msg}`);
}

function check(cond, msg) {
  if (!cond) throw new Error(`check failed: ${msg}`);
}

/** RFC 6238 (SHA-1, 6 digits, 30 s) of the current step. */
function totp(b32, at = Date.now()) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = '';
  for (const c of b32.replace(/=+$/, '').toUpperCase()) bits += alphabet.indexOf(c).toString(2).padStart(5, '0');
  const key = Buffer.from(bits.match(/.{8}/g).map((b) => parseInt(b, 2)));
  const msg = Buffer.alloc(8);
  msg.writeBigUInt64BE(BigInt(Math.floor(at / 1000 / 30)));
  const mac = crypto.createHmac('sha1', key).update(msg).digest();
  const o = mac[mac.length - 1] & 0xf;
  const n = (mac.readUInt32BE(o) & 0x7fffffff) % 1_000_000;
  return String(n).padStart(6, '0');
}

const input = readline.createInterface({ input: process.stdin });
const lines = [];
let lineWaiter = null;
input.on('line', (l) => {
  lines.push(l);
  if (lineWaiter) lineWaiter();
});
async function waitLine(want, ms) {
  const end = Date.now() + ms;
  while (!lines.includes(want)) {
    check(Date.now() < end, `no "${want}" from the test harness`);
    await new Promise((r) => {
      lineWaiter = r;
      setTimeout(r, 500);
    });
  }
}

/** At most this many messages (toasts) at once. */
const MAX_TOASTS = 3;

/** The messages (toasts) cover no control: at every scroll position of the
 *  page, no toast's box meets the box of a shown button, link, field, tab,
 *  frame, study or notification; the region is a polite live region with at
 *  most MAX_TOASTS, each with a named dismiss button. Returns the count. */
async function checkToasts(page, name) {
  const r = await page.evaluate(() => {
    const region = document.getElementById('toasts');
    const toasts = [...region.querySelectorAll('.toast')];
    const named = toasts.every((t) => {
      const b = t.querySelector('button');
      return b && (b.getAttribute('aria-label') || b.textContent).trim().length > 0;
    });
    const controls = [
      ...document.querySelectorAll(
        'button, a[href], input:not([type=file]), select, textarea, summary, iframe, [role=tab], ' +
          '[data-test="study-row"], [data-test="study-progress"], [data-test="notification"]',
      ),
    ].filter((el) => !el.closest('#toasts') && !el.closest('[hidden]') && el.getClientRects().length);
    const over = new Set();
    const y0 = window.scrollY;
    const step = Math.max(100, Math.floor(window.innerHeight / 2));
    for (let y = 0; toasts.length; y += step) {
      window.scrollTo(0, y);
      const boxes = toasts.map((t) => t.getBoundingClientRect());
      for (const el of controls) {
        const c = el.getBoundingClientRect();
        if (c.width === 0 || c.height === 0 || c.bottom <= 0 || c.top >= window.innerHeight) continue;
        for (const t of boxes) {
          if (c.left < t.right && t.left < c.right && c.top < t.bottom && t.top < c.bottom) {
            over.add(`${el.tagName.toLowerCase()}[${el.dataset.test || el.textContent.trim().slice(0, 30)}]`);
          }
        }
      }
      if (y + window.innerHeight >= document.documentElement.scrollHeight) break;
    }
    window.scrollTo(0, y0);
    return {
      role: region.getAttribute('role'),
      live: region.getAttribute('aria-live'),
      count: toasts.length,
      named,
      over: [...over],
    };
  });
  check(r.role === 'status' && r.live === 'polite', `${name}: the messages are a polite live region: ${JSON.stringify(r)}`);
  check(r.count <= MAX_TOASTS, `${name}: ${r.count} messages at once (at most ${MAX_TOASTS})`);
  check(r.named, `${name}: every message has a dismiss button with an accessible name`);
  check(r.over.length === 0, `${name}: messages cover controls: ${r.over.join(' | ')}`);
  return r.count;
}

let shotN = 0;
/** A screenshot of the step, after checking the phone-sized layout (no
 *  sideways scrolling), that every control of the shell's own views, of
 *  the open report and of the messages that a user can reach has an
 *  accessible name, and that no message covers a control. */
async function shot(page, name) {
  const width = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
  check(width[0] <= width[1], `${name}: the page scrolls sideways on a phone (${width[0]} > ${width[1]} px)`);
  const unnamed = await page.evaluate(() => {
    const roots = ['header', '#login', '#view-upload', '#view-studies', '#notifications', '#offline', '#report-host', '#toasts']
      .map((q) => document.querySelector(q))
      .filter(Boolean);
    const out = [];
    for (const root of roots) {
      for (const el of root.querySelectorAll('button, input, select, textarea, a[href], [tabindex]:not([tabindex="-1"])')) {
        if (el.closest('[hidden]') || el.getAttribute('aria-hidden') === 'true' || el.tabIndex < 0) continue;
        const byFor = el.id && document.querySelector(`label[for="${el.id}"]`);
        const byIds = (el.getAttribute('aria-labelledby') || '')
          .split(/\s+/)
          .map((i) => document.getElementById(i))
          .filter(Boolean);
        const name = (
          el.getAttribute('aria-label') ||
          byIds.map((x) => x.textContent).join(' ') ||
          (byFor && byFor.textContent) ||
          (el.closest('label') && el.closest('label').textContent) ||
          (['BUTTON', 'A'].includes(el.tagName) && el.textContent) ||
          el.getAttribute('title') ||
          ''
        ).trim();
        if (!name) out.push(el.outerHTML.slice(0, 120));
      }
    }
    return out;
  });
  check(unnamed.length === 0, `${name}: controls without an accessible name: ${unnamed.join(' | ')}`);
  await checkToasts(page, name);
  const file = path.join(ART, `${String(++shotN).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  log(`screenshot ${path.basename(file)}`);
}

const sel = (t) => `[data-test="${t}"]`;

async function login(page, user, password, code) {
  await page.getByLabel('User name').fill(user);
  await page.getByLabel('Password').fill(password);
  if (code) await page.getByLabel(/Authenticator code/).fill(code);
  await page.locator(sel('login-submit')).click();
  await page.locator(sel('tab-upload')).waitFor({ timeout: 15000 });
}

/** RFC 4180 parse (quoted cells, CRLF). */
function parseCsv(text) {
  const rows = [];
  let row = [];
  let cell = '';
  let q = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (q) {
      if (c === '"' && text[i + 1] === '"') {
        cell += '"';
        i++;
      } else if (c === '"') q = false;
      else cell += c;
    } else if (c === '"') q = true;
    else if (c === ',') {
      row.push(cell);
      cell = '';
    } else if (c === '\r' && text[i + 1] === '\n') {
      row.push(cell);
      rows.push(row);
      row = [];
      cell = '';
      i++;
    } else cell += c;
  }
  if (cell || row.length) rows.push([...row, cell]);
  return rows;
}

/** Open the analytics tab, export the CSV, parse it; sums of its counts. */
async function exportCsv(page) {
  await page.locator(sel('tab-analytics')).click();
  await page.locator(sel('analytics-table')).waitFor({ timeout: 15000 });
  const [dl] = await Promise.all([page.waitForEvent('download'), page.locator(sel('analytics-export-csv')).click()]);
  const text = fs.readFileSync(await dl.path(), 'utf8');
  const rows = parseCsv(text);
  check(rows.length >= 1, `CSV has a header row: ${text.slice(0, 200)}`);
  const [head, ...data] = rows;
  for (const col of ['uploads', 'delivered', 'files', 'bytes', 'refused']) check(head.includes(col), `CSV column ${col} in ${head}`);
  const total = {};
  for (const col of ['uploads', 'delivered', 'files', 'bytes', 'refused']) {
    const i = head.indexOf(col);
    total[col] = data.reduce((a, r) => a + Number(r[i] || 0), 0);
  }
  return { head, data, total, text };
}

async function main() {
  fs.mkdirSync(ART, { recursive: true });
  // A persistent profile, so that the browser can be closed and started
  // again on the same cookies, IndexedDB and service worker.
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'relaypacs-chromium-'));
  const problems = [];
  const open = async () => {
    const context = await chromium.launchPersistentContext(profile, {
      executablePath: env.CHROMIUM || '/usr/bin/chromium',
      headless: true,
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
      // A phone-sized screen: the layout the clinicians use.
      viewport: { width: 412, height: 915 },
      acceptDownloads: true,
    });
    const page = context.pages()[0] || (await context.newPage());
    page.on('console', (m) => {
      const t = m.text();
      if (/Content Security Policy|Refused to (load|execute|apply|connect|frame)/i.test(t)) problems.push(t);
      if (m.type() !== 'log' && m.type() !== 'debug') log(`console ${m.type()}: ${t}`);
    });
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    return { context, page };
  };
  let { context, page } = await open();

  // 1. Login with TOTP; the refresh token lands in an HttpOnly Secure cookie.
  await page.goto(BASE);
  await page.locator(sel('login-form')).waitFor();
  await shot(page, 'login');
  // Keyboard only: the user name has the focus, Tab walks the form, Enter submits.
  check((await page.evaluate(() => document.activeElement && document.activeElement.id)) === 'login-username', 'focus starts on the user name');
  await page.keyboard.type(env.USER1);
  await page.keyboard.press('Tab');
  await page.keyboard.type(env.PASSWORD1);
  await page.keyboard.press('Tab');
  await page.keyboard.type(totp(env.TOTP1));
  await page.keyboard.press('Enter');
  await page.locator(sel('tab-upload')).waitFor({ timeout: 15000 });
  const cookies = await context.cookies(`${BASE}/api/v1/auth/refresh`);
  const rc = cookies.find((c) => c.name === 'relaypacs_refresh');
  check(rc, `Chromium kept the refresh cookie on ${BASE}: ${JSON.stringify(cookies)}`);
  check(rc.httpOnly && rc.secure && rc.sameSite === 'Strict' && rc.path === '/api/v1/auth/refresh', `cookie attributes ${JSON.stringify(rc)}`);
  check(!(await page.evaluate(() => document.cookie)).includes('relaypacs_refresh'), 'the page cannot read the refresh cookie');
  log('logged in with TOTP; refresh cookie HttpOnly, Secure, SameSite=Strict, scoped to the refresh route');
  try {
    await page.waitForFunction(() => navigator.serviceWorker && navigator.serviceWorker.controller, null, { timeout: 15000 });
  } catch (e) {
    const reg = await page.evaluate(async () => {
      const r = await navigator.serviceWorker.getRegistration();
      return r ? { active: r.active && r.active.state, installing: !!r.installing, waiting: !!r.waiting } : null;
    });
    throw new Error(`no service worker controls the page: ${JSON.stringify(reg)}; ${e.message}`);
  }
  log('service worker controls the page');

  // Messages (toasts): in the flow, never over a control, at most three
  // (the oldest information goes first, an error stays), the same message
  // counted instead of repeated, each dismissed by its own button.
  await page.evaluate(async () => {
    const { toast } = await import('/app.js');
    toast('First message (test).');
    toast('Second message (test).');
    toast('Second message (test).');
    toast('A failure (test).', 'error');
    toast('Fourth message (test).');
    toast('Fifth message (test).');
    toast('Fifth message (test).');
  });
  const toastTexts = () => page.$$eval('#toasts .toast', (ts) => ts.map((t) => `${t.dataset.kind}: ${t.textContent}`));
  let shownToasts = await toastTexts();
  check(
    JSON.stringify(shownToasts) ===
      JSON.stringify(['error: A failure (test).✕', 'info: Fourth message (test).✕', 'info: Fifth message (test). (×2)✕']),
    `three messages kept, the error among them, a repeat counted: ${JSON.stringify(shownToasts)}`,
  );
  check((await checkToasts(page, 'messages')) === 3, 'three messages shown');
  // Dismissed by keyboard (the error) and by a tap (the others).
  await page.locator('#toasts .toast.error [data-test="toast-dismiss"]').focus();
  await page.keyboard.press('Enter');
  const dismiss = page.locator('#toasts [data-test="toast-dismiss"]');
  check((await dismiss.count()) === 2, 'the error went by its dismiss button (keyboard)');
  while ((await dismiss.count()) > 0) {
    check((await dismiss.first().getAttribute('aria-label')) === 'Dismiss message', 'the dismiss button is named');
    await dismiss.first().click();
  }
  shownToasts = await toastTexts();
  check(shownToasts.length === 0, `every message dismissed: ${JSON.stringify(shownToasts)}`);
  log('messages: at most three, none over a control, each dismissed by its button');

  // 2. Choose the folder; the headers are read in the browser and grouped.
  await page.locator(sel('folder-input')).setInputFiles(env.FOLDER);
  await page.locator(sel('study-group')).nth(EXPECT.groups.length - 1).waitFor({ timeout: 30000 });
  const groups = await page.$$eval(sel('study-group'), (rows) => rows.map((r) => ({ uid: r.dataset.studyUid, files: Number(r.dataset.files) })));
  check(groups.length === EXPECT.groups.length, `${groups.length} study groups, expected ${EXPECT.groups.length}`);
  for (const g of EXPECT.groups) {
    const got = groups.find((x) => x.uid === g.uid);
    check(got && got.files === g.files, `study ${g.uid}: ${JSON.stringify(got)}, expected ${g.files} files`);
  }
  const skipped = await page.$$eval(sel('skipped-file'), (li) => li.map((l) => ({ name: l.dataset.name, text: l.textContent })));
  check(skipped.length === EXPECT.skipped.length, `skipped ${JSON.stringify(skipped)}`);
  for (const name of EXPECT.skipped) {
    const s = skipped.find((x) => x.name.endsWith(`/${name}`));
    check(s && s.text.length > name.length + 10, `${name} listed as skipped with a reason: ${JSON.stringify(skipped)}`);
  }
  log(`grouping: ${groups.length} studies; skipped: ${skipped.map((s) => s.text).join(' | ')}`);
  await shot(page, 'grouping');

  // 3. Upload; go offline mid-upload; reload; online again.
  await page.locator(sel('upload-start')).click();
  await page.waitForFunction(
    () =>
      [...document.querySelectorAll('[data-test="file-progress"]')].some(
        (li) => li.dataset.state === 'uploading' && li.querySelector('progress').value > 8 * 1024 * 1024,
      ),
    null,
    { timeout: 60000, polling: 50 },
  );
  await context.setOffline(true);
  const mid = await page.$$eval(sel('file-progress'), (li) => li.map((l) => l.dataset.state));
  log(`offline; file states: ${mid.join(',')}`);
  check(mid.some((s) => s !== 'done' && s !== 'refused'), 'offline while files were still uploading');
  await page.locator(sel('offline-banner')).waitFor({ state: 'visible' });
  await page.waitForFunction(
    () => [...document.querySelectorAll('[data-test="file-progress"]')].every((li) => ['done', 'refused', 'paused', 'queued'].includes(li.dataset.state)),
    null,
    { timeout: 15000 },
  );
  await shot(page, 'offline-paused');
  await page.reload({ waitUntil: 'domcontentloaded' });
  await page.locator(sel('offline-banner')).waitFor({ state: 'visible' });
  // The reloaded page, still offline, shows the unfinished work as paused.
  await page.waitForFunction(
    () => [...document.querySelectorAll('[data-test="study-progress"]')].some((s) => s.dataset.phase === 'paused'),
    null,
    { timeout: 15000 },
  );
  await shot(page, 'reloaded-offline');
  log('reloaded while offline: the app shell came from the service worker and shows the paused uploads');
  const refreshed = page.waitForResponse((r) => r.url().endsWith('/api/v1/auth/refresh') && r.status() === 200, { timeout: 20000 });
  await context.setOffline(false);
  await refreshed;
  await page.locator(sel('tab-upload')).waitFor({ timeout: 20000 });
  log('online again: logged back in through the refresh cookie');
  await page.waitForFunction(
    (n) => {
      const li = [...document.querySelectorAll('[data-test="file-progress"]')];
      return li.length === n && li.every((l) => l.dataset.state === 'done' || l.dataset.state === 'refused');
    },
    EXPECT.files,
    { timeout: 120000, polling: 250 },
  );
  const states = await page.$$eval(sel('file-progress'), (li) =>
    li.map((l) => ({ name: l.dataset.name, state: l.dataset.state, text: l.textContent, runFrom: l.dataset.runFrom })),
  );
  // The file cut by going offline resumed where the server said, after the reload.
  const big = states.find((s) => s.name.endsWith(EXPECT.large));
  check(big && Number(big.runFrom) > 0, `the large file resumed after the reload: ${JSON.stringify(big)}`);
  log(`large file resumed at byte ${big.runFrom} after the reload`);
  const refused = states.filter((s) => s.state === 'refused');
  check(refused.length === 1 && refused[0].name.endsWith(EXPECT.refused), `refused: ${JSON.stringify(refused)}`);
  check(/refused — .{20,}/.test(refused[0].text), `the refusal says why: ${refused[0].text}`);
  log(`refused by the server: ${refused[0].text}`);
  check(states.filter((s) => s.state === 'done').length === EXPECT.files - 1, 'every other file uploaded');
  await shot(page, 'uploaded');

  // 4. Delivered (with the verification mode), then report ready.
  await page.waitForFunction(
    (n) => document.querySelectorAll('[data-test="notification"][data-kind="delivered"]').length >= n,
    EXPECT.groups.length,
    { timeout: 90000, polling: 250 },
  );
  const delivered = await page.$$eval('[data-test="notification"][data-kind="delivered"]', (li) => li.map((l) => l.textContent));
  check(delivered.every((t) => /compared|confirmed/.test(t)), `verification mode shown: ${delivered.join(' | ')}`);
  await page.waitForFunction(
    () => [...document.querySelectorAll('[data-test="study-progress"]')].every((s) => s.dataset.phase === 'delivered'),
    null,
    { timeout: 30000 },
  );
  log(`delivered: ${delivered[0]}`);
  await shot(page, 'delivered');
  console.log('STEP delivered');
  await waitLine('reports added', 60000);
  await page.locator('[data-test="notification"][data-kind="report_ready"]').first().waitFor({ timeout: 60000 });
  await shot(page, 'report-ready');
  log('report ready notification shown');

  // 5. Open the report.
  // What the report views answer (the frames show Blob URLs made of them).
  const views = [];
  page.on('response', async (r) => {
    if (/\/reports\/[^/]+\/view$/.test(new URL(r.url()).pathname)) {
      const body = await r.body().catch(() => Buffer.alloc(0));
      views.push({ url: r.url(), status: r.status(), type: r.headers()['content-type'] || '', head: body.subarray(0, 5).toString(), body });
    }
  });
  const openReports = page.locator('[data-test="notification"][data-kind="report_ready"] [data-test="open-reports"]').first();
  // "Report ready" comes once per study, with the first report the
  // gateway finds; the second one added to the PACS can be found by a later
  // check (the SR and the PDF are stored one after the other). So, as a
  // user would, open the panel again until it lists both (30 s at most).
  const reportsBy = Date.now() + 30000;
  for (;;) {
    await openReports.click();
    await page.locator(sel('report-panel')).waitFor({ timeout: 10000 });
    const listed = await page.locator(sel('report-item')).count();
    if (listed >= 2) break;
    check(Date.now() < reportsBy, `the report panel lists both reports (it lists ${listed})`);
    await page.locator(sel('report-close')).click();
    await page.locator(sel('report-panel')).waitFor({ state: 'detached', timeout: 5000 });
    await page.waitForTimeout(1000);
  }
  const panel = page.locator(sel('report-panel'));
  check((await panel.count()) === 1, 'one report panel');
  const closeButton = panel.getByRole('button', { name: 'Close report' });
  check(await closeButton.isVisible(), 'the report panel has a visible button named "Close report"');
  const kinds = await page.$$eval(sel('report-item'), (d) => d.map((x) => x.dataset.kind));
  log(`reports listed: ${kinds.join(', ')}`);
  const hasReportsView = await page.evaluate(async () => {
    try {
      await import('/views/reports.js');
      return true;
    } catch {
      return false;
    }
  });
  if (hasReportsView) {
    // The SR as a readable page (rendered by the server, shown from a Blob
    // URL in a sandboxed frame), the PDF as the PDF itself behind a save
    // and an open link (not framed), and the SR's PDF download.
    const srFrame = page.locator('[data-test="report-frame"][data-kind="structured_report"]');
    const pdfFrame = page.locator('[data-test="report-frame"][data-kind="encapsulated_pdf"]');
    await srFrame.waitFor({ timeout: 30000 });
    await pdfFrame.waitFor({ timeout: 30000 });
    check((await srFrame.getAttribute('sandbox')) === '', 'the SR frame is sandboxed');
    check((await srFrame.getAttribute('src')).startsWith('blob:'), 'the SR comes from a Blob URL');
    const srText = await srFrame.contentFrame().locator('body').innerText({ timeout: 10000 });
    check(srText.includes(EXPECT.sr_text), `the SR reads as text: ${srText.slice(0, 300)}`);
    check((await pdfFrame.locator('iframe, embed, object').count()) === 0, 'the PDF is not framed (no dark box where there is no viewer)');
    const pdfSave = pdfFrame.locator(sel('report-pdf-link'));
    const pdfOpen = pdfFrame.locator(sel('report-pdf-open'));
    check(await pdfSave.isVisible() && await pdfOpen.isVisible(), 'the PDF has a visible save and open link');
    const pdfUrl = await pdfSave.getAttribute('href');
    check(pdfUrl.startsWith('blob:'), 'the PDF comes from a Blob URL');
    check((await pdfOpen.getAttribute('href')) === pdfUrl && (await pdfOpen.getAttribute('target')) === '_blank', 'the open link opens the same PDF in a new tab');
    const pdfName = await pdfSave.getAttribute('download');
    check(/^report-[0-9.]+\.pdf$/.test(pdfName), `the PDF is saved with its file name: ${pdfName}`);
    const pdfView = views.find((v) => v.type.startsWith('application/pdf'));
    const srView = views.find((v) => v.type.startsWith('text/html'));
    check(pdfView && pdfView.head === '%PDF-', `the Encapsulated PDF is served as the PDF itself: ${JSON.stringify(views.map(({ body, ...v }) => v))}`);
    check(srView, `the SR is served as HTML: ${JSON.stringify(views.map(({ body, ...v }) => v))}`);
    const [pdfDl] = await Promise.all([page.waitForEvent('download'), pdfSave.click()]);
    check(pdfDl.suggestedFilename() === pdfName, `the saved PDF is named ${pdfDl.suggestedFilename()}, expected ${pdfName}`);
    check(fs.readFileSync(await pdfDl.path()).equals(pdfView.body), 'the saved PDF is the Encapsulated PDF byte for byte');
    const pdfButtons = page.locator('[data-test="report-item"][data-kind="structured_report"] [data-test="report-pdf-link"]');
    const [dl] = await Promise.all([page.waitForEvent('download'), pdfButtons.first().click()]);
    const pdf = fs.readFileSync(await dl.path());
    check(pdf.subarray(0, 5).toString() === '%PDF-', 'the SR downloads as a PDF');
    fs.copyFileSync(await dl.path(), path.join(ART, 'sr-report.pdf'));
    log(`report opened: SR as a page ("${EXPECT.sr_text}"), PDF saved as ${pdfName} from a link, SR as a ${pdf.length}-byte PDF download`);
  } else {
    // No reports view in this build: the download of each report (DICOM).
    for (const b of await page.locator(sel('report-download')).all()) {
      const [dl] = await Promise.all([page.waitForEvent('download'), b.click()]);
      const buf = fs.readFileSync(await dl.path());
      check(buf.length > 132 && buf.subarray(128, 132).toString() === 'DICM', 'report downloaded as DICOM');
    }
    log('reports downloaded as DICOM (views/reports.js is not in this build)');
  }
  await shot(page, 'report');

  // The report panel closes by Escape (the focus back on what opened it),
  // by its Close button, and when another tab is chosen.
  await closeButton.focus();
  await page.keyboard.press('Escape');
  await panel.waitFor({ state: 'detached', timeout: 5000 });
  check(
    (await page.evaluate(() => document.activeElement && document.activeElement.dataset.test)) === 'open-reports',
    'after Escape the focus is back on the "Open report" button',
  );
  await openReports.click();
  await page.locator(sel('report-item')).nth(1).waitFor({ timeout: 30000 });
  await closeButton.click();
  await panel.waitFor({ state: 'detached', timeout: 5000 });
  await openReports.click();
  await page.locator(sel('report-item')).nth(1).waitFor({ timeout: 30000 });
  await page.locator(sel('tab-analytics')).click();
  await page.locator(sel('analytics-table')).waitFor({ timeout: 15000 });
  check((await panel.count()) === 0 && (await page.locator(sel('report-frame')).count()) === 0, 'choosing another tab closed the report');
  log('report panel: closed by Escape (focus back on its opener), by its Close button, and by another tab');

  // 6. The CSV export of the analytics view: today's uploads of this user.
  const csv = await exportCsv(page);
  log(`CSV: ${JSON.stringify(csv.total)}`);
  check(csv.total.uploads === EXPECT.groups.length, `CSV uploads ${csv.total.uploads}`);
  check(csv.total.delivered === EXPECT.groups.length, `CSV delivered ${csv.total.delivered}`);
  // Files and bytes of the delivered studies and of the refused file.
  check(csv.total.files === EXPECT.files, `CSV files ${csv.total.files}, expected ${EXPECT.files}`);
  check(csv.total.refused === 1, `CSV refused ${csv.total.refused}`);
  check(csv.total.bytes === EXPECT.bytes, `CSV bytes ${csv.total.bytes}, expected ${EXPECT.bytes}`);
  await shot(page, 'analytics');

  check(problems.length === 0, `CSP violations or page errors: ${problems.join(' | ')}`);

  // 7. The browser closed mid-upload and started again: the upload
  // resumes where the server says (IndexedDB, the refresh cookie).
  await page.locator(sel('tab-upload')).click();
  await page.locator(sel('folder-input')).setInputFiles(env.FOLDER2);
  await page.locator(`[data-test="study-group"][data-study-uid="${EXPECT.restart.uid}"]`).waitFor({ timeout: 30000 });
  await page.locator(sel('upload-start')).click();
  await page.waitForFunction(
    (name) =>
      [...document.querySelectorAll('[data-test="file-progress"]')].some(
        (li) => li.dataset.name.endsWith(name) && li.dataset.state === 'uploading' && li.querySelector('progress').value > 8 * 1024 * 1024,
      ),
    EXPECT.restart.file,
    { timeout: 60000, polling: 50 },
  );
  await context.close();
  log('browser closed mid-upload (no screenshot first: it would give the upload time to finish)');
  ({ context, page } = await open());
  await page.goto(BASE);
  await page.locator(sel('tab-upload')).waitFor({ timeout: 20000 });
  log('browser started again: logged in through the refresh cookie');
  await page.waitForFunction(
    (name) =>
      [...document.querySelectorAll('[data-test="file-progress"]')].some(
        (li) => li.dataset.name.endsWith(name) && li.dataset.state === 'done',
      ),
    EXPECT.restart.file,
    { timeout: 60000, polling: 250 },
  );
  const restarted = await page.$eval(
    `[data-test="file-progress"][data-name$="${EXPECT.restart.file}"]`,
    (li) => li.dataset.runFrom,
  );
  check(Number(restarted) > 0, `after the browser restart the file resumed, from byte ${restarted}`);
  log(`after the browser restart the file resumed at byte ${restarted}`);
  await page.waitForFunction(
    (n) => document.querySelectorAll('[data-test="notification"][data-kind="delivered"]').length >= n,
    EXPECT.groups.length + 1,
    { timeout: 60000, polling: 250 },
  );
  await shot(page, 'after-browser-restart');

  // The studies view lists them with their state from the server.
  await page.locator(sel('tab-studies')).click();
  await page.locator(sel('study-row')).nth(EXPECT.groups.length).waitFor({ timeout: 15000 });
  const rows = await page.$$eval(sel('study-row'), (r) => r.map((x) => x.dataset.state));
  check(rows.length === EXPECT.groups.length + 1, `studies listed: ${rows}`);
  check(rows.filter((x) => x === 'report ready').length === 1 && rows.every((x) => x === 'delivered' || x === 'report ready'), `study states: ${rows}`);
  await shot(page, 'studies');

  // 8. A second user sees none of it.
  await page.locator(sel('logout')).click();
  await page.locator(sel('login-form')).waitFor();
  check((await context.cookies(`${BASE}/api/v1/auth/refresh`)).every((c) => c.name !== "relaypacs_refresh"), "logout cleared the refresh cookie");
  await login(page, env.USER2, env.PASSWORD2);
  check((await page.locator(sel('study-progress')).count()) === 0, 'no upload of the first user shown');
  await page.locator(sel('tab-studies')).click();
  await page.locator(sel('studies-table')).waitFor();
  await page.waitForTimeout(500);
  check((await page.locator(sel('study-row')).count()) === 0, 'the second user has no study');
  check((await page.locator(sel('notification')).count()) === 0, 'the second user has no notification');
  await shot(page, 'second-user');
  const csv2 = await exportCsv(page);
  check(csv2.total.uploads === 0 && csv2.total.files === 0 && csv2.total.bytes === 0, `second user's CSV: ${JSON.stringify(csv2.total)}`);
  await shot(page, 'second-user-analytics');
  log('second user: no study, no notification, no upload, nothing in the analytics');
  check(problems.length === 0, `CSP violations or page errors: ${problems.join(' | ')}`);
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}

main()
  .then(() => {
    log('PASS');
    process.exit(0);
  })
  .catch((e) => {
    console.log(`FAIL: ${e.stack || e}`);
    process.exit(1);
  });
