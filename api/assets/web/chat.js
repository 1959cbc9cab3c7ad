// The chat page: log in or register, list, create, rename and delete AI chats, and talk to the
// model over the chat's WebSocket (`user_message`, `assistant_partial`, `assistant_delta`,
// `assistant_message`, `message_cancelled`, `error`). A reply in progress shows whole as soon as
// the socket (re)opens, and goes on from there. A reply still to come can be stopped, and a
// failed or cancelled message retried, over REST. The assistant's replies are shown as Markdown
// (markdown.js); the user's own messages as the plain text they typed.
//
// A conversation is a tree (parent_id, version, active): the page reads every message
// (`?all=true`) and shows the active path. A question can be edited (a new version of it) and
// a reply regenerated (a new version of it); a message with other versions shows `‹ 2/3 ›`,
// whose arrows make another version's branch the active one.
import {
  $,
  api,
  apiPage,
  busy,
  el,
  formatNumber,
  formatTime,
  formatUsage,
  logOut,
  onUnauthorized,
  resumeSession,
  session,
  setMessage,
  setupAuth,
  show,
} from './common.js';
import { cancelRender, renderMarkdown, renderMarkdownSoon } from './markdown.js';

const CONTEXT_MESSAGE_LIMIT = 20;
const MAX_RECONNECT_DELAY_MS = 15000;
/** Least time between two socket renewals for lost deltas (`resync`). */
const RESYNC_INTERVAL_MS = 5000;
/** User message statuses whose reply is still to come (it can be stopped). */
const PENDING = new Set(['queued', 'answering']);
/** User message statuses that ended without a reply (they can be retried). */
const RETRYABLE = new Set(['failed', 'cancelled']);
const STATUS_TEXT = { answered: '', answering: 'answering…' };
/** Reads of the tree in a row that events may overtake before the page waits for the next change. */
const MAX_TREE_READS = 5;

const state = {
  chats: [],
  userChats: [],
  models: [], // [{id, default}], the default first; [] until loaded
  chat: null, // the open AI chat
  socket: null,
  reconnectTimer: null,
  attempts: 0,
  resyncTimer: null,
  resyncedAt: 0,
  lastId: 0, // highest message id seen: where a (re)connection's catch-up starts
  pendingText: null, // sent over the socket, not yet confirmed: restored if refused
  opening: 0,
  tree: new Map(), // every message of the open chat, every branch: id -> message
  treeEpoch: 0, // bumped by every change to the tree: a read begun before one is stale
  ends: new Map(), // user message id -> how many waits for its reply ended here
  edits: 0, // edits sent, not yet answered
};

const authView = $('#auth-view');
const appView = $('#app-view');
const list = $('#messages');
const input = $('#message-input');
const includeBox = $('#include-context');
const chatError = $('#chat-error');
const newChatForm = $('#new-chat-form');
const relatedSelect = $('#related-chat-select');
const modelSelect = $('#model-select');
const listNotice = $('#chat-list-notice');

// ---------------------------------------------------------------- session

const auth = setupAuth(authView, (user) => enterApp(user));

onUnauthorized(() => showAuth('Your session has ended. Please log in again.'));

$('#logout').addEventListener('click', async () => {
  leaveChat();
  showAuth(await logOut());
});

function showAuth(notice) {
  leaveChat();
  show(appView, false);
  show(authView, true);
  for (const id of ['#whoami', '#logout', '#admin-link']) show($(id), false);
  setMessage($('#auth-notice'), notice);
  auth.select('login');
  $('#login-form input[name=username]').focus();
}

function enterApp(user) {
  show(authView, false);
  show(appView, true);
  setMessage($('#auth-notice'), '');
  const who = $('#whoami');
  who.textContent = user.username;
  show(who, true);
  show($('#logout'), true);
  show($('#admin-link'), !!user.is_staff);
  loadUserChats();
  loadChats().then(() => {
    const match = /^#chat-(\d+)$/.exec(location.hash);
    if (match) openChat(Number(match[1]));
  });
}

/** The session is an HttpOnly cookie the page cannot see: `/api/me/` says whether there is one. */
async function boot() {
  try {
    const me = await resumeSession();
    if (me) enterApp(me);
    else showAuth('');
  } catch (err) {
    showAuth(err.message);
  }
}

// ---------------------------------------------------------------- chat list

async function loadChats() {
  try {
    state.chats = await api('GET', '/api/ai/chats/');
    renderChatList();
  } catch (err) {
    setMessage($('.form-error', newChatForm), err.status === 401 ? '' : err.message);
  }
}

let refreshTimer = null;
function refreshChatsSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(loadChats, 300);
}

function renderChatList() {
  const ul = $('#chat-list');
  ul.replaceChildren(
    ...state.chats.map((chat) =>
      el(
        'li',
        {},
        el(
          'button',
          {
            type: 'button',
            class: 'chat-item' + (state.chat && state.chat.id === chat.id ? ' active' : ''),
            dataset: { id: chat.id },
            onclick: () => openChat(chat.id),
          },
          el('span', { class: 'chat-item-title' }, chat.title),
          el(
            'span',
            { class: 'chat-item-meta' },
            chat.related_chat_name ? el('span', { class: 'tag' }, `↔ ${chat.related_chat_name}`) : null,
            `${chat.message_count} message${chat.message_count === 1 ? '' : 's'} · ${formatTime(chat.updated_at)}`,
          ),
        ),
      ),
    ),
  );
  show($('#chat-list-empty'), state.chats.length === 0);
}

async function loadUserChats(selectId) {
  try {
    state.userChats = await api('GET', '/api/chats/');
  } catch {
    return;
  }
  const current = selectId ?? relatedSelect.value;
  relatedSelect.replaceChildren(
    el('option', { value: '' }, 'None'),
    ...state.userChats.map((chat) => {
      const people = (chat.participants || []).map((p) => p.username).join(', ');
      return el('option', { value: chat.id }, people ? `${chat.name} (${people})` : chat.name);
    }),
  );
  relatedSelect.value = String(current || '');
}

/** The models a chat may use, the default chosen; the select keeps "Default" if they cannot be read. */
async function loadModels() {
  if (state.models.length > 0) return;
  try {
    state.models = await api('GET', '/api/ai/models/');
  } catch {
    return;
  }
  modelSelect.replaceChildren(
    ...state.models.map((model) =>
      el('option', { value: model.id, selected: model.default }, model.default ? `${model.id} (default)` : model.id),
    ),
  );
}

// ---------------------------------------------------------------- creating chats

