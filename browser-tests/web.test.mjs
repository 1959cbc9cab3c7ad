// Browser tests of the chat page (/) and the staff page (/admin/), in headless Chromium.
// Run by scripts/browser-test, which starts the fake model, the API and a worker and passes
// their addresses here. The tests run in order and share one user and its chat.
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

const BASE = required('AICHAT_BASE_URL');
const FAKE_LLM = required('FAKE_LLM_URL');
const ADMIN = { name: required('ADMIN_USERNAME'), password: required('ADMIN_PASSWORD') };
const SHOTS = process.env.SCREENSHOT_DIR || 'target/browser-screenshots';
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
/** The longest any single wait may take. */
const STEP_MS = 15000;
const TEST_MS = 60000;
const PHONE = { width: 375, height: 740 };

const user = { name: `alice_${Date.now().toString(36)}`, password: 'correct horse battery' };
const shared = { chatId: null, otherChatId: null, versionsChatId: null };
const problems = [];
const sockets = []; // the URL of every WebSocket any page opened
let browser;
let desktop; // the user's desktop browser context
let page; // its chat page, open from the first test to the last

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run the tests with scripts/browser-test`);
  return value;
}

/**
 * Records console errors, uncaught exceptions, any request that leaves the API's host or
 * carries an `Authorization` header (the pages authenticate by their cookie alone), and the
 * URL of every WebSocket opened.
 */
function watch(context) {
  const host = new URL(BASE).host;
  context.on('request', (request) => {
    const url = new URL(request.url());
    if (url.protocol === 'data:' || url.protocol === 'about:') return;
    if (url.host !== host) problems.push(`request to another host: ${request.url()}`);
    if (request.headers().authorization) {
      problems.push(`Authorization header sent: ${request.method()} ${request.url()}`);
    }
  });
  context.on('page', (p) => {
    p.on('websocket', (ws) => sockets.push(ws.url()));
    p.on('pageerror', (err) => problems.push(`uncaught on ${p.url()}: ${err.message}`));
    p.on('console', (message) => {
      // An expected 4xx answer is logged by Chromium itself; anything else is a problem.
      if (message.type() === 'error' && !/status of 4\d\d/.test(message.text())) {
        problems.push(`console error on ${p.url()}: ${message.text()}`);
      }
    });
  });
}

async function newContext(options = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, ...options });
  context.setDefaultTimeout(STEP_MS);
  context.setDefaultNavigationTimeout(STEP_MS);
  watch(context);
  return context;
}

async function shot(target, name) {
  await target.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true, timeout: STEP_MS });
}

async function fake(method, path, body) {
  const response = await fetch(`${FAKE_LLM}${path}`, {
    method,
    headers: body ? { 'content-type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined,
    signal: AbortSignal.timeout(STEP_MS),
  });
  assert.ok(response.ok, `${method} ${path}: ${response.status}`);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/**
 * Calls the API from the test itself (not from a page), as the user whose session token is
 * `token`; resolves to `{ status, body }`.
 */
async function apiAs(token, method, path, body) {
  const headers = { authorization: `Bearer ${token}` };
  if (body !== undefined) headers['content-type'] = 'application/json';
  const response = await fetch(`${BASE}${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(STEP_MS),
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

/** Resolves to the session token of the next log-in `p` makes (from the API's answer). */
function nextLogin(p) {
  return p
    .waitForResponse((r) => r.request().method() === 'POST' && new URL(r.url()).pathname === '/api/login/')
    .then(async (response) => {
      assert.equal(response.status(), 200, 'log-in answered 200');
      const { token } = await response.json();
      assert.ok(token, 'the log-in answer has a token');
      return token;
    });
}

/** The `sessionid` cookie's value in `context`, or undefined. */
async function sessionCookie(context) {
  return (await context.cookies(BASE)).find((c) => c.name === 'sessionid')?.value;
}

/** Fails when `token` is anywhere a script of `p` can read it: web storage or `document.cookie`. */
async function assertTokenHidden(p, token) {
  const readable = await p.evaluate(() => ({
    cookie: document.cookie,
    stored: [
      ['localStorage', localStorage],
      ['sessionStorage', sessionStorage],
    ].flatMap(([where, store]) => Object.keys(store).map((key) => [where, key, store.getItem(key)])),
  }));
  for (const [where, key, value] of readable.stored) {
    assert.ok(!key.includes(token) && !value.includes(token), `${where} entry "${key}" holds the session token`);
  }
  assert.ok(!readable.cookie.includes(token), 'document.cookie shows the session token');
}

/** Fails when a WebSocket was opened with a credential in its URL. */
function assertNoTokenInSocketUrls() {
  for (const url of sockets) {
    // The message shows the URL without the token's value: test output is a log too.
    assert.doesNotMatch(url, /[?&]token=/, `socket URL ${url.replace(/token=[^&]*/, 'token=…')}`);
  }
}

/** The fake model's reply when `reply_words` is set: that many words cycling through these. */
const LOREM = ['lorem', 'ipsum', 'dolor', 'sit', 'amet', 'consectetur', 'adipiscing', 'elit'];
const lorem = (words) => Array.from({ length: words }, (_, i) => LOREM[i % LOREM.length]).join(' ');

/**
 * An init script: from the page's first moment, `window.replyTexts` lists every non-empty text
 * the reply to user message `id` shows, in order, each as `{ text, streaming }`.
 */
function recordReplyTexts(id) {
  window.replyTexts = [];
  new MutationObserver(() => {
    const node = document.querySelector(`li.assistant[data-reply-to="${id}"]`);
    const text = node?.querySelector('.content')?.textContent;
    const seen = window.replyTexts;
    if (text && seen[seen.length - 1]?.text !== text) {
      seen.push({ text, streaming: node.classList.contains('streaming') });
    }
  }).observe(document, { childList: true, subtree: true, characterData: true });
}

/**
 * Fails unless every text the reply showed while streaming began the reply, none shorter than
 * the one before (a lost piece or a repeated one shows as a text the reply does not begin with).
 */
function assertStreamedInOrder(texts, reply) {
  let previous = '';
  for (const { text } of texts.filter((t) => t.streaming)) {
    assert.ok(reply.startsWith(text), `"${text}" is how the reply began`);
    assert.ok(text.length >= previous.length, `"${text}" came after the longer "${previous}"`);
    previous = text;
  }
}

/** The stored reply to user message `id` in the shared chat. */
async function storedReply(token, id) {
  const { status, body } = await apiAs(token, 'GET', `/api/ai/chats/${shared.chatId}/messages/?after_id=${id - 1}`);
  assert.equal(status, 200);
  const replies = body.filter((m) => m.reply_to === id);
  assert.equal(replies.length, 1, `one reply saved: ${JSON.stringify(replies)}`);
  return replies[0];
}

/** Resolves to the page's next `POST` to `path`. */
function nextPost(p, path) {
  return p.waitForResponse((r) => r.request().method() === 'POST' && new URL(r.url()).pathname === path);
}

/** Resolves to the page's next read of every version of chat `chatId`'s messages. */
function nextTreeRead(p, chatId) {
  return p.waitForResponse((r) => {
    const url = new URL(r.url());
    return (
      r.request().method() === 'GET' &&
      url.pathname === `/api/ai/chats/${chatId}/messages/` &&
      url.searchParams.get('all') === 'true'
    );
  });
}

/** The texts of the messages `p` shows, in order (only what is in view: hidden bubbles are not). */
const shownTexts = (p) =>
  p.locator('#messages > li.msg:visible .content').evaluateAll((nodes) => nodes.map((n) => n.textContent));

/** The staff page in a context of its own, logged in as the admin. */
async function openStaffPage() {
  const context = await newContext();
  const admin = await context.newPage();
  await admin.goto(`${BASE}/admin/`);
  const login = admin.locator('#login-form');
  await login.locator('input[name=username]').fill(ADMIN.name);
  await login.locator('input[name=password]').fill(ADMIN.password);
  const token = nextLogin(admin);
  await login.getByRole('button', { name: 'Log in' }).click();
  await admin.locator('#admin-view').waitFor();
  await assertTokenHidden(admin, await token);
  return { context, admin };
}

/** `document.documentElement.scrollWidth`: wider than the viewport means sideways scrolling. */
const pageWidth = (p) => p.evaluate(() => document.documentElement.scrollWidth);

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    timeout: 30000,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  desktop = await newContext();
  page = await desktop.newPage();
});

