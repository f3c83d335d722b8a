// RelayPACS web app shell: login (+TOTP), the access token in memory, the
// refresh through the HttpOnly cookie (CSRF token from the login answer or
// the relaypacs_csrf cookie after a reload), tabs, live events (SSE with a
// single-use ticket), notifications, offline banner, service worker.
// Views: ./upload.js and ./studies.js (here), ./views/analytics.js and
// ./views/admin.js (loaded if present), ./views/reports.js (openReport).

import { uploadView } from './upload.js';
import { studiesView, showReport, closeReport } from './studies.js';

const state = {
  token: null,
  csrf: null,
  user: null,
  refreshing: null,
  events: null,
  listeners: new Set(),
};

// ---- small DOM helpers ----------------------------------------------------

/** h(tag, attrs, ...children): attrs are attributes, except on* (listeners). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2).toLowerCase(), v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** At most this many messages at once: a new one drops the oldest. */
const MAX_TOASTS = 3;
/** How long an information message stays; an error stays until dismissed. */
const INFO_MS = 8000;

/** A short message in the #toasts live region (role=status): in the page's
 *  flow under the header, so it never covers a control; at most MAX_TOASTS,
 *  the same message again is counted instead of repeated; each has a
 *  dismiss button; information goes by itself after INFO_MS. */
export function toast(message, kind = 'info') {
  const box = document.getElementById('toasts');
  const text = String(message);
  const same = [...box.children].find((t) => t.dataset.message === text && t.dataset.kind === kind);
  if (same) {
    const n = Number(same.dataset.count || '1') + 1;
    same.dataset.count = String(n);
    same.querySelector('.toast-count').textContent = ` (×${n})`;
    arm(same);
    return;
  }
  while (box.children.length >= MAX_TOASTS) {
    // The oldest information first; errors only when there is nothing else.
    const old = [...box.children].find((t) => t.dataset.kind !== 'error') || box.firstElementChild;
    clearTimeout(Number(old.dataset.timer));
    old.remove();
  }
  const t = h(
    'div',
    { class: `toast ${kind}`, 'data-test': `toast-${kind}`, 'data-kind': kind },
    h('span', { class: 'toast-text' }, text, h('span', { class: 'toast-count' })),
    h(
      'button',
      {
        type: 'button',
        class: 'toast-close',
        'data-test': 'toast-dismiss',
        'aria-label': 'Dismiss message',
        onclick: () => {
          clearTimeout(Number(t.dataset.timer));
          t.remove();
        },
      },
      '✕',
    ),
  );
  t.dataset.message = text;
  box.append(t);
  arm(t);
}

/** (Re)start the timer of an information message. */
function arm(t) {
  if (t.dataset.kind === 'error') return;
  clearTimeout(Number(t.dataset.timer));
  t.dataset.timer = String(setTimeout(() => t.remove(), INFO_MS));
}