const toggleButton = $('#new-chat-toggle');
function showNewChatForm(visible) {
  show(newChatForm, visible);
  toggleButton.setAttribute('aria-expanded', String(visible));
  if (visible) {
    loadUserChats();
    loadModels();
    newChatForm.elements.title.focus();
  } else {
    setMessage($('.form-error', newChatForm), '');
  }
}
toggleButton.addEventListener('click', () => showNewChatForm(newChatForm.hidden));
$('#new-chat-cancel').addEventListener('click', () => showNewChatForm(false));

newChatForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = newChatForm.elements;
  const body = { title: form.title.value.trim() };
  if (form.system_prompt.value.trim()) body.system_prompt = form.system_prompt.value.trim();
  if (relatedSelect.value) body.related_chat = Number(relatedSelect.value);
  if (modelSelect.value) body.model = modelSelect.value;
  try {
    const chat = await busy(newChatForm, api('POST', '/api/ai/chats/', body));
    newChatForm.reset();
    showNewChatForm(false);
    await loadChats();
    openChat(chat.id);
  } catch (err) {
    setMessage($('.form-error', newChatForm), err.message);
  }
});

async function createUserChat() {
  const name = $('#user-chat-name').value.trim();
  const error = $('.form-error', newChatForm);
  if (!name) {
    setMessage(error, 'Give the user-to-user chat a name.');
    $('#user-chat-name').focus();
    return;
  }
  const participant_usernames = $('#user-chat-people')
    .value.split(/[\s,]+/)
    .filter(Boolean);
  const first = $('#user-chat-first').value.trim();
  try {
    const chat = await busy(
      newChatForm,
      (async () => {
        const created = await api('POST', '/api/chats/', { name, participant_usernames });
        if (first) await api('POST', `/api/chats/${created.id}/send_message/`, { content: first });
        return created;
      })(),
    );
    for (const id of ['#user-chat-name', '#user-chat-people', '#user-chat-first']) $(id).value = '';
    $('#user-chat-box').open = false;
    await loadUserChats(chat.id);
    setMessage(error, '');
  } catch (err) {
    setMessage(error, err.message);
  }
}
$('#user-chat-create').addEventListener('click', createUserChat);
// Enter inside the nested fields creates the user chat, not the AI chat around them.
$('#user-chat-fields').addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && event.target.tagName === 'INPUT') {
    event.preventDefault();
    createUserChat();
  }
});

// ---------------------------------------------------------------- one chat

async function openChat(id) {
  const ticket = ++state.opening;
  leaveChat();
  let chat;
  let tree;
  try {
    [chat, tree] = await Promise.all([
      api('GET', `/api/ai/chats/${id}/`),
      // Every branch, for the versions; without it the page still shows the active path.
      readTree(id).catch(() => null),
    ]);
  } catch (err) {
    if (ticket === state.opening && err.status !== 401) {
      history.replaceState(null, '', location.pathname);
      setMessage($('.form-error', newChatForm), err.status === 404 ? 'That chat does not exist.' : err.message);
    }
    return;
  }
  if (ticket !== state.opening) return; // another chat was chosen meanwhile
  state.chat = chat;
  state.lastId = 0;
  listNotice.textContent = '';
  history.replaceState(null, '', `#chat-${chat.id}`);
  document.body.classList.add('chat-open');
  show($('#no-chat'), false);
  show($('#chat-pane'), true);
  $('#chat-title').textContent = chat.title;
  setMessage(chatError, '');
  list.replaceChildren();
  applyTree(tree ?? chat.messages);
  for (const format of ['json', 'markdown']) {
    $(`#export-${format}`).href = `/api/ai/chats/${chat.id}/export/?format=${format}`;
  }
  const linked = chat.related_chat != null;
  includeBox.disabled = !linked;
  includeBox.checked = linked && localStorage.getItem(contextKey(chat.id)) !== 'off';
  $('#context-toggle').classList.toggle('disabled', !linked);
  $('#context-toggle').title = linked ? '' : 'This chat has no related user-to-user chat';
  renderChatList();
  scrollToEnd(true);
  connect();
  if (window.matchMedia('(min-width: 760px)').matches) input.focus();
}

function leaveChat() {
  closeSocket();
  showChatOptions(false);
  setHint('');
  state.chat = null;
  state.pendingText = null;
  state.tree = new Map();
  state.ends.clear();
  document.body.classList.remove('chat-open');
  show($('#chat-pane'), false);
  show($('#no-chat'), true);
}

$('#back').addEventListener('click', () => {
  state.opening++;
  leaveChat();
  history.replaceState(null, '', location.pathname);
  renderChatList();
});

const contextKey = (id) => `aichat.context.${id}`;
includeBox.addEventListener('change', () => {
  if (state.chat) localStorage.setItem(contextKey(state.chat.id), includeBox.checked ? 'on' : 'off');
});

function updateChatMeta() {
  const chat = state.chat;
  if (!chat) return;
  let tokens = 0;
  for (const node of list.querySelectorAll('li.assistant[data-tokens]')) tokens += Number(node.dataset.tokens);
  const parts = [chat.model];
  if (chat.related_chat_name) parts.push(`linked to “${chat.related_chat_name}”`);
  parts.push(`${formatNumber(tokens)} tokens used`);
  $('#chat-meta').textContent = parts.join(' · ');
}

// ---------------------------------------------------------------- renaming and deleting

const optionsToggle = $('#chat-options-toggle');
const optionsPanel = $('#chat-options');
const renameForm = $('#rename-form');
const deleteConfirm = $('#delete-confirm');
const optionsError = $('.form-error', optionsPanel);

function showChatOptions(visible) {
  show(optionsPanel, visible);
  optionsToggle.setAttribute('aria-expanded', String(visible));
  show(deleteConfirm, false);
  setMessage(optionsError, '');
  if (visible && state.chat) {
    renameForm.elements.title.value = state.chat.title;
    renameForm.elements.title.focus();
  }
}
optionsToggle.addEventListener('click', () => showChatOptions(optionsPanel.hidden));
$('#chat-options-close').addEventListener('click', () => {
  showChatOptions(false);
  optionsToggle.focus();
});

renameForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  const chat = state.chat;
  const title = renameForm.elements.title.value.trim();
  if (!chat) return;
  if (!title) {
    setMessage(optionsError, 'A chat needs a title.');
    renameForm.elements.title.focus();
    return;
  }
  try {
    const changed = await busy(renameForm, api('PATCH', `/api/ai/chats/${chat.id}/`, { title }));
    if (state.chat !== chat) return;
    Object.assign(chat, changed);
    $('#chat-title').textContent = chat.title;
    updateChatMeta();
    showChatOptions(false);
    optionsToggle.focus();
    await loadChats();
  } catch (err) {
    if (err.status !== 401) setMessage(optionsError, err.message);
  }
});

