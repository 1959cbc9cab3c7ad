// Shared by the chat page and the admin page: who is logged in, JSON calls to the API,
// the log-in/register forms and small DOM helpers. Plain ES module, no build step.

const REQUEST_TIMEOUT_MS = 20000;

// Pages before this one kept the session token (and the user) in localStorage, where any
// script could read it: wipe what they left behind.
for (const key of ['aichat.token', 'aichat.user']) localStorage.removeItem(key);

/**
 * Who is logged in, kept in memory only. The session itself is the HttpOnly `sessionid`
 * cookie that `/api/login/` sets: the browser sends it to this origin (REST calls and the
 * WebSocket alike) and no script can read it, so no injected script, storage dump or logged
 * URL carries it away. At load the page asks `/api/me/` whether the cookie still holds.
 */
export const session = {
  user: null,
  generation: 0, // bumped at every log-in and log-out: a late 401 of an older session is ignored
  /** Keeps the user's public fields: never the `token` that the log-in answer also carries. */
  start(user) {
    const { id, username, email, is_staff } = user;
    session.user = { id, username, email, is_staff };
    session.generation += 1;
    return session.user;
  },
  end() {
    session.user = null;
    session.generation += 1;
  },
};

export class ApiError extends Error {
  constructor(status, body) {
    super(describeError(body) || `Request failed (${status})`);
    this.status = status;
    this.body = body;
  }
}

/** `{"error": "..."}` or `{"field": ["problem", ...]}` as one readable line. */
export function describeError(body) {
  if (!body || typeof body !== 'object') return typeof body === 'string' ? body : '';
  if (typeof body.error === 'string') return body.error;
  return Object.entries(body)
    .map(([field, problems]) => {
      const text = Array.isArray(problems) ? problems.join(' ') : String(problems);
      return field === 'non_field_errors' ? text : `${field}: ${text}`;
    })
    .join(' ');
}

let unauthorized = () => {};

/** What to do when the API answers 401 (the session expired or was revoked). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

/**
 * Calls the API; resolves to the JSON body, throws `ApiError`. The session cookie is the
 * credential (`same-origin`: sent to this origin only); no `Authorization` header is sent.
 */
export async function api(method, path, body) {
  return (await request(method, path, body)).data;
}

/**
 * Reads one page of a list: resolves to `{ items, next }`, `next` being the path of the page
 * after it (its `Link: <…>; rel="next"`), or null on the last page.
 */
export async function apiPage(path) {
  const { data, response } = await request('GET', path);
  return { items: Array.isArray(data) ? data : [], next: nextLink(response.headers.get('Link')) };
}

/** The target of a `Link` header's `rel="next"` (RFC 8288), when it is a path of this origin. */
function nextLink(header) {
  for (const part of (header || '').split(',')) {
    const match = /^\s*<([^>]*)>(.*)$/.exec(part);
    if (match && /;\s*rel="?next"?\s*(?:;|$)/i.test(match[2]) && /^\/(?!\/)/.test(match[1])) return match[1];
  }
  return null;
}

async function request(method, path, body) {
  const headers = { Accept: 'application/json' };
  const init = { method, headers, credentials: 'same-origin' };
  const generation = session.generation;
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
  init.signal = controller.signal;
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    const message =
      err && err.name === 'AbortError'
        ? 'The server took too long to answer.'
        : 'Cannot reach the server.';
    throw new ApiError(0, { error: message });
  } finally {
    clearTimeout(timer);
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { error: text.slice(0, 200) };
    }
  }
  // Only a session this page believes in can end: a 401 at load (nobody is logged in), from
  // the log-in form or from a session replaced meanwhile is just an error for the caller.
  if (response.status === 401 && session.user && generation === session.generation) {
    session.end();
    unauthorized();
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return { data, response };
}

/** `el('li', {class: 'x', dataset: {id: 1}}, 'text', child)`: text is never parsed as HTML. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') {
      node.addEventListener(key.slice(2), value);
    } else if (value === true) node.setAttribute(key, '');
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false || child === '') continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);

export function show(node, visible = true) {
  node.hidden = !visible;
}

/** Shows `message` in a `.form-error`/`.banner` element, or hides it when empty. */
export function setMessage(node, message) {
  node.textContent = message || '';
  node.hidden = !message;
}

const timeFormat = new Intl.DateTimeFormat(undefined, {
  month: 'short',
  day: 'numeric',
  hour: '2-digit',
  minute: '2-digit',
});

export function formatTime(iso) {
  if (!iso) return '';
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : timeFormat.format(date);
}

const numberFormat = new Intl.NumberFormat();

export function formatNumber(n) {
  return n === null || n === undefined ? '–' : numberFormat.format(n);
}

