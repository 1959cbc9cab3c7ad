// Versions of a message: the `‹ n/m ›` switcher, Regenerate and Edit, and their requests.
import { $, api, busy, el, setMessage, show } from './common.js';
import { refreshChatsSoon } from './chat-list.js';
import { byId, pendingReply, releaseFocus, setStatus, setWaiting } from './messages.js';
import { PENDING, chatError, list, state } from './state.js';
import { activePath, familiesOf, familyKey, reloadSoon, remember, showPath } from './tree.js';

/**
 * A message's actions as the tree and its question's status have them: the version switcher
 * when it has siblings; Edit, Regenerate and the arrows waiting while its question does; and
 * a saved reply out of sight while a new one to the same question is on its way.
 */
export function decorate(node, families) {
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
export function decorateTurn(userId) {
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
export async function regenerate(userId, button) {
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
export function startEdit(id) {
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
