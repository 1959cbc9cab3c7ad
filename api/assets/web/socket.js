// The open chat's WebSocket: connecting (its catch-up starts after the last message seen),
// reconnecting with backoff, renewing it when deltas were lost (`resync`), and what each event
// does to the page.
import { $, api, session, setMessage } from './common.js';
import { refreshChatsSoon } from './chat-list.js';
import { showAuth } from './chat.js';
import { PENDING, chatError, input, list, state } from './state.js';
import { cancelMessage, failMessage, resumeReply, streamDelta } from './stream.js';
import { noteUserMessage, receiveReply, reloadSoon } from './tree.js';

const MAX_RECONNECT_DELAY_MS = 15000;
/** Least time between two socket renewals for lost deltas (`resync`). */
const RESYNC_INTERVAL_MS = 5000;

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

function setConnection(status) {
  const badge = $('#conn');
  badge.dataset.state = status;
  badge.textContent = status;
}

export function connect() {
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
export function resync() {
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

export function closeSocket() {
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