renameForm.elements.title.addEventListener('input', () => setMessage(optionsError, ''));

$('#delete-chat').addEventListener('click', () => {
  setMessage(optionsError, '');
  show(deleteConfirm, true);
  $('#delete-chat-cancel').focus();
});
$('#delete-chat-cancel').addEventListener('click', () => {
  show(deleteConfirm, false);
  $('#delete-chat').focus();
});

$('#delete-chat-confirm').addEventListener('click', async () => {
  const chat = state.chat;
  if (!chat) return;
  try {
    await busy(optionsPanel, api('DELETE', `/api/ai/chats/${chat.id}/`));
  } catch (err) {
    // Already gone (deleted from another tab) is what was asked for.
    if (err.status !== 404) {
      if (err.status !== 401) setMessage(optionsError, err.message);
      return;
    }
  }
  localStorage.removeItem(contextKey(chat.id));
  if (state.chat === chat) {
    state.opening++;
    leaveChat();
    history.replaceState(null, '', location.pathname);
  }
  state.chats = state.chats.filter((c) => c.id !== chat.id);
  renderChatList();
  listNotice.textContent = `Deleted “${chat.title}”.`;
  toggleButton.focus();
  loadChats();
});

// ---------------------------------------------------------------- messages

const byId = (id) => list.querySelector(`li[data-id="${Number(id)}"]`);
const pendingReply = (userId) =>
  list.querySelector(`li.assistant[data-reply-to="${Number(userId)}"]:not([data-id])`);

function seen(id) {
  if (id > state.lastId) state.lastId = id;
}

function nearBottom() {
  return list.scrollHeight - list.scrollTop - list.clientHeight < 120;
}

function scrollToEnd(force) {
  if (force || nearBottom()) list.scrollTop = list.scrollHeight;
}

/** A message of the tree on the path: added when not shown yet, its status brought up to date. */
function renderStored(message) {
  if (message.role === 'assistant') addAssistantMessage(message, false);
  else if (message.role === 'user') addUserMessage(message);
  else if (!byId(message.id)) {
    seen(message.id);
    list.append(el('li', { class: 'msg system', dataset: { id: message.id } }, message.content));
  }
}

function userNode(message) {
  return el(
    'li',
    { class: 'msg user', dataset: { id: message.id } },
    el('div', { class: 'bubble' }, el('div', { class: 'content' }, message.content)),
    el(
      'div',
      { class: 'meta' },
      el('time', { datetime: message.timestamp }, formatTime(message.timestamp)),
      el('span', { class: 'status' }),
    ),
    el('p', { class: 'msg-error', role: 'alert', hidden: true }),
    el(
      'div',
      { class: 'msg-actions' },
      el(
        'button',
        {
          type: 'button',
          class: 'small edit',
          title: 'Change this message: the conversation goes on from the new text',
          onclick: () => startEdit(message.id),
        },
        'Edit',
      ),
      el(
        'button',
        {
          type: 'button',
          class: 'small retry',
          hidden: true,
          title: 'Send this message to the assistant again',
          onclick: () => retryMessage(message.id),
        },
        'Retry',
      ),
      el(
        'button',
        {
          type: 'button',
          class: 'small regenerate',
          hidden: true,
          title: 'Ask the assistant for a new reply to this message',
          onclick: (event) => regenerate(message.id, event.currentTarget),
        },
        'Regenerate',
      ),
    ),
  );
}

/** A reply's bubble; its actions show once it is saved (`decorate`). */
function assistantNode(replyTo) {
  return el(
    'li',
    { class: 'msg assistant', dataset: replyTo != null ? { replyTo } : {} },
    el('div', { class: 'bubble' }, el('div', { class: 'content' })),
    el('div', { class: 'meta' }, el('time'), el('span', { class: 'usage' })),
    el(
      'div',
      { class: 'msg-actions', hidden: true },
      replyTo != null
        ? el(
            'button',
            {
              type: 'button',
              class: 'small regenerate',
              title: 'Ask the assistant for another reply to the same message',
              onclick: (event) => regenerate(replyTo, event.currentTarget),
            },
            'Regenerate',
          )
        : null,
    ),
  );
}

/**
 * Shows a user message's status: its error when failed, Retry when failed or cancelled (and
 * Regenerate when failed), and the reply to come (with its Stop button) while queued or
 * answering, during which its buttons and its replies' wait.
 */
function setStatus(node, status, error) {
  if (!node) return;
  const id = Number(node.dataset.id);
  noteStatus(id, status, error);
  const stick = nearBottom(); // what it shows below the message stays in view
  node.dataset.status = status;
  node.classList.toggle('failed', status === 'failed');
  node.classList.toggle('cancelled', status === 'cancelled');
  $('.status', node).textContent = STATUS_TEXT[status] ?? status;
  const errorText = $('.msg-error', node);
  errorText.textContent = status === 'failed' ? error || 'The assistant could not answer this message.' : '';
  errorText.hidden = status !== 'failed';
  const actions = $('.msg-actions', node);
  const retryable = RETRYABLE.has(status);
  for (const [button, shown] of [
    [$('.retry', actions), retryable],
    [$('.regenerate', actions), status === 'failed'],
  ]) {
    if (!shown) releaseFocus(button);
    show(button, shown);
  }
  if (PENDING.has(status)) ensurePendingReply(id);
  else if (retryable) removePendingReply(id);
  if (!state.rendering) decorateTurn(id);
  scrollToEnd(stick);
}

/** The tree's record of user message `id`'s status (shown or not). */
function noteStatus(id, status, error) {
  const message = state.tree.get(id);
  if (!message || message.status === status) return;
  message.status = status;
  message.error = status === 'failed' ? error || message.error || null : null;
  state.treeEpoch += 1;
}

/** A user message, from a list, a send's answer or a `user_message` event (which has no status). */
function addUserMessage(message) {
  seen(message.id);
  remember(message);
  let node = byId(message.id);
  if (!node) {
    const stick = nearBottom();
    node = userNode(message);
    const early = pendingReply(message.id); // a reply that started before this event arrived
    if (early) early.before(node);
    else list.append(node);
    scrollToEnd(stick);
  }
  const current = node.dataset.status;
  if (message.status) {
    // A read older than the events already shown never makes an answered message pending again.
    if (message.status !== current && !(current === 'answered' && PENDING.has(message.status))) {
      setStatus(node, message.status, message.error);
    }
  } else if (!current || !PENDING.has(current)) {
    // An event about a message that had ended: it was retried or regenerated (here or
    // elsewhere), and the server queued it again under the same id.
    setStatus(node, 'queued');
  }
}

