// Upload analytics view: filters (date range, modality; user for admins),
// summary figures, charts per day (vendored uPlot), a table by day,
// modality or user, and the CSV export. Data: GET /api/v1/analytics/...
// (the server applies ownership: an uploader sees its own uploads only).

import uPlot from '../vendor/uplot/uPlot.esm.js';

const GROUPS = [
  { id: 'day', path: 'by-day', label: 'Day' },
  { id: 'modality', path: 'by-modality', label: 'Modality' },
  { id: 'user', path: 'by-user', label: 'User' },
];

const DAY_MS = 86400000;

/** Series colours (WCAG AA on white) and dash patterns, so that the
 *  series differ by more than colour; points show single days. */
const SERIES_STYLE = [
  { stroke: '#0b4f6c', width: 2, points: { show: true, size: 7 } },
  { stroke: '#1b6e20', width: 2, dash: [6, 3], points: { show: true, size: 7 } },
  { stroke: '#a4161a', width: 2, dash: [2, 2], points: { show: true, size: 7 } },
];

/** Add a stylesheet once (CSP: style-src 'self', so <link>, never <style>). */
function addStyle(href) {
  if (document.querySelector(`link[data-analytics-css="${href}"]`)) return;
  const l = document.createElement('link');
  l.rel = 'stylesheet';
  l.href = new URL(href, import.meta.url).href;
  l.setAttribute('data-analytics-css', href);
  document.head.append(l);
}

/** YYYY-MM-DD of a Date, in UTC (the server's days are UTC days). */
function dayText(d) {
  return d.toISOString().slice(0, 10);
}

function bytesText(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = Number(n) || 0;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function durationText(ms) {
  if (ms === null || ms === undefined) return '—';
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 120) return `${s.toFixed(1)} s`;
  const m = s / 60;
  if (m < 120) return `${m.toFixed(1)} min`;
  return `${(m / 60).toFixed(1)} h`;
}

function failuresOf(row) {
  return (row.refused || 0) + (row.duplicate || 0) + (row.conflict || 0)
    + (row.dead_lettered || 0) + (row.aborted || 0) + (row.expired || 0);
}

/** Plain words for a failure cause (`refused:RELAY_DICOM_NOT_DICOM`, ...). */
function causeText(cause) {
  const [kind, code] = cause.split(':');
  const words = {
    refused: 'Refused by the validator',
    duplicate: 'Duplicate instance',
    conflict: 'Conflicting instance',
    dead_lettered: 'Not accepted by the PACS',
    aborted: 'Aborted',
    expired: 'Expired',
  };
  const base = words[kind] || kind;
  return code ? `${base} (${code.replace(/^RELAY_/, '').replaceAll('_', ' ').toLowerCase()})` : base;
}

function query(f, extra) {
  const p = new URLSearchParams();
  p.set('from', f.from);
  p.set('to', f.to);
  if (f.modality) p.set('modality', f.modality);
  if (f.user) p.set('user', f.user);
  for (const [k, v] of Object.entries(extra || {})) p.set(k, v);
  return p.toString();
}

/** The file name from Content-Disposition, or `fallback`. */
function fileName(resp, fallback) {
  const cd = resp.headers.get('content-disposition') || '';
  const m = /filename="([^"]+)"/.exec(cd);
  return m ? m[1] : fallback;
}

