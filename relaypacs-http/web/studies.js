// The studies view: the caller's studies with their state (live from the
// server's events), the PACS's or the validator's reason in plain words,
// the verification mode of a delivery, and reports (opened by
// ./views/reports.js's openReport, or downloaded as DICOM when that module
// is not there).

const REASONS = {
  RELAY_DICOM_INVALID: 'the DICOM file is damaged or incomplete',
  RELAY_DICOM_BAD_ATTRIBUTE: 'a value in the DICOM header is not valid',
  RELAY_DICOM_MISSING_ATTRIBUTE: 'the DICOM header lacks a required value',
  RELAY_DICOM_TRUNCATED: 'the DICOM file is cut short',
  RELAY_DICOM_UNSUPPORTED_TRANSFER_SYNTAX: 'the image encoding is not supported',
  RELAY_DICOM_NOT_DICOM: 'this file is not a DICOM image',
  RELAY_DICOM_MALFORMED: 'the DICOM file is damaged',
  RELAY_DICOM_LENGTH_OVERRUN: 'the DICOM file is damaged (a length runs past its end)',
  RELAY_DICOM_STRAY_DELIMITER: 'the DICOM file is damaged',
  RELAY_DICOM_TOO_DEEP: 'the DICOM file is nested too deeply to be safe',
  RELAY_DICOM_TOO_MANY_ELEMENTS: 'the DICOM file has too many elements to be safe',
  RELAY_DICOM_HEADER_TOO_LARGE: 'the DICOM header is too large',
  RELAY_DICOM_INFLATE_LIMIT: 'the compressed DICOM data expands too much to be safe',
  RELAY_STUDY_MISMATCH: 'this file belongs to another study',
  RELAY_FILE_HASH_MISMATCH: 'the file changed or was damaged on the way (its checksum does not match)',
  RELAY_CHUNK_HASH_MISMATCH: 'part of the file was damaged on the way',
  RELAY_CHUNK_CHECKSUM_MISMATCH: 'part of the file was damaged on the way',
  RELAY_ALREADY_EXISTS: 'this image was already sent',
  RELAY_LIMIT_EXCEEDED: 'the file or study is larger than this server accepts',
  RELAY_SESSION_EXPIRED: 'the upload waited too long and expired; send it again',
  RELAY_SESSION_EMPTY: 'no file of this study was accepted',
  RELAY_PACS_REJECTED: 'the PACS refused the study',
  RELAY_INSUFFICIENT_STORAGE: 'the server is out of space; try again later',
  RELAY_STORAGE_FULL: 'the server is out of space; try again later',
};

/** A validator's or the PACS's refusal in plain words (with its detail). */
export function plainReason(code, message) {
  const plain = code && REASONS[code];
  const detail = (message || '').replace(/; the upload was refused and removed, the study stays open$/, '');
  if (plain && detail) return `${plain} (${detail})`;
  return plain || detail || code || 'refused';
}

const PHASE_TEXT = {
  waiting: 'waiting',
  uploading: 'uploading',
  paused: 'paused',
  validating: 'validating',
  refused: 'refused',
  queued: 'queued for the PACS',
  delivered: 'delivered',
  failed: 'delivery failed',
  'report ready': 'report ready',
  open: 'open (upload not finished)',
  forwarding: 'queued for the PACS',
  dead_letter: 'delivery failed',
};

function verifiedShort(v) {
  if (v === 'content') return 'content verified';
  if (v === 'presence-only') return 'presence verified only';
  return '';
}

/** A small status badge: text, never colour alone. */
export function stateBadge(phase, verified) {
  const el = document.createElement('span');
  el.className = `badge ${String(phase).replace(/\s+/g, '-')}`;
  el.dataset.test = 'study-state';
  el.dataset.state = phase;
  const v = phase === 'delivered' ? verifiedShort(verified) : '';
  el.textContent = (PHASE_TEXT[phase] || phase) + (v ? ` (${v})` : '');
  return el;
}

/** The phase of a study as the API shows it. */
function phaseOf(s) {
  const st = (s.state && s.state.state) || s.state;
  if (st === 'delivered') return s.delivery && s.delivery.reports > 0 ? 'report ready' : 'delivered';
  if (st === 'dead_letter') return 'failed';
  if (st === 'forwarding') return 'queued';
  return 'open';
}

/** The open report panel (one at a time) and what to give the focus back to. */
const shown = { panel: null, opener: null, study: null, onKey: null };

/** Close the open report panel, if any: it leaves the page (its Blob URLs
 *  are revoked by ./views/reports.js once it is gone). With `refocus`, the
 *  focus returns to the control that opened it when that is still shown. */
export function closeReport(refocus = false) {
  const { panel, opener, study, onKey } = shown;
  shown.panel = null;
  shown.opener = null;
  shown.study = null;
  if (onKey) document.removeEventListener('keydown', onKey);
  shown.onKey = null;
  if (!panel) return;
  panel.remove();
  if (!refocus || !opener) return;
  // The list that held the opener may have been drawn again meanwhile (a
  // new notification): then the same study's "Open" button in it.
  const again =
    opener.isConnected || !study
      ? opener
      : document.querySelector(`[data-study="${CSS.escape(study)}"] [data-test="open-reports"]`);
  if (again && again.isConnected && again.getClientRects().length) again.focus();
}

/** Show the reports of a study: openReport of ./views/reports.js, or a
 *  download. The panel goes to #report-host above the tab panels (so it is
 *  seen whichever tab is open), replaces an open one, and closes with its
 *  Close button, with Escape, and when another tab is chosen (app.js). */
