// The upload view: pick files or a folder (picker or drag and drop), read
// the DICOM headers in the browser (dicom-parser), group by study, then per
// study: one session, tus uploads (tus-js-client) with the whole-file
// SHA-256 declared (hash-wasm) and Upload-Checksum on every PATCH (WebCrypto
// in a secure context, else hash-wasm), at most
// PARALLEL files at a time, retries with backoff, upload URLs and the files
// themselves kept in IndexedDB so that a reload (or a browser restart)
// resumes where the server says; offline pauses, online resumes.

import { h, toast, api, apiJson, freshToken, refreshToken, onEvent, errorOf } from './app.js';
import { plainReason, stateBadge } from './studies.js';

const CHUNK = 8 * 1024 * 1024;
const PARALLEL = 3;
const HEADER_PEEK = 1024 * 1024;
const HEADER_MAX = 64 * 1024 * 1024;
const RETRY_DELAYS = [0, 1000, 3000, 5000, 10000, 20000, 30000];

// ---- IndexedDB --------------------------------------------------------------

let dbPromise = null;
function db() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      const r = indexedDB.open('relaypacs', 1);
      r.onupgradeneeded = () => {
        const d = r.result;
        const tus = d.createObjectStore('tus', { keyPath: 'key' });
        tus.createIndex('fp', 'fp');
        d.createObjectStore('files', { keyPath: 'fp' });
        d.createObjectStore('sessions', { keyPath: 'k' });
      };
      r.onsuccess = () => resolve(r.result);
      r.onerror = () => reject(r.error);
    });
  }
  return dbPromise;
}

async function tx(store, mode, fn) {
  const d = await db();
  return new Promise((resolve, reject) => {
    const t = d.transaction(store, mode);
    const s = t.objectStore(store);
    let out;
    Promise.resolve(fn(s)).then((v) => {
      out = v;
    });
    t.oncomplete = () => resolve(out);
    t.onerror = () => reject(t.error);
    t.onabort = () => reject(t.error);
  });
}

function req(r) {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

const idb = {
  get: (store, key) => tx(store, 'readonly', (s) => req(s.get(key))),
  put: (store, value) => tx(store, 'readwrite', (s) => req(s.put(value))),
  del: (store, key) => tx(store, 'readwrite', (s) => req(s.delete(key))),
  all: (store) => tx(store, 'readonly', (s) => req(s.getAll())),
};

/** tus-js-client URL storage kept in IndexedDB (survives reloads and restarts). */
const urlStorage = {
  async findAllUploads() {
    return (await idb.all('tus')).map((e) => ({ ...e.upload, urlStorageKey: e.key }));
  },
  async findUploadsByFingerprint(fp) {
    const rows = await tx('tus', 'readonly', (s) => req(s.index('fp').getAll(fp)));
    return rows.map((e) => ({ ...e.upload, urlStorageKey: e.key }));
  },
  async removeUpload(key) {
    await idb.del('tus', key);
  },
  async addUpload(fp, upload) {
    const key = `tus::${fp}::${Math.random().toString(36).slice(2)}`;
    await idb.put('tus', { key, fp, upload });
    return key;
  },
};

// ---- reading headers ----------------------------------------------------------

const TAGS = {
  study: 'x0020000d',
  sop: 'x00080018',
  patientName: 'x00100010',
  patientId: 'x00100020',
  date: 'x00080020',
  modality: 'x00080060',
  description: 'x00081030',
};

/** Read a file's DICOM header: {ok:true, info} or {ok:false, reason}. */
export async function readHeader(file) {
  if (file.size < 132) return { ok: false, reason: 'not a DICOM file (too short to be one)' };
  const tryParse = async (n) => {
    const bytes = new Uint8Array(await file.slice(0, n).arrayBuffer());
    return window.dicomParser.parseDicom(bytes, { untilTag: 'x7fe00010' });
  };
  const magic = new Uint8Array(await file.slice(128, 132).arrayBuffer());
  if (String.fromCharCode(...magic) !== 'DICM') {
    return { ok: false, reason: 'not a DICOM file (no "DICM" marker at byte 128)' };
  }
  let ds;
  try {
    ds = await tryParse(Math.min(file.size, HEADER_PEEK));
  } catch (e) {
    if (file.size > HEADER_PEEK && file.size <= HEADER_MAX) {
      try {
        ds = await tryParse(file.size);
      } catch (e2) {
        return { ok: false, reason: `unreadable DICOM header: ${errText(e2)}` };
      }
    } else {
      return { ok: false, reason: `unreadable DICOM header: ${errText(e)}` };
    }
  }
  const s = (t) => {
    try {
      return (ds.string(t) || '').trim();
    } catch {
      return '';
    }
  };
  const study = s(TAGS.study);
  if (!study) return { ok: false, reason: 'DICOM file without a Study Instance UID' };
  return {
    ok: true,
    info: {
      study,
      sop: s(TAGS.sop),
      patient: s(TAGS.patientName).replace(/\^+/g, ' ').trim() || s(TAGS.patientId) || '(no name)',
      patientId: s(TAGS.patientId),
      date: s(TAGS.date),
      modality: s(TAGS.modality),
      description: s(TAGS.description),
    },
  };
}

function errText(e) {
  if (typeof e === 'string') return e;
  if (e && e.exception) return String(e.exception);
  return (e && e.message) || String(e);
}

// ---- picking --------------------------------------------------------------

function fromInput(input) {
  return [...input.files].map((f) => ({ file: f, rel: f.webkitRelativePath || f.name }));
}

async function fromDrop(dt) {
  const out = [];
  const entries = [...dt.items].map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null)).filter(Boolean);
  const walk = async (entry, prefix) => {
    if (entry.isFile) {
      const f = await new Promise((res, rej) => entry.file(res, rej));
      out.push({ file: f, rel: prefix + f.name });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
        if (!batch.length) break;
        for (const e of batch) await walk(e, `${prefix}${entry.name}/`);
      }
    }
  };
  if (entries.length) for (const e of entries) await walk(e, '');
  else for (const f of dt.files) out.push({ file: f, rel: f.name });
  return out;
}

