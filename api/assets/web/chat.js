// The chat page: log in or register, list, create, rename and delete AI chats, and talk to the
// model over the chat's WebSocket (`user_message`, `assistant_partial`, `assistant_delta`,
// `assistant_message`, `message_cancelled`, `error`). A reply in progress shows whole as soon as
// the socket (re)opens, and goes on from there. A reply still to come can be stopped, and a
// failed or cancelled message retried, over REST. The assistant's replies are shown as Markdown
// (markdown.js); the user's own messages as the plain text they typed.
import {
  $,
  api,
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
  try {
    chat = await api('GET', `/api/ai/chats/${id}/`);
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
  for (const message of chat.messages) renderStored(message);
  updateChatMeta();
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

function renderStored(message) {
  if (message.role === 'assistant') addAssistantMessage(message);
  else if (message.role === 'user') addUserMessage(message);
  else {
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
      { class: 'msg-actions', hidden: true },
      el(
        'button',
        {
          type: 'button',
          class: 'small retry',
          title: 'Send this message to the assistant again',
          onclick: () => retryMessage(message.id),
        },
        'Retry',
      ),
    ),
  );
}

function assistantNode(replyTo) {
  return el(
    'li',
    { class: 'msg assistant', dataset: replyTo != null ? { replyTo } : {} },
    el('div', { class: 'bubble' }, el('div', { class: 'content' })),
    el('div', { class: 'meta' }, el('time'), el('span', { class: 'usage' })),
  );
}

/**
 * Shows a user message's status: its error when failed, Retry when failed or cancelled, and
 * the reply to come (with its Stop button) while queued or answering.
 */
function setStatus(node, status, error) {
  if (!node) return;
  const id = Number(node.dataset.id);
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
  if (!retryable) releaseFocus($('.retry', actions));
  show(actions, retryable);
  if (PENDING.has(status)) ensurePendingReply(id);
  else if (retryable) removePendingReply(id);
  scrollToEnd(stick);
}

/** A user message, from the REST detail or a `user_message` event (which has no status). */
function addUserMessage(message) {
  seen(message.id);
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
    if (!(current === 'answered' && PENDING.has(message.status))) setStatus(node, message.status, message.error);
  } else if (!current || RETRYABLE.has(current)) {
    // An event about a message that had ended without a reply: it was retried (here or
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

/** A saved reply: replaces the streamed text, or is added when nothing streamed. */
function addAssistantMessage(message) {
  seen(message.id);
  if (byId(message.id)) return;
  const stick = nearBottom();
  const replyTo = message.reply_to ?? null;
  let node = replyTo != null ? pendingReply(replyTo) : null;
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
  if (replyTo != null) setStatus(byId(replyTo), 'answered');
  updateChatMeta();
  scrollToEnd(stick);
}

function failMessage(userId, error) {
  removePendingReply(userId);
  setStatus(byId(userId), 'failed', error);
}

/** Stopped before the model was asked: no reply comes. */
function cancelMessage(userId) {
  removePendingReply(userId);
  setStatus(byId(userId), 'cancelled');
}

function handleEvent(event) {
  switch (event.type) {
    case 'user_message':
      addUserMessage(event.message);
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
      addAssistantMessage(event.message);
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
      if (state.chat) showMessagesAfter(state.chat.id, event.next_after_id);
      break;
    default:
      break; // unknown events are for newer pages
  }
}

/**
 * After the socket opens, statuses of messages still pending here may have changed while
 * no socket listened: read them once (later changes arrive as events).
 */
async function refreshPending(chatId) {
  const pending = [...list.querySelectorAll('li.user[data-status]')]
    .filter((n) => PENDING.has(n.dataset.status))
    .map((n) => Number(n.dataset.id));
  if (pending.length === 0) return;
  await showMessagesAfter(chatId, Math.min(...pending) - 1);
}

/** Messages a page of `GET .../messages/` holds by default: a shorter page is the last. */
const MESSAGES_PAGE = 1000;

/**
 * Reads the chat's stored messages after `after` over REST, page by page, and shows them
 * (after a socket's catch-up stopped at its limit, or to refresh pending ones). The `partial`
 * of a message being answered is left out: it has no `seq` to line the next deltas up with,
 * and the socket, which this read follows, sends the same text as `assistant_partial` with one.
 */
async function showMessagesAfter(chatId, after) {
  try {
    for (;;) {
      const messages = await api('GET', `/api/ai/chats/${chatId}/messages/?after_id=${after}`);
      if (!state.chat || state.chat.id !== chatId) return;
      for (const message of messages) {
        if (message.role === 'user') addUserMessage(message);
        else if (message.role === 'assistant') addAssistantMessage(message);
      }
      if (messages.length < MESSAGES_PAGE) return;
      after = messages[messages.length - 1].id;
    }
  } catch {
    // Best effort: the events still arrive.
  }
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
    if (answer?.reply) addAssistantMessage(answer.reply);
    else if (answer?.message?.status === 'cancelled') cancelMessage(userId);
    else if (answer?.message && !PENDING.has(answer.message.status)) await showMessagesAfter(chat.id, userId - 1);
    // Otherwise (202) the stop is under way: `assistant_message` or `message_cancelled` follows.
  } catch (err) {
    if (state.chat !== chat || err.status === 401) return;
    if (err.status === 409 || err.status === 404) {
      // It ended meanwhile (answered or failed): nothing to stop, show what it became.
      await showMessagesAfter(chat.id, userId - 1);
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
      await showMessagesAfter(chat.id, userId - 1);
      if (state.chat === chat && RETRYABLE.has(byId(userId)?.dataset.status)) setMessage(chatError, err.message);
    } else {
      setMessage(chatError, err.message);
    }
  } finally {
    setWaiting(button, false);
  }
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
    refreshPending(chat.id);
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
