// The open chat's options panel: renaming the chat and deleting it.
import { $, api, busy, setMessage, show } from './common.js';
import { listNotice, loadChats, renderChatList, toggleButton } from './chat-list.js';
import { contextKey, leaveChat, updateChatMeta } from './chat.js';
import { state } from './state.js';

const optionsToggle = $('#chat-options-toggle');
const optionsPanel = $('#chat-options');
const renameForm = $('#rename-form');
const deleteConfirm = $('#delete-confirm');
const optionsError = $('.form-error', optionsPanel);

export function showChatOptions(visible) {
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