/** Puts `node` under its user message, after any reply already there. */
function placeReply(node, userId) {
  const user = userId != null ? byId(userId) : null;
  if (!user) {
    list.append(node);
    return;
  }
  let after = user;
  while (after.nextElementSibling && after.nextElementSibling.classList.contains('assistant')) {
    after = after.nextElementSibling;
  }
  after.after(node);
}

/**
 * A streaming reply's `.content` -> `{ text, seq }`: the text received so far (its DOM is the
 * rendered Markdown) and the `seq` of the last delta in it (0: none yet).
 */
const streamed = new WeakMap();

/** The reply still to come to user message `userId` (empty until its first words), with Stop. */
function ensurePendingReply(userId) {
  let node = pendingReply(userId);
  if (node) return node;
  const stick = nearBottom();
  node = assistantNode(userId);
  node.classList.add('streaming');
  // Re-rendered as it grows: screen readers wait for the finished reply instead of reading
  // every version of it.
  node.setAttribute('aria-busy', 'true');
  $('.usage', node).textContent = 'waiting…';
  $('.meta', node).append(
    el(
      'button',
      { type: 'button', class: 'small stop-reply', title: 'Stop this reply', onclick: () => stopReply(userId) },
      'Stop',
    ),
  );
  placeReply(node, userId);
  scrollToEnd(stick);
  return node;
}

function removePendingReply(userId) {
  const node = pendingReply(userId);
  if (!node) return;
  releaseFocus($('.stop-reply', node));
  cancelRender($('.content', node));
  node.remove();
}

/**
 * The bubble of the reply in progress to user message `userId` (made if need be) and what it
 * holds; null once that reply is saved.
 */
function streamingReply(userId) {
  // A reply to a question off the path is not shown (its branch was left meanwhile).
  if (state.tree.get(userId)?.active === false) return null;
  const user = byId(userId);
  // Words sent before a stop can arrive after the stopped reply itself (the stop's REST answer
  // and the socket are two roads): the saved reply is what stays.
  if (user && user.dataset.status === 'answered') return null;
  if (user && user.dataset.status !== 'answering') setStatus(user, 'answering');
  const node = ensurePendingReply(userId);
  const content = $('.content', node);
  let reply = streamed.get(content);
  if (!reply) {
    reply = { text: '', seq: 0 };
    streamed.set(content, reply);
  }
  return { node, content, reply };
}

function showReply({ node, content, reply }) {
  if (reply.text && !node.dataset.stopping) $('.usage', node).textContent = 'writing…';
  // Re-rendered at most once a frame, however fast the words come.
  const stick = nearBottom();
  renderMarkdownSoon(content, reply.text, () => scrollToEnd(stick));
}

/** A reply in progress as it stands (`assistant_partial`): what a (re)opened socket gets first. */
function resumeReply(userId, text, seq) {
  const target = streamingReply(userId);
  if (!target) return;
  // The socket sends it before any delta it numbers higher: it replaces whatever was shown.
  target.reply.text = text ?? '';
  target.reply.seq = Number.isInteger(seq) ? seq : 0;
  showReply(target);
}

/**
 * One more piece of a reply. Numbered pieces (`seq`: 1, 2, 3 …) are taken in order only: one
 * already in the text is dropped, and one past the next means some were lost (`resync`).
 */
function streamDelta(userId, delta, seq) {
  const target = streamingReply(userId);
  if (!target) return;
  const { reply } = target;
  if (!Number.isInteger(seq) || seq < 1) {
    reply.text += delta; // from a server that numbers nothing: taken as it comes
  } else if (seq === reply.seq + 1) {
    reply.text += delta;
    reply.seq = seq;
  } else if (seq === 1) {
    // A socket never repeats a first piece: the reply starts over (a new run of its job, the
    // last one having died mid-stream, streams it from the beginning again).
    reply.text = delta;
    reply.seq = 1;
  } else if (seq <= reply.seq) {
    return; // already in the text
  } else {
    resync();
    return;
  }
  showReply(target);
}

function usageOf(message) {
  return (
    message.usage || {
      prompt_tokens: message.prompt_tokens,
      completion_tokens: message.completion_tokens,
      total_tokens: message.total_tokens,
    }
  );
}

/**
 * A saved reply: replaces the streamed text (`live`: it was just saved), or is added when
 * nothing streamed (an older version read from the tree keeps a bubble of its own, beside a
 * new one that may be streaming).
 */
function addAssistantMessage(message, live = true) {
  seen(message.id);
  if (byId(message.id)) return;
  const stick = nearBottom();
  const replyTo = message.reply_to ?? null;
  let node = live && replyTo != null ? pendingReply(replyTo) : null;
  if (!node) {
    node = assistantNode(replyTo);
    placeReply(node, replyTo);
  }
  node.dataset.id = message.id;
  node.classList.remove('streaming');
  node.removeAttribute('aria-busy');
  const stop = $('.stop-reply', node);
  if (stop) {
    releaseFocus(stop);
    stop.remove();
  }
  delete node.dataset.stopping;
  const content = $('.content', node);
  cancelRender(content);
  streamed.delete(content);
  renderMarkdown(content, message.content);
  const time = $('time', node);
  time.dateTime = message.timestamp;
  time.textContent = formatTime(message.timestamp);
  if (message.stopped && !node.classList.contains('stopped')) {
    // The text streamed until its user stopped it: what there is of the reply.
    node.classList.add('stopped');
    time.after(el('span', { class: 'tag stopped-label', title: 'The reply was stopped before its end' }, 'stopped'));
  }
  const usage = usageOf(message);
  $('.usage', node).textContent = formatUsage(usage);
  if (usage.total_tokens != null) node.dataset.tokens = usage.total_tokens;
  if (live && replyTo != null) setStatus(byId(replyTo), 'answered');
  updateChatMeta();
  scrollToEnd(stick);
}

/**
 * A reply saved (its event, or a stop's answer): into the tree as the newest version of its
 * question's replies, and the one shown when its question is on the path (`save_reply`).
 */