export async function showReport(ctx, studyId) {
  const { h } = ctx;
  const opener = document.activeElement;
  let reports;
  try {
    reports = await ctx.apiJson(`/api/v1/studies/${studyId}/reports`);
  } catch (e) {
    ctx.toast(`Reports unavailable: ${e.message}`, 'error');
    return;
  }
  closeReport();
  const host = document.getElementById('report-host') || document.getElementById('views');
  const titleId = `report-title-${Date.now()}`;
  const panel = h(
    'section',
    { class: 'card report', 'data-test': 'report-panel', 'aria-labelledby': titleId, tabindex: '-1' },
    h(
      'div',
      { class: 'report-head' },
      h('h2', { id: titleId }, reports.length === 1 ? 'Report' : `Reports (${reports.length})`),
      h(
        'button',
        {
          type: 'button',
          class: 'close',
          'data-test': 'report-close',
          'aria-keyshortcuts': 'Escape',
          onclick: () => closeReport(true),
        },
        h('span', { 'aria-hidden': 'true' }, '✕'),
        ' Close report',
      ),
    ),
  );
  host.prepend(panel);
  shown.panel = panel;
  shown.opener = opener;
  // The row or notification it came from (see closeReport).
  const row = opener instanceof Element ? opener.closest('[data-study]') : null;
  shown.study = row ? row.dataset.study : null;
  shown.onKey = (ev) => {
    // Escape closes the report, except where it means something to the
    // control that has the focus (a text field, a list box). The frames
    // (sandboxed, another origin) do not pass their keys to this page.
    if (ev.key !== 'Escape' || ev.defaultPrevented) return;
    if (ev.target instanceof Element && ev.target.closest('input, select, textarea')) return;
    ev.preventDefault();
    closeReport(true);
  };
  document.addEventListener('keydown', shown.onKey);
  panel.focus();
  if (!reports.length) {
    panel.append(h('p', {}, 'No report yet.'));
    return;
  }
  let mod = null;
  try {
    mod = await import('./views/reports.js');
  } catch {
    mod = null;
  }
  for (const r of reports) {
    // Closed (or replaced) while the reports were loading: stop here.
    if (shown.panel !== panel) return;
    const holder = h('div', { class: 'report-item', 'data-test': 'report-item', 'data-kind': r.kind || '' });
    panel.append(holder);
    if (mod && typeof mod.openReport === 'function') {
      try {
        await mod.openReport(ctx, studyId, r, holder);
        continue;
      } catch (e) {
        holder.append(h('p', { class: 'error' }, `The report could not be shown: ${e.message}`));
      }
    }
    holder.append(
      h(
        'button',
        {
          type: 'button',
          'data-test': 'report-download',
          onclick: async () => {
            const res = await ctx.api(r.url || `/api/v1/studies/${studyId}/reports/${r.sop_instance_uid}`);
            if (!res.ok) {
              ctx.toast(`Download failed (${res.status})`, 'error');
              return;
            }
            ctx.download(await res.blob(), `${r.sop_instance_uid}.dcm`);
          },
        },
        `Download report (${r.kind || 'DICOM'})`,
      ),
    );
  }
}

export const studiesView = {
  id: 'studies',
  title: 'My studies',
  adminOnly: false,
  rerender: true,
  async render(container, ctx) {
    const { h } = ctx;
    const list = h('tbody', {});
    const table = h(
      'table',
      { 'data-test': 'studies-table' },
      h('caption', {}, 'Studies sent from this account'),
      h(
        'thead',
        {},
        h('tr', {}, ...['Created', 'Study', 'Files', 'State', 'Reports'].map((c) => h('th', { scope: 'col' }, c))),
      ),
      list,
    );
    container.replaceChildren(
      h(
        'section',
        { class: 'card' },
        h('h2', {}, 'My studies'),
        h('button', { type: 'button', 'data-test': 'studies-refresh', onclick: () => load() }, 'Refresh'),
        h('div', { class: 'scroll' }, table),
      ),
    );
    const load = async () => {
      let page;
      try {
        page = await ctx.apiJson('/api/v1/studies?limit=1000');
      } catch (e) {
        list.replaceChildren(h('tr', {}, h('td', { colspan: '5', class: 'error' }, e.message)));
        return;
      }
      const items = (page.items || []).slice().sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
      list.replaceChildren(
        ...items.map((s) => {
          const phase = phaseOf(s);
          const reason =
            phase === 'failed'
              ? plainReason('RELAY_PACS_REJECTED', s.state.reason || (s.delivery && s.delivery.last_error))
              : '';
          return h(
            'tr',
            { 'data-test': 'study-row', 'data-study': s.id, 'data-state': phase },
            h('td', { 'data-label': 'Created' }, new Date(s.created_at).toLocaleString()),
            h('td', { class: 'uid', 'data-label': 'Study' }, s.study_instance_uid || '—'),
            h('td', { class: 'num', 'data-label': 'Files' }, String(s.file_count)),
            h('td', { 'data-label': 'State' }, stateBadge(phase, s.delivery && s.delivery.verified), reason ? h('div', { class: 'muted' }, reason) : null),
            h(
              'td',
              { 'data-label': 'Reports' },
              s.delivery && s.delivery.reports > 0
                ? h(
                    'button',
                    { type: 'button', 'data-test': 'open-reports', onclick: () => showReport(ctx, s.id) },
                    `Open (${s.delivery.reports})`,
                  )
                : '—',
            ),
          );
        }),
      );
      if (!items.length) list.append(h('tr', {}, h('td', { colspan: '5' }, 'No study yet.')));
    };
    await load();
    if (!this.unsub) {
      this.unsub = ctx.onEvent((ev) => {
        if (ev.type === 'notification' && !container.hidden) load();
      });
    }
  },
};