// ---- formatting -------------------------------------------------------------

export function bytes(n) {
  const u = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) {
    n /= 1000;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function duration(s) {
  if (!isFinite(s) || s < 0) return '…';
  if (s < 60) return `${Math.ceil(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.ceil(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.ceil((s % 3600) / 60)} min`;
}

function dicomDate(d) {
  return /^\d{8}$/.test(d) ? `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6, 8)}` : d || '—';
}

// ---- the engine -------------------------------------------------------------

/** Speed and time left from byte samples (moving window). */
class Meter {
  constructor() {
    this.samples = [];
  }
  add(done) {
    const now = performance.now();
    this.samples.push([now, done]);
    while (this.samples.length > 2 && now - this.samples[0][0] > 5000) this.samples.shift();
  }
  rate() {
    if (this.samples.length < 2) return 0;
    const [t0, b0] = this.samples[0];
    const [t1, b1] = this.samples[this.samples.length - 1];
    return t1 > t0 ? ((b1 - b0) * 1000) / (t1 - t0) : 0;
  }
}

const engine = {
  owner: null,
  studies: new Map(), // studyUid -> study
  jobs: [], // file jobs, in order
  running: 0,
  paused: false,
  container: null,
};

function fpOf(owner, rel, file, studyUid) {
  return `relaypacs:${owner}:${studyUid}:${rel}:${file.size}:${file.lastModified}`;
}

async function sha256Of(file, onProgress) {
  const hasher = await window.hashwasm.createSHA256();
  hasher.init();
  for (let off = 0; off < file.size; off += CHUNK) {
    const part = new Uint8Array(await file.slice(off, Math.min(file.size, off + CHUNK)).arrayBuffer());
    hasher.update(part);
    onProgress(Math.min(file.size, off + CHUNK));
  }
  return hasher.digest('hex');
}

function b64(u8) {
  let s = '';
  for (let i = 0; i < u8.length; i++) s += String.fromCharCode(u8[i]);
  return btoa(s);
}

// A chunk's Upload-Checksum. WebCrypto's SHA-256 is native (several
// times hash-wasm's speed) but not incremental, which a chunk held in
// memory does not need; it exists only in a secure context (HTTPS, or
// http://localhost), so a page served over plain HTTP elsewhere falls back
// to hash-wasm. The whole-file digest stays with hash-wasm: it must be
// computed piece by piece.
async function chunkChecksum(file, start, end) {
  const buf = await file.slice(start, end).arrayBuffer();
  if (window.crypto && window.crypto.subtle) {
    return `sha256 ${b64(new Uint8Array(await window.crypto.subtle.digest('SHA-256', buf)))}`;
  }
  const hasher = await window.hashwasm.createSHA256();
  hasher.init();
  hasher.update(new Uint8Array(buf));
  return `sha256 ${b64(hasher.digest('binary'))}`;
}

/** The session of a study: kept in IndexedDB, created when missing or gone. */
async function ensureSession(study) {
  const k = `${engine.owner}|${study.uid}`;
  const kept = await idb.get('sessions', k);
  if (kept && kept.sessionId) {
    try {
      const s = await apiJson(`/api/v1/studies/${kept.sessionId}?files_limit=1`);
      if (s.state && s.state.state === 'open') {
        study.sessionId = kept.sessionId;
        return;
      }
      if (s.state && s.state.state !== 'open') {
        study.sessionId = kept.sessionId;
        study.completed = true;
        return;
      }
    } catch (e) {
      if (e.status !== 404) throw e;
    }
  }
  const s = await apiJson('/api/v1/studies', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: '{}',
  });
  study.sessionId = s.id;
  await idb.put('sessions', { k, sessionId: s.id, owner: engine.owner, study: study.uid, at: Date.now() });
}