function receiveReply(message) {
  const replyTo = message.reply_to ?? null;
  const question = replyTo != null ? state.tree.get(replyTo) : undefined;
  if (!state.tree.has(message.id)) {
    const others = replyTo != null ? repliesTo(replyTo) : [];
    const version = message.version ?? Math.max(0, ...others.map((m) => m.version ?? 1)) + 1;
    const active = question ? question.active !== false : true;
    remember(message, { role: 'assistant', parent_id: replyTo, version, active, status: 'complete' });
    if (active) for (const other of others) other.active = false;
    // A reply to a question not read yet, or a version the event does not number: read them.
    if ((replyTo != null && !question) || (message.version === undefined && others.length > 0)) reloadSoon();
  }
  if (replyTo != null) endedWait(replyTo, 'answered');
  if (state.tree.get(message.id).active) addAssistantMessage(message, true);
  else if (replyTo != null) removePendingReply(replyTo);
  showPath();
}

/** The wait of user message `userId` for its reply ended (`status`), shown or not. */
function endedWait(userId, status, error) {
  state.ends.set(userId, (state.ends.get(userId) ?? 0) + 1);
  noteStatus(userId, status, error);
}

function failMessage(userId, error) {
  endedWait(userId, 'failed', error);
  removePendingReply(userId);
  setStatus(byId(userId), 'failed', error);
}

/** Stopped before the model was asked: no reply comes. */
function cancelMessage(userId) {
  endedWait(userId, 'cancelled');
  removePendingReply(userId);
  setStatus(byId(userId), 'cancelled');
}

function handleEvent(event) {
  switch (event.type) {
    case 'user_message':
      noteUserMessage(event.message);
      if (state.pendingText !== null && event.message.content === state.pendingText) {
        state.pendingText = null;
      }
      refreshChatsSoon();
      break;
    case 'assistant_partial':
      resumeReply(event.message_id, event.content, event.seq);
      break;
    case 'assistant_delta':
      streamDelta(event.message_id, event.delta, event.seq);
      break;
    case 'assistant_message':
      receiveReply(event.message);
      refreshChatsSoon();
      break;
    case 'message_cancelled':
      cancelMessage(event.message_id);
      break;
    case 'error':
      if (event.message_id != null) {
        failMessage(event.message_id, event.message);
      } else {
        setMessage(chatError, event.message);
        // The message we sent was refused: give its text back.
        if (state.pendingText !== null && !input.value) input.value = state.pendingText;
        state.pendingText = null;
      }
      break;
    case 'catch_up_truncated':
      reloadSoon(); // the rest, and where it goes
      break;
    case 'active_path_changed':
      reloadSoon(); // another tab (or client) switched branches
      break;
    default:
      break; // unknown events are for newer pages
  }
}

/**
 * After the socket opens, statuses of messages still pending here may have changed while
 * no socket listened: read them once (later changes arrive as events).
 */
async function refreshPending() {
  const pending = [...list.querySelectorAll('li.user[data-status]')].some((n) => PENDING.has(n.dataset.status));
  if (pending) await reloadSoon();
}

// ---------------------------------------------------------------- stopping and retrying

/**
 * Before a focused button disappears, the focus moves to the message field (on a wide screen;
 * on a phone that would open the keyboard), so keyboard users are not sent back to the top.
 */
function releaseFocus(button) {
  if (!button || button !== document.activeElement) return;
  if (window.matchMedia('(min-width: 760px)').matches) input.focus({ preventScroll: true });
  else button.blur();
}

/** `aria-disabled` rather than `disabled`: a disabled button would drop the keyboard focus. */
function setWaiting(button, waiting) {
  if (!button) return;
  if (waiting) button.setAttribute('aria-disabled', 'true');
  else button.removeAttribute('aria-disabled');
}

/**
 * Stops the reply to user message `userId`. The answer is the end itself (the stopped reply, or
 * the message cancelled) or, when the stop is still under way, the events that follow.
 */
async function stopReply(userId) {
  const chat = state.chat;
  const reply = pendingReply(userId);
  if (!chat || !reply || reply.dataset.stopping) return;
  reply.dataset.stopping = 'true';
  setWaiting($('.stop-reply', reply), true);
  $('.usage', reply).textContent = 'stopping…';
  try {
    const answer = await api('POST', `/api/ai/messages/${userId}/stop/`, {});
    if (state.chat !== chat) return;
    if (answer?.reply) receiveReply(answer.reply);
    else if (answer?.message?.status === 'cancelled') cancelMessage(userId);
    else if (answer?.message && !PENDING.has(answer.message.status)) await reloadSoon();
    // Otherwise (202) the stop is under way: `assistant_message` or `message_cancelled` follows.
  } catch (err) {
    if (state.chat !== chat || err.status === 401) return;
    if (err.status === 409 || err.status === 404) {
      // It ended meanwhile (answered or failed): nothing to stop, show what it became.
      await reloadSoon();
      return;
    }
    const node = pendingReply(userId);
    if (node) {
      delete node.dataset.stopping;
      setWaiting($('.stop-reply', node), false);
      $('.usage', node).textContent = streamed.get($('.content', node))?.text ? 'writing…' : 'waiting…';
    }
    setMessage(chatError, err.message);
  }
}

/** Queues failed or cancelled user message `userId` again; its reply then streams as for a send. */
async function retryMessage(userId) {
  const chat = state.chat;
  const node = byId(userId);
  const button = node && $('.retry', node);
  if (!chat || !button || button.getAttribute('aria-disabled')) return;
  setWaiting(button, true);
  setMessage(chatError, '');
  try {
    const answer = await api('POST', `/api/ai/messages/${userId}/retry/`, {});
    if (state.chat !== chat) return;
    // Unless the socket already told more (the reply may have started meanwhile).
    if (RETRYABLE.has(node.dataset.status)) setStatus(node, answer?.message?.status || 'queued');
  } catch (err) {
    if (state.chat !== chat || err.status === 401) return;
    if (err.status === 409) {
      // Retried elsewhere already, perhaps: show what it is now, and the refusal only if it
      // still looks retryable.
      await reloadSoon();
      if (state.chat === chat && RETRYABLE.has(byId(userId)?.dataset.status)) setMessage(chatError, err.message);
    } else {
      setMessage(chatError, err.message);
    }
  } finally {
    setWaiting(button, false);
  }
}

// ---------------------------------------------------------------- versions and branches

/**
 * Merges what is known of `message` into the tree (an event carries fewer fields than a
 * list); `defaults` fill the fields nothing said yet. The merged message.
 */
function remember(message, defaults = {}) {
  const known = state.tree.get(message.id);
  const merged = Object.assign(known ?? { ...defaults }, message);
  delete merged.partial; // the socket sends the text so far, numbered: it is shown from there
  if (!known) state.tree.set(message.id, merged);
  state.treeEpoch += 1;
  return merged;
}

/** The replies saved to user message `userId`, every version. */
const repliesTo = (userId) =>
  [...state.tree.values()].filter((m) => m.role === 'assistant' && m.reply_to === userId);

