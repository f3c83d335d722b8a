// Administration (tab shown to admins only): dead letters with replay,
// and accounts (create, disable / enable, reset the second factor).
// Data: GET /api/v1/admin/dead-letters, POST .../{id}/replay,
// GET/POST /api/v1/users, POST /api/v1/users/{id}/disable|enable|reset-totp.

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

/** fetch JSON through ctx.api; throws Error(the server's message). */
async function call(ctx, path, init) {
  const res = await ctx.api(path, init);
  const body = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) {
    const e = body && (body.error || body);
    throw new Error((e && e.message) || `${res.status} ${res.statusText}`);
  }
  return body;
}

/** Every item of a paginated listing ({items, next}). */
async function all(ctx, path) {
  const out = [];
  let cursor = null;
  for (let i = 0; i < 100; i += 1) {
    const q = cursor ? `?cursor=${encodeURIComponent(cursor)}` : '';
    const page = await call(ctx, `${path}${q}`);
    out.push(...page.items);
    if (!page.next) break;
    cursor = page.next;
  }
  return out;
}

function when(t) {
  return t ? new Date(t).toLocaleString() : '—';
}

function post(json) {
  return {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(json || {}),
  };
}

function deadLetters(ctx, section) {
  const { h } = ctx;
  const body = h('tbody');
  const table = h(
    'table',
    { class: 'admin-table', 'data-test': 'dead-letters-table' },
    h('caption', {}, 'Dead letters: deliveries given up'),
    h(
      'thead',
      {},
      h(
        'tr',
        {},
        ...['Study', 'Owner', 'Files', 'Attempts', 'Last error', 'Queued', 'Replays', 'Action'].map((c) => h('th', { scope: 'col' }, c)),
      ),
    ),
    body,
  );
  const status = h('p', { role: 'status', class: 'muted' });
  const load = async () => {
    status.textContent = 'Loading…';
    let list;
    try {
      list = await all(ctx, '/api/v1/admin/dead-letters');
    } catch (e) {
      status.textContent = `Dead letters unavailable: ${e.message}`;
      return;
    }
    status.textContent = list.length ? `${list.length} dead letter(s).` : 'No dead letter.';
    body.replaceChildren(
      ...list.map((d) => h(
        'tr',
        { 'data-id': d.id },
        h('td', { 'data-label': 'Study' }, h('code', {}, d.id), d.study_instance_uid ? h('div', { class: 'muted' }, d.study_instance_uid) : null),
        h('td', { 'data-label': 'Owner' }, d.owner),
        h('td', { 'data-label': 'Files', class: 'num' }, String(d.instances)),
        h('td', { 'data-label': 'Attempts', class: 'num' }, String(d.attempts)),
        h('td', { 'data-label': 'Last error', class: 'admin-error' }, d.last_error || '—'),
        h('td', { 'data-label': 'Queued' }, when(d.queued_at)),
        h('td', { 'data-label': 'Replays', class: 'num' }, String(d.replays)),
        h(
          'td',
          { 'data-label': 'Action' },
          h(
            'button',
            {
              type: 'button',
              'data-test': 'dead-letter-replay',
              'data-id': d.id,
              'aria-label': `Replay delivery of study ${d.id}`,
              onclick: async (ev) => {
                ev.currentTarget.disabled = true;
                try {
                  await call(ctx, `/api/v1/admin/dead-letters/${encodeURIComponent(d.id)}/replay`, post());
                  ctx.toast(`Study ${d.id} queued for delivery again.`);
                } catch (e) {
                  ctx.toast(`Replay refused: ${e.message}`, 'error');
                }
                await load();
              },
            },
            'Replay',
          ),
        ),
      )),
    );
  };
  section.append(
    h('h2', {}, 'Dead letters'),
    h('div', { class: 'admin-actions' }, h('button', { type: 'button', 'data-test': 'dead-letters-reload', onclick: load }, 'Reload')),
    status,
    h('div', { class: 'scroll' }, table),
  );
  return load;
}

