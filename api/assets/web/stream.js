// The reply still to come to a user message: its bubble (with Stop) while it waits and streams,
// the text so far (`assistant_partial`) and the numbered pieces after it (`assistant_delta`),
// and the ends of a wait without a reply (failed, cancelled).
import { $, el } from './common.js';
import { cancelRender, renderMarkdownSoon } from './markdown.js';
import {
  assistantNode,
  byId,
  nearBottom,
  pendingReply,
  placeReply,
  releaseFocus,
  scrollToEnd,
  setStatus,
} from './messages.js';
import { resync } from './socket.js';
import { state } from './state.js';
import { stopReply } from './stop-retry.js';
import { noteStatus } from './tree.js';

/**
 * A streaming reply's `.content` -> `{ text, seq }`: the text received so far (its DOM is the
 * rendered Markdown) and the `seq` of the last delta in it (0: none yet).
 */
export const streamed = new WeakMap();

/** The reply still to come to user message `userId` (empty until its first words), with Stop. */
export function ensurePendingReply(userId) {
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

export function removePendingReply(userId) {
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
export function resumeReply(userId, text, seq) {
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
export function streamDelta(userId, delta, seq) {
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

/** The wait of user message `userId` for its reply ended (`status`), shown or not. */
export function endedWait(userId, status, error) {
  state.ends.set(userId, (state.ends.get(userId) ?? 0) + 1);
  noteStatus(userId, status, error);
}

export function failMessage(userId, error) {
  endedWait(userId, 'failed', error);
  removePendingReply(userId);
  setStatus(byId(userId), 'failed', error);
}

/** Stopped before the model was asked: no reply comes. */
export function cancelMessage(userId) {
  endedWait(userId, 'cancelled');
  removePendingReply(userId);
  setStatus(byId(userId), 'cancelled');
}
