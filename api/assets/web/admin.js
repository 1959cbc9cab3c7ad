// The staff page: token use per day (an SVG bar chart drawn here) and per user/model/day,
// users' daily token budgets (set here) and today's use of them, AI chat search, message
// filters, and the dead jobs with their re-drive.
import {
  $,
  api,
  el,
  formatCost,
  formatCosts,
  formatNumber,
  formatTime,
  logOut,
  onUnauthorized,
  resumeSession,
  session,
  setMessage,
  setupAuth,
  show,
} from './common.js';

const authView = $('#auth-view');
const staffOnly = $('#staff-only');
const adminView = $('#admin-view');
const svg = $('#chart-svg');
// The HTML parser put the <svg> in its namespace; new chart elements go in the same one.
const SVG_NS = svg.namespaceURI;
const DAY_MS = 86400000;

let usageRows = [];
let usageDays = 14;

/** Each call returns a check that is true only while no later call was made: stale answers are dropped. */
function latestOnly() {
  let counter = 0;
  return () => {
    const mine = ++counter;
    return () => mine === counter;
  };
}
const usageCall = latestOnly();
const chatsCall = latestOnly();
const messagesCall = latestOnly();
const deadCall = latestOnly();
const budgetsCall = latestOnly();

// ---------------------------------------------------------------- session

setupAuth(authView, (user) => enter(user));
onUnauthorized(() => showAuth('Your session has ended. Please log in again.'));

async function leave() {
  showAuth(await logOut());
}
$('#logout').addEventListener('click', leave);
$('#switch-user').addEventListener('click', leave);

function showAuth(notice) {
  for (const node of [staffOnly, adminView, $('#whoami'), $('#logout')]) show(node, false);
  show(authView, true);
  setMessage($('#auth-notice'), notice);
  $('#login-form input[name=username]').focus();
}

function showStaffOnly(username) {
  show(authView, false);
  show(adminView, false);
  $('#staff-only-user').textContent = username || 'This account';
  show(staffOnly, true);
}

function enter(user) {
  show(authView, false);
  const who = $('#whoami');
  who.textContent = user.username;
  show(who, true);
  show($('#logout'), true);
  if (!user.is_staff) {
    showStaffOnly(user.username);
    return;
  }
  show(staffOnly, false);
  show(adminView, true);
  loadUsage();
  loadBudgets();
  searchChats();
  loadDeadJobs();
  loadMessages();
}

/** True (and the page switched) when the API says this user is not staff. */
function refused(err) {
  if (err.status === 403) {
    showStaffOnly(session.user?.username);
    return true;
  }
  return err.status === 401;
}

/** The session is an HttpOnly cookie the page cannot see: `/api/me/` says whether there is one. */
async function boot() {
  try {
    const me = await resumeSession();
    if (me) enter(me);
    else showAuth('');
  } catch (err) {
    showAuth(err.message);
  }
}

// ---------------------------------------------------------------- tables

/** `columns`: `{label, value: row => text|Node, num?}`; each cell carries its label for phones. */
function renderTable(table, columns, rows, emptyText) {
  const head = el(
    'thead',
    {},
    el('tr', {}, columns.map((c) => el('th', { scope: 'col', class: c.num ? 'num' : null }, c.label))),
  );
  const body = el(
    'tbody',
    {},
    rows.length
      ? rows.map((row) =>
          el(
            'tr',
            { class: columns.rowClass ? columns.rowClass(row) : null },
            columns.map((c) =>
              el('td', { class: c.num ? 'num' : c.class || null, 'data-label': c.label }, c.value(row)),
            ),
          ),
        )
      : el('tr', {}, el('td', { colspan: columns.length, class: 'empty' }, emptyText)),
  );
  table.replaceChildren(head, body);
}

/** A numeric column of `row[key]` (or of `of(row)[key]`). */
const num = (key, of = (row) => row) => ({ num: true, value: (row) => formatNumber(of(row)[key]) });

// ---------------------------------------------------------------- usage and chart

$('#usage-form').addEventListener('submit', (event) => {
  event.preventDefault();
  loadUsage();
});
$('#usage-form select').addEventListener('change', () => loadUsage());