function refusedBody(err) {
  try {
    const body = err.originalResponse && err.originalResponse.getBody();
    return body ? errorOf(JSON.parse(body)) : null;
  } catch {
    return null;
  }
}

function shouldRetry(err) {
  if (!navigator.onLine) return false;
  const res = err.originalResponse;
  const status = res ? res.getStatus() : 0;
  if (status === 0 || status >= 500 || [408, 423, 429].includes(status)) return true;
  if (status === 401) {
    refreshToken();
    return true;
  }
  const body = refusedBody(err);
  const code = (body && body.code) || '';
  if (status === 409) return code === 'RELAY_UPLOAD_BUSY' || code === 'RELAY_OFFSET_MISMATCH';
  if (code.endsWith('CHECKSUM_MISMATCH') || code === 'RELAY_BODY_INTERRUPTED') return true;
  return false;
}

function tusUpload(job) {
  const { rec, file } = job;
  return new Promise((resolve, reject) => {
    const up = new window.tus.Upload(file, {
      endpoint: '/files',
      chunkSize: CHUNK,
      retryDelays: RETRY_DELAYS,
      uploadSize: file.size,
      metadata: { session: job.study.sessionId, filename: rec.name, sha256: rec.sha256 },
      fingerprint: () => Promise.resolve(`${rec.fp}:${job.study.sessionId}`),
      urlStorage,
      storeFingerprintForResuming: true,
      removeFingerprintOnSuccess: true,
      onBeforeRequest: async (req) => {
        const t = await freshToken();
        if (t) req.setHeader('Authorization', `Bearer ${t}`);
        if (req.getMethod() === 'PATCH') {
          const start = Number(req.getHeader('Upload-Offset'));
          if (job.runFrom === undefined) job.runFrom = start;
          const end = Math.min(file.size, start + CHUNK);
          req.setHeader('Upload-Checksum', await chunkChecksum(file, start, end));
        }
      },
      onShouldRetry: (err) => shouldRetry(err),
      onProgress: (sent) => {
        job.sent = sent;
        job.meter.add(sent);
        job.study.meter.add(studySent(job.study));
        scheduleDraw();
      },
      onSuccess: () => resolve(),
      onError: (err) => reject(err),
    });
    job.tus = up;
    // An abort (pause, offline) calls neither onSuccess nor onError.
    job.cancel = () => reject(new Error('paused'));
    up.findPreviousUploads()
      .then((prev) => {
        if (prev.length) up.resumeFromPreviousUpload(prev[0]);
        if (job.aborted) return;
        up.start();
      })
      .catch(reject);
  });
}

function studySent(study) {
  return study.jobs.reduce((a, j) => a + (j.state === 'done' ? j.size : j.sent || 0), 0);
}