after(async () => {
  await browser?.close();
});

test('a visitor registers, logs out and logs in again', { timeout: TEST_MS }, async () => {
  await page.goto(`${BASE}/`);
  await page.locator('#login-form').waitFor();
  await shot(page, 'login-desktop');

  await page.getByRole('tab', { name: 'Register' }).click();
  const register = page.locator('#register-form');
  await register.locator('input[name=username]').fill(user.name);
  await register.locator('input[name=password]').fill(user.password);
  await register.locator('input[name=password_confirm]').fill(user.password);
  let login = nextLogin(page); // the page logs the new account in
  await register.getByRole('button', { name: 'Create account' }).click();
  await page.locator('#whoami', { hasText: user.name }).waitFor();
  let token = await login;
  const cookies = await desktop.cookies(BASE);
  assert.ok(cookies.some((c) => c.name === 'sessionid' && c.httpOnly), 'sessionid cookie set');
  assert.equal(await sessionCookie(desktop), token, 'the cookie is the session');
  await assertTokenHidden(page, token);
  assert.equal(await page.locator('#admin-link').isVisible(), false, 'no admin link for a user');

  await page.getByRole('button', { name: 'Log out' }).click();
  await page.locator('#login-form').waitFor();
  assert.equal(await sessionCookie(desktop), undefined, 'log-out clears the cookie');
  assert.equal(await page.locator('#auth-notice').isVisible(), false, 'no notice after a log-out');

  const form = page.locator('#login-form');
  await form.locator('input[name=username]').fill(user.name);
  await form.locator('input[name=password]').fill('not the password');
  await form.getByRole('button', { name: 'Log in' }).click();
  await page.locator('#auth-view .form-error', { hasText: 'Invalid credentials' }).waitFor();
  await form.locator('input[name=password]').fill(user.password);
  login = nextLogin(page);
  await form.getByRole('button', { name: 'Log in' }).click();
  await page.locator('#app-view').waitFor();
  token = await login;
  await assertTokenHidden(page, token);

  // The session (the cookie) survives a reload; still nothing a script can read holds it.
  await page.reload();
  await page.locator('#whoami', { hasText: user.name }).waitFor();
  await assertTokenHidden(page, token);
});

test('an AI chat is created, linked to a new user-to-user chat', { timeout: TEST_MS }, async () => {
  await page.getByRole('button', { name: 'New chat' }).click();
  const form = page.locator('#new-chat-form');
  await form.locator('input[name=title]').fill('Project helper');
  await page.locator('#user-chat-box summary').click();
  await page.locator('#user-chat-name').fill('Project');
  await page.locator('#user-chat-first').fill('Ship on Friday?');
  await page.getByRole('button', { name: 'Create user chat' }).click();
  await page.waitForFunction(() => document.querySelector('#related-chat-select').value !== '', null, {
    timeout: STEP_MS,
  });
  const chosen = await page.locator('#related-chat-select option:checked').textContent();
  assert.match(chosen, /^Project/);
  await shot(page, 'new-chat-desktop');

  await form.getByRole('button', { name: 'Create AI chat' }).click();
  await page.locator('#chat-title', { hasText: 'Project helper' }).waitFor();
  assert.match(await page.locator('#chat-meta').textContent(), /linked to “Project”/);
  assert.ok(await page.locator('#include-context').isEnabled(), 'context toggle enabled');
  assert.ok(await page.locator('#include-context').isChecked(), 'context on by default when linked');
  await page.locator('.chat-item.active', { hasText: 'Project helper' }).waitFor();
  await page.locator('#conn[data-state="live"]').waitFor();
  shared.chatId = Number(/#chat-(\d+)/.exec(page.url())[1]);
});

test('a message is answered: the reply streams in, then shows its token use', { timeout: TEST_MS }, async () => {
  const text =
    'Please summarise our plan for the release: the owners, the dates, the risks, ' +
    'and the open questions we still have to settle before Friday afternoon';
  const expected = `Echo: ${text}`;
  await fake('DELETE', '/_fake/requests');
  // Every text the reply bubble shows, in order.
  await page.evaluate(() => {
    window.replyTexts = [];
    const list = document.querySelector('#messages');
    new MutationObserver(() => {
      const node = list.querySelector('li.assistant:last-child .content');
      const seen = window.replyTexts;
      if (node && seen[seen.length - 1] !== node.textContent) seen.push(node.textContent);
    }).observe(list, { childList: true, subtree: true, characterData: true });
  });

  await page.locator('#message-input').fill(text);
  await page.locator('#message-input').press('Enter');
  await page.locator('li.user', { hasText: 'Please summarise our plan' }).waitFor();

  // While streaming: a non-empty prefix of the final text, marked as streaming.
  const partial = await page.waitForFunction(
    (full) => {
      const text = document.querySelector('li.assistant.streaming .content')?.textContent;
      return text && text.length < full.length && full.startsWith(text) ? text : null;
    },
    expected,
    { timeout: STEP_MS, polling: 10 },
  );
  const partialText = await partial.jsonValue();
  assert.ok(partialText.length > 0 && partialText.length < expected.length);
  await shot(page, 'chat-streaming-desktop');

  const reply = page.locator('li.assistant[data-id]');
  await reply.waitFor();
  assert.equal(await reply.locator('.content').textContent(), expected);
  assert.equal(await reply.evaluate((n) => n.classList.contains('streaming')), false);
  const seen = await page.evaluate(() => window.replyTexts);
  assert.ok(seen.length >= 3, `the reply grew in steps: ${JSON.stringify(seen)}`);
  for (const step of seen) assert.ok(expected.startsWith(step), `"${step}" is a prefix of the reply`);

  // Token use: the fake model counts one token per word of the reply.
  const usage = await reply.locator('.usage').textContent();
  // A priced model's replies also show their cost (` · 0.00045 USD`).
  const match = /^([\d,]+) tokens \(prompt ([\d,]+) · completion ([\d,]+)\)(?: · [\d.]+ [A-Z]{3})?$/.exec(usage);
  assert.ok(match, `usage shown: "${usage}"`);
  const [total, prompt, completion] = match.slice(1).map((n) => Number(n.replaceAll(',', '')));
  assert.equal(completion, expected.split(/\s+/).length);
  assert.equal(total, prompt + completion);
  assert.match(await page.locator('#chat-meta').textContent(), new RegExp(`${total} tokens used`));
  assert.equal(await page.locator('li.user').first().getAttribute('data-status'), 'answered');

  // The toggle was on: the model was given the related chat's messages.
  const requests = await fake('GET', '/_fake/requests');
  assert.equal(requests.length, 1);
  const system = requests[0].messages[0];
  assert.equal(system.role, 'system');
  assert.match(system.content, /Context from related chat:\n.*: Ship on Friday\?/);
  await shot(page, 'chat-desktop');

  // The reply came over a socket that the cookie authenticated: no token in its URL.
  const chatPath = `/ws/ai-chat/${shared.chatId}/`;
  const opened = sockets.map((url) => new URL(url));
  assert.ok(
    opened.some((url) => url.pathname === chatPath && url.searchParams.has('after_id')),
    `a socket was opened to ${chatPath}?after_id=…: ${JSON.stringify(sockets)}`,
  );
  assertNoTokenInSocketUrls();
});

test('a reply is rendered as Markdown as it streams, and its code block can be copied', { timeout: TEST_MS }, async () => {
  await desktop.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: BASE });
  const code = 'make release VERSION=1.2 && echo "done"';
  // The fake model answers "Echo: " and the message: the Markdown below is its reply.
  const text = [
    'Here is the plan.',
    '',
    '# Release plan',
    '',
    '- owners',
    '- dates',
    '',
    '| who | when |',
    '| --- | --- |',
    '| alice | Friday |',
    '',
    '```sh',
    code,
    '```',
  ].join('\n');
  await page.locator('#message-input').fill(text);
  await page.getByRole('button', { name: 'Send' }).click();

  // The user's own message stays the plain text it was.
  const mine = page.locator('li.user', { hasText: 'Here is the plan.' });
  await mine.waitFor();
  assert.equal(await mine.locator('.content').textContent(), text);
  assert.equal(await mine.locator('h1, ul, table, pre').count(), 0, 'a user message is not rendered');

  // While the reply streams in it is already Markdown: the heading shows before the end.
  await page.waitForFunction(() => document.querySelector('li.assistant.streaming .content h1'), null, {
    timeout: STEP_MS,
    polling: 10,
  });
  await shot(page, 'chat-markdown-streaming-desktop');

  const reply = page.locator('li.assistant[data-id]', { has: page.locator('h1', { hasText: 'Release plan' }) });
  await reply.waitFor();
  const content = reply.locator('.content');
  assert.equal(await content.locator('p').first().textContent(), 'Echo: Here is the plan.');
  assert.equal(await content.locator('h1').textContent(), 'Release plan');
  assert.deepEqual(await content.locator('ul > li').allTextContents(), ['owners', 'dates']);
  assert.deepEqual(await content.locator('table th').allTextContents(), ['who', 'when']);
  assert.deepEqual(await content.locator('table td').allTextContents(), ['alice', 'Friday']);
  assert.equal((await content.locator('pre code').textContent()).trimEnd(), code);
  assert.equal(await content.locator('.code-lang').textContent(), 'sh');
  await shot(page, 'chat-markdown-desktop');

  // The copy button puts the code on the clipboard and says so.
  const copy = reply.getByRole('button', { name: 'Copy code' });
  await copy.click();
  await reply.getByRole('status').filter({ hasText: 'Copied' }).waitFor();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), `${code}\n`);
});

