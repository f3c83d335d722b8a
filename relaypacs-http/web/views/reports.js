// Reports a clinician reads (not a tab): openReport(ctx, studyId, report,
// container) fetches the report's /view with the bearer token and shows it
// in data-test="report-frame":
//   - a Structured Report as the server renders it (HTML, no script), from
//     a Blob URL in a sandboxed <iframe> (sandbox="": no script, an opaque
//     origin); its inline <style> is replaced by ./report-frame.css, as the
//     page CSP allows style sheets from this origin only; beside it a
//     "Download PDF" button (data-test="report-pdf-link") that fetches /pdf
//     and saves it through ctx.download;
//   - an Encapsulated PDF as links to the PDF itself (a Blob URL): "Save
//     PDF" (<a download> with the file name, data-test="report-pdf-link")
//     and "Open PDF" (a new tab, the browser's own viewer). Not framed:
//     phone browsers and headless Chromium draw a framed PDF as an empty
//     or dark box, and every browser can save or open a link.

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

/** "1.4 kB" */
function sizeText(n) {
  if (n < 1000) return `${n} bytes`;
  if (n < 1e6) return `${(n / 1e3).toFixed(1)} kB`;
  return `${(n / 1e6).toFixed(1)} MB`;
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
      'aria-label': `Download PDF (${fileName(report)})`,
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
    isPdf ? null : h('div', { class: 'report-actions' }, pdfButton),
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
  let url;
  if (type.startsWith('text/html')) {
    const blob = new Blob([framePage(await res.text())], { type: 'text/html' });
    url = URL.createObjectURL(blob);
    const frame = h('iframe', {
      class: 'report-frame',
      title,
      sandbox: '',
      src: url,
      'data-test': 'report-frame',
      'data-kind': report.kind || '',
    });
    status.replaceWith(frame);
  } else if (type.startsWith('application/pdf')) {
    const blob = new Blob([await res.arrayBuffer()], { type: 'application/pdf' });
    url = URL.createObjectURL(blob);
    const name = fileName(report);
    const holder = h(
      'div',
      { class: 'report-pdf', 'data-test': 'report-frame', 'data-kind': report.kind || '' },
      h('p', {}, 'A PDF report ', h('span', { class: 'muted' }, `(${name}, ${sizeText(blob.size)})`), '.'),
      h(
        'div',
        { class: 'report-actions' },
        h(
          'a',
          {
            class: 'button primary',
            href: url,
            download: name,
            'data-test': 'report-pdf-link',
            'aria-label': `Save PDF (${name})`,
          },
          'Save PDF',
        ),
        h(
          'a',
          {
            class: 'button',
            href: url,
            target: '_blank',
            rel: 'noopener',
            'data-test': 'report-pdf-open',
            'aria-label': 'Open PDF in a new tab',
          },
          'Open PDF',
        ),
      ),
    );
    status.replaceWith(holder);
  } else {
    status.textContent = `The report cannot be shown: unexpected content type ${type}`;
    status.className = 'error';
    return box;
  }
  // A frame keeps its document, an opened tab its PDF; the URL is dropped
  // once the view is gone (the report panel closed, maybe already while
  // the report was loading).
  if (!box.isConnected) {
    URL.revokeObjectURL(url);
    return box;
  }
  const drop = new MutationObserver(() => {
    if (!box.isConnected) {
      URL.revokeObjectURL(url);
      drop.disconnect();
    }
  });
  drop.observe(document.body, { childList: true, subtree: true });
  return box;
}