async function runJob(job) {
  job.state = 'hashing';
  job.aborted = false;
  draw();
  try {
    if (!job.study.sessionId) {
      // One session per study, however many of its files start at once.
      job.study.sessionPromise = job.study.sessionPromise || ensureSession(job.study);
      try {
        await job.study.sessionPromise;
      } finally {
        job.study.sessionPromise = null;
      }
    }
    if (!job.rec.sha256) {
      job.rec.sha256 = await sha256Of(job.file, (n) => {
        job.hashed = n;
        scheduleDraw();
      });
      await saveRec(job);
    }
    if (job.aborted) throw new Error('paused');
    job.state = 'uploading';
    job.runFrom = undefined;
    job.meter = new Meter();
    draw();
    await tusUpload(job);
    job.state = 'done';
    job.sent = job.size;
    job.rec.state = 'done';
    job.rec.file = null; // sent: the bytes need not be kept any more
    await saveRec(job);
  } catch (err) {
    if (job.aborted || !navigator.onLine || engine.paused) {
      job.state = 'paused';
    } else {
      const body = refusedBody(err);
      const status = err.originalResponse ? err.originalResponse.getStatus() : 0;
      if (body && status >= 400 && status < 500) {
        console.info(`refused: ${status} ${JSON.stringify(body)}`);
        job.state = 'refused';
        job.reason = plainReason(body.code, body.message);
        job.rec.state = 'refused';
        job.rec.reason = job.reason;
        job.rec.file = null;
        await saveRec(job);
      } else {
        job.state = 'error';
        job.reason = (body && body.message) || errText(err);
      }
    }
  }
  draw();
}

async function saveRec(job) {
  try {
    await idb.put('files', job.rec);
  } catch (e) {
    // The File could not be kept (quota): keep the rest, without the bytes.
    if (job.rec.file) {
      const { file: _f, ...rest } = job.rec;
      await idb.put('files', { ...rest, file: null }).catch(() => {});
      toast('This browser cannot keep the files for a reload; choose them again to resume after one.', 'error');
    } else throw e;
  }
}

function pump() {
  if (engine.paused || !navigator.onLine) return;
  while (engine.running < PARALLEL) {
    const job = engine.jobs.find((j) => j.state === 'queued');
    if (!job) break;
    engine.running++;
    job.state = 'starting';
    runJob(job).finally(() => {
      engine.running--;
      afterJob(job.study);
      pump();
    });
  }
}

async function afterJob(study) {
  const open = study.jobs.some((j) => !['done', 'refused'].includes(j.state));
  if (open || study.completing || study.completed) return;
  study.completing = true;
  study.phase = 'validating';
  draw();
  try {
    const s = await apiJson(`/api/v1/studies/${study.sessionId}/complete`, { method: 'POST' });
    study.completed = true;
    study.phase = s.state && s.state.state === 'delivered' ? 'delivered' : 'queued';
    study.verified = s.delivery && s.delivery.verified;
  } catch (e) {
    if (e.code === 'RELAY_SESSION_EMPTY') {
      study.completed = true;
      study.phase = 'refused';
      study.reason = 'every file of this study was refused';
    } else if (!navigator.onLine) {
      study.completing = false;
      study.phase = 'paused';
      return;
    } else {
      study.phase = 'refused';
      study.reason = plainReason(e.code, e.message);
    }
  } finally {
    study.completing = false;
  }
  await rememberStudy(study);
  watchStudy(study);
  draw();
}

/** Keep what the app knows of a study (for a reload). */
async function rememberStudy(study) {
  const k = `${engine.owner}|${study.uid}`;
  await idb
    .put('sessions', {
      k,
      sessionId: study.sessionId,
      owner: engine.owner,
      study: study.uid,
      completed: !!study.completed,
      phase: study.phase,
      verified: study.verified || null,
      reason: study.reason || null,
      at: Date.now(),
    })
    .catch(() => {});
}

/** The server's state of a completed study, until it is final (events
 *  may be missed while offline or across a reload). */