async function loadUsage() {
  const days = Number($('#usage-form select').value) || 14;
  const current = usageCall();
  try {
    const rows = await api('GET', `/api/admin/usage/?days=${days}`);
    if (!current()) return;
    usageRows = rows;
    usageDays = days;
    setMessage($('#usage-error'), '');
  } catch (err) {
    if (!refused(err)) setMessage($('#usage-error'), err.message);
    return;
  }
  renderTable(
    $('#usage-table'),
    [
      { label: 'Day', value: (r) => r.day },
      { label: 'User', value: (r) => r.username },
      { label: 'Model', value: (r) => r.model },
      { label: 'Prompt', ...num('prompt_tokens') },
      { label: 'Completion', ...num('completion_tokens') },
      { label: 'Total', ...num('total_tokens') },
      { label: 'Cost', num: true, value: (r) => formatCosts(r.cost) || '–' },
      { label: 'Replies', ...num('message_count') },
    ],
    usageRows,
    'No replies in this period.',
  );
  drawChart();
}

function svgNode(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** The smallest 1/2/5 × 10ⁿ at or above `n`. */
function niceCeiling(n) {
  if (n <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(n));
  for (const step of [1, 2, 5, 10]) if (step * power >= n) return step * power;
  return 10 * power;
}

function compact(n) {
  if (n >= 1e6) return `${+(n / 1e6).toFixed(1)}M`;
  if (n >= 1e3) return `${+(n / 1e3).toFixed(1)}k`;
  return String(n);
}

const isoDay = (ms) => new Date(ms).toISOString().slice(0, 10);

/** Days (UTC, oldest first) with prompt and completion tokens summed over users and models. */
function dailyTotals() {
  const now = new Date();
  const today = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate());
  let start = today - (usageDays - 1) * DAY_MS;
  for (const row of usageRows) start = Math.min(start, Date.parse(`${row.day}T00:00:00Z`));
  const days = new Map();
  for (let t = start; t <= today; t += DAY_MS) days.set(isoDay(t), { prompt: 0, completion: 0 });
  for (const row of usageRows) {
    const day = days.get(row.day) || { prompt: 0, completion: 0 };
    day.prompt += row.prompt_tokens;
    day.completion += row.completion_tokens;
    days.set(row.day, day);
  }
  return [...days.entries()].sort(([a], [b]) => (a < b ? -1 : 1));
}

function drawChart() {
  const days = dailyTotals();
  const width = Math.max(260, Math.round($('#chart').clientWidth || 600));
  const height = 220;
  const m = { top: 12, right: 8, bottom: 26, left: 44 };
  const plotW = width - m.left - m.right;
  const plotH = height - m.top - m.bottom;
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.replaceChildren();

  const totals = days.map(([, d]) => d.prompt + d.completion);
  const sum = totals.reduce((a, b) => a + b, 0);
  const max = niceCeiling(Math.max(0, ...totals));
  const y = (v) => m.top + plotH - (v / max) * plotH;

  for (const tick of [0, max / 2, max]) {
    svg.append(
      svgNode('line', { class: 'grid', x1: m.left, x2: width - m.right, y1: y(tick), y2: y(tick) }),
      svgNode('text', { class: 'axis', x: m.left - 6, y: y(tick) + 4, 'text-anchor': 'end' }, compact(tick)),
    );
  }

  const slot = plotW / days.length;
  const barW = Math.max(2, Math.min(40, slot * 0.7));
  const labelEvery = Math.max(1, Math.ceil(days.length / Math.max(1, Math.floor(plotW / 52))));
  days.forEach(([day, d], i) => {
    const x = m.left + i * slot + (slot - barW) / 2;
    const group = svgNode('g', { class: 'day', 'data-day': day });
    group.append(
      svgNode(
        'title',
        {},
        `${day}: ${formatNumber(d.prompt + d.completion)} tokens (prompt ${formatNumber(d.prompt)}, completion ${formatNumber(d.completion)})`,
      ),
    );
    const promptTop = y(d.prompt);
    if (d.prompt > 0) {
      group.append(
        svgNode('rect', { class: 'bar prompt', x, y: promptTop, width: barW, height: m.top + plotH - promptTop }),
      );
    }
    if (d.completion > 0) {
      const top = y(d.prompt + d.completion);
      group.append(svgNode('rect', { class: 'bar completion', x, y: top, width: barW, height: promptTop - top }));
    }
    svg.append(group);
    if ((days.length - 1 - i) % labelEvery === 0) {
      svg.append(
        svgNode('text', { class: 'axis', x: x + barW / 2, y: height - 8, 'text-anchor': 'middle' }, day.slice(5)),
      );
    }
  });
  if (sum === 0) {
    svg.append(
      svgNode('text', { class: 'axis empty', x: m.left + plotW / 2, y: m.top + plotH / 2, 'text-anchor': 'middle' }, 'No tokens used in this period'),
    );
  }
  const summary = `${formatNumber(sum)} tokens over ${days.length} days`;
  $('#chart-total').textContent = `· ${summary}`;
  svg.setAttribute('aria-label', `Tokens per day: ${summary}`);
}