function users(ctx, section) {
  const { h } = ctx;
  const body = h('tbody');
  const status = h('p', { role: 'status', class: 'muted' });
  const table = h(
    'table',
    { class: 'admin-table', 'data-test': 'users-table' },
    h('caption', {}, 'Accounts'),
    h('thead', {}, h('tr', {}, ...['User', 'Role', 'Second factor', 'Status', 'Actions'].map((c) => h('th', { scope: 'col' }, c)))),
    body,
  );
  const act = (u, what, label, test) => h(
    'button',
    {
      type: 'button',
      'data-test': test,
      'data-id': u.id,
      'aria-label': `${label}: ${u.username}`,
      onclick: async (ev) => {
        ev.currentTarget.disabled = true;
        try {
          await call(ctx, `/api/v1/users/${encodeURIComponent(u.id)}/${what}`, post());
          ctx.toast(`${label}: ${u.username}.`);
        } catch (e) {
          ctx.toast(`${label} refused: ${e.message}`, 'error');
        }
        await load();
      },
    },
    label,
  );
  const load = async () => {
    status.textContent = 'Loading…';
    let list;
    try {
      list = await all(ctx, '/api/v1/users');
    } catch (e) {
      status.textContent = `Accounts unavailable: ${e.message}`;
      return;
    }
    status.textContent = `${list.length} account(s).`;
    body.replaceChildren(
      ...list.map((u) => {
        const self = ctx.user && u.id === ctx.user.id;
        return h(
          'tr',
          { 'data-id': u.id, 'data-username': u.username },
          h('td', { 'data-label': 'User' }, u.username, self ? h('span', { class: 'muted' }, ' (you)') : null),
          h('td', { 'data-label': 'Role' }, u.role),
          h('td', { 'data-label': 'Second factor' }, u.totp ? 'Enrolled' : 'None'),
          h('td', { 'data-label': 'Status' }, u.disabled ? 'Disabled' : 'Active'),
          h(
            'td',
            { 'data-label': 'Actions', class: 'admin-actions' },
            u.disabled
              ? act(u, 'enable', 'Enable', 'user-enable')
              : self ? null : act(u, 'disable', 'Disable', 'user-disable'),
            u.totp ? act(u, 'reset-totp', 'Reset second factor', 'user-reset-totp') : null,
          ),
        );
      }),
    );
  };

  const name = h('input', { id: 'admin-new-username', name: 'username', required: true, autocomplete: 'off', maxlength: '64', 'data-test': 'user-create-username' });
  const password = h('input', { id: 'admin-new-password', name: 'password', type: 'password', required: true, minlength: '12', autocomplete: 'new-password', 'data-test': 'user-create-password' });
  const role = h(
    'select',
    { id: 'admin-new-role', name: 'role', 'data-test': 'user-create-role' },
    h('option', { value: 'uploader' }, 'Uploader'),
    h('option', { value: 'radiologist' }, 'Radiologist'),
    h('option', { value: 'admin' }, 'Administrator'),
  );
  const formStatus = h('p', { role: 'status', class: 'muted', 'aria-live': 'polite' });
  const form = h(
    'form',
    {
      class: 'admin-form',
      'data-test': 'user-create-form',
      'aria-label': 'Create an account',
      onsubmit: async (ev) => {
        ev.preventDefault();
        formStatus.textContent = 'Creating…';
        formStatus.className = 'muted';
        try {
          const u = await call(ctx, '/api/v1/users', post({ username: name.value.trim(), password: password.value, role: role.value }));
          formStatus.textContent = `Account ${u.username} created.`;
          form.reset();
          await load();
        } catch (e) {
          formStatus.textContent = `Not created: ${e.message}`;
          formStatus.className = 'error';
        }
      },
    },
    h('div', {}, h('label', { for: 'admin-new-username' }, 'Username'), name),
    h('div', {}, h('label', { for: 'admin-new-password' }, 'Password (at least 12 characters)'), password),
    h('div', {}, h('label', { for: 'admin-new-role' }, 'Role'), role),
    h('div', {}, h('button', { type: 'submit', class: 'primary', 'data-test': 'user-create-submit' }, 'Create account')),
  );
  section.append(
    h('h2', {}, 'Accounts'),
    form,
    formStatus,
    status,
    h('div', { class: 'scroll' }, table),
  );
  return load;
}

export default {
  id: 'admin',
  title: 'Admin',
  adminOnly: true,
  async render(container, ctx) {
    addStyle('./admin.css');
    const { h } = ctx;
    const dl = h('section', { class: 'card', 'aria-labelledby': 'admin-dl-title' });
    const us = h('section', { class: 'card', 'aria-labelledby': 'admin-users-title' });
    container.replaceChildren(h('h1', { class: 'visually-hidden' }, 'Administration'), dl, us);
    const loadDl = deadLetters(ctx, dl);
    const loadUsers = users(ctx, us);
    dl.querySelector('h2').id = 'admin-dl-title';
    us.querySelector('h2').id = 'admin-users-title';
    await Promise.all([loadDl(), loadUsers()]);
  },
};