async function watchStudy(study) {
  if (study.watching || !study.completed || !study.sessionId) return;
  study.watching = true;
  try {
    // At least once (a report may have come while this page was closed),
    // then until the state is final.
    let first = true;
    while (
      engine.studies.get(study.uid) === study &&
      (first || !['delivered', 'failed', 'report ready', 'refused'].includes(study.phase))
    ) {
      first = false;
      if (navigator.onLine) {
        try {
          const s = await apiJson(`/api/v1/studies/${study.sessionId}?files_limit=1`);
          const st = s.state && s.state.state;
          if (st === 'delivered') {
            study.phase = s.delivery && s.delivery.reports > 0 ? 'report ready' : 'delivered';
            study.verified = s.delivery && s.delivery.verified;
          } else if (st === 'dead_letter') {
            study.phase = 'failed';
            study.reason = plainReason('RELAY_PACS_REJECTED', s.state.reason);
          }
          draw();
        } catch (e) {
          if (e.status === 404) break;
        }
      }
      await new Promise((r) => setTimeout(r, 3000));
    }
  } finally {
    study.watching = false;
  }
  rememberStudy(study);
}

/** Forget the studies that are completed (their state stays on the server). */
async function clearFinished() {
  for (const [uid, s] of [...engine.studies]) {
    if (!s.completed) continue;
    for (const j of s.jobs) await idb.del('files', j.rec.fp).catch(() => {});
    await idb.del('sessions', `${engine.owner}|${uid}`).catch(() => {});
    engine.jobs = engine.jobs.filter((j) => j.study !== s);
    engine.studies.delete(uid);
  }
  draw();
}

function pauseAll() {
  for (const j of engine.jobs) {
    if (['hashing', 'uploading', 'starting'].includes(j.state)) {
      j.aborted = true;
      if (j.tus) j.tus.abort(false).catch(() => {});
      if (j.cancel) j.cancel();
    }
  }
  for (const j of engine.jobs) if (j.state === 'starting') j.state = 'queued';
  draw();
}

function resumeAll() {
  for (const j of engine.jobs) if (['paused', 'error'].includes(j.state)) j.state = 'queued';
  for (const s of engine.studies.values()) if (s.phase === 'paused') s.phase = null;
  pump();
  for (const s of engine.studies.values()) afterJob(s);
  draw();
}

// ---- grouping and the pending work ----------------------------------------

function newStudy(info) {
  return {
    uid: info.study,
    patient: info.patient,
    patientId: info.patientId,
    date: info.date,
    modality: new Set(info.modality ? [info.modality] : []),
    description: info.description,
    jobs: [],
    size: 0,
    sessionId: null,
    phase: null,
    meter: new Meter(),
  };
}

function addJob(study, rec, file) {
  const size = file ? file.size : rec.size || 0;
  const job = { rec, file, study, size, sent: 0, state: 'queued', meter: new Meter() };
  study.jobs.push(job);
  study.size += size;
  engine.jobs.push(job);
  return job;
}

/** This user's files kept from before a reload or a browser restart:
 *  the unfinished ones queued again (their count is returned), the
 *  finished ones shown with their study. */
async function restorePending() {
  let rows = [];
  try {
    rows = (await idb.all('files')).filter((r) => r.owner === engine.owner);
  } catch {
    return 0;
  }
  let n = 0;
  for (const rec of rows) {
    if (engine.jobs.some((j) => j.rec.fp === rec.fp)) continue;
    let study = engine.studies.get(rec.info.study);
    if (!study) {
      study = newStudy(rec.info);
      engine.studies.set(study.uid, study);
      const kept = await idb.get('sessions', `${engine.owner}|${study.uid}`).catch(() => null);
      if (kept) {
        study.sessionId = kept.sessionId;
        study.completed = !!kept.completed;
        study.phase = kept.completed ? kept.phase : null;
        study.verified = kept.verified || null;
        study.reason = kept.reason || null;
      }
    }
    if (rec.info.modality) study.modality.add(rec.info.modality);
    if (!rec.file && rec.state !== 'done' && rec.state !== 'refused') {
      study.missing = (study.missing || 0) + 1;
      continue;
    }
    const job = addJob(study, rec, rec.file);
    if (rec.state === 'done') {
      job.state = 'done';
      job.sent = job.size;
    } else if (rec.state === 'refused') {
      job.state = 'refused';
      job.reason = rec.reason;
    } else {
      if (!navigator.onLine) job.state = 'paused'; // resumed by the 'online' event
      n++;
    }
  }
  return n;
}

// ---- the view -------------------------------------------------------------

const ui = { scan: null, drawQueued: false };

function scheduleDraw() {
  if (ui.drawQueued) return;
  ui.drawQueued = true;
  requestAnimationFrame(() => {
    ui.drawQueued = false;
    draw();
  });
}

