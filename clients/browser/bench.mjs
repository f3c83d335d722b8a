// The web app's upload of one file in Debian's headless Chromium, timed:
// the browser side of benches/src/bin/upload_cli_bench.rs, which runs the
// server, writes the file and compares the figure with the CLI's in the
// same run.
//
// Env: RELAYPACS_URL, CHROMIUM, BENCH_USER, BENCH_PASSWORD, BENCH_FILE
// (a DICOM file; one study). Prints one JSON line:
//   {"ceiling_secs": s, "completed_secs": s, "delivered_secs": s}
// - ceiling: the page's own per-byte work on the file without a network,
//   done as the app does it (hash-wasm SHA-256 of the whole file read in
//   8 MiB slices, then the SHA-256 of each 8 MiB slice for its
//   Upload-Checksum: WebCrypto in a secure context, else hash-wasm);
// - completed: from choosing the file (the app reads its header) until the
//   app has completed the study's session (the gateway holds it durably);
// - delivered: until the app shows the study delivered (from its SSE).
// Exit status 0 only if the upload completed and was delivered.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const env = process.env;
const sel = (t) => `[data-test="${t}"]`;
const CHUNK = 8 * 1024 * 1024;

async function main() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'relaypacs-bench-chromium-'));
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
  });
  try {
    const page = context.pages()[0] || (await context.newPage());
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(env.RELAYPACS_URL);
    await page.locator(sel('login-form')).waitFor();
    await page.getByLabel('User name').fill(env.BENCH_USER);
    await page.getByLabel('Password').fill(env.BENCH_PASSWORD);
    await page.locator(sel('login-submit')).click();
    await page.locator(sel('tab-upload')).waitFor({ timeout: 15000 });

    // The ceiling, on a File of the same bytes from an input of our own.
    await page.evaluate(() => {
      const i = document.createElement('input');
      i.type = 'file';
      i.id = 'bench-ceiling';
      i.hidden = true;
      document.body.append(i);
    });
    await page.locator('#bench-ceiling').setInputFiles(env.BENCH_FILE);
    const ceilingSecs = await page.evaluate(async (chunk) => {
      const file = document.getElementById('bench-ceiling').files[0];
      const t0 = performance.now();
      const whole = await window.hashwasm.createSHA256();
      whole.init();
      for (let off = 0; off < file.size; off += chunk) {
        whole.update(new Uint8Array(await file.slice(off, Math.min(file.size, off + chunk)).arrayBuffer()));
      }
      whole.digest('hex');
      for (let off = 0; off < file.size; off += chunk) {
        const buf = await file.slice(off, Math.min(file.size, off + chunk)).arrayBuffer();
        if (window.crypto && window.crypto.subtle) {
          await window.crypto.subtle.digest('SHA-256', buf);
        } else {
          const h = await window.hashwasm.createSHA256();
          h.init();
          h.update(new Uint8Array(buf));
          h.digest('binary');
        }
      }
      document.getElementById('bench-ceiling').remove();
      return (performance.now() - t0) / 1000;
    }, CHUNK);

    // The upload, as a clinician does it: choose the file, send.
    const t0 = Date.now();
    await page.locator(sel('files-input')).setInputFiles(env.BENCH_FILE);
    await page.locator(sel('upload-start')).waitFor({ timeout: 120000 });
    await page.locator(sel('upload-start')).click();
    await page.waitForFunction(
      () => {
        const s = [...document.querySelectorAll('[data-test="study-progress"]')];
        return s.length > 0 && s.every((x) => ['queued', 'delivered', 'refused'].includes(x.dataset.phase));
      },
      null,
      { timeout: 1800000, polling: 50 },
    );
    const completedSecs = (Date.now() - t0) / 1000;
    const phases = await page.$$eval(sel('study-progress'), (s) => s.map((x) => x.dataset.phase));
    if (phases.includes('refused')) throw new Error(`the study was refused: ${phases}`);
    await page.waitForFunction(
      () => [...document.querySelectorAll('[data-test="study-progress"]')].every((x) => x.dataset.phase === 'delivered'),
      null,
      { timeout: 1800000, polling: 50 },
    );
    const deliveredSecs = (Date.now() - t0) / 1000;
    if (errors.length) throw new Error(`page errors: ${errors.join(' | ')}`);
    console.log(JSON.stringify({ ceiling_secs: ceilingSecs, completed_secs: completedSecs, delivered_secs: deliveredSecs }));
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : String(e));
  process.exit(1);
});