/** The last question of the active path (what a send follows), or null. */
function tipId() {
  let tip = null;
  for (const m of state.tree.values()) if (m.role === 'user' && m.active && (tip === null || m.id > tip)) tip = m.id;
  return tip;
}

/**
 * The active path, in the order of the conversation: each question followed by its reply.
 * Questions run in id order (each follows the one before it, so it was stored after it); a
 * reply goes under its question, whenever it was made (a regenerated reply to an early
 * question is newer than the turns after it).
 */
function activePath() {
  const replies = new Map();
  const rest = [];
  for (const m of state.tree.values()) {
    if (!m.active) continue;
    if (m.role === 'assistant' && m.reply_to != null && state.tree.get(m.reply_to)?.active) replies.set(m.reply_to, m);
    else rest.push(m);
  }
  rest.sort((a, b) => a.id - b.id);
  return rest.flatMap((m) => (replies.has(m.id) ? [m, replies.get(m.id)] : [m]));
}

/** Siblings share it: the same role and the same parent (a reply's parent is its question). */
const familyKey = (m) => `${m.role}:${(m.role === 'assistant' ? m.reply_to : m.parent_id) ?? ''}`;

/** Every family of the tree (key -> its messages by version) with more than one message. */
function familiesOf() {
  const families = new Map();
  for (const m of state.tree.values()) {
    if (m.role !== 'user' && m.role !== 'assistant') continue;
    const key = familyKey(m);
    if (families.has(key)) families.get(key).push(m);
    else families.set(key, [m]);
  }
  for (const [key, family] of families) {
    if (family.length < 2) families.delete(key);
    else family.sort((a, b) => (a.version ?? 1) - (b.version ?? 1) || a.id - b.id);
  }
  return families;
}

/**
 * Shows the tree's active path: bubbles of messages that left it go, missing ones are made,
 * and all stand in the path's order (a reply still to come under its question, after the
 * reply it will replace). Nodes that stay are moved, not made again: a streaming reply goes on.
 */
function showPath() {
  const stick = nearBottom();
  const path = activePath();
  const onPath = new Set(path.map((m) => m.id));
  for (const node of [...list.children]) {
    const id = node.dataset.id;
    // A reply that started before its question was read stays until the question is known.
    const question = node.dataset.replyTo != null ? Number(node.dataset.replyTo) : null;
    const keep = id ? onPath.has(Number(id)) : question == null || onPath.has(question) || !state.tree.has(question);
    if (!keep) dropNode(node);
  }
  state.rendering = true;
  try {
    for (const message of path) renderStored(message);
  } finally {
    state.rendering = false;
  }
  const order = [];
  path.forEach((m, i) => {
    order.push(byId(m.id));
    const next = path[i + 1];
    const replyFollows = m.role === 'user' && next?.role === 'assistant' && next.reply_to === m.id;
    const question = m.role === 'user' ? m.id : m.reply_to;
    if (question != null && !replyFollows) order.push(pendingReply(question));
  });
  let cursor = list.firstElementChild;
  for (const node of order) {
    if (!node) continue;
    if (node === cursor) cursor = node.nextElementSibling;
    else list.insertBefore(node, cursor);
  }
  const families = familiesOf();
  for (const node of list.children) decorate(node, families);
  updateChatMeta();
  scrollToEnd(stick);
}

/** Removes a message's bubble, the focus going to the message field if it was inside. */
function dropNode(node) {
  releaseFocus(node.contains(document.activeElement) ? document.activeElement : null);
  const content = $('.content', node);
  if (content) cancelRender(content);
  node.remove();
}

/**
 * A message's actions as the tree and its question's status have them: the version switcher
 * when it has siblings; Edit, Regenerate and the arrows waiting while its question does; and
 * a saved reply out of sight while a new one to the same question is on its way.
 */
function decorate(node, families) {
  const message = node.dataset.id ? state.tree.get(Number(node.dataset.id)) : undefined;
  if (!message || (message.role !== 'user' && message.role !== 'assistant')) return;
  const question = message.role === 'user' ? node : byId(message.reply_to);
  const waiting = PENDING.has(question?.dataset.status);
  const actions = $('.msg-actions', node);
  if (message.role === 'assistant') {
    const replaced = waiting && pendingReply(message.reply_to) !== null;
    if (replaced) releaseFocus(node.contains(document.activeElement) ? document.activeElement : null);
    node.hidden = replaced;
    show(actions, true);
    setWaiting($('.regenerate', actions), waiting);
  } else {
    setWaiting($('.edit', actions), waiting);
  }
  const family = families.get(familyKey(message));
  let switcher = $('.versions', actions);
  if (!family) {
    if (switcher) {
      releaseFocus(switcher.contains(document.activeElement) ? document.activeElement : null);
      switcher.remove();
    }
    return;
  }
  if (!switcher) {
    switcher = versionSwitcher(node);
    actions.prepend(switcher);
  }
  const at = family.findIndex((m) => m.id === message.id);
  switcher.setAttribute('aria-label', `Version ${at + 1} of ${family.length}`);
  $('.count', switcher).textContent = `${at + 1}/${family.length}`;
  const [previous, next] = switcher.querySelectorAll('button');
  previous.disabled = at === 0;
  next.disabled = at === family.length - 1;
  setWaiting(previous, waiting);
  setWaiting(next, waiting);
}

/** Decorates user message `userId` and its replies shown. */
function decorateTurn(userId) {
  const families = familiesOf();
  for (const node of [byId(userId), ...list.querySelectorAll(`li.assistant[data-id][data-reply-to="${Number(userId)}"]`)]) {
    if (node) decorate(node, families);
  }
}

/** `‹ 2/3 ›`: the arrows show the version before or after this one (`switchVersion`). */
function versionSwitcher(node) {
  const arrow = (step, label, text) =>
    el(
      'button',
      {
        type: 'button',
        class: `small ghost ${step < 0 ? 'previous' : 'next'}`,
        'aria-label': label,
        title: label,
        onclick: (event) => switchVersion(Number(node.dataset.id), step, event.currentTarget),
      },
      text,
    );
  return el(
    'div',
    { class: 'versions', role: 'group' },
    arrow(-1, 'Previous version', '‹'),
    el('span', { class: 'count' }),
    arrow(1, 'Next version', '›'),
  );
}

/**
 * Makes the version `step` away from message `id` (among its siblings) the one shown: its
 * branch becomes the active path, which is then read again.
 */