test('HTML and script links in a message are shown, never run', { timeout: TEST_MS }, async () => {
  const text =
    `Careful: <img src=x onerror="window.pwned = 'img'"> and <script>window.pwned = 'script'</script> ` +
    `and [click me](javascript:window.pwned='link') and ![pic](x) and [the docs](https://example.com/docs)`;
  const fetched = [];
  const onRequest = (request) => {
    if (new URL(request.url()).pathname === '/x') fetched.push(request.url());
  };
  page.on('request', onRequest);
  try {
    await page.locator('#message-input').fill(text);
    await page.locator('#message-input').press('Enter');
    const mine = page.locator('li.user', { hasText: 'Careful:' });
    await mine.waitFor();
    assert.equal(await mine.locator('.content').textContent(), text, 'the user message shows what was typed');

    const reply = page.locator('li.assistant[data-id]', { hasText: 'Echo: Careful:' });
    await reply.waitFor();
    const content = reply.locator('.content');
    // The tags are text: no element of the message was made from them.
    const shown = await content.textContent();
    assert.ok(shown.includes(`<img src=x onerror="window.pwned = 'img'">`), shown);
    assert.ok(shown.includes(`<script>window.pwned = 'script'</script>`), shown);
    assert.equal(await page.locator('#messages').locator('img, script, iframe, object, embed, svg').count(), 0);
    for (const node of await content.locator('*').all()) {
      const attributes = await node.evaluate((n) => [...n.attributes].map((a) => a.name));
      assert.ok(!attributes.some((name) => name.startsWith('on')), `an event handler attribute: ${attributes}`);
    }

    // A `javascript:` link keeps its text but loses its address; clicking it does nothing.
    const bad = content.locator('a', { hasText: 'click me' });
    assert.equal(await bad.getAttribute('href'), null);
    assert.match(await bad.getAttribute('title'), /Link removed/);
    const pages = desktop.pages().length;
    const url = page.url();
    await bad.click();
    // An image is a link (nothing is fetched), and a relative address is dropped too.
    assert.equal(await content.locator('a', { hasText: 'pic' }).getAttribute('href'), null);
    // An http(s) link stays, opening beside the chat without a handle on it.
    const good = content.locator('a', { hasText: 'the docs' });
    assert.equal(await good.getAttribute('href'), 'https://example.com/docs');
    assert.equal(await good.getAttribute('target'), '_blank');
    assert.match(await good.getAttribute('rel'), /\bnoopener\b/);

    // A round trip through the page after the click: had anything run, it would have by now.
    assert.equal(await page.evaluate(() => typeof window.pwned), 'undefined', 'no script of the message ran');
    assert.equal(page.url(), url, 'the click did not navigate');
    assert.equal(desktop.pages().length, pages, 'the click opened nothing');
    assert.deepEqual(fetched, [], 'nothing was fetched for the message');
    await shot(page, 'chat-hostile-desktop');
  } finally {
    page.off('request', onRequest);
  }
});

test('sending a blank message says why nothing was sent', { timeout: TEST_MS }, async () => {
  const users = await page.locator('li.user').count();
  const input = page.locator('#message-input');
  const hint = page.getByRole('status').filter({ hasText: 'Nothing was sent' });

  await input.fill('');
  await input.press('Enter');
  await hint.filter({ hasText: 'the message is empty' }).waitFor();
  assert.equal(await input.getAttribute('aria-invalid'), 'true');
  assert.equal(await input.evaluate((n) => n === document.activeElement), true, 'the field keeps the focus');
  await shot(page, 'chat-blank-desktop');

  // Typing clears the message; whitespace alone is blank too.
  await input.fill('   \n\t  ');
  assert.equal(await page.locator('#composer-hint').textContent(), '');
  await page.getByRole('button', { name: 'Send' }).click();
  await hint.filter({ hasText: 'only spaces' }).waitFor();

  // Nothing went out: the next real message is the only new one, and the only one answered.
  await fake('DELETE', '/_fake/requests');
  await input.fill('Not blank any more');
  await input.press('Enter');
  await page.locator('li.assistant[data-id] .content', { hasText: 'Echo: Not blank any more' }).waitFor();
  assert.equal(await page.locator('li.user').count(), users + 1);
  assert.equal(await page.locator('#chat-error').isVisible(), false);
  assert.equal(await page.locator('#composer-hint').textContent(), '');
  assert.equal((await fake('GET', '/_fake/requests')).length, 1);
});

test('a message the model refuses is shown failed with its error', { timeout: TEST_MS }, async () => {
  await fake('POST', '/_fake/script', { kind: 'bad_request' });
  await page.locator('#message-input').fill('This one fails');
  await page.getByRole('button', { name: 'Send' }).click();
  const failed = page.locator('li.user.failed', { hasText: 'This one fails' });
  await failed.waitFor();
  assert.match(await failed.locator('.msg-error').textContent(), /could not process this message/);
  assert.equal(await failed.locator('.status').textContent(), 'failed');
  await failed.getByRole('button', { name: 'Retry' }).waitFor(); // clicked in a later test
  assert.equal(await page.getByRole('button', { name: 'Stop' }).count(), 0, 'nothing to stop');
  await shot(page, 'chat-failed-desktop');
  // A reload shows the same, from the stored message.
  await page.reload();
  await page.locator('li.user.failed .msg-error', { hasText: 'could not process' }).waitFor();
  await page.locator('li.user.failed').getByRole('button', { name: 'Retry' }).waitFor();
  await page.locator('#conn[data-state="live"]').waitFor();
});

