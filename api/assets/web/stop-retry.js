// Stop and Retry, over REST: ending a reply still to come, and queuing again a user message
// that ended without one.
import { $, api, setMessage } from './common.js';
import { byId, pendingReply, setStatus, setWaiting } from './messages.js';
import { PENDING, RETRYABLE, chatError, state } from './state.js';
import { cancelMessage, streamed } from './stream.js';
import { receiveReply, reloadSoon } from './tree.js';

/**
 * Stops the reply to user message `userId`. The answer is the end itself (the stopped reply, or
 * the message cancelled) or, when the stop is still under way, the events that follow.
 */
export async function stopReply(userId) {
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
export async function retryMessage(userId) {
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
