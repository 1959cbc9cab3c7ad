// Shared by the chat page and the admin page: the stored session, JSON calls to the API,
// the log-in/register forms and small DOM helpers. Plain ES module, no build step.

const TOKEN_KEY = 'aichat.token';
const USER_KEY = 'aichat.user';
const REQUEST_TIMEOUT_MS = 20000;

/** The session token from `/api/login/` (also sent by the server as the `sessionid` cookie). */
export const session = {
  get token() {
    return localStorage.getItem(TOKEN_KEY);
  },
  get user() {
    try {
      return JSON.parse(localStorage.getItem(USER_KEY) || 'null');
    } catch {
      return null;
    }
  },
  save(login) {
    localStorage.setItem(TOKEN_KEY, login.token);
    session.remember(login);
  },
  remember(user) {
    const { id, username, email, is_staff } = user;
    localStorage.setItem(USER_KEY, JSON.stringify({ id, username, email, is_staff }));
  },
  clear() {
    localStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(USER_KEY);
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

/** Calls the API with the stored token; resolves to the JSON body, throws `ApiError`. */
export async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  const token = session.token;
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers, credentials: 'same-origin' };
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
  if (response.status === 401 && path !== '/api/login/') {
    session.clear();
    unauthorized();
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
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

/** Token counts as one short line, or '' when none is known. */
export function formatUsage(usage) {
  if (!usage) return '';
  const { prompt_tokens: p, completion_tokens: c, total_tokens: t } = usage;
  if (p == null && c == null && t == null) return '';
  return `${formatNumber(t)} tokens (prompt ${formatNumber(p)} · completion ${formatNumber(c)})`;
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

async function logIn(username, password) {
  const login = await api('POST', '/api/login/', { username, password });
  session.save(login);
  return login;
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

/** Revokes the session server-side (best effort) and forgets it here. */
export async function logOut() {
  try {
    if (session.token) await api('POST', '/api/logout/');
  } catch {
    // Already invalid or unreachable: forgetting it locally is what matters.
  }
  session.clear();
}
