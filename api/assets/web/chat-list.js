// The chats beside the conversation: the AI chats (listed again as their messages change), and
// the new-chat form with the user-to-user chats and models it offers; that form can also create
// a user-to-user chat.
import { $, api, busy, el, formatTime, setMessage, show } from './common.js';
import { openChat } from './chat.js';
import { state } from './state.js';

export const newChatForm = $('#new-chat-form');
const relatedSelect = $('#related-chat-select');
const modelSelect = $('#model-select');
export const listNotice = $('#chat-list-notice');

// ---------------------------------------------------------------- chat list

export async function loadChats() {
  try {
    state.chats = await api('GET', '/api/ai/chats/');
    renderChatList();
  } catch (err) {
    setMessage($('.form-error', newChatForm), err.status === 401 ? '' : err.message);
  }
}

let refreshTimer = null;
export function refreshChatsSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(loadChats, 300);
}

export function renderChatList() {
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

export async function loadUserChats(selectId) {
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

export const toggleButton = $('#new-chat-toggle');
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