function progress(value, max, label, test) {
  return h('progress', { value: Math.round(value), max: Math.max(1, max), 'aria-label': label, 'data-test': test });
}

const JOB_TEXT = {
  queued: 'waiting',
  starting: 'starting',
  hashing: 'computing checksum',
  uploading: 'uploading',
  paused: 'paused',
  done: 'uploaded and verified',
  refused: 'refused',
  error: 'failed (will retry when you press Resume)',
};

function studyPhase(s) {
  if (s.phase) return s.phase;
  if (s.jobs.some((j) => ['uploading', 'hashing', 'starting'].includes(j.state))) return 'uploading';
  if (s.jobs.some((j) => j.state === 'paused')) return 'paused';
  return 'waiting';
}

function draw() {
  const box = engine.container && engine.container.querySelector('#upload-progress');
  if (!box) return;
  const rows = [];
  for (const s of engine.studies.values()) {
    if (!s.jobs.length && !s.missing) continue;
    const sent = studySent(s);
    // Refused files leave the study: they are not part of what is sent.
    const total = s.jobs.reduce((a, j) => a + (j.state === 'refused' ? 0 : j.size), 0);
    const rate = s.meter.rate();
    const phase = studyPhase(s);
    const left = rate > 0 ? (total - sent) / rate : Infinity;
    const files = s.jobs.map((j) => {
      const jr = j.meter ? j.meter.rate() : 0;
      return h(
        'li',
        {
          class: `file ${j.state}`,
          'data-test': 'file-progress',
          'data-state': j.state,
          'data-name': j.rec.rel,
          'data-run-from': j.runFrom === undefined ? '' : String(j.runFrom),
        },
        h('span', { class: 'name' }, j.rec.rel),
        progress(j.state === 'hashing' ? j.hashed || 0 : j.state === 'done' ? j.size : j.sent, j.size, `Upload of ${j.rec.rel}`),
        h(
          'span',
          { class: 'meta' },
          `${JOB_TEXT[j.state] || j.state}`,
          j.state === 'uploading' && jr > 0 ? ` · ${bytes(jr)}/s · ${duration((j.size - j.sent) / jr)} left` : '',
          j.reason ? ` — ${j.reason}` : '',
        ),
      );
    });
    rows.push(
      h(
        'article',
        { class: 'study-progress card', 'data-test': 'study-progress', 'data-study-uid': s.uid, 'data-phase': phase },
        h(
          'h3',
          {},
          `${s.patient}${s.patientId ? ` (${s.patientId})` : ''} · ${dicomDate(s.date)} · ${[...s.modality].join('/') || '—'}`,
          ' ',
          stateBadge(phase, s.verified),
        ),
        s.description ? h('p', { class: 'muted' }, s.description) : null,
        progress(sent, total, `Study ${s.patient} ${s.description || ''}`, 'study-bar'),
        h(
          'p',
          { class: 'meta' },
          `${bytes(sent)} of ${bytes(total)} · ${s.jobs.filter((j) => j.state === 'done').length}/${s.jobs.length} files`,
          s.jobs.some((j) => j.state === 'refused') ? ` · ${s.jobs.filter((j) => j.state === 'refused').length} refused` : '',
          phase === 'uploading' && rate > 0 ? ` · ${bytes(rate)}/s · ${duration(left)} left` : '',
          s.reason ? ` — ${s.reason}` : '',
        ),
        s.missing
          ? h('p', { class: 'error' }, `${s.missing} file(s) must be chosen again to resume (this browser could not keep them).`)
          : null,
        h('details', {}, h('summary', {}, 'Files'), h('ul', { class: 'files' }, files)),
      ),
    );
  }
  const active = engine.jobs.some((j) => !['done', 'refused'].includes(j.state));
  const controls = engine.container.querySelector('#upload-controls');
  controls.hidden = !active;
  engine.container.querySelector('#pause').hidden = engine.paused;
  engine.container.querySelector('#resume').hidden = !engine.paused;
  box.replaceChildren(...rows);
}

