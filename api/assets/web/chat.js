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
//
// This module wires the page: the session, opening and leaving a chat, and sending. The rest is
// in modules named after what they hold: chat-list.js and chat-options.js (the chats, and
// renaming or deleting the open one), messages.js (the bubbles), stream.js (a reply as it comes),
// stop-retry.js, socket.js (the connection and its events), tree.js (the message tree and its
// active path), versions.js (the switcher, Regenerate and Edit) and state.js (what they share).
import {
  $,
  addDecimals,
  api,
  busy,
  formatCosts,
  formatNumber,
  logOut,
  onUnauthorized,
  resumeSession,
  setMessage,
  setupAuth,
  show,
} from './common.js';
import { listNotice, loadChats, loadUserChats, newChatForm, renderChatList } from './chat-list.js';
import { showChatOptions } from './chat-options.js';
import { addUserMessage, scrollToEnd } from './messages.js';
import { closeSocket, connect } from './socket.js';
import { chatError, input, list, state } from './state.js';
import { applyTree, readTree } from './tree.js';

const CONTEXT_MESSAGE_LIMIT = 20;
const authView = $('#auth-view');
const appView = $('#app-view');
const includeBox = $('#include-context');

// ---------------------------------------------------------------- session

const auth = setupAuth(authView, (user) => enterApp(user));

onUnauthorized(() => showAuth('Your session has ended. Please log in again.'));

$('#logout').addEventListener('click', async () => {
  leaveChat();
  showAuth(await logOut());
});

export function showAuth(notice) {
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

// ---------------------------------------------------------------- one chat

export async function openChat(id) {
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

export function leaveChat() {
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

export const contextKey = (id) => `aichat.context.${id}`;
includeBox.addEventListener('change', () => {
  if (state.chat) localStorage.setItem(contextKey(state.chat.id), includeBox.checked ? 'on' : 'off');
});

export function updateChatMeta() {
  const chat = state.chat;
  if (!chat) return;
  let tokens = 0;
  for (const node of list.querySelectorAll('li.assistant[data-tokens]')) tokens += Number(node.dataset.tokens);
  const costs = {};
  for (const node of list.querySelectorAll('li.assistant[data-cost]')) {
    const { cost, currency } = node.dataset;
    costs[currency] = currency in costs ? addDecimals(costs[currency], cost) : cost;
  }
  const parts = [chat.model];
  if (chat.related_chat_name) parts.push(`linked to “${chat.related_chat_name}”`);
  parts.push(`${formatNumber(tokens)} tokens used`);
  if (Object.keys(costs).length) parts.push(formatCosts(costs));
  $('#chat-meta').textContent = parts.join(' · ');
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
