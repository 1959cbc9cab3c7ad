// The conversation's bubbles: a user message with its status and its buttons (Edit, Retry,
// Regenerate), a saved reply (Markdown, usage, stopped), each reply placed under its question,
// and the scrolling and focus rules they share.
import { $, el, formatTime, formatUsage, show } from './common.js';
import { cancelRender, renderMarkdown } from './markdown.js';
import { updateChatMeta } from './chat.js';
import { PENDING, RETRYABLE, input, list, state } from './state.js';
import { retryMessage } from './stop-retry.js';
import { ensurePendingReply, removePendingReply, streamed } from './stream.js';
import { noteStatus, remember } from './tree.js';
import { decorateTurn, regenerate, startEdit } from './versions.js';

const STATUS_TEXT = { answered: '', answering: 'answering…' };

export const byId = (id) => list.querySelector(`li[data-id="${Number(id)}"]`);
export const pendingReply = (userId) =>
  list.querySelector(`li.assistant[data-reply-to="${Number(userId)}"]:not([data-id])`);

export function seen(id) {
  if (id > state.lastId) state.lastId = id;
}

export function nearBottom() {
  return list.scrollHeight - list.scrollTop - list.clientHeight < 120;
}

export function scrollToEnd(force) {
  if (force || nearBottom()) list.scrollTop = list.scrollHeight;
}

/** A message of the tree on the path: added when not shown yet, its status brought up to date. */
export function renderStored(message) {
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
export function assistantNode(replyTo) {
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
export function setStatus(node, status, error) {
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

/** A user message, from a list, a send's answer or a `user_message` event (which has no status). */
export function addUserMessage(message) {
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
export function placeReply(node, userId) {
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

function usageOf(message) {
  return (
    message.usage || {
      prompt_tokens: message.prompt_tokens,
      completion_tokens: message.completion_tokens,
      total_tokens: message.total_tokens,
      cost: message.cost,
      currency: message.currency,
    }
  );
}

/**
 * A saved reply: replaces the streamed text (`live`: it was just saved), or is added when
 * nothing streamed (an older version read from the tree keeps a bubble of its own, beside a
 * new one that may be streaming).
 */
export function addAssistantMessage(message, live = true) {
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
  if (usage.cost != null && usage.currency != null) {
    node.dataset.cost = usage.cost;
    node.dataset.currency = usage.currency;
  }
  if (live && replyTo != null) setStatus(byId(replyTo), 'answered');
  updateChatMeta();
  scrollToEnd(stick);
}

/**
 * Before a focused button disappears, the focus moves to the message field (on a wide screen;
 * on a phone that would open the keyboard), so keyboard users are not sent back to the top.
 */
export function releaseFocus(button) {
  if (!button || button !== document.activeElement) return;
  if (window.matchMedia('(min-width: 760px)').matches) input.focus({ preventScroll: true });
  else button.blur();
}

/** `aria-disabled` rather than `disabled`: a disabled button would drop the keyboard focus. */
export function setWaiting(button, waiting) {
  if (!button) return;
  if (waiting) button.setAttribute('aria-disabled', 'true');
  else button.removeAttribute('aria-disabled');
}

/** Removes a message's bubble, the focus going to the message field if it was inside. */
export function dropNode(node) {
  releaseFocus(node.contains(document.activeElement) ? document.activeElement : null);
  const content = $('.content', node);
  if (content) cancelRender(content);
  node.remove();
}