export default {
  id: 'analytics',
  title: 'Analytics',
  adminOnly: false,
  rerender: false,

  async render(container, ctx) {
    const { h } = ctx;
    addStyle('../vendor/uplot/uPlot.min.css');
    addStyle('./analytics.css');
    const admin = ctx.user && ctx.user.role === 'admin';
    const today = new Date();
    const monthAgo = new Date(today.getTime() - 29 * DAY_MS);
    const ids = {
      from: 'analytics-from',
      to: 'analytics-to',
      modality: 'analytics-modality',
      user: 'analytics-user',
      group: 'analytics-group',
    };

    const from = h('input', { id: ids.from, type: 'date', required: true, value: dayText(monthAgo), 'data-test': 'analytics-from' });
    const to = h('input', { id: ids.to, type: 'date', required: true, value: dayText(today), 'data-test': 'analytics-to' });
    const modality = h('input', {
      id: ids.modality,
      type: 'text',
      autocomplete: 'off',
      maxlength: '16',
      pattern: '[A-Za-z0-9_]{0,16}',
      placeholder: 'e.g. CT',
      'aria-describedby': 'analytics-modality-hint',
      'data-test': 'analytics-modality',
    });
    const user = admin
      ? h('select', { id: ids.user, 'data-test': 'analytics-user' }, h('option', { value: '' }, 'Every user'))
      : null;
    const group = h(
      'select',
      { id: ids.group, 'data-test': 'analytics-group' },
      ...GROUPS.filter((g) => admin || g.id !== 'user').map((g) => h('option', { value: g.id }, `By ${g.label.toLowerCase()}`)),
    );
    const status = h('p', { class: 'muted', role: 'status', 'aria-live': 'polite', 'data-test': 'analytics-status' });
    const exportButton = h(
      'button',
      { type: 'button', 'data-test': 'analytics-export-csv', onclick: () => exportCsv() },
      'Export CSV',
    );
    const form = h(
      'form',
      { class: 'analytics-filters', 'aria-label': 'Analytics filters', onsubmit: (e) => { e.preventDefault(); load(); } },
      h('div', {}, h('label', { for: ids.from }, 'From (UTC day)'), from),
      h('div', {}, h('label', { for: ids.to }, 'To (UTC day, included)'), to),
      h(
        'div',
        {},
        h('label', { for: ids.modality }, 'Modality'),
        modality,
        h('span', { id: 'analytics-modality-hint', class: 'hint' }, 'Empty: every modality'),
      ),
      user ? h('div', {}, h('label', { for: ids.user }, 'User'), user) : null,
      h('div', {}, h('label', { for: ids.group }, 'Table rows'), group),
      h(
        'div',
        { class: 'analytics-actions' },
        h('button', { type: 'submit', class: 'primary', 'data-test': 'analytics-apply' }, 'Show'),
        exportButton,
      ),
    );

    const figures = h('dl', { class: 'analytics-figures', 'data-test': 'analytics-summary' });
    const causes = h('ul', { class: 'analytics-causes', 'data-test': 'analytics-causes' });
    const countsChart = h('figure', { class: 'analytics-chart' });
    const timeChart = h('figure', { class: 'analytics-chart' });
    const tbody = h('tbody', {});
    const headRow = h('tr', {});
    const caption = h('caption', {}, 'Uploads');
    const table = h('table', { class: 'analytics-table', 'data-test': 'analytics-table' }, caption, h('thead', {}, headRow), tbody);

    container.replaceChildren(
      h(
        'div',
        { class: 'card' },
        h('h2', {}, admin ? 'Upload analytics (every user)' : 'My upload analytics'),
        form,
        status,
      ),
      h('div', { class: 'card' }, h('h3', {}, 'Summary'), figures, h('h3', {}, 'Failures by cause'), causes),
      h('div', { class: 'card analytics-charts' }, countsChart, timeChart),
      h('div', { class: 'card' }, h('div', { class: 'scroll' }, table)),
    );

    if (user) {
      try {
        const page = await ctx.apiJson('/api/v1/users?limit=1000');
        const list = Array.isArray(page) ? page : page.items || [];
        for (const u of list) user.append(h('option', { value: u.username }, u.username));
      } catch (e) {
        ctx.toast(`Users could not be listed: ${e.message}`, 'error');
      }
    }

    const plots = [];

    function filters() {
      return {
        from: from.value,
        to: to.value,
        modality: modality.value.trim().toUpperCase(),
        user: user ? user.value : '',
      };
    }

    function fillFigures(row) {
      const items = [
        ['Studies', row.uploads],
        ['Delivered', row.delivered],
        ['Files', row.files],
        ['Data', bytesText(row.bytes)],
        ['Failures', failuresOf(row)],
        ['Median time to delivered', durationText(row.median_ms)],
        ['95th percentile', durationText(row.p95_ms)],
      ];
      figures.replaceChildren(...items.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))]));
      const entries = Object.entries(row.failures || {});
      causes.replaceChildren(
        ...(entries.length
          ? entries.map(([c, n]) => h('li', {}, `${causeText(c)}: ${n}`))
          : [h('li', {}, 'None')]),
      );
    }

    /**
     * One chart: a title, a text alternative, the uPlot canvas and a legend
     * of our own (the series' colours and dash patterns are set in
     * analytics.css as `.swatch.s1`… and in SERIES_STYLE below).
     */
    function chart(fig, title, summaryText, opts, data) {
      fig.replaceChildren(h('figcaption', {}, title));
      const holder = h('div', { role: 'img', 'aria-label': `${title}. ${summaryText}` });
      fig.append(holder);
      const width = Math.max(260, Math.min(fig.clientWidth || 640, 900) - 8);
      plots.push(new uPlot({ ...opts, width, height: 220, legend: { show: false } }, data, holder));
      fig.append(h(
        'ul',
        { class: 'analytics-legend', 'aria-hidden': 'true' },
        ...opts.series.slice(1).map((se, i) => h('li', {}, h('span', { class: `swatch s${i + 1}` }), se.label)),
      ));
    }

    function drawCharts(f, dayRows) {
      while (plots.length) plots.pop().destroy();
      const byDay = new Map(dayRows.map((r) => [r.key, r]));
      const xs = [];
      const uploads = [];
      const delivered = [];
      const failed = [];
      const median = [];
      const p95 = [];
      const start = Date.parse(`${f.from}T00:00:00Z`);
      const end = Date.parse(`${f.to}T00:00:00Z`);
      for (let t = start; t <= end; t += DAY_MS) {
        const r = byDay.get(dayText(new Date(t)));
        xs.push(t / 1000);
        uploads.push(r ? r.uploads : 0);
        delivered.push(r ? r.delivered : 0);
        failed.push(r ? failuresOf(r) : 0);
        median.push(r && r.median_ms !== null && r.median_ms !== undefined ? r.median_ms / 1000 : null);
        p95.push(r && r.p95_ms !== null && r.p95_ms !== undefined ? r.p95_ms / 1000 : null);
      }
      const total = (a) => a.reduce((s, v) => s + (v || 0), 0);
      const utc = { tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), 'Etc/UTC') };
      chart(
        countsChart,
        'Studies and failures per day',
        `${total(uploads)} studies, ${total(delivered)} delivered, ${total(failed)} failures from ${f.from} to ${f.to}; the table below has the figures.`,
        {
          ...utc,
          series: [
            {},
            { label: 'Studies', ...SERIES_STYLE[0] },
            { label: 'Delivered', ...SERIES_STYLE[1] },
            { label: 'Failures', ...SERIES_STYLE[2] },
          ],
          axes: [{}, { label: 'count' }],
        },
        [xs, uploads, delivered, failed],
      );
      chart(
        timeChart,
        'Time from first byte to delivered (seconds)',
        'Median and 95th percentile per day; the table below has the figures.',
        {
          ...utc,
          series: [
            {},
            { label: 'Median', ...SERIES_STYLE[0] },
            { label: '95th percentile', ...SERIES_STYLE[1], stroke: '#8a5300' },
          ],
          axes: [{}, { label: 'seconds' }],
        },
        [xs, median, p95],
      );
    }

    function fillTable(g, rows) {
      const label = GROUPS.find((x) => x.id === g).label;
      caption.textContent = `Uploads by ${label.toLowerCase()}, ${from.value} to ${to.value}`;
      const cols = [label, 'Studies', 'Delivered', 'Files', 'Data', 'Refused', 'Duplicates', 'Conflicts',
        'Not accepted by PACS', 'Aborted', 'Expired', 'Median', '95th pct.'];
      headRow.replaceChildren(...cols.map((c) => h('th', { scope: 'col' }, c)));
      if (!rows.length) {
        tbody.replaceChildren(h('tr', {}, h('td', { colspan: String(cols.length) }, 'Nothing in this range.')));
        return;
      }
      tbody.replaceChildren(
        ...rows.map((r) => h(
          'tr',
          {},
          h('th', { scope: 'row' }, g === 'user' ? (r.username || r.key) : (r.key || '(unknown)')),
          ...[r.uploads, r.delivered, r.files].map((v) => h('td', { class: 'num' }, String(v))),
          h('td', { class: 'num' }, bytesText(r.bytes)),
          ...[r.refused, r.duplicate, r.conflict, r.dead_lettered, r.aborted, r.expired]
            .map((v) => h('td', { class: 'num' }, String(v))),
          h('td', { class: 'num' }, durationText(r.median_ms)),
          h('td', { class: 'num' }, durationText(r.p95_ms)),
        )),
      );
    }

    async function load() {
      if (!form.reportValidity()) return;
      const f = filters();
      const g = group.value;
      const path = GROUPS.find((x) => x.id === g).path;
      status.textContent = 'Loading…';
      try {
        const [summary, days, rows] = await Promise.all([
          ctx.apiJson(`/api/v1/analytics/summary?${query(f)}`),
          ctx.apiJson(`/api/v1/analytics/by-day?${query(f)}`),
          g === 'day' ? null : ctx.apiJson(`/api/v1/analytics/${path}?${query(f)}`),
        ]);
        fillFigures(summary.rows[0] || {});
        drawCharts(f, days.rows);
        fillTable(g, (rows || days).rows);
        status.textContent = `Showing ${f.from} to ${f.to}${f.modality ? `, modality ${f.modality}` : ''}${f.user ? `, user ${f.user}` : ''}.`;
      } catch (e) {
        status.textContent = '';
        ctx.toast(`Analytics could not be loaded: ${e.message}`, 'error');
      }
    }

    async function exportCsv() {
      if (!form.reportValidity()) return;
      const f = filters();
      const g = GROUPS.find((x) => x.id === group.value);
      exportButton.disabled = true;
      try {
        const r = await ctx.api(`/api/v1/analytics/${g.path}?${query(f, { format: 'csv' })}`, {
          headers: { accept: 'text/csv' },
        });
        if (!r.ok) {
          let msg = `HTTP ${r.status}`;
          try {
            msg = (await r.json()).error.message;
          } catch (_) { /* not JSON */ }
          throw new Error(msg);
        }
        const blob = await r.blob();
        ctx.download(blob, fileName(r, `relaypacs-analytics-${g.id}-${f.from}-${f.to}.csv`));
        status.textContent = 'CSV exported.';
      } catch (e) {
        ctx.toast(`CSV export failed: ${e.message}`, 'error');
      } finally {
        exportButton.disabled = false;
      }
    }

    await load();
  },
};