function renderScan(scan) {
  const box = engine.container.querySelector('#scan');
  const groups = [...scan.groups.values()];
  const table = h(
    'table',
    { 'data-test': 'study-groups' },
    h('caption', {}, `${groups.length} stud${groups.length === 1 ? 'y' : 'ies'} found in ${scan.total} file(s)`),
    h(
      'thead',
      {},
      h('tr', {}, ...['Patient', 'Date', 'Modality', 'Description', 'Files', 'Size'].map((c) => h('th', { scope: 'col' }, c))),
    ),
    h(
      'tbody',
      {},
      groups.map((g) =>
        h(
          'tr',
          { 'data-test': 'study-group', 'data-study-uid': g.uid, 'data-files': g.items.length },
          h('td', { 'data-label': 'Patient' }, g.patient, g.patientId ? h('span', { class: 'muted' }, ` (${g.patientId})`) : null),
          h('td', { 'data-label': 'Date' }, dicomDate(g.date)),
          h('td', { 'data-label': 'Modality' }, [...g.modality].join('/') || '—'),
          h('td', { 'data-label': 'Description' }, g.description || '—'),
          h('td', { class: 'num', 'data-label': 'Files' }, String(g.items.length)),
          h('td', { class: 'num', 'data-label': 'Size' }, bytes(g.size)),
        ),
      ),
    ),
  );
  const skipped = scan.skipped.length
    ? h(
        'section',
        { class: 'skipped' },
        h('h3', {}, `${scan.skipped.length} file(s) will not be sent`),
        h(
          'ul',
          { 'data-test': 'skipped-files' },
          scan.skipped.map((s) => h('li', { 'data-test': 'skipped-file', 'data-name': s.rel }, h('strong', {}, s.rel), ': ', s.reason)),
        ),
      )
    : null;
  const send = h(
    'button',
    {
      type: 'button',
      class: 'primary',
      'data-test': 'upload-start',
      disabled: groups.length === 0,
      onclick: () => startScan(scan),
    },
    `Send ${groups.length} stud${groups.length === 1 ? 'y' : 'ies'}`,
  );
  box.replaceChildren(groups.length ? table : h('p', {}, 'No DICOM study among these files.'), skipped || '', send);
}

