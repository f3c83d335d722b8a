// Reports a clinician reads (not a tab): openReport(ctx, studyId, report,
// container) fetches the report's /view with the bearer token and shows
// it from a Blob URL in an <iframe data-test="report-frame">:
//   - a Structured Report as the server renders it (HTML, no script), in a
//     sandboxed frame (sandbox="": no script, an opaque origin); its inline
//     <style> is replaced by ./report-frame.css, as the page CSP allows
//     style sheets from this origin only;
//   - an Encapsulated PDF as the PDF itself (browsers refuse to run their
//     PDF viewer in a sandboxed frame, so this frame is not sandboxed; it
//     holds the PDF only).
// and a "Download PDF" button (data-test="report-pdf-link") that fetches
// /pdf and saves it through ctx.download.

/** Add a stylesheet once (CSP: style-src 'self', so <link>, never <style>). */
function addStyle(href) {
  const url = new URL(href, import.meta.url).href;
  if (document.querySelector(`link[data-view-css="${url}"]`)) return;
  const l = document.createElement('link');
  l.rel = 'stylesheet';
  l.href = url;
  l.setAttribute('data-view-css', url);
  document.head.append(l);
}

/** The message of a JSON error answer ({error: {code, message}}). */
async function errorText(res) {
  const body = await res.json().catch(() => null);
  const e = body && (body.error || body);
  return (e && e.message) || `${res.status} ${res.statusText}`;
}

/** The server's report page with its <style> swapped for our stylesheet
 * and anything active removed (there is none; the frame runs no script). */
function framePage(html) {
  // Removed before parsing: even an inert parsed document reports its
  // inline <style> to the page CSP.
  const doc = new DOMParser().parseFromString(html.replace(/<style[\s\S]*?<\/style>/gi, ''), 'text/html');
  for (const el of doc.querySelectorAll('style, script, link, base, meta[http-equiv]')) el.remove();
  const link = doc.createElement('link');
  link.rel = 'stylesheet';
  link.href = new URL('./report-frame.css', import.meta.url).href;
  doc.head.append(link);
  return `<!DOCTYPE html>\n${doc.documentElement.outerHTML}`;
}

function reportUrl(studyId, report) {
  return report.url
    || `/api/v1/studies/${encodeURIComponent(studyId)}/reports/${encodeURIComponent(report.sop_instance_uid)}`;
}

function fileName(report) {
  const uid = String(report.sop_instance_uid || 'report').replace(/[^0-9.]/g, '');
  return `report-${uid}.pdf`;
}

export async function openReport(ctx, studyId, report, container) {
  const { h } = ctx;
  addStyle('./reports.css');
  const base = reportUrl(studyId, report);
  const isPdf = report.kind === 'encapsulated_pdf';
  const title = isPdf ? 'Report (PDF)' : 'Report';
  const status = h('p', { role: 'status', class: 'muted' }, 'Loading the report…');
  const pdfButton = h(
    'button',
    {
      type: 'button',
      class: 'primary',
      'data-test': 'report-pdf-link',
      'aria-label': `Download the report as PDF (${fileName(report)})`,
      onclick: async (ev) => {
        const b = ev.currentTarget;
        b.disabled = true;
        try {
          const res = await ctx.api(`${base}/pdf`);
          if (!res.ok) throw new Error(await errorText(res));
          ctx.download(await res.blob(), fileName(report));
        } catch (e) {
          ctx.toast(`The PDF could not be downloaded: ${e.message}`, 'error');
        } finally {
          b.disabled = false;
        }
      },
    },
    'Download PDF',
  );
  const box = h(
    'article',
    { class: 'report-view', 'aria-label': title },
    h('div', { class: 'report-actions' }, pdfButton),
    status,
  );
  container.append(box);

  const res = await ctx.api(`${base}/view`);
  if (!res.ok) {
    status.textContent = `The report cannot be shown: ${await errorText(res)}`;
    status.className = 'error';
    status.setAttribute('role', 'alert');
    return box;
  }
  const type = res.headers.get('content-type') || '';
  let blob;
  const attrs = { class: 'report-frame', title, 'data-test': 'report-frame', 'data-kind': report.kind || '' };
  if (type.startsWith('text/html')) {
    blob = new Blob([framePage(await res.text())], { type: 'text/html' });
    attrs.sandbox = '';
  } else if (type.startsWith('application/pdf')) {
    blob = new Blob([await res.arrayBuffer()], { type: 'application/pdf' });
  } else {
    status.textContent = `The report cannot be shown: unexpected content type ${type}`;
    status.className = 'error';
    return box;
  }
  const url = URL.createObjectURL(blob);
  attrs.src = url;
  const frame = h('iframe', attrs);
  status.replaceWith(frame);
  if (isPdf) {
    box.append(h('p', { class: 'muted' }, h('a', { href: url, target: '_blank', rel: 'noopener' }, 'Open the PDF in a new tab')));
  }
  // The frame keeps its document; the URL is dropped once the view is gone.
  const drop = new MutationObserver(() => {
    if (!box.isConnected) {
      URL.revokeObjectURL(url);
      drop.disconnect();
    }
  });
  drop.observe(document.body, { childList: true, subtree: true });
  return box;
}