async function switchVersion(id, step, button) {
  const chat = state.chat;
  const message = state.tree.get(id);
  if (!chat || !message || button.disabled || button.getAttribute('aria-disabled')) return;
  const family = familiesOf().get(familyKey(message)) ?? [];
  const target = family[family.findIndex((m) => m.id === id) + step];
  if (!target) return;
  const focused = button === document.activeElement;
  setWaiting(button, true);
  setMessage(chatError, '');
  try {
    await api('POST', `/api/ai/messages/${target.id}/activate/`, {});
    if (state.chat !== chat) return;
    state.treeEpoch += 1; // a read begun before the switch shows the branch left
    refreshChatsSoon(); // their message counts are the active path's
    await reloadSoon();
    if (state.chat !== chat || !focused) return;
    // The focus stays on the arrows, now those of the version shown.
    const arrows = byId(target.id)?.querySelectorAll('.versions button') ?? [];
    const [previous, next] = arrows;
    const keep = step < 0 ? previous : next;
    (keep && !keep.disabled ? keep : step < 0 ? next : previous)?.focus();
  } catch (err) {
    if (state.chat !== chat || err.status === 401) return;
    setMessage(chatError, err.message);
  } finally {
    setWaiting(button, false);
    const node = byId(id);
    if (node) decorate(node, familiesOf());
  }
}

/**
 * Asks for a new reply to user message `userId` (answered or failed). It streams in as after
 * a send, in place of the reply it replaces, which stays a version of its own.
 */
async function regenerate(userId, button) {
  const chat = state.chat;
  const node = byId(userId);
  if (!chat || !node || button.getAttribute('aria-disabled') || PENDING.has(node.dataset.status)) return;
  const ends = state.ends.get(userId) ?? 0;
  setWaiting(button, true);
  setMessage(chatError, '');
  try {
    const answer = await api('POST', `/api/ai/messages/${userId}/regenerate/`, {});
    if (state.chat !== chat) return;
    state.treeEpoch += 1;
    // Unless the socket told more meanwhile: the new reply started, or even ended.
    const now = byId(userId);
    if (now && !PENDING.has(now.dataset.status) && (state.ends.get(userId) ?? 0) === ends) {
      setStatus(now, answer?.message?.status || 'queued');
    }
  } catch (err) {
    if (state.chat !== chat || err.status === 401) return;
    if (err.status === 409) {
      // Regenerated elsewhere already, perhaps: show what it is now, and the refusal only if
      // it does not wait.
      await reloadSoon();
      if (state.chat === chat && !PENDING.has(byId(userId)?.dataset.status)) setMessage(chatError, err.message);
    } else {
      setMessage(chatError, err.message);
    }
  } finally {
    setWaiting(button, false);
    if (state.chat === chat) decorateTurn(userId);
  }
}

/** Opens the edit form of user message `id` in place of its bubble. */
function startEdit(id) {
  const node = byId(id);
  const message = state.tree.get(id);
  if (!node || !message || PENDING.has(node.dataset.status)) return;
  const open = $('.edit-form', node);
  if (open) {
    open.elements.content.focus();
    return;
  }
  const field = el('textarea', { name: 'content', rows: 3, 'aria-label': 'Edited message', required: true });
  field.value = message.content;
  const error = el('p', { class: 'form-error', role: 'alert', hidden: true });
  const form = el(
    'form',
    { class: 'edit-form', novalidate: true },
    field,
    error,
    el(
      'div',
      { class: 'row' },
      el('button', { type: 'button', class: 'small ghost', onclick: () => endEdit(node, true) }, 'Cancel'),
      el('button', { type: 'submit', class: 'small primary' }, 'Save'),
    ),
  );
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    saveEdit(id, form);
  });
  field.addEventListener('input', () => setMessage(error, ''));
  field.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') {
      event.preventDefault();
      endEdit(node, true);
    } else if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      // As in the message field: Enter sends, Shift+Enter is a new line.
      event.preventDefault();
      form.requestSubmit();
    }
  });
  node.classList.add('editing');
  show($('.bubble', node), false);
  show($('.msg-actions', node), false);
  $('.bubble', node).after(form);
  field.focus();
  field.setSelectionRange(field.value.length, field.value.length);
}

/** Closes the edit form of `node`, if open (`refocus`: the focus goes back to Edit). */
function endEdit(node, refocus) {
  const form = node && $('.edit-form', node);
  if (!form) return;
  form.remove();
  node.classList.remove('editing');
  show($('.bubble', node), true);
  show($('.msg-actions', node), true);
  if (refocus) $('.edit', node).focus();
}

/**
 * Sends the edit of user message `id`: its new text is a new version of the question, whose
 * branch is the active path from now on (the turns after the old version leave the view), and
 * its reply streams in as after a send.
 */
async function saveEdit(id, form) {
  const chat = state.chat;
  const field = form.elements.content;
  const error = $('.form-error', form);
  const content = field.value.trim();
  if (!content) {
    setMessage(error, 'The message is empty: write something, or cancel.');
    field.focus();
    return;
  }
  state.edits += 1;
  try {
    const answer = await busy(form, api('POST', `/api/ai/messages/${id}/edit/`, { content }));
    if (state.chat !== chat) return;
    applyEdit(id, answer.message);
    reloadSoon(); // what the server made of it, should the path differ from the one guessed
  } catch (err) {
    if (state.chat !== chat || err.status === 401) return;
    setMessage(error, err.message);
    field.focus();
  } finally {
    state.edits -= 1;
  }
}

/**
 * Shows the edit's new version at once, as the server stores it: the old version and the
 * turns after it leave the active path, the new message (queued) takes its place.
 */
function applyEdit(oldId, message) {
  const path = activePath();
  const from = path.findIndex((m) => m.id === oldId);
  if (from >= 0) for (const m of path.slice(from)) m.active = false;
  remember(message, { active: true }).active = true;
  showPath();
}

/**
 * A `user_message` event: a message sent (here or elsewhere), queued again (a retry or a
 * regeneration), or made by an edit. A send follows the last question of the path as its
 * first version and shows at once; an edit moves the path, which a read of the tree shows.
 */
function noteUserMessage(message) {
  if (state.tree.has(message.id)) {
    addUserMessage(message);
    return;
  }
  const tip = tipId();
  const numbered = message.version !== undefined; // events of an older server carry no versions
  const sent = numbered ? message.version === 1 && (message.parent_id ?? null) === tip : state.edits === 0;
  if (!sent) {
    reloadSoon();
    return;
  }
  remember(message, { parent_id: tip, version: 1, active: true });
  addUserMessage(message);
  if (!numbered) reloadSoon();
}

