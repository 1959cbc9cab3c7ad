// The assistant's replies as Markdown: marked turns the text into HTML, DOMPurify keeps only
// the elements and attributes listed here, and code blocks get a copy button. Both libraries
// are vendored (api/assets/vendor/) and loaded as classic scripts before this module; without
// them a reply is shown as plain text.
//
// No HTML of a message is ever executed or even parsed as markup: marked's `html` tokens (raw
// HTML in the Markdown) are rendered as escaped text, images become links (no request leaves
// the page, and the CSP would refuse other hosts anyway), and DOMPurify then removes anything
// that is not plain formatting, every attribute but a few, and every link that is not
// http(s) or mailto.
import { el } from './common.js';

/** What a rendered reply may contain: the elements marked produces for GFM, nothing more. */
const ALLOWED_TAGS = [
  'a', 'blockquote', 'br', 'code', 'del', 'em', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'hr',
  'input', 'li', 'ol', 'p', 'pre', 'strong', 'table', 'tbody', 'td', 'th', 'thead', 'tr', 'ul',
];
const ALLOWED_ATTR = ['href', 'title', 'align', 'class', 'start', 'type', 'checked', 'disabled'];
/** Links may only leave for the web or a mail client: no `javascript:`, `data:`, relative URL. */
const ALLOWED_URI = /^(?:https?:|mailto:)/i;
/** The only classes kept: marked's `language-xyz` on a fenced code block. */
const CODE_CLASS = /^language-[\w+#.-]{1,40}$/;
const COPIED_FOR_MS = 2000;

const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
/** ` name="value"`, the value escaped. */
const attribute = (name, value) => ` ${name}="${escapeHtml(value)}"`;

function makeParser() {
  const lib = globalThis.marked;
  if (!lib || typeof lib.Marked !== 'function') return null;
  return new lib.Marked({
    gfm: true,
    breaks: true, // a line break in a reply stays one, as in the plain text shown before
    renderer: {
      // Raw HTML in a message is shown as the text it is.
      html({ text, block }) {
        return block ? `<p>${escapeHtml(text.trim())}</p>\n` : escapeHtml(text);
      },
      // An image is a link to it: nothing is fetched from a URL a message names.
      image({ href, title, text }) {
        const titleAttribute = title ? attribute('title', title) : '';
        return `<a${attribute('href', href)}${titleAttribute}>${escapeHtml(text || href)}</a>`;
      },
    },
  });
}

function makePurifier() {
  const create = globalThis.DOMPurify;
  if (typeof create !== 'function') return null;
  const purify = create(window); // an instance of our own: its hooks touch nobody else's
  if (!purify.isSupported) return null;
  purify.addHook('uponSanitizeAttribute', (node, data) => {
    if (data.attrName === 'class' && !(node.nodeName === 'CODE' && CODE_CLASS.test(data.attrValue))) {
      data.keepAttr = false;
    }
  });
  purify.addHook('afterSanitizeAttributes', (node) => {
    if (node.nodeName === 'A' && node.hasAttribute('href')) {
      // Links open beside the chat, which keeps its socket; the new tab gets no opener.
      node.setAttribute('target', '_blank');
      node.setAttribute('rel', 'noopener noreferrer nofollow');
    } else if (node.nodeName === 'A') {
      node.setAttribute('title', 'Link removed: only http, https and mailto links are kept');
    } else if (node.nodeName === 'INPUT') {
      // marked's task-list boxes: shown, never edited.
      node.setAttribute('type', 'checkbox');
      node.setAttribute('disabled', '');
    }
  });
  return purify;
}

const parser = makeParser();
const purifier = makePurifier();
const PURIFY_CONFIG = {
  ALLOWED_TAGS,
  ALLOWED_ATTR,
  ALLOWED_URI_REGEXP: ALLOWED_URI,
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

/** Whether replies are rendered as Markdown (false: the libraries did not load). */
export const markdownEnabled = parser !== null && purifier !== null;

async function copyCode(button, status, code) {
  const text = code.textContent;
  try {
    await navigator.clipboard.writeText(text);
    status.textContent = 'Copied';
  } catch {
    // No clipboard (a page served over plain http, or permission refused): select the code
    // so that the keyboard can copy it.
    const range = document.createRange();
    range.selectNodeContents(code);
    const selection = getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    status.textContent = 'Selected: press Ctrl+C to copy';
  }
  clearTimeout(button.copiedTimer);
  button.copiedTimer = setTimeout(() => (status.textContent = ''), COPIED_FOR_MS);
}

/** A fenced code block with its language (if named) and a copy button above it. */
function decorateCodeBlock(pre) {
  const code = pre.querySelector('code') || pre;
  const language = /^language-(.+)$/.exec(code.className)?.[1];
  const status = el('span', { class: 'code-status', role: 'status' });
  const button = el('button', { type: 'button', class: 'ghost small copy-code', 'aria-label': 'Copy code' }, 'Copy');
  button.addEventListener('click', () => copyCode(button, status, code));
  const block = el(
    'div',
    { class: 'code-block' },
    el('div', { class: 'code-bar' }, el('span', { class: 'code-lang' }, language || 'code'), status, button),
  );
  pre.replaceWith(block);
  block.append(pre);
}

/** Wide tables scroll on their own instead of widening the message. */
function wrapTable(table) {
  const scroller = el('div', { class: 'table-scroll' });
  table.replaceWith(scroller);
  scroller.append(table);
}

/**
 * Shows `text` as Markdown inside `target` (replacing what it held), or as plain text when
 * the libraries are missing.
 */
export function renderMarkdown(target, text) {
  if (!markdownEnabled) {
    target.textContent = text;
    return;
  }
  const html = parser.parse(text).trim();
  const fragment = purifier.sanitize(html, PURIFY_CONFIG);
  fragment.querySelectorAll('pre').forEach(decorateCodeBlock);
  fragment.querySelectorAll('table').forEach(wrapTable);
  target.classList.add('markdown');
  target.replaceChildren(fragment);
}

const pending = new Map(); // target -> { text, then }: the latest text it should show
let scheduled = false;
let notBefore = 0;
/** While a reply streams in, re-rendering may take at most this share of the time. */
const RENDER_SHARE = 0.2;

function renderPending() {
  scheduled = false;
  const started = performance.now();
  const done = [...pending];
  pending.clear();
  for (const [target, { text }] of done) renderMarkdown(target, text);
  const took = performance.now() - started;
  // A long reply costs more to re-render: wait longer before the next time.
  notBefore = performance.now() + took / RENDER_SHARE;
  for (const [, { then }] of done) then?.();
}

/**
 * Shows `text` in `target` soon, then calls `then`: at most once per animation frame, and less
 * often when rendering gets slow, so a reply that grows word by word stays cheap to follow.
 */
export function renderMarkdownSoon(target, text, then) {
  pending.set(target, { text, then });
  if (scheduled) return;
  scheduled = true;
  const wait = notBefore - performance.now();
  if (wait > 0) setTimeout(() => requestAnimationFrame(renderPending), wait);
  else requestAnimationFrame(renderPending);
}

/** Forgets a pending render of `target` (its final text was just rendered). */
export function cancelRender(target) {
  pending.delete(target);
}
