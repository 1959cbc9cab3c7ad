// What the chat page's modules share: the state of the page (the chats, the open chat, its
// socket and its message tree), the statuses a user message can wait or end in, and the page
// elements they all write to.
import { $ } from './common.js';

/** User message statuses whose reply is still to come (it can be stopped). */
export const PENDING = new Set(['queued', 'answering']);
/** User message statuses that ended without a reply (they can be retried). */
export const RETRYABLE = new Set(['failed', 'cancelled']);

export const state = {
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

export const list = $('#messages');
export const input = $('#message-input');
export const chatError = $('#chat-error');