/** Every message of chat `chatId`, every branch, oldest first: all its pages, by their `Link`. */
async function readTree(chatId) {
  const messages = [];
  let next = `/api/ai/chats/${chatId}/messages/?all=true`;
  while (next) {
    const page = await apiPage(next);
    messages.push(...page.items);
    next = page.next;
  }
  return messages;
}

/** Makes `messages` (every branch of the open chat) the tree, and shows its active path. */
function applyTree(messages) {
  state.tree = new Map();
  for (const message of messages) {
    remember(message);
    seen(message.id);
  }
  showPath();
}

/**
 * Reads the open chat's tree again and shows it: after a branch change, or when events alone
 * do not say where a message goes. Resolves once a read begun after the call is shown. A read
 * that a change overtook (an event, or a change this page asked for) is not shown but made
 * again, up to MAX_TREE_READS times in a row; the events carry on meanwhile.
 */
function reloadSoon() {
  const chat = state.chat;
  if (!chat) return Promise.resolve();
  if (chat.reload) {
    chat.reloadAgain = true;
    return chat.reload;
  }
  chat.reload = (async () => {
    try {
      for (let reads = 0; reads < MAX_TREE_READS; reads++) {
        chat.reloadAgain = false;
        const epoch = state.treeEpoch;
        const messages = await readTree(chat.id);
        if (state.chat !== chat) return;
        if (epoch !== state.treeEpoch) continue;
        applyTree(messages);
        if (!chat.reloadAgain) return;
      }
    } catch {
      // Best effort: the events still arrive, and the next change reads again.
    } finally {
      chat.reload = null;
    }
  })();
  return chat.reload;
}

// ---------------------------------------------------------------- the socket

function setConnection(status) {
  const badge = $('#conn');
  badge.dataset.state = status;
  badge.textContent = status;
}

function connect() {
  const chat = state.chat;
  if (!chat || !session.user) return;
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  // No token in the URL (URLs end up in logs and history): the browser sends the session
  // cookie with the upgrade, and from this page's origin, the only one the server lets a
  // cookie open a socket from.
  const url = `${scheme}://${location.host}/ws/ai-chat/${chat.id}/?after_id=${state.lastId}`;
  const socket = new WebSocket(url);
  state.socket = socket;
  setConnection('connecting');
  socket.addEventListener('open', () => {
    if (state.socket !== socket) return;
    state.attempts = 0;
    setConnection('live');
    refreshPending();
  });
  socket.addEventListener('message', (message) => {
    if (state.socket !== socket) return;
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    handleEvent(event);
  });
  socket.addEventListener('close', (close) => {
    if (state.socket !== socket) return;
    state.socket = null;
    setConnection('offline');
    if (close.code === 4401) {
      session.end();
      showAuth('Your session has ended. Please log in again.');
    } else if (close.code === 4404) {
      setMessage(chatError, 'This chat no longer exists.');
    } else {
      reconnectLater(chat.id);
    }
  });
}

function reconnectLater(chatId) {
  const delay = Math.min(MAX_RECONNECT_DELAY_MS, 500 * 2 ** state.attempts) * (0.5 + Math.random() / 2);
  state.attempts += 1;
  setConnection('reconnecting');
  state.reconnectTimer = setTimeout(async () => {
    state.reconnectTimer = null;
    if (!state.chat || state.chat.id !== chatId) return;
    // A refused upgrade looks like any dropped socket: ask REST why (401 logs out).
    try {
      await api('GET', `/api/ai/chats/${chatId}/`);
    } catch (err) {
      if (err.status === 401) return;
      if (err.status === 404) {
        setMessage(chatError, 'This chat no longer exists.');
        return;
      }
    }
    if (state.chat && state.chat.id === chatId && !state.socket) connect();
  }, delay);
}

/**
 * Deltas were lost on the open socket (a numbered one skipped a number). The text comes back
 * the way a reloaded page gets it: a new socket with `after_id`, whose catch-up sends each reply
 * in progress whole (`assistant_partial`, with its `seq`) before any later delta, and the
 * messages stored meanwhile (its `open` re-reads the pending ones too). Simpler than asking for
 * the missing pieces, and right whatever was lost; re-reading the message list instead would
 * give text without a `seq`. At most one renewal every RESYNC_INTERVAL_MS, should a server keep
 * skipping; until then the reply waits (its later pieces are not taken).
 */
function resync() {
  if (state.resyncTimer || !state.socket) return; // renewing, or reconnecting (a catch-up too)
  const wait = Math.max(0, state.resyncedAt + RESYNC_INTERVAL_MS - Date.now());
  state.resyncTimer = setTimeout(() => {
    state.resyncTimer = null;
    const socket = state.socket;
    if (!socket) return;
    state.resyncedAt = Date.now();
    state.socket = null; // its close is ours: not a drop to reconnect after
    socket.close(1000);
    connect();
  }, wait);
}

function closeSocket() {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = null;
  clearTimeout(state.resyncTimer);
  state.resyncTimer = null;
  const socket = state.socket;
  state.socket = null;
  if (socket) socket.close(1000);
  state.attempts = 0;
  setConnection('offline');
}

// ---------------------------------------------------------------- sending

const composer = $('#composer');
const composerHint = $('#composer-hint');

/** Says (politely, to screen readers too) why nothing was sent; '' clears it. */
function setHint(text) {
  composerHint.textContent = text;
  if (text) input.setAttribute('aria-invalid', 'true');
  else input.removeAttribute('aria-invalid');
}

composer.addEventListener('submit', async (event) => {
  event.preventDefault();
  const chat = state.chat;
  const content = input.value.trim();
  if (!chat) return;
  if (!content) {
    setHint(
      input.value
        ? 'Nothing was sent: the message is only spaces or blank lines. Write something first.'
        : 'Nothing was sent: the message is empty. Write something first.',
    );
    input.focus();
    return;
  }
  setHint('');
  setMessage(chatError, '');
  const include_related_chat_context = includeBox.checked && chat.related_chat != null;
  const body = { content, include_related_chat_context, context_message_limit: CONTEXT_MESSAGE_LIMIT };
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(JSON.stringify({ type: 'message', ...body }));
    state.pendingText = content;
    input.value = '';
    return;
  }
  // No live socket: REST stores and queues it the same way; the reply shows on reconnect.
  try {
    const answer = await busy(composer, api('POST', `/api/ai/chats/${chat.id}/send_message/`, body));
    if (state.chat === chat) addUserMessage(answer.message);
    input.value = '';
  } catch (err) {
    if (err.status !== 401) setMessage(chatError, err.message);
  }
});

input.addEventListener('input', () => {
  if (composerHint.textContent) setHint('');
});

input.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    composer.requestSubmit();
  }
});

boot();