test('a streaming reply is stopped: its text so far stays, marked stopped, also after a reload', { timeout: TEST_MS }, async () => {
  const token = await sessionCookie(desktop);
  const before = await fake('GET', '/_fake/config');
  const words = 400;
  const delay = 100;
  // 40 s of reply: the stop comes long before its end.
  await fake('PUT', '/_fake/config', { reply_words: words, chunk_delay_ms: delay });
  try {
    await page.locator('#message-input').fill('Tell me everything, at length');
    await page.locator('#message-input').press('Enter');
    const mine = page.locator('li.user', { hasText: 'Tell me everything, at length' });
    await mine.waitFor();
    const id = Number(await mine.getAttribute('data-id'));
    const bubble = page.locator(`li.assistant[data-reply-to="${id}"]`);
    const stop = bubble.getByRole('button', { name: 'Stop' });
    await stop.waitFor();

    // Some of the reply is on screen first.
    await page.waitForFunction(
      (id) => {
        const text = document.querySelector(`li.assistant.streaming[data-reply-to="${id}"] .content`)?.textContent;
        return text && text.split(' ').length >= 5;
      },
      id,
      { timeout: STEP_MS, polling: 10 },
    );
    await shot(page, 'chat-stop-streaming-desktop');
    const stopped = nextPost(page, `/api/ai/messages/${id}/stop/`);
    await stop.click();
    const status = (await stopped).status();
    assert.ok(status === 200 || status === 202, `the stop answered ${status}`);

    // The bubble keeps the words it had, as the (stopped) reply.
    const reply = page.locator(`li.assistant.stopped[data-id][data-reply-to="${id}"]`);
    await reply.waitFor();
    await reply.locator('.meta').getByText('stopped', { exact: true }).waitFor();
    // Words come with their spaces: the last one may still have its own.
    const text = (await reply.locator('.content').textContent()).trim();
    const kept = text.split(' ').length;
    assert.ok(kept >= 5 && kept < words, `${kept} of ${words} words kept`);
    assert.ok(lorem(words).startsWith(text), `"${text}" is how the reply began`);
    assert.equal(await reply.evaluate((n) => n.classList.contains('streaming')), false);
    assert.equal(await page.getByRole('button', { name: 'Stop' }).count(), 0, 'nothing left to stop');
    assert.equal(await mine.getAttribute('data-status'), 'answered');
    await shot(page, 'chat-stopped-desktop');

    // The server kept that same text.
    const { body: messages } = await apiAs(token, 'GET', `/api/ai/chats/${shared.chatId}/messages/?after_id=${id - 1}`);
    const saved = messages.filter((m) => m.reply_to === id);
    assert.equal(saved.length, 1, `one reply saved: ${JSON.stringify(saved)}`);
    assert.equal(saved[0].stopped, true);
    assert.equal(saved[0].content.trim(), text);

    // No more words come: the absence of something can only be watched over a while, here
    // as long as ten more words of the stream would have taken.
    await page.waitForTimeout(10 * delay);
    assert.equal((await reply.locator('.content').textContent()).trim(), text);
    assert.equal(await page.locator(`li.assistant[data-reply-to="${id}"]`).count(), 1, 'no second bubble');

    // A reload shows the stopped reply, from the stored message.
    await page.reload();
    await page.locator('#conn[data-state="live"]').waitFor();
    const again = page.locator(`li.assistant.stopped[data-id="${saved[0].id}"]`);
    await again.waitFor();
    assert.equal((await again.locator('.content').textContent()).trim(), text);
    await again.locator('.meta').getByText('stopped', { exact: true }).waitFor();
    assert.equal(await page.getByRole('button', { name: 'Stop' }).count(), 0);
  } finally {
    await fake('PUT', '/_fake/config', { reply_words: before.reply_words, chunk_delay_ms: before.chunk_delay_ms });
  }
});

test('a page reloaded while a reply streams shows its text so far at once, then the rest, nothing lost or repeated', { timeout: TEST_MS }, async () => {
  const token = await sessionCookie(desktop);
  const before = await fake('GET', '/_fake/config');
  const words = 150;
  const delay = 60;
  const expected = lorem(words);
  // 9 s of reply: the reload comes early in it.
  await fake('PUT', '/_fake/config', { reply_words: words, chunk_delay_ms: delay });
  let recorder;
  try {
    await page.locator('#conn[data-state="live"]').waitFor();
    await page.locator('#message-input').fill('Tell me a long story; I will reload meanwhile');
    await page.locator('#message-input').press('Enter');
    const mine = page.locator('li.user', { hasText: 'Tell me a long story; I will reload meanwhile' });
    await mine.waitFor();
    const id = Number(await mine.getAttribute('data-id'));

    // Some of the reply is on screen.
    const visible = await page.waitForFunction(
      (id) => {
        const text = document.querySelector(`li.assistant.streaming[data-reply-to="${id}"] .content`)?.textContent;
        return text && text.split(' ').length >= 10 ? text : null;
      },
      id,
      { timeout: STEP_MS, polling: 10 },
    );
    const shownBefore = await visible.jsonValue();
    assert.ok(expected.startsWith(shownBefore), `"${shownBefore}" is how the reply begins`);

    recorder = await page.addInitScript(recordReplyTexts, id);
    const socketsBefore = sockets.length;
    await page.reload();

    // The first text the reloaded page shows is the reply so far, whole: how the reply begins,
    // and at least what was on screen before.
    const firstShown = await page.waitForFunction(() => window.replyTexts?.[0] ?? null, null, {
      timeout: STEP_MS,
      polling: 10,
    });
    const first = await firstShown.jsonValue();
    assert.ok(first.streaming, 'the reply is still streaming');
    assert.ok(expected.startsWith(first.text), `"${first.text}" is how the reply begins`);
    assert.ok(
      first.text.length >= shownBefore.length,
      `at once ${first.text.length} characters, at least the ${shownBefore.length} shown before the reload`,
    );
    await shot(page, 'chat-resumed-desktop');

    // It was given them by the socket's catch-up, asked from the last message the page loaded.
    const chatPath = `/ws/ai-chat/${shared.chatId}/`;
    const reopened = sockets
      .slice(socketsBefore)
      .map((url) => new URL(url))
      .filter((url) => url.pathname === chatPath);
    assert.ok(reopened.length >= 1, 'the reloaded page opened the chat socket');
    assert.equal(reopened[0].searchParams.get('after_id'), String(id));

    // Then the rest streams in, each step how the reply begins, until the reply is saved.
    const reply = page.locator(`li.assistant[data-id][data-reply-to="${id}"]`);
    await reply.waitFor({ timeout: words * delay + STEP_MS });
    const texts = await page.evaluate(() => window.replyTexts);
    assertStreamedInOrder(texts, expected);
    const streamed = texts.filter((t) => t.streaming);
    assert.ok(streamed.length >= 3, `the reply went on streaming after the reload: ${streamed.length} steps`);
    assert.ok(streamed[streamed.length - 1].text.length > first.text.length);

    // The saved reply is the fake model's, and the bubble shows exactly it.
    const saved = await storedReply(token, id);
    assert.equal(saved.content, expected);
    assert.equal(await reply.locator('.content').textContent(), saved.content);
    assert.equal(await reply.evaluate((n) => n.classList.contains('streaming')), false);
    assert.equal(await page.locator(`li.assistant[data-reply-to="${id}"]`).count(), 1, 'one bubble');
    assert.equal(await mine.getAttribute('data-status'), 'answered');
  } finally {
    await recorder?.dispose();
    await fake('PUT', '/_fake/config', { reply_words: before.reply_words, chunk_delay_ms: before.chunk_delay_ms });
  }
});

test('a piece of a reply lost on the socket is caught up by a new socket, nothing lost or repeated', { timeout: TEST_MS }, async () => {
  const token = await sessionCookie(desktop);
  const before = await fake('GET', '/_fake/config');
  const words = 100;
  const delay = 60;
  const expected = lorem(words);
  await fake('PUT', '/_fake/config', { reply_words: words, chunk_delay_ms: delay });
  // A page of its own: its sockets pass through the test, which drops the reply's third
  // delta on the first one, as if it had been lost.
  const context = await newContext();
  try {
    await context.addCookies((await desktop.cookies(BASE)).filter((c) => c.name === 'sessionid'));
    const other = await context.newPage();
    const opened = [];
    let dropped = null;
    await other.routeWebSocket(/\/ws\/ai-chat\//, (ws) => {
      opened.push(new URL(ws.url()));
      const server = ws.connectToServer();
      server.onMessage((message) => {
        if (dropped === null && typeof message === 'string') {
          const event = JSON.parse(message);
          if (event.type === 'assistant_delta' && event.seq === 3) {
            dropped = event;
            return;
          }
        }
        ws.send(message);
      });
    });
    await other.goto(`${BASE}/#chat-${shared.chatId}`);
    await other.locator('#conn[data-state="live"]').waitFor();
    await other.locator('#message-input').fill('Tell me a long story over a lossy line');
    const mine = other.locator('li.user', { hasText: 'Tell me a long story over a lossy line' });
    await other.locator('#message-input').press('Enter');
    await mine.waitFor();
    const id = Number(await mine.getAttribute('data-id'));
    await other.evaluate(recordReplyTexts, id);

    const reply = other.locator(`li.assistant[data-id][data-reply-to="${id}"]`);
    await reply.waitFor({ timeout: words * delay + STEP_MS });
    assert.ok(dropped, 'a delta was dropped');
    assert.equal(dropped.message_id, id);
    // The next delta showed the gap: the page opened one new socket, from where it was.
    assert.equal(opened.length, 2, `sockets opened: ${opened.join(' ')}`);
    assert.equal(opened[1].searchParams.get('after_id'), String(id));

    const texts = await other.evaluate(() => window.replyTexts);
    assertStreamedInOrder(texts, expected);
    const longest = texts.filter((t) => t.streaming).at(-1)?.text ?? '';
    assert.ok(longest.split(' ').length >= words / 2, `it streamed on past the lost piece: "${longest}"`);
    const saved = await storedReply(token, id);
    assert.equal(saved.content, expected);
    assert.equal(await reply.locator('.content').textContent(), saved.content);
    assert.equal(await other.locator(`li.assistant[data-reply-to="${id}"]`).count(), 1, 'one bubble');
  } finally {
    await context.close();
    await fake('PUT', '/_fake/config', { reply_words: before.reply_words, chunk_delay_ms: before.chunk_delay_ms });
  }
});