/** A cost as the server gives it (an exact decimal string) with its currency, or '' when none. */
export function formatCost(cost, currency) {
  return cost == null ? '' : `${cost} ${currency ?? ''}`.trim();
}

/** Costs per currency (`{"USD": "0.00075"}`, as usage totals give them) as one short line. */
export function formatCosts(costs) {
  return Object.entries(costs || {})
    .map(([currency, cost]) => formatCost(cost, currency))
    .join(' + ');
}

/**
 * The exact sum of two non-negative decimal strings ("0.00045" + "0.0003" = "0.00075"): summed
 * as integers of the finer scale, never as floats, so a total shows what its parts add up to.
 */
export function addDecimals(a, b) {
  const [aWhole, aFraction = ''] = String(a).split('.');
  const [bWhole, bFraction = ''] = String(b).split('.');
  const scale = Math.max(aFraction.length, bFraction.length);
  const units =
    BigInt((aWhole || '0') + aFraction.padEnd(scale, '0')) + BigInt((bWhole || '0') + bFraction.padEnd(scale, '0'));
  const digits = units.toString().padStart(scale + 1, '0');
  const whole = digits.slice(0, digits.length - scale);
  const fraction = digits.slice(digits.length - scale).replace(/0+$/, '');
  return fraction ? `${whole}.${fraction}` : whole;
}

/** Token counts and the cost as one short line, or '' when none is known. */
export function formatUsage(usage) {
  if (!usage) return '';
  const { prompt_tokens: p, completion_tokens: c, total_tokens: t } = usage;
  const tokens =
    p == null && c == null && t == null
      ? ''
      : `${formatNumber(t)} tokens (prompt ${formatNumber(p)} · completion ${formatNumber(c)})`;
  return [tokens, formatCost(usage.cost, usage.currency)].filter(Boolean).join(' · ');
}

function formValues(form) {
  return Object.fromEntries(new FormData(form).entries());
}

/** While `promise` runs, the form's buttons are disabled. */
export async function busy(form, promise) {
  const buttons = [...form.querySelectorAll('button')];
  buttons.forEach((b) => (b.disabled = true));
  try {
    return await promise;
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

/** Logs in: the answer's `Set-Cookie` is what the page authenticates with from now on. */
async function logIn(username, password) {
  return session.start(await api('POST', '/api/login/', { username, password }));
}

/** The user the session cookie belongs to, or null when there is none or it has ended. */
export async function resumeSession() {
  try {
    return session.start(await api('GET', '/api/me/'));
  } catch (err) {
    if (err.status === 401) return null;
    throw err;
  }
}

/**
 * Wires the log-in form (and the register form and tabs, when the page has them) inside
 * `root`; `loggedIn(user)` runs after a successful log-in.
 */
export function setupAuth(root, loggedIn) {
  const loginForm = $('.login-form', root);
  const registerForm = $('.register-form', root);
  const error = $('.form-error', root);
  const tabs = [...root.querySelectorAll('[data-tab]')];
  const select = (name) => {
    for (const tab of tabs) tab.setAttribute('aria-selected', String(tab.dataset.tab === name));
    show(loginForm, name === 'login');
    if (registerForm) show(registerForm, name === 'register');
    setMessage(error, '');
  };
  tabs.forEach((tab) => tab.addEventListener('click', () => select(tab.dataset.tab)));

  loginForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    const { username, password } = formValues(loginForm);
    try {
      const user = await busy(loginForm, logIn(username.trim(), password));
      loginForm.reset();
      setMessage(error, '');
      loggedIn(user);
    } catch (err) {
      setMessage(error, err.message);
    }
  });

  registerForm?.addEventListener('submit', async (event) => {
    event.preventDefault();
    const values = formValues(registerForm);
    const username = values.username.trim();
    if (values.password !== values.password_confirm) {
      setMessage(error, 'The two passwords differ.');
      return;
    }
    try {
      const user = await busy(
        registerForm,
        (async () => {
          await api('POST', '/api/register/', {
            username,
            email: values.email || undefined,
            password: values.password,
            password_confirm: values.password_confirm,
          });
          return logIn(username, values.password);
        })(),
      );
      registerForm.reset();
      select('login');
      loggedIn(user);
    } catch (err) {
      setMessage(error, err.message);
    }
  });
  return { select, showError: (message) => setMessage(error, message) };
}

/**
 * Revokes the session server-side, which also clears the cookie. Resolves to '' or, when the
 * server could not be told, a notice: no script can delete an HttpOnly cookie, so the session
 * may still be live in this browser.
 */
export async function logOut() {
  session.end(); // first: a 401 here means "already ended", not "your session has ended"
  try {
    await api('POST', '/api/logout/');
  } catch (err) {
    if (err.status !== 401) return `You may still be logged in: ${err.message}`;
  }
  return '';
}
