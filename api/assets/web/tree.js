// The open chat's message tree (parent_id, version, active): read whole (`?all=true`), kept up
// to date by events, and shown as its active path, each reply under its question. A message's
// versions are its family: the messages of its role with the same parent.
import { apiPage } from './common.js';
import { updateChatMeta } from './chat.js';
import {
  addAssistantMessage,
  addUserMessage,
  byId,
  dropNode,
  nearBottom,
  pendingReply,
  renderStored,
  scrollToEnd,
  seen,
} from './messages.js';
import { list, state } from './state.js';
import { endedWait, removePendingReply } from './stream.js';
import { decorate } from './versions.js';

/** Reads of the tree in a row that events may overtake before the page waits for the next change. */
const MAX_TREE_READS = 5;

/**
 * Merges what is known of `message` into the tree (an event carries fewer fields than a
 * list); `defaults` fill the fields nothing said yet. The merged message.
 */
export function remember(message, defaults = {}) {
  const known = state.tree.get(message.id);
  const merged = Object.assign(known ?? { ...defaults }, message);
  delete merged.partial; // the socket sends the text so far, numbered: it is shown from there
  if (!known) state.tree.set(message.id, merged);
  state.treeEpoch += 1;
  return merged;
}

/** The tree's record of user message `id`'s status (shown or not). */
export function noteStatus(id, status, error) {
  const message = state.tree.get(id);
  if (!message || message.status === status) return;
  message.status = status;
  message.error = status === 'failed' ? error || message.error || null : null;
  state.treeEpoch += 1;
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
export function activePath() {
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
export const familyKey = (m) => `${m.role}:${(m.role === 'assistant' ? m.reply_to : m.parent_id) ?? ''}`;

/** Every family of the tree (key -> its messages by version) with more than one message. */
export function familiesOf() {
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
 * A reply saved (its event, or a stop's answer): into the tree as the newest version of its
 * question's replies, and the one shown when its question is on the path (`save_reply`).
 */
export function receiveReply(message) {
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

/**
 * A `user_message` event: a message sent (here or elsewhere), queued again (a retry or a
 * regeneration), or made by an edit. A send follows the last question of the path as its
 * first version and shows at once; an edit moves the path, which a read of the tree shows.
 */
export function noteUserMessage(message) {
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

/**
 * Shows the tree's active path: bubbles of messages that left it go, missing ones are made,
 * and all stand in the path's order (a reply still to come under its question, after the
 * reply it will replace). Nodes that stay are moved, not made again: a streaming reply goes on.
 */
export function showPath() {
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

/** Every message of chat `chatId`, every branch, oldest first: all its pages, by their `Link`. */
export async function readTree(chatId) {
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
export function applyTree(messages) {
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
export function reloadSoon() {
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