let resizeTimer = null;
new ResizeObserver(() => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => {
    if (!adminView.hidden) drawChart();
  }, 100);
}).observe($('#chart'));

// ---------------------------------------------------------------- budgets

/** Users per page: the API sorts each page by the share of the limit taken today. */
const BUDGET_PAGE = 1000;

$('#budgets-refresh').addEventListener('click', () => loadBudgets());

const tokens = (n) => (n === null || n === undefined ? 'no limit' : formatNumber(n));

/** The share of today's limit taken (used and reserved), as a percentage; '–' without a limit. */
function shareTaken(daily) {
  if (daily.limit === null) return '–';
  if (daily.limit === 0) return '100%';
  return `${Math.round((100 * (daily.used + daily.reserved)) / daily.limit)}%`;
}

async function loadBudgets() {
  let users;
  const current = budgetsCall();
  try {
    users = await api('GET', `/api/admin/users/?limit=${BUDGET_PAGE}`);
    if (!current()) return;
    setMessage($('#budgets-error'), '');
  } catch (err) {
    if (!refused(err)) setMessage($('#budgets-error'), err.message);
    return;
  }
  const columns = [
    { label: 'User', value: (u) => u.username },
    { label: 'Own budget', num: true, value: (u) => (u.daily_token_budget === null ? 'default' : formatNumber(u.daily_token_budget)) },
    { label: 'Limit', num: true, value: (u) => tokens(u.daily.limit) },
    { label: 'Used', ...num('used', (u) => u.daily) },
    { label: 'Reserved', ...num('reserved', (u) => u.daily) },
    { label: 'Remaining', num: true, value: (u) => tokens(u.daily.remaining) },
    { label: 'Taken', num: true, value: (u) => shareTaken(u.daily) },
    { label: 'Set budget', value: (u) => budgetForm(u) },
  ];
  columns.rowClass = (u) => (u.daily.limit !== null && u.daily.remaining === 0 ? 'failed' : null);
  renderTable($('#budgets-table'), columns, users, 'No users yet.');
}

/** An input and a button that set `user`'s own budget (empty: the default). */
function budgetForm(user) {
  const input = el('input', {
    type: 'number',
    name: 'daily_tokens',
    min: 0,
    step: 1,
    placeholder: 'default',
    'aria-label': `Daily token budget of ${user.username}`,
    value: user.daily_token_budget ?? '',
  });
  const form = el(
    'form',
    {
      class: 'inline-form budget-form',
      'data-user': user.username,
      onsubmit: (event) => {
        event.preventDefault();
        setBudget(user, input, event.currentTarget.querySelector('button'));
      },
    },
    input,
    el('button', { type: 'submit', class: 'small' }, 'Set'),
  );
  return form;
}

async function setBudget(user, input, button) {
  const text = input.value.trim();
  const dailyTokens = text === '' ? null : Number(text);
  if (dailyTokens !== null && !(Number.isInteger(dailyTokens) && dailyTokens >= 0)) {
    setMessage($('#budgets-error'), 'A budget is a whole number of tokens, 0 or more.');
    return;
  }
  button.disabled = true;
  setMessage($('#budgets-error'), '');
  try {
    const updated = await api('PUT', `/api/admin/users/${user.id}/budget/`, { daily_tokens: dailyTokens });
    const now = updated.daily_token_budget === null ? 'the default' : `${formatNumber(updated.daily_token_budget)} tokens a day`;
    setMessage($('#budgets-notice'), `${updated.username} now has ${now}.`);
  } catch (err) {
    button.disabled = false;
    if (!refused(err)) setMessage($('#budgets-error'), err.message);
    return;
  }
  loadBudgets();
}

// ---------------------------------------------------------------- AI chats

$('#chat-search').addEventListener('submit', (event) => {
  event.preventDefault();
  searchChats();
});

async function searchChats() {
  const q = $('#chat-search input[name=q]').value.trim();
  let chats;
  const current = chatsCall();
  try {
    chats = await api('GET', `/api/admin/ai-chats/?q=${encodeURIComponent(q)}`);
    if (!current()) return;
    setMessage($('#chats-error'), '');
  } catch (err) {
    if (!refused(err)) setMessage($('#chats-error'), err.message);
    return;
  }
  renderTable(
    $('#chats-table'),
    [
      { label: 'ID', num: true, value: (c) => c.id },
      { label: 'Title', class: 'wrap', value: (c) => c.title },
      { label: 'Owner', value: (c) => c.user_username },
      { label: 'Related chat', value: (c) => c.related_chat_name || '–' },
      { label: 'Model', value: (c) => c.model },
      { label: 'Messages', ...num('message_count') },
      { label: 'Updated', value: (c) => formatTime(c.updated_at) },
    ],
    chats,
    q ? `No AI chat matches “${q}”.` : 'No AI chats yet.',
  );
}