test('a message stopped before the model answers is cancelled, and Retry gets it answered', { timeout: TEST_MS }, async () => {
  // A stop is a cancel while the worker does not wait on the model: here, 5 s between a first
  // attempt the model refused with `Retry-After: 5` and the next. (A stop while a request to
  // the model is open keeps what it sent so far: the previous test.)
  await fake('DELETE', '/_fake/requests');
  await fake('POST', '/_fake/script', { kind: 'rate_limited', retry_after: '5' });
  try {
    const text = 'Answer me later, please';
    await page.locator('#message-input').fill(text);
    await page.locator('#message-input').press('Enter');
    const mine = page.locator('li.user', { hasText: text });
    await mine.waitFor();
    const id = Number(await mine.getAttribute('data-id'));
    const deadline = Date.now() + STEP_MS;
    while (!(await fake('GET', '/_fake/requests')).some((r) => r.outcome === 'rate_limited')) {
      assert.ok(Date.now() < deadline, 'the worker asked the model');
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const stopped = nextPost(page, `/api/ai/messages/${id}/stop/`);
    await page.locator(`li.assistant[data-reply-to="${id}"]`).getByRole('button', { name: 'Stop' }).click();
    const status = (await stopped).status();
    assert.ok(status === 200 || status === 202, `the stop answered ${status}`);

    await page.locator(`li.user.cancelled[data-id="${id}"]`).waitFor();
    assert.equal(await mine.locator('.status').textContent(), 'cancelled');
    const retry = mine.getByRole('button', { name: 'Retry' });
    await retry.waitFor();
    assert.equal(await page.locator(`li.assistant[data-reply-to="${id}"]`).count(), 0, 'no reply, not even a pending one');
    assert.equal(await page.getByRole('button', { name: 'Stop' }).count(), 0, 'nothing left to stop');
    await shot(page, 'chat-cancelled-desktop');

    // Stored so: a reload shows it the same.
    await page.reload();
    await page.locator('#conn[data-state="live"]').waitFor();
    await page.locator(`li.user.cancelled[data-id="${id}"]`).waitFor();
    await retry.waitFor();
    assert.equal(await page.locator(`li.assistant[data-reply-to="${id}"]`).count(), 0);

    // Retry: the same message is queued again and answered.
    await fake('DELETE', '/_fake/script'); // an answer at once this time
    const retried = nextPost(page, `/api/ai/messages/${id}/retry/`);
    await retry.click();
    assert.equal((await retried).status(), 202);
    await page.locator(`li.assistant[data-id][data-reply-to="${id}"] .content`, { hasText: `Echo: ${text}` }).waitFor();
    await page.locator(`li.user[data-id="${id}"][data-status="answered"]`).waitFor();
    assert.equal(await page.locator('li.user', { hasText: text }).count(), 1, 'the message is shown once');
    assert.equal(await page.locator(`li.assistant[data-reply-to="${id}"]`).count(), 1, 'one reply');
    assert.equal(await page.locator(`li.assistant.stopped[data-reply-to="${id}"]`).count(), 0);
    assert.equal(await mine.evaluate((n) => n.classList.contains('cancelled')), false);
    assert.equal(await retry.count(), 0, 'no Retry on an answered message');
    assert.equal(await page.getByRole('button', { name: 'Stop' }).count(), 0);
  } finally {
    await fake('DELETE', '/_fake/script');
  }
});

test('an AI chat is created with the model and related user chat chosen', { timeout: TEST_MS }, async () => {
  const token = await sessionCookie(desktop);
  const models = (await apiAs(token, 'GET', '/api/ai/models/')).body;
  assert.ok(models.length >= 2, `scripts/browser-test offers a second model: ${JSON.stringify(models)}`);
  const model = models.find((m) => !m.default).id;
  const project = (await apiAs(token, 'GET', '/api/chats/')).body.find((c) => c.name === 'Project');
  assert.ok(project, 'the user chat made earlier');

  await page.getByRole('button', { name: 'New chat' }).click();
  const form = page.locator('#new-chat-form');
  await form.locator('input[name=title]').fill('Model check');
  const modelSelect = form.getByRole('combobox', { name: 'Model' });
  await modelSelect.locator('option', { hasText: '(default)' }).waitFor({ state: 'attached' });
  assert.equal(await modelSelect.inputValue(), models.find((m) => m.default).id, 'the default is chosen at first');
  await modelSelect.selectOption(model);
  await form.getByRole('combobox', { name: 'Related user chat' }).selectOption(String(project.id));
  await form.getByRole('button', { name: 'Create AI chat' }).click();
  await page.locator('#chat-title', { hasText: 'Model check' }).waitFor();
  const id = Number(/#chat-(\d+)/.exec(page.url())[1]);
  assert.notEqual(id, shared.chatId);
  shared.otherChatId = id;
  const meta = await page.locator('#chat-meta').textContent();
  assert.ok(meta.startsWith(`${model} · linked to “Project”`), meta);

  const { status, body } = await apiAs(token, 'GET', `/api/ai/chats/${id}/`);
  assert.equal(status, 200);
  assert.equal(body.model, model);
  assert.equal(body.related_chat, project.id);
  await page.locator('#conn[data-state="live"]').waitFor();
});

test('an AI chat is renamed from the page, and the name stays after a reload', { timeout: TEST_MS }, async () => {
  const token = await sessionCookie(desktop);
  const toggle = page.getByRole('button', { name: 'Chat options' });
  await toggle.click();
  assert.equal(await toggle.getAttribute('aria-expanded'), 'true');
  const options = page.locator('#chat-options');
  const title = options.getByRole('textbox', { name: 'Title' });
  assert.equal(await title.inputValue(), 'Model check');

  await title.fill('   ');
  await options.getByRole('button', { name: 'Rename', exact: true }).click();
  await options.getByRole('alert').filter({ hasText: 'needs a title' }).waitFor();

  await title.fill('Renamed check');
  await shot(page, 'chat-options-desktop');
  await options.getByRole('button', { name: 'Rename', exact: true }).click();
  await page.locator('#chat-title', { hasText: 'Renamed check' }).waitFor();
  await page.locator('.chat-item.active', { hasText: 'Renamed check' }).waitFor();
  assert.equal(await options.isVisible(), false, 'the options close');
  assert.equal((await apiAs(token, 'GET', `/api/ai/chats/${shared.otherChatId}/`)).body.title, 'Renamed check');

  await page.reload();
  await page.locator('#chat-title', { hasText: 'Renamed check' }).waitFor();
  await page.locator('.chat-item.active', { hasText: 'Renamed check' }).waitFor();
  assert.equal(await page.locator('.chat-item', { hasText: 'Model check' }).count(), 0);
});

test('an AI chat is deleted from the page: gone from the list and from the server', { timeout: TEST_MS }, async () => {
  const token = await sessionCookie(desktop);
  const id = shared.otherChatId;
  await page.locator('#conn[data-state="live"]').waitFor();
  await page.getByRole('button', { name: 'Chat options' }).click();
  const options = page.locator('#chat-options');

  // Asked first; "Keep it" keeps it.
  await options.getByRole('button', { name: 'Delete chat' }).click();
  const confirm = options.getByRole('group', { name: 'Delete this chat' });
  await confirm.waitFor();
  await confirm.getByRole('button', { name: 'Keep it' }).click();
  assert.equal(await confirm.isVisible(), false);
  assert.equal((await apiAs(token, 'GET', `/api/ai/chats/${id}/`)).status, 200);

  await options.getByRole('button', { name: 'Delete chat' }).click();
  await confirm.getByRole('button', { name: 'Delete for good' }).click();
  await page.getByRole('status').filter({ hasText: 'Deleted “Renamed check”' }).waitFor();
  assert.equal(await page.locator('.chat-item', { hasText: 'Renamed check' }).count(), 0);
  assert.equal(await page.locator('#chat-pane').isVisible(), false, 'the chat closes');
  assert.equal(new URL(page.url()).hash, '');
  assert.equal((await apiAs(token, 'GET', `/api/ai/chats/${id}/`)).status, 404);
  await shot(page, 'chat-deleted-desktop');

  await page.reload();
  await page.locator('.chat-item', { hasText: 'Project helper' }).waitFor();
  assert.equal(await page.locator('.chat-item', { hasText: 'Renamed check' }).count(), 0);

  // Back to the shared chat, which the tests after this one expect open.
  await page.locator('.chat-item', { hasText: 'Project helper' }).click();
  await page.locator('#chat-title', { hasText: 'Project helper' }).waitFor();
  await page.locator('#conn[data-state="live"]').waitFor();
});

test('the staff page tells a user who is not staff that it is staff only', { timeout: TEST_MS }, async () => {
  const other = await desktop.newPage();
  await other.goto(`${BASE}/admin/`);
  await other.locator('#staff-only', { hasText: 'Staff only' }).waitFor();
  assert.match(await other.locator('#staff-only').textContent(), new RegExp(user.name));
  assert.equal(await other.locator('#admin-view').isVisible(), false);
  await shot(other, 'admin-staff-only');
  await other.close();
});

test('staff see the chart, usage, chats, messages and re-drive a dead job', { timeout: TEST_MS }, async () => {
  const { context, admin } = await openStaffPage();

  // The chart has a bar for today's reply; the usage table names the user.
  await admin.locator('#chart-svg rect.bar').first().waitFor();
  const bars = await admin.locator('#chart-svg rect.bar').count();
  assert.ok(bars >= 1, `${bars} bars`);
  const height = Number(await admin.locator('#chart-svg rect.bar').first().getAttribute('height'));
  assert.ok(height > 0);
  await admin.locator('#usage-table td', { hasText: user.name }).waitFor();

  // Search and filters (each result must replace the unfiltered table shown at first).
  await admin.locator('#chat-search input[name=q]').fill('no-such-chat');
  await admin.locator('#chat-search button').click();
  await admin.locator('#chats-table td.empty', { hasText: 'No AI chat matches' }).waitFor();
  await admin.locator('#chat-search input[name=q]').fill(user.name);
  await admin.locator('#chat-search button').click();
  await admin.locator('#chats-table td', { hasText: 'Project helper' }).waitFor();
  await admin.locator('#message-filter select[name=role]').selectOption('assistant');
  const today = new Date().toISOString().slice(0, 10);
  await admin.locator('#message-filter input[name=since]').fill(today);
  await admin.locator('#message-filter input[name=until]').fill(today);
  await admin.locator('#message-filter button').click();
  await admin.waitForFunction(
    () => {
      const cells = [...document.querySelectorAll('#messages-table td')].map((td) => td.textContent);
      const roles = [...document.querySelectorAll('#messages-table td[data-label="Role"]')];
      return (
        cells.some((text) => text.startsWith('Echo: Please summarise')) &&
        roles.length > 0 &&
        roles.every((td) => td.textContent === 'assistant')
      );
    },
    null,
    { timeout: STEP_MS },
  );
  assert.equal(await admin.locator('#messages-table td', { hasText: /^This one fails$/ }).count(), 0);

  // A user's own daily token budget, set from the budgets table, then the default again.
  const budgetRow = admin.locator('#budgets-table tbody tr', { has: admin.locator(`form[data-user="${user.name}"]`) });
  await budgetRow.waitFor();
  await budgetRow.locator('input[name=daily_tokens]').fill('123456');
  await budgetRow.getByRole('button', { name: 'Set' }).click();
  await admin.locator('#budgets-notice', { hasText: `${user.name} now has` }).waitFor();
  await budgetRow.locator('td[data-label="Limit"]', { hasText: /123.?456/ }).waitFor();
  await budgetRow.locator('input[name=daily_tokens]').fill('');
  await budgetRow.getByRole('button', { name: 'Set' }).click();
  await admin.locator('#budgets-notice', { hasText: 'the default' }).waitFor();
  await budgetRow.locator('td[data-label="Own budget"]', { hasText: 'default' }).waitFor();
  await shot(admin, 'admin-desktop');

  // The failed message's job is dead; re-driving it gets the message answered.
  const redrive = admin.locator('#dead-table button.redrive');
  await redrive.first().waitFor();
  assert.equal(await redrive.count(), 1);
  await redrive.click();
  await admin.locator('#dead-notice', { hasText: 'queued again' }).waitFor();
  await admin.locator('#dead-table td.empty', { hasText: 'No dead jobs' }).waitFor();
  // The user's open chat page gets the reply live.
  await page.locator('li.assistant[data-id] .content', { hasText: 'Echo: This one fails' }).waitFor();
  await page.locator('li.user[data-status="answered"]', { hasText: 'This one fails' }).waitFor();
  assert.equal(await page.locator('li.user', { hasText: 'This one fails' }).getByRole('button', { name: 'Retry' }).count(), 0);

  // At phone width the tables become cards and nothing scrolls sideways.
  await admin.setViewportSize(PHONE);
  await admin.reload();
  await admin.locator('#chart-svg rect.bar').first().waitFor();
  await admin.locator('#usage-table td', { hasText: user.name }).waitFor();
  await admin.locator('#chats-table td', { hasText: 'Project helper' }).waitFor();
  await admin.locator('#dead-table td.empty').waitFor();
  await admin.locator('#messages-table td', { hasText: 'This one fails' }).first().waitFor();
  assert.ok((await pageWidth(admin)) <= PHONE.width, `admin page ${await pageWidth(admin)} px wide`);
  await shot(admin, 'admin-phone');
  await context.close();
});

// After the staff page's test, which counts the dead jobs: this failure leaves one more.
test('a failed message is retried from the page: its error goes and the reply comes', { timeout: TEST_MS }, async () => {
  await page.locator('#conn[data-state="live"]').waitFor();
  await fake('POST', '/_fake/script', { kind: 'bad_request' });
  const text = 'Fail first, then succeed';
  await page.locator('#message-input').fill(text);
  await page.locator('#message-input').press('Enter');
  const failed = page.locator('li.user.failed', { hasText: text });
  await failed.waitFor();
  const id = Number(await failed.getAttribute('data-id'));
  const mine = page.locator(`li.user[data-id="${id}"]`);
  await mine.locator('.msg-error', { hasText: 'could not process' }).waitFor();

  const retried = nextPost(page, `/api/ai/messages/${id}/retry/`);
  await mine.getByRole('button', { name: 'Retry' }).click();
  assert.equal((await retried).status(), 202);
  await page.locator(`li.assistant[data-id][data-reply-to="${id}"] .content`, { hasText: `Echo: ${text}` }).waitFor();
  await page.locator(`li.user[data-id="${id}"][data-status="answered"]`).waitFor();
  assert.equal(await mine.locator('.msg-error').isVisible(), false, 'the error is gone');
  assert.equal(await mine.evaluate((n) => n.classList.contains('failed')), false);
  assert.equal(await mine.getByRole('button', { name: 'Retry' }).count(), 0);
  assert.equal(await page.locator('li.user', { hasText: text }).count(), 1, 'the message is shown once');

  await page.reload();
  await page.locator(`li.assistant[data-id][data-reply-to="${id}"] .content`, { hasText: `Echo: ${text}` }).waitFor();
  await page.locator(`li.user[data-id="${id}"][data-status="answered"]`).waitFor();
  await page.locator('#conn[data-state="live"]').waitFor();
});

test('at phone width the chat page fits the screen', { timeout: TEST_MS }, async () => {
  const context = await newContext({ viewport: PHONE, isMobile: true, hasTouch: true, deviceScaleFactor: 2 });
  const phone = await context.newPage();

  await phone.goto(`${BASE}/`);
  await phone.locator('#login-form').waitFor();
  assert.ok((await pageWidth(phone)) <= PHONE.width);
  await shot(phone, 'login-phone');

  // The desktop's session cookie logs the phone in; a token an older page left in
  // localStorage is wiped at load.
  await context.addCookies((await desktop.cookies(BASE)).filter((c) => c.name === 'sessionid'));
  await phone.evaluate(() => localStorage.setItem('aichat.token', 'left by an older page'));
  await phone.goto(`${BASE}/#chat-${shared.chatId}`); // same document: only the hash changes
  await phone.reload();
  await phone.locator('li.assistant[data-id]').first().waitFor();
  await phone.locator('#conn[data-state="live"]').waitFor();
  assert.equal(await phone.evaluate(() => localStorage.getItem('aichat.token')), null);
  await assertTokenHidden(phone, await sessionCookie(context));
  assertNoTokenInSocketUrls();
  assert.equal(await phone.locator('.sidebar').isVisible(), false, 'one pane at a time');
  const width = await pageWidth(phone);
  assert.ok(width <= PHONE.width, `chat page is ${width} px wide`);
  await phone.screenshot({ path: join(SHOTS, 'chat-phone.png'), timeout: STEP_MS });
  await phone.emulateMedia({ colorScheme: 'dark' });
  await phone.screenshot({ path: join(SHOTS, 'chat-phone-dark.png'), timeout: STEP_MS });
  await phone.emulateMedia({ colorScheme: 'light' });

  await phone.getByRole('button', { name: 'Back to chats' }).click();
  await phone.locator('.chat-item', { hasText: 'Project helper' }).waitFor();
  assert.ok((await pageWidth(phone)) <= PHONE.width);
  await phone.getByRole('button', { name: 'New chat' }).click();
  await phone.locator('#user-chat-box summary').click();
  assert.ok((await pageWidth(phone)) <= PHONE.width);
  await shot(phone, 'chats-phone');
  await context.close();
});

test('a reply is regenerated: the new one streams in its place, and ‹ › switch between the two', { timeout: TEST_MS }, async () => {
  const token = await sessionCookie(desktop);
  const created = await apiAs(token, 'POST', '/api/ai/chats/', { title: 'Versions' });
  assert.equal(created.status, 201);
  const chatId = created.body.id;
  shared.versionsChatId = chatId;
  await page.goto(`${BASE}/#chat-${chatId}`); // same document: only the hash changes
  await page.reload();
  await page.locator('#chat-title', { hasText: 'Versions' }).waitFor();
  await page.locator('#conn[data-state="live"]').waitFor();

  await page.locator('#message-input').fill('Name a colour');
  await page.locator('#message-input').press('Enter');
  const question = page.locator('li.user', { hasText: 'Name a colour' });
  const first = page.locator('li.assistant[data-id]', { hasText: 'Echo: Name a colour' });
  await first.waitFor();
  const id = Number(await question.getAttribute('data-id'));
  const firstId = Number(await first.getAttribute('data-id'));
  assert.equal(await page.locator('.versions').count(), 0, 'one version of everything: no switcher');

  const before = await fake('GET', '/_fake/config');
  // The second reply differs from the first (lorem words instead of the echo), and streams
  // long enough to be seen.
  const words = 30;
  await fake('PUT', '/_fake/config', { reply_words: words, chunk_delay_ms: 60 });
  try {
    const regenerated = nextPost(page, `/api/ai/messages/${id}/regenerate/`);
    await first.getByRole('button', { name: 'Regenerate' }).click();
    assert.equal((await regenerated).status(), 202);

    // It streams in as after a send, Stop and all, in place of the first reply; the
    // question's Edit waits meanwhile.
    const streaming = page.locator(`li.assistant.streaming[data-reply-to="${id}"]`);
    await streaming.getByRole('button', { name: 'Stop' }).waitFor();
    await page.waitForFunction(
      (id) => document.querySelector(`li.assistant.streaming[data-reply-to="${id}"] .content`)?.textContent.startsWith('lorem'),
      id,
      { timeout: STEP_MS, polling: 10 },
    );
    assert.equal(await first.isVisible(), false, 'the reply being replaced steps aside');
    assert.equal(await question.getByRole('button', { name: 'Edit' }).getAttribute('aria-disabled'), 'true');
    await shot(page, 'chat-regenerating-desktop');

    const second = page.locator(`li.assistant[data-id][data-reply-to="${id}"]`, { hasText: lorem(words) });
    await second.waitFor();
    const secondId = Number(await second.getAttribute('data-id'));
    assert.notEqual(secondId, firstId);
    assert.equal(await page.locator(`li.assistant[data-reply-to="${id}"]`).count(), 1, 'one reply shown');
    const switcher = second.getByRole('group', { name: 'Version 2 of 2' });
    await switcher.waitFor();
    assert.equal(await switcher.locator('.count').textContent(), '2/2');
    assert.equal(await switcher.getByRole('button', { name: 'Next version' }).isDisabled(), true);
    assert.equal(await question.getByRole('button', { name: 'Edit' }).getAttribute('aria-disabled'), null);
    await shot(page, 'chat-regenerated-desktop');

    // ‹: the first reply is the one shown again, as the list read back after the switch says.
    const activated = nextPost(page, `/api/ai/messages/${firstId}/activate/`);
    const reread = nextTreeRead(page, chatId);
    await switcher.getByRole('button', { name: 'Previous version' }).click();
    assert.equal((await activated).status(), 200);
    const listed = await (await reread).json();
    assert.equal(listed.find((m) => m.id === firstId)?.active, true, 'the first reply is active');
    assert.equal(listed.find((m) => m.id === secondId)?.active, false, 'the second is not');
    const back = page.locator(`li.assistant[data-id="${firstId}"]`);
    await back.getByRole('group', { name: 'Version 1 of 2' }).waitFor();
    assert.equal(await back.locator('.versions .count').textContent(), '1/2');
    assert.deepEqual(await shownTexts(page), ['Name a colour', 'Echo: Name a colour']);
    // The focus stays on the arrows: the one left to press.
    assert.equal(await back.getByRole('button', { name: 'Next version' }).evaluate((n) => n === document.activeElement), true);

    // Stored so: a reload shows the first reply, 1/2.
    await page.reload();
    await page.locator('#conn[data-state="live"]').waitFor();
    await back.getByRole('group', { name: 'Version 1 of 2' }).waitFor();
    assert.deepEqual(await shownTexts(page), ['Name a colour', 'Echo: Name a colour']);
  } finally {
    await fake('PUT', '/_fake/config', { reply_words: before.reply_words, chunk_delay_ms: before.chunk_delay_ms });
  }
});

test('a question is edited: the conversation goes on from the new text, and ‹ brings the old branch back', { timeout: TEST_MS }, async () => {
  const chatId = shared.versionsChatId;
  await page.locator('#conn[data-state="live"]').waitFor();
  await page.locator('#message-input').fill('And a fruit?');
  await page.locator('#message-input').press('Enter');
  await page.locator('li.assistant[data-id]', { hasText: 'Echo: And a fruit?' }).waitFor();
  const turns = await shownTexts(page);
  assert.equal(turns.length, 4, `two turns: ${JSON.stringify(turns)}`);
  assert.deepEqual(turns.slice(2), ['And a fruit?', 'Echo: And a fruit?']);

  const old = page.locator('li.user', { hasText: 'Name a colour' });
  const oldId = Number(await old.getAttribute('data-id'));
  const edit = old.getByRole('button', { name: 'Edit' });
  const field = old.getByRole('textbox', { name: 'Edited message' });

  // Cancel (or Escape) leaves the message as it was, the focus back on Edit.
  await edit.click();
  assert.equal(await field.inputValue(), 'Name a colour');
  await old.getByRole('button', { name: 'Cancel' }).click();
  assert.equal(await field.count(), 0);
  assert.equal(await edit.evaluate((n) => n === document.activeElement), true);
  await edit.click();
  await field.press('Escape');
  assert.equal(await field.count(), 0);

  // An empty edit is refused on the page: nothing is sent.
  await edit.click();
  await field.fill('   ');
  await old.getByRole('button', { name: 'Save' }).click();
  await old.getByRole('alert').filter({ hasText: 'The message is empty' }).waitFor();

  await field.fill('Name a shape');
  await shot(page, 'chat-editing-desktop');
  const edited = nextPost(page, `/api/ai/messages/${oldId}/edit/`);
  await old.getByRole('button', { name: 'Save' }).click();
  const response = await edited;
  assert.equal(response.status(), 202);
  const newId = (await response.json()).message.id;

  // The new text is the question now, its reply streams in, and the turn after the old
  // version is gone from view.
  const question = page.locator(`li.user[data-id="${newId}"]`);
  await question.locator('.content', { hasText: 'Name a shape' }).waitFor();
  await page.locator(`li.assistant[data-id][data-reply-to="${newId}"]`, { hasText: 'Echo: Name a shape' }).waitFor();
  assert.deepEqual(await shownTexts(page), ['Name a shape', 'Echo: Name a shape']);
  const switcher = question.getByRole('group', { name: 'Version 2 of 2' });
  await switcher.waitFor();
  assert.equal(await switcher.locator('.count').textContent(), '2/2');
  await shot(page, 'chat-edited-desktop');

  // ‹: the old version, with the turn that followed it.
  const activated = nextPost(page, `/api/ai/messages/${oldId}/activate/`);
  await switcher.getByRole('button', { name: 'Previous version' }).click();
  assert.equal((await activated).status(), 200);
  await page.locator('li.user', { hasText: 'And a fruit?' }).waitFor();
  await page.locator(`li.user[data-id="${oldId}"]`).getByRole('group', { name: 'Version 1 of 2' }).waitFor();
  const shown = await shownTexts(page);
  assert.equal(shown.length, 4, `two turns again: ${JSON.stringify(shown)}`);
  assert.equal(shown[0], 'Name a colour');
  assert.deepEqual(shown.slice(2), ['And a fruit?', 'Echo: And a fruit?']);
  assert.equal(await page.locator('li.user', { hasText: 'Name a shape' }).count(), 0);

  // What the server holds as the active path is what the page shows.
  const { body: path } = await apiAs(await sessionCookie(desktop), 'GET', `/api/ai/chats/${chatId}/messages/`);
  assert.deepEqual(
    path.map((m) => m.content).sort(),
    [...shown].sort(),
    'the page shows the active path',
  );
});

test('a new reply to an earlier question stays under it, before the turns that follow', { timeout: TEST_MS }, async () => {
  // The turns' order is the tree's: the new reply is stored after the later turn.
  const question = page.locator('li.user', { hasText: 'Name a colour' });
  const id = Number(await question.getAttribute('data-id'));
  const reply = page.locator(`li.assistant[data-id][data-reply-to="${id}"]`);
  const versions = Number((await reply.locator('.versions .count').textContent()).split('/')[1]);
  const regenerated = nextPost(page, `/api/ai/messages/${id}/regenerate/`);
  await reply.getByRole('button', { name: 'Regenerate' }).click();
  assert.equal((await regenerated).status(), 202);
  const newest = `Version ${versions + 1} of ${versions + 1}`;
  await reply.getByRole('group', { name: newest }).waitFor();
  assert.deepEqual(await shownTexts(page), ['Name a colour', 'Echo: Name a colour', 'And a fruit?', 'Echo: And a fruit?']);

  // So after a reload too.
  await page.reload();
  await page.locator('#conn[data-state="live"]').waitFor();
  await reply.getByRole('group', { name: newest }).waitFor();
  assert.deepEqual(await shownTexts(page), ['Name a colour', 'Echo: Name a colour', 'And a fruit?', 'Echo: And a fruit?']);
});

test('the conversation shown is exported as JSON and as Markdown', { timeout: TEST_MS }, async () => {
  const chatId = shared.versionsChatId;
  const shown = await shownTexts(page);
  await page.getByRole('button', { name: 'Chat options' }).click();
  const options = page.locator('#chat-options');
  for (const [name, format] of [
    ['Export as JSON', 'json'],
    ['Export as Markdown', 'markdown'],
  ]) {
    const downloading = page.waitForEvent('download');
    await options.getByRole('link', { name }).click();
    const download = await downloading;
    const url = new URL(download.url());
    assert.equal(url.pathname, `/api/ai/chats/${chatId}/export/`);
    assert.equal(url.searchParams.get('format'), format);
    assert.equal(await download.failure(), null, `the ${format} download finished`);
    const text = readFileSync(await download.path(), 'utf8');
    if (format === 'json') {
      const exported = JSON.parse(text);
      assert.equal(exported.chat?.title, 'Versions');
      const contents = exported.messages.map((m) => m.content);
      for (const content of shown) assert.ok(contents.includes(content), `"${content}" is exported: ${text}`);
    } else {
      assert.ok(text.startsWith('# Versions'), text);
      for (const content of shown) assert.ok(text.includes(content), `"${content}" is exported: ${text}`);
    }
    // The active path only: not the edited version, which is off it.
    assert.ok(!text.includes('Name a shape'), `only the active path is exported: ${text}`);
    assert.match(download.suggestedFilename(), format === 'json' ? /\.json$/ : /\.md$/);
  }
  await page.locator('#chat-options-close').click();
});

test('staff see each message\'s version, whether it is on its path, and its parent', { timeout: TEST_MS }, async () => {
  const token = await sessionCookie(desktop);
  const { body: messages } = await apiAs(token, 'GET', `/api/ai/chats/${shared.versionsChatId}/messages/?all=true`);
  assert.ok(messages.some((m) => m.version === 2), 'the chat has second versions');
  assert.ok(messages.some((m) => !m.active), 'and messages off its path');
  const { context, admin } = await openStaffPage();
  try {
    for (const message of messages) {
      const row = admin.locator('#messages-table tbody tr', {
        has: admin.locator('td[data-label="ID"]', { hasText: new RegExp(`^${message.id}$`) }),
      });
      await row.waitFor();
      const version = row.locator('td[data-label="Version"]');
      assert.equal(await version.locator('.version').textContent(), `v${message.version}`);
      assert.equal(await version.getByText('inactive', { exact: true }).count(), message.active ? 0 : 1);
      assert.equal(await row.locator('td[data-label="Parent"]').textContent(), String(message.parent_id ?? '–'));
    }
    await shot(admin, 'admin-versions');
  } finally {
    await context.close();
  }
});

test('a session revoked elsewhere sends the open page back to the log-in form', { timeout: TEST_MS }, async () => {
  const token = await sessionCookie(desktop); // what only the browser (and this test) can read
  const response = await fetch(`${BASE}/api/logout/`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}` },
    signal: AbortSignal.timeout(STEP_MS),
  });
  assert.equal(response.status, 200);
  // The server closes the page's socket (4401): the page leaves on its own, no click needed.
  await page.locator('#auth-notice', { hasText: 'session has ended' }).waitFor();
  await page.locator('#login-form').waitFor();
});

test('the API documentation pages render under their Content-Security-Policy', { timeout: TEST_MS }, async () => {
  // Not `watch`ed: ReDoc's footer asks for Redocly's logo from their CDN, and the policy is
  // expected to block exactly that. Any other console error (a script, style or worker the
  // policy blocks) or uncaught exception fails the test.
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  context.setDefaultTimeout(STEP_MS);
  const docs = await context.newPage();
  const errors = [];
  docs.on('pageerror', (err) => errors.push(`uncaught: ${err.message}`));
  docs.on('console', (message) => {
    // As in `watch`: a 4xx (the favicon) is logged by Chromium itself.
    if (message.type() === 'error' && !/status of 4\d\d/.test(message.text())) errors.push(message.text());
  });
  await docs.goto(`${BASE}/api/docs/`);
  await docs.locator('.swagger-ui .info .title', { hasText: 'aichat' }).waitFor();
  await docs.goto(`${BASE}/api/redoc/`);
  await docs.locator('h1', { hasText: 'aichat' }).waitFor();
  const unexpected = errors.filter((e) => !/cdn\.redoc\.ly.*violates the following Content Security Policy/.test(e));
  assert.deepEqual(unexpected, []);
  await context.close();
});

test('no page loaded anything from another host, sent a token or logged an error', () => {
  assert.deepEqual(problems, []);
  assert.ok(sockets.length > 0, 'sockets were opened');
  assertNoTokenInSocketUrls();
});