async function scanItems(items) {
  const box = engine.container.querySelector('#scan');
  box.replaceChildren(h('p', { role: 'status', 'data-test': 'scanning' }, `Reading ${items.length} file headers…`));
  const scan = { groups: new Map(), skipped: [], total: items.length };
  let i = 0;
  const worker = async () => {
    while (i < items.length) {
      const it = items[i++];
      let r;
      try {
        r = await readHeader(it.file);
      } catch (e) {
        r = { ok: false, reason: `cannot be read: ${errText(e)}` };
      }
      if (!r.ok) {
        scan.skipped.push({ rel: it.rel, reason: r.reason });
        continue;
      }
      let g = scan.groups.get(r.info.study);
      if (!g) {
        g = { ...newStudy(r.info), items: [] };
        scan.groups.set(g.uid, g);
      }
      if (r.info.modality) g.modality.add(r.info.modality);
      g.items.push({ ...it, info: r.info });
      g.size += it.file.size;
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
  scan.skipped.sort((a, b) => a.rel.localeCompare(b.rel));
  ui.scan = scan;
  renderScan(scan);
}

async function startScan(scan) {
  engine.container.querySelector('#scan').replaceChildren(h('p', { role: 'status' }, 'Sending…'));
  for (const g of scan.groups.values()) {
    let study = engine.studies.get(g.uid);
    if (!study) {
      study = newStudy(g.items[0].info);
      study.modality = g.modality;
      engine.studies.set(study.uid, study);
    }
    study.completed = false;
    study.phase = null;
    for (const it of g.items) {
      const fp = fpOf(engine.owner, it.rel, it.file, g.uid);
      if (engine.jobs.some((j) => j.rec.fp === fp)) continue;
      const kept = await idb.get('files', fp).catch(() => null);
      const rec = kept
        ? { ...kept, file: it.file }
        : { fp, owner: engine.owner, rel: it.rel, name: it.file.name, size: it.file.size, info: it.info, file: it.file, state: 'queued' };
      const job = addJob(study, rec, it.file);
      if (rec.state === 'done') {
        job.state = 'done';
        job.sent = job.size;
      }
      await saveRec(job);
    }
  }
  draw();
  pump();
  for (const s of engine.studies.values()) afterJob(s);
}

function onServerEvent(ev) {
  if (ev.type === 'notification' || ev.type === 'file_completed') {
    for (const s of engine.studies.values()) {
      if (s.sessionId !== ev.study) continue;
      if (ev.type === 'notification' && ev.kind === 'delivered') {
        s.phase = 'delivered';
        s.verified = ev.verified;
      } else if (ev.type === 'notification' && ev.kind === 'forward_failed') {
        s.phase = 'failed';
        s.reason = ev.message;
      } else if (ev.type === 'notification' && ev.kind === 'report_ready') {
        s.phase = 'report ready';
      }
    }
    draw();
  }
}

export const uploadView = {
  id: 'upload',
  title: 'Send a study',
  adminOnly: false,
  async render(container, ctx) {
    const owner = ctx.user.id;
    if (engine.owner !== owner) {
      // Another user on this browser: nothing of the previous one is shown.
      pauseAll();
      engine.studies = new Map();
      engine.jobs = [];
      engine.running = 0;
      engine.owner = owner;
    }
    engine.container = container;
    // The inputs stay out of sight and out of the tab order; the buttons
    // (keyboard-reachable, labelled) open them.
    const folder = h('input', {
      type: 'file',
      id: 'pick-folder',
      webkitdirectory: true,
      multiple: true,
      class: 'visually-hidden',
      tabindex: '-1',
      'aria-hidden': 'true',
      'data-test': 'folder-input',
      onchange: (e) => scanItems(fromInput(e.target)),
    });
    const files = h('input', {
      type: 'file',
      id: 'pick-files',
      multiple: true,
      class: 'visually-hidden',
      tabindex: '-1',
      'aria-hidden': 'true',
      'data-test': 'files-input',
      onchange: (e) => scanItems(fromInput(e.target)),
    });
    const drop = h(
      'div',
      { class: 'drop', role: 'group', 'aria-label': 'Drop files or folders here', 'data-test': 'drop-zone' },
      h('p', {}, 'Drop a study folder or files here, or'),
      h(
        'p',
        { class: 'pickers' },
        h('button', { type: 'button', 'data-test': 'pick-folder', onclick: () => folder.click() }, 'Choose a folder'),
        folder,
        h('button', { type: 'button', 'data-test': 'pick-files', onclick: () => files.click() }, 'Choose files'),
        files,
      ),
    );
    drop.addEventListener('dragover', (e) => {
      e.preventDefault();
      drop.classList.add('over');
    });
    drop.addEventListener('dragleave', () => drop.classList.remove('over'));
    drop.addEventListener('drop', async (e) => {
      e.preventDefault();
      drop.classList.remove('over');
      scanItems(await fromDrop(e.dataTransfer));
    });
    const controls = h(
      'p',
      { id: 'upload-controls', class: 'controls', hidden: true },
      h(
        'button',
        {
          type: 'button',
          id: 'pause',
          'data-test': 'upload-pause',
          onclick: () => {
            engine.paused = true;
            pauseAll();
          },
        },
        'Pause',
      ),
      h(
        'button',
        {
          type: 'button',
          id: 'resume',
          'data-test': 'upload-resume',
          hidden: true,
          onclick: () => {
            engine.paused = false;
            resumeAll();
          },
        },
        'Resume',
      ),
    );
    const clear = h(
      'button',
      { type: 'button', 'data-test': 'upload-clear', onclick: () => clearFinished() },
      'Clear finished studies',
    );
    container.replaceChildren(
      h('section', { class: 'card' }, h('h2', {}, 'Send a study'), drop, h('div', { id: 'scan', 'aria-live': 'polite' })),
      h('section', { 'aria-label': 'Uploads' }, controls, h('div', { id: 'upload-progress', 'data-test': 'uploads' }), clear),
    );
    if (!engine.listening) {
      engine.listening = true;
      onEvent((ev) => {
        if (ev.type === 'logout') {
          pauseAll();
          engine.owner = null;
        } else onServerEvent(ev);
      });
      window.addEventListener('offline', () => pauseAll());
      window.addEventListener('online', () => {
        if (!engine.paused) resumeAll();
      });
    }
    const restored = await restorePending();
    if (restored) toast(`${restored} unfinished file(s) from before: resuming where the server says.`);
    draw();
    pump();
    for (const s of engine.studies.values()) {
      afterJob(s);
      watchStudy(s);
    }
  },
};

export { api };