// ---------------------------------------------------------------- messages

$('#message-filter').addEventListener('submit', (event) => {
  event.preventDefault();
  loadMessages();
});

async function loadMessages() {
  const form = $('#message-filter').elements;
  const params = new URLSearchParams();
  if (form.role.value) params.set('role', form.role.value);
  if (form.since.value) params.set('since', `${form.since.value}T00:00:00Z`);
  if (form.until.value) {
    // The chosen day is included: stop at the start of the next one.
    params.set('until', `${isoDay(Date.parse(`${form.until.value}T00:00:00Z`) + DAY_MS)}T00:00:00Z`);
  }
  if (form.since.value && form.until.value && form.since.value > form.until.value) {
    setMessage($('#messages-error'), '“From” is after “To”.');
    return;
  }
  let messages;
  const current = messagesCall();
  try {
    messages = await api('GET', `/api/admin/messages/?${params}`);
    if (!current()) return;
    setMessage($('#messages-error'), '');
  } catch (err) {
    if (!refused(err)) setMessage($('#messages-error'), err.message);
    return;
  }
  const columns = [
    { label: 'ID', num: true, value: (x) => x.id },
    { label: 'Chat', num: true, value: (x) => x.ai_chat },
    { label: 'Role', value: (x) => x.role },
    { label: 'Status', value: (x) => el('span', { class: `pill ${x.status}` }, x.status) },
    {
      // Which version of its turn (an edit or a regeneration makes another), and whether it is
      // on the path its user sees.
      label: 'Version',
      value: (x) => [
        el('span', { class: 'badge version', title: `Version ${x.version ?? 1}` }, `v${x.version ?? 1}`),
        x.active === false
          ? el('span', { class: 'pill inactive', title: 'On a branch its user does not see' }, 'inactive')
          : null,
      ],
    },
    { label: 'Parent', num: true, value: (x) => x.parent_id ?? '–' },
    {
      label: 'Content',
      class: 'wrap content-cell',
      value: (x) => el('span', { title: x.content }, x.content.length > 160 ? `${x.content.slice(0, 160)}…` : x.content),
    },
    { label: 'Tokens', ...num('total_tokens') },
    { label: 'Cost', num: true, value: (x) => formatCost(x.cost, x.currency) || '–' },
    { label: 'Time', value: (x) => formatTime(x.timestamp) },
    { label: 'Error', class: 'wrap', value: (x) => x.error || '' },
  ];
  columns.rowClass = (x) => (x.status === 'failed' ? 'failed' : null);
  renderTable($('#messages-table'), columns, messages, 'No message matches.');
}

// ---------------------------------------------------------------- dead jobs

$('#dead-refresh').addEventListener('click', () => loadDeadJobs());

async function loadDeadJobs() {
  let jobs;
  const current = deadCall();
  try {
    jobs = await api('GET', '/api/admin/dead-jobs/');
    if (!current()) return;
    setMessage($('#dead-error'), '');
  } catch (err) {
    if (!refused(err)) setMessage($('#dead-error'), err.message);
    return;
  }
  renderTable(
    $('#dead-table'),
    [
      { label: 'Task', class: 'mono wrap', value: (j) => j.task_id },
      { label: 'Message', num: true, value: (j) => j.message_id },
      { label: 'Chat', num: true, value: (j) => j.ai_chat_id },
      { label: 'Attempts', ...num('attempts') },
      {
        label: 'Action',
        value: (j) =>
          el('button', { type: 'button', class: 'small redrive', onclick: (e) => redrive(j, e.currentTarget) }, 'Re-drive'),
      },
    ],
    jobs,
    'No dead jobs.',
  );
}

async function redrive(job, button) {
  button.disabled = true;
  setMessage($('#dead-error'), '');
  try {
    const result = await api('POST', `/api/admin/dead-jobs/${encodeURIComponent(job.task_id)}/redrive/`);
    setMessage($('#dead-notice'), `Message ${result.message_id} is queued again.`);
  } catch (err) {
    button.disabled = false;
    if (!refused(err)) setMessage($('#dead-error'), err.message);
    return;
  }
  loadDeadJobs();
  loadMessages();
}

boot();