export function download(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = h('a', { href: url, download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// ---- auth -----------------------------------------------------------------

function csrfFromCookie() {
  const m = document.cookie.split(';').map((s) => s.trim()).find((s) => s.startsWith('relaypacs_csrf='));
  return m ? decodeURIComponent(m.slice('relaypacs_csrf='.length)) : null;
}

function takeTokens(body) {
  state.token = body.access_token;
  state.csrf = body.csrf_token || csrfFromCookie();
}

/** Rotate the refresh cookie; one refresh at a time. Returns true on success. */
async function refresh() {
  if (state.refreshing) return state.refreshing;
  state.refreshing = (async () => {
    const csrf = state.csrf || csrfFromCookie();
    if (!csrf) return false;
    try {
      const r = await fetch('/api/v1/auth/refresh', {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-csrf-token': csrf },
        body: '{}',
        credentials: 'same-origin',
      });
      if (!r.ok) return false;
      takeTokens(await r.json());
      return true;
    } catch {
      return false;
    }
  })();
  try {
    return await state.refreshing;
  } finally {
    state.refreshing = null;
  }
}

/** The current access token (for tus requests, which add it themselves). */
export function accessToken() {
  return state.token;
}

/** Seconds until the access token expires (its `exp`; -1 without one). */
function tokenLeft() {
  try {
    const payload = state.token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(payload)).exp - Date.now() / 1000;
  } catch {
    return -1;
  }
}

/** An access token good for at least a minute, refreshed through the
 *  cookie if needed (tus requests: a 401 on a HEAD would make the client
 *  drop the upload URL and start the file again). */
export async function freshToken() {
  if (!state.token || tokenLeft() < 60) await refresh();
  return state.token;
}

/** fetch with the bearer token; refreshes once on 401. */
export async function api(path, init = {}) {
  const go = () => {
    const headers = new Headers(init.headers || {});
    if (state.token) headers.set('authorization', `Bearer ${state.token}`);
    return fetch(path, { ...init, headers });
  };
  let r = await go();
  if (r.status === 401 && (await refresh())) r = await go();
  if (r.status === 401) {
    const body = errorOf(await r.clone().json().catch(() => null));
    if (body.code === 'RELAY_UNAUTHENTICATED') showLogin('Your session ended; please log in again.');
  }
  return r;
}

/** api() that parses JSON and throws Error(server message) when not ok. */
export async function apiJson(path, init = {}) {
  const r = await api(path, init);
  const body = r.status === 204 ? null : await r.json().catch(() => null);
  if (!r.ok) {
    const err = errorOf(body);
    const e = new Error(err.message || `${r.status} ${r.statusText}`);
    e.status = r.status;
    e.code = err.code;
    throw e;
  }
  return body;
}

export { refresh as refreshToken };

/** {code, message} of an error answer ({"error": {code, message}}). */
export function errorOf(body) {
  if (body && body.error && typeof body.error === 'object') return body.error;
  return body && typeof body === 'object' ? body : {};
}

// ---- live events ----------------------------------------------------------

/** Subscribe to server events ({type, ...}); returns an unsubscribe function. */
export function onEvent(fn) {
  state.listeners.add(fn);
  return () => state.listeners.delete(fn);
}

function emit(ev) {
  for (const fn of state.listeners) {
    try {
      fn(ev);
    } catch (e) {
      console.error(e);
    }
  }
}

async function openEvents() {
  closeEvents();
  if (!state.user || !navigator.onLine) return;
  let ticket;
  try {
    ticket = (await apiJson('/api/v1/events/ticket', { method: 'POST' })).ticket;
  } catch {
    setTimeout(openEvents, 5000);
    return;
  }
  // The ticket is single-use, so the browser's own reconnection (same URL)
  // cannot work: on error, close and open again with a new ticket.
  const es = new EventSource(`/api/v1/events?ticket=${encodeURIComponent(ticket)}`);
  state.events = es;
  es.addEventListener('message', (m) => {
    try {
      emit(JSON.parse(m.data));
    } catch (e) {
      console.error(e);
    }
  });
  es.addEventListener('lagged', () => emit({ type: 'lagged' }));
  es.addEventListener('error', () => {
    if (state.events !== es) return;
    es.close();
    state.events = null;
    setTimeout(() => {
      if (!state.events) openEvents();
    }, 3000);
  });
}

function closeEvents() {
  if (state.events) {
    state.events.close();
    state.events = null;
  }
}

// ---- notifications --------------------------------------------------------

const KIND_TEXT = {
  delivered: 'Delivered to the PACS',
  forward_failed: 'Delivery failed',
  report_ready: 'Report ready',
};

function verifiedText(v) {
  if (v === 'content') return 'every image was read back from the PACS and compared';
  if (v === 'presence-only') return 'the PACS confirmed it holds the images (content not compared)';
  return null;
}

export { verifiedText };

async function loadNotifications() {
  const list = document.getElementById('notifications');
  let page;
  try {
    page = await apiJson('/api/v1/notifications?limit=1000');
  } catch (e) {
    list.replaceChildren(h('li', { class: 'error' }, `Notifications unavailable: ${e.message}`));
    return;
  }
  const items = (page.items || []).slice().reverse();
  list.replaceChildren(
    ...(items.length ? items.map(notificationItem) : [h('li', { class: 'muted' }, 'Nothing yet.')]),
  );
}

function notificationItem(n) {
  const when = new Date(n.created_at).toLocaleString();
  const v = verifiedText(n.verified);
  const li = h(
    'li',
    { class: `notification ${n.kind}`, 'data-test': 'notification', 'data-kind': n.kind, 'data-study': n.study },
    h('strong', {}, KIND_TEXT[n.kind] || n.kind),
    ' ',
    h('span', {}, n.message),
    v ? h('span', { class: 'muted' }, ` (${v})`) : null,
    ' ',
    h('time', { datetime: n.created_at, class: 'muted' }, when),
  );
  if (n.kind === 'report_ready') {
    li.append(
      ' ',
      h('button', { type: 'button', 'data-test': 'open-reports', onclick: () => showReport(ctx(), n.study) }, 'Open report'),
    );
  }
  return li;
}

// ---- shell ----------------------------------------------------------------

function ctx() {
  return { api, apiJson, user: state.user, h, toast, download, onEvent, accessToken, refresh };
}

function showLogin(message) {
  closeEvents();
  closeReport();
  state.token = null;
  state.user = null;
  document.getElementById('app').hidden = true;
  document.getElementById('who').hidden = true;
  document.getElementById('login').hidden = false;
  document.getElementById('login-error').textContent = message || '';
  document.getElementById('login-username').focus();
}

const views = [];

async function loadOptionalView(path) {
  try {
    const m = await import(path);
    return m.default || null;
  } catch (e) {
    console.info(`view ${path} not available: ${e.message}`);
    return null;
  }
}

async function showApp(offlineUser) {
  const me = offlineUser || (await apiJson('/api/v1/auth/me'));
  state.user = me;
  // Who was logged in, for a reload without a connection (not a secret:
  // the id, name and role; the tokens stay in memory and the cookie).
  sessionStorage.setItem('relaypacs_user', JSON.stringify({ id: me.id, username: me.username, role: me.role }));
  document.getElementById('login').hidden = true;
  document.getElementById('app').hidden = false;
  document.getElementById('who').hidden = false;
  document.getElementById('who-name').textContent = `${me.username} (${me.role})`;
  views.length = 0;
  views.push(uploadView, studiesView);
  for (const p of ['./views/analytics.js', './views/admin.js']) {
    const v = await loadOptionalView(p);
    if (v && (!v.adminOnly || me.role === 'admin')) views.push(v);
  }
  renderTabs();
  await selectView(views[0].id);
  if (offlineUser) return;
  openEvents();
  loadNotifications();
}

function renderTabs() {
  const tabs = document.getElementById('tabs');
  const box = document.getElementById('views');
  tabs.replaceChildren();
  box.replaceChildren();
  for (const v of views) {
    const tab = h(
      'button',
      {
        type: 'button',
        role: 'tab',
        id: `tab-${v.id}`,
        'aria-controls': `view-${v.id}`,
        'aria-selected': 'false',
        'data-test': `tab-${v.id}`,
        onclick: () => selectView(v.id),
      },
      v.title,
    );
    tabs.append(tab);
    box.append(h('section', { id: `view-${v.id}`, role: 'tabpanel', 'aria-labelledby': `tab-${v.id}`, hidden: true }));
  }
  tabs.addEventListener('keydown', (e) => {
    if (e.key !== 'ArrowRight' && e.key !== 'ArrowLeft') return;
    const all = [...tabs.querySelectorAll('[role=tab]')];
    const i = all.indexOf(document.activeElement);
    if (i < 0) return;
    const next = all[(i + (e.key === 'ArrowRight' ? 1 : all.length - 1)) % all.length];
    next.focus();
    next.click();
  });
}

const rendered = new Set();

async function selectView(id) {
  // An open report belongs to the moment it was opened: another tab closes it.
  const current = document.querySelector('#tabs [role=tab][aria-selected=true]');
  if (!current || current.id !== `tab-${id}`) closeReport();
  for (const v of views) {
    const on = v.id === id;
    document.getElementById(`tab-${v.id}`).setAttribute('aria-selected', String(on));
    document.getElementById(`tab-${v.id}`).tabIndex = on ? 0 : -1;
    const panel = document.getElementById(`view-${v.id}`);
    panel.hidden = !on;
    if (on && (!rendered.has(v.id) || v.rerender)) {
      rendered.add(v.id);
      try {
        await v.render(panel, ctx());
      } catch (e) {
        panel.replaceChildren(h('p', { class: 'error' }, `This view failed: ${e.message}`));
      }
    }
  }
}

async function login(ev) {
  ev.preventDefault();
  const f = ev.target;
  const err = document.getElementById('login-error');
  err.textContent = '';
  const body = { username: f.username.value, password: f.password.value, cookie: true };
  if (f.totp.value.trim()) body.totp = f.totp.value.trim();
  let r;
  try {
    r = await fetch('/api/v1/auth/login', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
      credentials: 'same-origin',
    });
  } catch {
    err.textContent = 'The server cannot be reached. Check the connection.';
    return;
  }
  const j = await r.json().catch(() => ({}));
  if (!r.ok) {
    err.textContent =
      r.status === 401
        ? 'Wrong user name, password or authenticator code.'
        : errorOf(j).message || `Login failed (${r.status}).`;
    return;
  }
  f.password.value = '';
  f.totp.value = '';
  takeTokens(j);
  rendered.clear();
  await showApp();
}

async function logout() {
  try {
    await api('/api/v1/auth/logout', { method: 'POST' });
  } catch {
    /* offline: the cookie stays until it expires; the token is dropped */
  }
  state.csrf = null;
  sessionStorage.removeItem('relaypacs_user');
  rendered.clear();
  emit({ type: 'logout' });
  showLogin('You are logged out.');
}

function online() {
  document.getElementById('offline').hidden = navigator.onLine;
  document.body.classList.toggle('is-offline', !navigator.onLine);
}

async function start() {
  document.getElementById('login-form').addEventListener('submit', login);
  document.getElementById('logout').addEventListener('click', logout);
  window.addEventListener('online', async () => {
    online();
    if (!state.user || !state.token) {
      // Back from an offline start: log in again through the cookie.
      if (await refresh()) {
        rendered.clear();
        await showApp();
      } else showLogin('Please log in again.');
    } else {
      openEvents();
      loadNotifications();
    }
  });
  window.addEventListener('offline', () => {
    online();
    closeEvents();
  });
  onEvent((ev) => {
    if (ev.type === 'notification') {
      loadNotifications();
      if (ev.kind === 'delivered') toast(`Study delivered to the PACS.`);
      if (ev.kind === 'report_ready') toast(`A report is ready.`);
      if (ev.kind === 'forward_failed') toast(`Delivery failed: ${ev.message}`, 'error');
    }
  });
  online();
  if ('serviceWorker' in navigator) {
    navigator.serviceWorker.register('/sw.js').catch((e) => console.info(`no service worker: ${e.message}`));
  }
  // A reload: the refresh cookie (and the readable CSRF cookie) may still
  // be there. Offline, wait for the connection.
  if (csrfFromCookie()) {
    if (!navigator.onLine) {
      // Offline after a reload: show the paused work of the last user of
      // this tab; the login through the cookie happens when back online.
      const last = JSON.parse(sessionStorage.getItem('relaypacs_user') || 'null');
      if (last) {
        await showApp(last);
        return;
      }
      showLogin('');
      document.getElementById('login-error').textContent =
        'Offline: you will be logged back in when the connection returns.';
      return;
    }
    if (await refresh()) {
      await showApp();
      return;
    }
  }
  showLogin('');
}

start();
