// The chatd web app served at `/`. Plain DOM, no framework; all protocol
// work (ordering, resume, retries) is in chatd-client.js.

import { ChangeKind, ChatdClient, ChatdError, ErrorCode, MemberChange, Role, RoomKind, applyChange, newClientMsgId } from './chatd-client.js';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'chatd.token';
const DEV_USER_KEY = 'chatd.devUser'; // set when signed in through the dev login
const EXPIRED_NOTICE = 'Your session expired — sign in again';
const ROOM_KEY = 'chatd.room';
const PAGE = 50; // messages per history page
const TYPING_REFRESH_MS = 3000; // resend "typing" while the user keeps typing
const TYPING_IDLE_MS = 5000; // stop "typing" after this long without a keystroke
const TYPING_EXPIRE_MS = 7000; // forget someone's "typing" not refreshed this long
const GROUP_MS = 5 * 60 * 1000; // consecutive messages of one sender within this are grouped
const MEMBER_PAGE = 100; // members per ListMembers page
const DIR_PAGE = 50; // rooms per directory page
const DIR_SEARCH_DELAY_MS = 200; // the directory searches once typing pauses
const REACTION_KEYS = ['👍', '❤️', '😂', '🎉', '😮', '😢']; // offered by "add reaction"
const MAX_MENTIONS = 50; // user ids one Publish may mention
const MENTION_CHOICES = 8; // names the @ autocomplete offers at once
const QUOTE_CHARS = 80; // of a replied-to message, in the reply bar and quotes
const NOTIFY_CHARS = 140; // of a message, in a desktop notification
const BADGE_CAP = 9999; // the server caps unread counts here
const FILL_PAGES = 5; // history pages fetched at most to fill a screen with messages (not changes)
const MAX_ORPHANS = 500; // change entries kept for targets not loaded yet, per room
/** `@name` in a message: at the start or after a character that cannot be part of a name. */
const MENTION_RE = /(^|[^A-Za-z0-9_.@-])@([A-Za-z0-9_.-]{1,62})/g;
// Phone widths, where the sidebar is a panel over the messages (the breakpoint in style.css).
const narrow = matchMedia('(max-width: 720px)');

/** @type {ChatdClient | null} */
let client = null;
let me = '';
/** @type {Map<string, Room>} */
const rooms = new Map();
let active = null; // name of the room on screen
let connState = 'idle';
let retryAt = 0;
/** Pending invitations, by room. @type {Map<string, import('./chatd-client.js').Invitation>} */
const invites = new Map();
/** Rooms dropped at the last (re)connect because Welcome no longer lists them: a `left` push may say why. */
/** @type {Map<string, Room>} */
let droppedAtConnect = new Map();
let droppedActive = null; // the one of them that was on screen
let membersOpen = false; // the member panel is shown (for whichever room is on screen)
let dirty = { sidebar: false, header: false, messages: false, typing: false, members: false };
let renderQueued = false;
let scrollMode = null; // null | 'bottom' | {height, top} (keep position when prepending)

/**
 * @typedef {object} Room
 * @property {string} name
 * @property {number} head       newest seq known
 * @property {number} read       my read marker (optimistic)
 * @property {number} acked      my read marker as the server confirmed it
 * @property {boolean} marking   a MarkRead is in flight
 * @property {Map<number, any>} msgs  seq -> message
 * @property {number[]} seqs     sorted seqs of msgs
 * @property {boolean} loaded    the newest page was fetched
 * @property {boolean} hasOlder  older messages exist on the server
 * @property {boolean} loading
 * @property {Set<string>} online
 * @property {Map<string, number>} typing   user -> expiry (ms)
 * @property {Map<string, number>} receipts user -> read seq (others)
 * @property {Map<string, any>} pending     clientMsgId -> {text, failed, ts}
 * @property {Map<number, HTMLElement>} nodes seq -> element
 * @property {number} dividerAt  "new messages" line after this seq (-1: none)
 * @property {import('./chatd-client.js').RoomInfo | null} info  title, topic, kind, my role
 * @property {Map<string, {role: string, online: boolean}>} members  as far as listed
 * @property {boolean} membersLoaded  the first member page arrived
 * @property {boolean} membersMore    more members after `membersAfter`
 * @property {string} membersAfter    the last user of the last page
 * @property {boolean} membersLoading
 * @property {boolean} membersStale   the membership changed while a page was on its way
 * @property {boolean} membersFailed  listing failed: not asked again until the panel is reopened
 * @property {{reason: string, by: string} | null} gone  removed or banned: the room receives nothing more
 * @property {number} unreadSeeded   unread messages up to `countedThrough`, as the server counted them
 * @property {number} mentionsSeeded of those, the ones that mention me
 * @property {number} countedThrough the head the server's counts are for (Welcome, Joined)
 * @property {Map<number, boolean>} liveUnread  unread messages counted since: seq -> mentions me
 * @property {number} oldest     the lowest seq fetched (messages and change entries): where older pages start
 * @property {Map<number, any[]>} orphans  change entries whose target is not loaded: target seq -> entries
 * @property {Set<string>} memberNames  who is in the room (for @ mentions), as far as listed
 * @property {boolean} memberNamesLoaded  a member list arrived since the last join
 * @property {boolean} memberNamesLoading
 * @property {number} replyTo    the message the composer answers (0: none)
 * @property {number} editing    the message being edited (0: none)
 * @property {string} editDraft  the editor's text
 * @property {boolean} editFocus the editor is to be focused once rendered
 * @property {number} picker     the message whose reaction picker is open (0: none)
 */

function newRoom(name) {
  return {
    name,
    head: 0,
    read: 0,
    acked: 0,
    marking: false,
    msgs: new Map(),
    seqs: [],
    loaded: false,
    hasOlder: false,
    loading: false,
    online: new Set(),
    typing: new Map(),
    receipts: new Map(),
    pending: new Map(),
    nodes: new Map(),
    dividerAt: -1,
    info: null,
    members: new Map(),
    membersLoaded: false,
    membersMore: false,
    membersAfter: '',
    membersLoading: false,
    membersStale: false,
    membersFailed: false,
    gone: null,
    unreadSeeded: 0,
    mentionsSeeded: 0,
    countedThrough: 0,
    liveUnread: new Map(),
    oldest: 0,
    orphans: new Map(),
    memberNames: new Set(),
    memberNamesLoaded: false,
    memberNamesLoading: false,
    replyTo: 0,
    editing: 0,
    editDraft: '',
    editFocus: false,
    picker: 0,
  };
}

function room(name) {
  let r = rooms.get(name);
  if (!r) {
    r = newRoom(name);
    rooms.set(name, r);
    invalidate('sidebar');
  }
  return r;
}

/** A message for a room we did not list (joined in another tab): get its state. */
function discover(name) {
  if (rooms.has(name)) return;
  room(name);
  if (client) client.join(name).then(applyJoined, () => {});
}

// ---------------------------------------------------------------------------
// Helpers

const isDm = (name) => name.startsWith('dm:');
const dmPeer = (name) => {
  const [, a, b] = name.split(':');
  return a === me ? b : a;
};
const displayName = (name) => (isDm(name) ? dmPeer(name) : `#${name}`);
/**
 * A notice: a message the application's backend posted as the system, whose
 * sender is "" (proto/README.md). Shown as a notice, never as any user's.
 */
const isNotice = (m) => m.sender === '';
/** Whether `m` is mine: a notice never is, whoever is signed in. */
const isMine = (m) => !isNotice(m) && m.sender === me;
/** Unread messages (never change entries, never mine), as the server counted them plus those since. */
const unread = (r) => r.unreadSeeded + r.liveUnread.size;
/** Of those, the ones that mention me. */
const mentionCount = (r) => r.mentionsSeeded + [...r.liveUnread.values()].filter(Boolean).length;
const badgeText = (n) => (n >= BADGE_CAP ? `${BADGE_CAP}+` : String(n));
/** Whether the user sees `name` now: on screen, in a visible page. */
const watching = (name) => name === active && document.visibilityState === 'visible';
/** The first `n` characters of `text` on one line, with … when cut. */
function excerpt(text, n) {
  const one = text.replace(/\s+/g, ' ').trim();
  const chars = [...one];
  return chars.length > n ? `${chars.slice(0, n).join('').trimEnd()}…` : one;
}

// Roles, as the server ranks them: nobody may remove or ban anyone of equal
// or higher role (proto/README.md §8); the server has the last word.
const RANK = { [Role.UNSPECIFIED]: 0, [Role.MEMBER]: 1, [Role.ADMIN]: 2, [Role.OWNER]: 3 };
const ROLE_LABEL = { [Role.OWNER]: 'Owner', [Role.ADMIN]: 'Admin', [Role.MEMBER]: 'Member' };
const KIND_LABEL = { [RoomKind.PUBLIC]: 'Public', [RoomKind.PRIVATE]: 'Private', [RoomKind.DIRECT]: 'Direct' };
const rank = (role) => RANK[role] || 0;
const myRole = (r) => (r && r.info ? r.info.myRole : Role.UNSPECIFIED);
const isDirect = (r) => isDm(r.name) || (r.info && r.info.kind === RoomKind.DIRECT);
const isPrivate = (r) => !!r.info && r.info.kind === RoomKind.PRIVATE;
/** Admins and the owner manage a room (never a direct one). */
const canManage = (r) => !!r && !r.gone && !isDirect(r) && rank(myRole(r)) >= RANK[Role.ADMIN];
/** Admins invite; in a public room any member does. */
const canInvite = (r) => !!r && !r.gone && !isDirect(r) && (canManage(r) || (rank(myRole(r)) >= RANK[Role.MEMBER] && !isPrivate(r)));
/** Whether I may remove or ban `user` (of role `role`). */
const canModerate = (r, user, role) => canManage(r) && user !== me && rank(role) < rank(myRole(r));
const canSetRoles = (r) => canManage(r) && myRole(r) === Role.OWNER;
/** Only the sender edits (never a deleted message or a notice). */
const canEdit = (r, m) => !!r && !r.gone && isMine(m) && !m.deleted;
/** The sender deletes; so does an admin or the owner, any message. */
const canDelete = (r, m) => !!r && !r.gone && !m.deleted && (isMine(m) || rank(myRole(r)) >= RANK[Role.ADMIN]);

/** "You were removed from #room by ann" */
function goneText(name, g) {
  const what = g.reason === MemberChange.BANNED ? 'banned from' : 'removed from';
  return `You were ${what} ${displayName(name)}${g.by ? ` by ${g.by}` : ''}`;
}

const HUES = [4, 24, 45, 140, 170, 200, 225, 255, 285, 320];
function hue(s) {
  let h = 2166136261;
  for (const c of s) h = Math.imul(h ^ c.codePointAt(0), 16777619) >>> 0;
  return HUES[h % HUES.length];
}

function avatar(user, cls = 'avatar') {
  const el = document.createElement('span');
  el.className = cls;
  el.style.setProperty('--hue', String(hue(user)));
  el.textContent = (user[0] || '?').toUpperCase();
  el.setAttribute('aria-hidden', 'true');
  return el;
}

/** A padlock (SVG: no emoji font is needed). */
function lockIcon() {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('class', 'icon');
  svg.setAttribute('aria-hidden', 'true');
  const body = document.createElementNS(ns, 'rect');
  for (const [k, v] of Object.entries({ x: 5, y: 11, width: 14, height: 10, rx: 2 })) body.setAttribute(k, String(v));
  const shackle = document.createElementNS(ns, 'path');
  shackle.setAttribute('d', 'M8 11V8a4 4 0 0 1 8 0v3');
  svg.append(body, shackle);
  return svg;
}

function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('data-') || k === 'title' || k === 'datetime' || k === 'role' || k.startsWith('aria-')) {
      el.setAttribute(k, String(v));
    } else el[k] = v;
  }
  for (const c of children) if (c) el.append(c);
  return el;
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'medium' });
const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: 'long', month: 'long', day: 'numeric' });

function dayLabel(ts) {
  const d = new Date(ts);
  const today = new Date();
  const yesterday = new Date(Date.now() - 86400000);
  if (d.toDateString() === today.toDateString()) return 'Today';
  if (d.toDateString() === yesterday.toDateString()) return 'Yesterday';
  return dayFmt.format(d);
}

function toast(text, kind = 'error') {
  const el = h('div', { class: `toast ${kind}`, role: 'alert', text });
  $('toasts').append(el);
  setTimeout(() => el.classList.add('fade'), 4500);
  setTimeout(() => el.remove(), 5000);
}

function errorText(e) {
  if (e instanceof ChatdError) {
    const friendly = {
      [ErrorCode.FORBIDDEN]: 'Not allowed',
      [ErrorCode.BAD_REQUEST]: 'Invalid request',
      [ErrorCode.RATE_LIMITED]: 'Slow down — too many messages',
      [ErrorCode.UNAUTHENTICATED]: 'Sign-in failed',
      [ErrorCode.SERVER_BUSY]: 'Server busy',
      [ErrorCode.NOT_FOUND]: 'Not found',
      [ErrorCode.ALREADY_EXISTS]: 'Already exists',
      [ErrorCode.CONFLICT]: 'Not possible now',
    }[e.code];
    return friendly ? `${friendly}: ${e.serverMessage}` : e.message;
  }
  return String(e && e.message ? e.message : e);
}

// ---------------------------------------------------------------------------
// Message store

/**
 * Adds a log entry of `m.room`: a message, or a change entry, which is
 * applied to its target and never shown as a line of its own. `live`: it
 * came as a push (live or resumed), not in a History page, so it may count
 * as unread and raise a notification.
 */
function addMessage(m, live = false) {
  const r = room(m.room);
  r.head = Math.max(r.head, m.seq);
  if (m.change) {
    applyEntry(r, m);
    return false;
  }
  const had = r.msgs.get(m.seq);
  if (had) {
    // A later History page folds in changes this copy may not have.
    if (m.foldedSeq > (had.foldedSeq || 0)) {
      Object.assign(had, { text: m.text, data: m.data, editedMs: m.editedMs, deleted: m.deleted, reactions: m.reactions, foldedSeq: m.foldedSeq });
      if (m.room === active) invalidate('messages');
    }
    return false;
  }
  r.msgs.set(m.seq, m);
  // Changes that came before their target (a page still on its way).
  const waiting = r.orphans.get(m.seq);
  if (waiting) {
    r.orphans.delete(m.seq);
    for (const e of waiting) applyChange(m, e, me);
  }
  if (live) onLiveMessage(r, m);
  const s = r.seqs;
  if (!s.length || m.seq > s[s.length - 1]) s.push(m.seq);
  else {
    let lo = 0;
    let hi = s.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (s[mid] < m.seq) lo = mid + 1;
      else hi = mid;
    }
    s.splice(lo, 0, m.seq);
  }
  if (m.clientMsgId && isMine(m)) r.pending.delete(m.clientMsgId);
  if (m.room === active) invalidate('messages');
  invalidate('sidebar');
  return true;
}

/** A change entry: applied to its target, or kept until the target is loaded. */
function applyEntry(r, e) {
  const seq = e.change.targetSeq;
  const target = r.msgs.get(seq);
  if (!target) {
    const list = r.orphans.get(seq) || [];
    list.push(e);
    r.orphans.set(seq, list);
    if (r.orphans.size > MAX_ORPHANS) r.orphans.delete(r.orphans.keys().next().value);
    uncountDeleted(r, e, null);
    return;
  }
  const wasDeleted = target.deleted;
  if (!applyChange(target, e, me)) return;
  if (e.change.kind === ChangeKind.DELETE && !wasDeleted) {
    uncountDeleted(r, e, target);
    if (r.editing === seq) r.editing = 0;
    if (r.picker === seq) r.picker = 0;
    if (r.replyTo === seq) r.replyTo = 0;
    invalidate('header');
  }
  if (r.name === active) invalidate('messages');
}

/** A deleted message no longer counts as unread, when it was counted. */
function uncountDeleted(r, e, target) {
  if (e.change.kind !== ChangeKind.DELETE) return;
  const seq = e.change.targetSeq;
  if (r.liveUnread.delete(seq)) {
    invalidate('sidebar');
    return;
  }
  // Counted by the server (after my read marker, up to the head it counted
  // for, someone else's): one less.
  if (target && r.unreadSeeded > 0 && seq > r.read && seq <= r.countedThrough && !isMine(target)) {
    r.unreadSeeded -= 1;
    if (r.mentionsSeeded > 0 && target.mentions.includes(me)) r.mentionsSeeded -= 1;
    invalidate('sidebar');
  }
}

/**
 * A message pushed by the server (live, or resumed after the head the
 * server last counted for): unread while the room is not in sight, and
 * maybe a desktop notification.
 */
function onLiveMessage(r, m) {
  if (isMine(m) || m.deleted || m.seq <= r.countedThrough) return;
  const mentionsMe = m.mentions.includes(me);
  if (!watching(r.name)) {
    r.liveUnread.set(m.seq, mentionsMe);
    invalidate('sidebar');
  }
  if (!isNotice(m) && (mentionsMe || isDirect(r))) notify(r, m);
}

/** The server's counts for a room (Welcome, Joined): what came before is in them. */
function seedCounts(r, st) {
  r.unreadSeeded = st.unread || 0;
  r.mentionsSeeded = st.mentions || 0;
  r.countedThrough = Math.max(r.countedThrough, st.headSeq);
  r.liveUnread.clear();
  invalidate('sidebar');
}

/** The room was read (opened, or read on another device): no badges. */
function clearCounts(r) {
  if (!r.unreadSeeded && !r.mentionsSeeded && !r.liveUnread.size) return;
  r.unreadSeeded = 0;
  r.mentionsSeeded = 0;
  r.liveUnread.clear();
  invalidate('sidebar');
}

// ---------------------------------------------------------------------------
// Desktop notifications: a mention, or any message in a direct room, from
// someone else while the page is hidden, once the user allowed them.

const notifySupported = () => typeof window.Notification === 'function';

function notify(r, m) {
  if (!notifySupported() || Notification.permission !== 'granted' || !document.hidden) return;
  const title = isDm(r.name) ? `${m.sender} (direct message)` : `${m.sender} in #${r.name}`;
  try {
    const n = new Notification(title, { body: excerpt(messageText(m), NOTIFY_CHARS), tag: `${r.name}#${m.seq}` });
    n.onclick = () => {
      window.focus();
      n.close();
      if (!rooms.has(r.name)) return;
      setNav(false);
      selectRoom(r.name).then(() => jumpTo(r.name, m.seq));
    };
  } catch {
    /* not allowed here (e.g. only from a service worker): nothing to show */
  }
}

function renderNotifyButton() {
  $('notify-btn').hidden = !(notifySupported() && Notification.permission === 'default') || !me;
}

async function enableNotifications() {
  if (!notifySupported()) return;
  try {
    const answer = await Notification.requestPermission();
    if (answer === 'denied') toast('Notifications are blocked for this site: the browser\'s site settings can allow them.', 'info');
  } catch {
    /* an old browser without the promise form */
  }
  renderNotifyButton();
}

// ---------------------------------------------------------------------------
// Rendering (coalesced: many events, one render)

function invalidate(...parts) {
  for (const p of parts) dirty[p] = true;
  if (!renderQueued) {
    renderQueued = true;
    queueMicrotask(render);
  }
}

function render() {
  renderQueued = false;
  const d = dirty;
  dirty = { sidebar: false, header: false, messages: false, typing: false, members: false };
  if (d.sidebar) renderSidebar();
  if (d.header) renderHeader();
  if (d.messages) renderMessages();
  if (d.header || d.messages) renderReplyBar();
  if (d.typing) renderTyping();
  if (d.members || d.header) renderMembers();
  if (d.sidebar || d.messages) maybeMarkRead();
}

function renderSidebar() {
  const names = [...rooms.keys()].sort();
  const item = (name) => {
    const r = rooms.get(name);
    const n = name === active ? 0 : unread(r);
    const at = name === active ? 0 : mentionCount(r);
    const label = displayName(name);
    const icon = isDm(name)
      ? avatar(dmPeer(name), 'avatar small')
      : isPrivate(r)
        ? h('span', { class: 'hash lock', title: 'Private room', 'data-kind': 'private' }, lockIcon())
        : h('span', { class: 'hash', text: '#' });
    if (isDm(name) && connState === 'connected' && r.online.has(dmPeer(name))) icon.classList.add('is-online');
    const btn = h(
      'button',
      { class: 'room-btn', type: 'button', title: r.gone ? goneText(name, r.gone) : r.info && r.info.title ? `${name} — ${r.info.title}` : name },
      icon,
      h('span', { class: 'room-name', text: isDm(name) ? label : name }),
      at > 0 ? h('span', { class: 'mention-badge', 'data-mentions': at, title: `${at} mention${at === 1 ? '' : 's'} of you`, text: `@${badgeText(at)}` }) : null,
      n > 0 ? h('span', { class: 'badge', 'data-unread': n, title: `${n} unread`, text: badgeText(n) }) : null,
    );
    btn.addEventListener('click', () => {
      setNav(false, { refocus: true });
      selectRoom(name);
    });
    return h(
      'li',
      {
        class: `room-item${name === active ? ' active' : ''}${n > 0 ? ' unread' : ''}${at > 0 ? ' mentioned' : ''}${r.gone ? ' gone' : ''}`,
        'data-room': name,
        'data-head': r.head,
        'data-read': r.acked || 0, // read marker as confirmed by the server
      },
      btn,
    );
  };
  $('room-list').replaceChildren(...names.filter((n) => !isDm(n)).map(item));
  $('dm-list').replaceChildren(...names.filter(isDm).map(item));
  renderInvites();
  const total = [...rooms.values()].reduce((a, r) => a + (r.name === active || r.gone ? 0 : unread(r)), 0);
  document.title = total ? `(${total}) chatd` : 'chatd';
  // The menu button also counts invitations: on a phone they wait in the closed panel.
  const waiting = total + invites.size;
  const menuBadge = $('menu-unread');
  menuBadge.hidden = !waiting;
  menuBadge.textContent = badgeText(waiting);
  const mentioned = [...rooms.values()].some((r) => r.name !== active && !r.gone && mentionCount(r) > 0);
  menuBadge.classList.toggle('has-mentions', mentioned);
}

function renderInvites() {
  const list = [...invites.values()].sort((a, b) => a.room.localeCompare(b.room));
  $('invites-section').hidden = !list.length;
  $('invite-list').replaceChildren(
    ...list.map((inv) => {
      const info = inv.info;
      const accept = h('button', { class: 'invite-accept', type: 'button', text: 'Accept', 'aria-label': `Accept the invitation to ${inv.room}` });
      const decline = h('button', { class: 'invite-decline', type: 'button', text: 'Decline', 'aria-label': `Decline the invitation to ${inv.room}` });
      accept.addEventListener('click', () => acceptInvite(inv.room));
      decline.addEventListener('click', () => declineInvite(inv.room));
      return h(
        'li',
        { class: 'invite', 'data-room': inv.room },
        h(
          'div',
          { class: 'invite-text' },
          h('span', { class: 'invite-room', text: info && info.title ? info.title : `#${inv.room}`, title: inv.room }),
          h('span', { class: 'invite-by', text: inv.by ? `from ${inv.by}` : 'invitation' }),
        ),
        h('div', { class: 'invite-buttons' }, accept, decline),
      );
    }),
  );
}

function renderHeader() {
  const r = active ? rooms.get(active) : null;
  $('room-title').textContent = r ? displayName(r.name) : 'chatd';
  const info = r && !isDm(r.name) ? r.info : null;
  const kind = $('room-kind');
  kind.hidden = !(info && info.kind === RoomKind.PRIVATE);
  kind.textContent = kind.hidden ? '' : 'Private';
  const title = $('room-display-title');
  title.hidden = !(info && info.title);
  title.textContent = info ? info.title : '';
  const topic = $('room-topic');
  topic.hidden = !(info && info.topic);
  topic.textContent = info ? info.topic : '';
  topic.title = info ? info.topic : '';
  $('leave-btn').hidden = !r || !!r.gone;
  $('members-btn').hidden = !r || !!r.gone;
  $('settings-btn').hidden = !r || !!r.gone || isDirect(r);
  if (r) {
    const count = r.info ? r.info.memberCount : r.members.size;
    $('member-count').textContent = String(count || '');
    $('members-btn').setAttribute('aria-label', `Members${count ? ` (${count})` : ''}`);
    $('members-btn').title = 'Members';
  }
  $('empty').hidden = !!r;
  $('messages').hidden = !r;
  $('composer').hidden = !r || !!r.gone;
  $('gone').hidden = !r || !r.gone;
  $('gone-text').textContent = r && r.gone ? `${goneText(r.name, r.gone)}.` : '';
  $('composer-input').placeholder = r ? `Message ${displayName(r.name)}` : 'Message';
  const online = $('online');
  if (!r || r.gone) {
    online.replaceChildren();
    return;
  }
  if (connState !== 'connected') {
    // Who is online is unknown while away; it is asked again on reconnect.
    online.replaceChildren(h('span', { class: 'online-count', text: connState === 'closed' ? 'offline' : 'connecting…' }));
    return;
  }
  const people = [...r.online].sort((a, b) => (a === me ? -1 : b === me ? 1 : a.localeCompare(b)));
  const chips = people.map((u) =>
    h('span', { class: 'person', 'data-user': u, title: `${u} is online` }, h('span', { class: 'dot' }), u === me ? `${u} (you)` : u),
  );
  online.replaceChildren(
    h('span', { class: 'online-count', text: people.length ? `${people.length} online` : 'nobody online' }),
    ...chips,
  );
}

const messageText = (m) => (m.deleted ? '' : m.text || (m.data ? `[${Math.floor((m.data.length * 3) / 4)} bytes of data]` : ''));
const DELETED_TEXT = 'This message was deleted';

/** Everyone known to be in `r`, for @ mentions: the member list as far as listed, and me. */
function memberNamesOf(r) {
  const names = new Set(r.memberNames);
  for (const u of r.members.keys()) names.add(u);
  if (me) names.add(me);
  return names;
}

/** The user an `@name` names: as written, else without the dots that end a sentence. */
function mentionedUser(name, known) {
  if (known.has(name)) return name;
  const bare = name.replace(/\.+$/, '');
  return bare && known.has(bare) ? bare : '';
}

/** The room members `text` mentions with `@name`, once each, at most {@link MAX_MENTIONS}. */
function mentionsIn(text, r) {
  const known = memberNamesOf(r);
  const out = [];
  for (const x of text.matchAll(MENTION_RE)) {
    const user = mentionedUser(x[2], known);
    if (user && !out.includes(user)) out.push(user);
    if (out.length >= MAX_MENTIONS) break;
  }
  return out;
}

/**
 * `text` as nodes, each `@name` of a user the message mentions (its
 * `mentions`, which the server counts) in a span.mention,
 * span.mention.mention-me when it is me.
 */
function richText(text, m) {
  const known = new Set(m.mentions || []);
  const out = [];
  if (!known.size) return [text];
  let at = 0;
  for (const x of text.matchAll(MENTION_RE)) {
    const user = mentionedUser(x[2], known);
    if (!user) continue;
    const start = x.index + x[1].length;
    if (start > at) out.push(text.slice(at, start));
    out.push(h('span', { class: `mention${user === me ? ' mention-me' : ''}`, 'data-user': user, text: `@${user}` }));
    at = start + 1 + user.length;
  }
  if (at < text.length) out.push(text.slice(at));
  return out;
}

/** The text of a message: its words (mentions marked), or that it was deleted. */
function textNode(r, m) {
  if (m.deleted) return h('div', { class: 'msg-text deleted', text: DELETED_TEXT });
  return h('div', { class: 'msg-text' }, ...richText(messageText(m), m));
}

/** "(edited)", with when in its tooltip. */
function editedMark(m) {
  if (!m.editedMs || m.deleted) return null;
  return h('span', { class: 'msg-edited', title: `Edited ${fullFmt.format(new Date(m.editedMs))}`, text: '(edited)' });
}

/** What a quote of message `seq` of `r` says: its sender and the start of its text. */
function quoteOf(r, seq) {
  const t = r.msgs.get(seq);
  if (!t) return { sender: '', text: `message #${seq}`, known: false };
  if (t.deleted) return { sender: '', text: 'deleted message', known: true };
  return { sender: isNotice(t) ? 'Notice' : t.sender, text: excerpt(messageText(t), QUOTE_CHARS), known: true };
}

/** The quote of the message `m` answers; a click goes to it. */
function quoteNode(r, m) {
  const q = quoteOf(r, m.replyTo);
  return h(
    'button',
    { class: `msg-quote${q.known ? '' : ' unknown'}`, type: 'button', 'data-act': 'quote', 'data-target': m.replyTo, title: 'Go to the message replied to', 'aria-label': `In reply to ${q.sender || ''} ${q.text}`.replace(/\s+/g, ' ') },
    q.sender ? h('span', { class: 'quote-sender', text: q.sender }) : null,
    h('span', { class: 'quote-text', text: q.text }),
  );
}

/** Reaction chips: emoji and count, mine highlighted, who reacted in the tooltip. */
function reactionsNode(r, m) {
  if (m.deleted || !m.reactions || !m.reactions.length) return null;
  return h(
    'div',
    { class: 'reactions' },
    ...m.reactions.map((x) => {
      const more = x.count - x.users.length;
      const who = x.users.map((u) => (u === me ? 'you' : u)).join(', ');
      const title = `${who}${more > 0 ? `${who ? ' and ' : ''}${more} more` : ''} reacted with ${x.key}`;
      return h(
        'button',
        {
          class: `reaction${x.mine ? ' mine' : ''}`,
          type: 'button',
          'data-act': 'toggle-reaction',
          'data-key': x.key,
          'data-count': x.count,
          'aria-pressed': String(x.mine),
          title,
          'aria-label': `${x.key} ${x.count}: ${title}`,
        },
        h('span', { class: 'reaction-key', text: x.key }),
        h('span', { class: 'reaction-count', text: String(x.count) }),
      );
    }),
    r.gone ? null : h('button', { class: 'reaction add-reaction', type: 'button', 'data-act': 'picker', title: 'Add reaction', 'aria-label': 'Add reaction', text: '+' }),
  );
}

/** The emoji the "add reaction" button offers. */
function pickerNode() {
  return h(
    'div',
    { class: 'reaction-picker', role: 'group', 'aria-label': 'Add reaction' },
    ...REACTION_KEYS.map((k) => h('button', { class: 'pick', type: 'button', 'data-act': 'pick', 'data-key': k, title: `React with ${k}`, 'aria-label': `React with ${k}`, text: k })),
  );
}

/** Reply, react, edit and delete: shown on hover, focus, or a tap on the message. */
function actionsNode(r, m) {
  if (r.gone || m.deleted) return null;
  const act = (name, text, label) => h('button', { class: `msg-act act-${name}`, type: 'button', 'data-act': name, title: label, 'aria-label': label, text });
  return h(
    'div',
    { class: 'msg-actions', role: 'toolbar', 'aria-label': 'Message actions' },
    act('picker', '☺', 'Add reaction'),
    act('reply', 'Reply', 'Reply'),
    canEdit(r, m) ? act('edit', 'Edit', 'Edit') : null,
    canDelete(r, m) ? act('delete', 'Delete', 'Delete') : null,
  );
}

/** The inline editor of one's own message: Enter saves, Escape cancels. */
function editorNode(r, m) {
  const input = h('textarea', { class: 'edit-input', rows: 1, 'aria-label': 'Edit message' });
  input.value = r.editDraft;
  input.addEventListener('input', () => {
    r.editDraft = input.value;
    input.style.height = 'auto';
    input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
  });
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      saveEdit(r.name, m.seq);
    } else if (e.key === 'Escape') {
      e.preventDefault();
      e.stopPropagation();
      cancelEdit(r.name);
    }
  });
  return h(
    'div',
    { class: 'msg-editor' },
    input,
    h(
      'div',
      { class: 'edit-bar' },
      h('span', { class: 'edit-hint', text: 'Enter to save · Esc to cancel' }),
      h('button', { class: 'ghost small', type: 'button', 'data-act': 'edit-cancel', text: 'Cancel' }),
      h('button', { class: 'primary small', type: 'button', 'data-act': 'edit-save', text: 'Save' }),
    ),
  );
}

/**
 * What a message's node shows, as a string: a node is rebuilt only when
 * this changed (an edit, a reaction, the quoted message, the editor...).
 */
function nodeSig(r, m) {
  const q = m.replyTo ? quoteOf(r, m.replyTo) : null;
  return JSON.stringify([
    m.text, m.data, m.editedMs, m.deleted, m.reactions, m.mentions, q,
    r.editing === m.seq, r.picker === m.seq, canEdit(r, m), canDelete(r, m), me,
  ]);
}

function messageNode(r, m) {
  const sig = nodeSig(r, m);
  let el = r.nodes.get(m.seq);
  if (el && el.dataset.sig === sig) return el;
  el = isNotice(m) ? noticeNode(r, m) : userMessageNode(r, m);
  el.dataset.sig = sig;
  r.nodes.set(m.seq, el);
  return el;
}

/** A notice: centred, muted, labelled "Notice"; no author, no avatar. */
function noticeNode(r, m) {
  const ts = new Date(m.tsMs);
  return h(
    'div',
    { class: `msg notice${m.deleted ? ' deleted' : ''}`, role: 'note', 'data-room': m.room, 'data-seq': m.seq, 'data-sender': '' },
    h(
      'div',
      { class: 'notice-body' },
      h('span', { class: 'notice-label', text: 'Notice' }),
      h('span', { class: `msg-text${m.deleted ? ' deleted' : ''}`, text: m.deleted ? DELETED_TEXT : messageText(m) }),
      editedMark(m),
      h('time', { class: 'msg-time', datetime: ts.toISOString(), title: `${fullFmt.format(ts)} · #${m.seq}`, text: timeFmt.format(ts) }),
    ),
    m.deleted || !canDelete(r, m) ? null : h('div', { class: 'msg-actions', role: 'toolbar', 'aria-label': 'Message actions' }, h('button', { class: 'msg-act act-delete', type: 'button', 'data-act': 'delete', title: 'Delete', 'aria-label': 'Delete', text: 'Delete' })),
  );
}

function userMessageNode(r, m) {
  const ts = new Date(m.tsMs);
  const editing = r.editing === m.seq && !m.deleted;
  return h(
    'div',
    {
      class: `msg${isMine(m) ? ' mine' : ''}${m.deleted ? ' deleted' : ''}${!m.deleted && m.mentions.includes(me) && !isMine(m) ? ' mentions-me' : ''}${editing ? ' editing' : ''}`,
      'data-room': m.room,
      'data-seq': m.seq,
      'data-sender': m.sender,
      'data-client-msg-id': m.clientMsgId || undefined,
      'data-reply-to': m.replyTo || undefined,
    },
    avatar(m.sender),
    h(
      'div',
      { class: 'msg-body' },
      h(
        'div',
        { class: 'msg-meta' },
        h('span', { class: 'msg-sender', text: m.sender }),
        h('time', { class: 'msg-time', datetime: ts.toISOString(), title: `${fullFmt.format(ts)} · #${m.seq}`, text: timeFmt.format(ts) }),
      ),
      m.replyTo && !m.deleted ? quoteNode(r, m) : null,
      editing ? editorNode(r, m) : h('div', { class: 'msg-line' }, textNode(r, m), editedMark(m)),
      reactionsNode(r, m),
      r.picker === m.seq && !m.deleted ? pickerNode() : null,
    ),
    h('time', { class: 'msg-hover-time', datetime: ts.toISOString(), text: timeFmt.format(ts) }),
    editing ? null : actionsNode(r, m),
  );
}

function renderMessages() {
  const r = active ? rooms.get(active) : null;
  const box = $('messages');
  if (!r) {
    $('message-list').replaceChildren();
    return;
  }
  const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 120;
  const out = [];
  let prev = null;
  let prevDay = '';
  for (const seq of r.seqs) {
    const m = r.msgs.get(seq);
    const day = new Date(m.tsMs).toDateString();
    let breakGroup = false;
    if (day !== prevDay) {
      out.push(h('div', { class: 'day-divider', role: 'separator' }, h('span', { text: dayLabel(m.tsMs) })));
      prevDay = day;
      breakGroup = true;
    }
    if (r.dividerAt >= 0 && seq > r.dividerAt && (!prev || prev.seq <= r.dividerAt)) {
      out.push(h('div', { class: 'new-divider', role: 'separator' }, h('span', { text: 'New' })));
      breakGroup = true;
    }
    const el = messageNode(r, m);
    // A notice stands alone: it is never grouped, nor is a message with it.
    const cont = !breakGroup && prev && !isNotice(prev) && !isNotice(m) && prev.sender === m.sender && m.tsMs - prev.tsMs < GROUP_MS;
    el.classList.toggle('cont', !!cont);
    el.classList.toggle('selected', selected !== null && selected.room === r.name && selected.seq === seq);
    out.push(el);
    prev = m;
  }
  for (const [id, p] of r.pending) {
    out.push(
      h(
        'div',
        { class: `msg mine pending${p.failed ? ' failed' : ''}`, 'data-pending': id },
        avatar(me),
        h(
          'div',
          { class: 'msg-body' },
          h('div', { class: 'msg-meta' }, h('span', { class: 'msg-sender', text: me }), h('span', { class: 'msg-status', text: p.failed ? `Not sent — ${p.failed}` : 'Sending…' })),
          p.replyTo ? quoteNode(r, { replyTo: p.replyTo }) : null,
          h('div', { class: 'msg-text', text: p.text }),
          p.failed ? retryButton(r, id) : null,
        ),
      ),
    );
  }
  const list = $('message-list');
  const same = out.length === list.children.length && out.every((el, i) => list.children[i] === el);
  if (!same) {
    // Moving nodes loses focus (an editor, a button): it is given back.
    const focused = list.contains(document.activeElement) ? document.activeElement : null;
    const range = focused && 'selectionStart' in focused ? [focused.selectionStart, focused.selectionEnd] : null;
    list.replaceChildren(...out);
    if (focused && focused.isConnected && document.activeElement !== focused) {
      focused.focus({ preventScroll: true });
      if (range) focused.setSelectionRange(range[0], range[1]);
    }
  }
  if (r.editFocus) {
    const input = list.querySelector('.msg.editing .edit-input');
    if (input) {
      r.editFocus = false;
      input.focus({ preventScroll: true });
      input.setSelectionRange(input.value.length, input.value.length);
      input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
    }
  }

  $('load-older').hidden = !r.hasOlder || !r.loaded;
  $('load-older').disabled = r.loading;
  $('load-older').textContent = r.loading ? 'Loading…' : 'Load older messages';
  const start = $('history-start');
  start.hidden = !(r.loaded && !r.hasOlder);
  start.textContent = isDm(r.name)
    ? `This is the beginning of your conversation with ${dmPeer(r.name)}.`
    : `This is the very beginning of #${r.name}.`;

  // Who has seen the latest message.
  const last = r.seqs.length ? r.seqs[r.seqs.length - 1] : 0;
  const seenBy = [...r.receipts].filter(([u, s]) => u !== me && last && s >= last).map(([u]) => u).sort();
  $('seen').textContent = seenBy.length ? `Seen by ${seenBy.join(', ')}` : '';

  if (scrollMode === 'bottom' || (scrollMode === null && nearBottom)) {
    box.scrollTop = box.scrollHeight;
  } else if (scrollMode && typeof scrollMode === 'object') {
    box.scrollTop = scrollMode.top + (box.scrollHeight - scrollMode.height);
  }
  scrollMode = null;
}

function retryButton(r, id) {
  const b = h('button', { class: 'link', type: 'button', text: 'Retry' });
  b.addEventListener('click', () => {
    const p = r.pending.get(id);
    if (p) sendPending(r.name, id, p.text, p.replyTo, p.mentions);
  });
  return b;
}

function renderTyping() {
  const r = active ? rooms.get(active) : null;
  const el = $('typing');
  if (!r) {
    el.replaceChildren();
    return;
  }
  const now = Date.now();
  const users = [...r.typing].filter(([, exp]) => exp > now).map(([u]) => u).sort();
  let text = '';
  if (users.length === 1) text = `${users[0]} is typing`;
  else if (users.length === 2) text = `${users[0]} and ${users[1]} are typing`;
  else if (users.length > 2) text = `${users[0]}, ${users[1]} and ${users.length - 2} more are typing`;
  el.replaceChildren(...(text ? [h('span', { class: 'dots', 'aria-hidden': 'true' }, h('i'), h('i'), h('i')), h('span', { class: 'typing-text', text: `${text}…` })] : []));
  el.dataset.users = users.join(',');
}

// The member panel: everyone in the room on screen with their role and
// whether they are online; for admins and the owner, what they may do.
function renderMembers() {
  const r = active ? rooms.get(active) : null;
  const open = membersOpen && !!r && !r.gone;
  const panel = $('members-panel');
  const was = !panel.hidden;
  panel.hidden = !open;
  $('app').classList.toggle('members-open', open);
  $('members-btn').setAttribute('aria-expanded', String(open));
  syncInert();
  if (!open) {
    if (was && panel.contains(document.activeElement)) $('members-btn').focus();
    return;
  }
  if (!r.membersLoaded && !r.membersLoading && !r.membersFailed) loadMembers(r);
  $('invite-form').hidden = !canInvite(r);
  const count = r.info ? r.info.memberCount : r.members.size;
  $('members-heading').textContent = count ? `Members · ${count}` : 'Members';
  const people = [...r.members].sort(([a, x], [b, y]) => rank(y.role) - rank(x.role) || a.localeCompare(b));
  const known = connState === 'connected';
  const items = people.map(([user, m]) => {
    const online = known && (m.online || user === me);
    const av = avatar(user, 'avatar small');
    const role = ROLE_LABEL[m.role] || '';
    const li = h(
      'li',
      { class: 'member', 'data-user': user, 'data-role': m.role, 'data-online': String(online) },
      av,
      h('span', { class: `presence ${online ? 'on' : 'off'}`, title: online ? 'Online' : 'Offline', role: 'img', 'aria-label': online ? 'online' : 'offline' }),
      h('span', { class: 'member-name', text: user === me ? `${user} (you)` : user, title: user }),
      m.role === Role.OWNER || m.role === Role.ADMIN ? h('span', { class: `role-badge ${m.role === Role.OWNER ? 'owner' : 'admin'}`, text: role }) : null,
    );
    if (canModerate(r, user, m.role) || (canSetRoles(r) && user !== me)) {
      const b = h('button', { class: 'member-menu', type: 'button', text: '⋯', title: `Manage ${user}`, 'aria-label': `Manage ${user}`, 'aria-haspopup': 'dialog' });
      b.addEventListener('click', () => openMemberDialog(r.name, user));
      li.append(b);
    }
    return li;
  });
  if (!items.length) items.push(h('li', { class: 'member-note', text: r.membersLoading ? 'Loading…' : 'Nobody here' }));
  $('member-list').replaceChildren(...items);
  const more = $('members-more');
  more.hidden = !r.membersMore;
  more.disabled = r.membersLoading;
}

function renderConn() {
  const el = $('conn-state');
  const labels = { idle: 'Offline', connecting: 'Connecting…', connected: 'Online', reconnecting: 'Reconnecting…', closed: 'Offline' };
  el.dataset.state = connState;
  el.querySelector('.label').textContent = labels[connState] || connState;
  const banner = $('banner');
  if (connState === 'reconnecting' || connState === 'connecting') {
    const secs = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
    banner.textContent =
      connState === 'connecting'
        ? 'Connecting to the server…'
        : secs > 0
          ? `Connection lost — reconnecting in ${secs} s… Messages you send now go out when it is back.`
          : 'Connection lost — reconnecting… Messages you send now go out when it is back.';
    banner.hidden = false;
  } else if (connState === 'closed') {
    banner.textContent = 'Disconnected.';
    banner.hidden = false;
  } else banner.hidden = true;
}

// ---------------------------------------------------------------------------
// Message actions: reply, react, edit, delete (proto/README.md §9). Each
// change is an entry in the room's log; every page (this one too) applies
// it when it arrives. Applied here at once when the ack shows nothing else
// came in between, so the page does not wait for the push.

let selected = null; // {room, seq}: the message whose actions a tap showed (phones)

/** Clicks in the message list, by the `data-act` of what was clicked. */
function onMessageClick(e) {
  const r = active ? rooms.get(active) : null;
  const row = e.target.closest('.msg[data-seq]');
  if (!r || !row) return;
  const seq = Number(row.dataset.seq);
  const btn = e.target.closest('[data-act]');
  if (!btn) {
    // A tap on a message shows its actions (there is no hover on a touch screen).
    if (e.target.closest('.msg-editor, a')) return;
    const on = !(selected && selected.room === r.name && selected.seq === seq);
    selected = on ? { room: r.name, seq } : null;
    for (const el of $('message-list').querySelectorAll('.msg.selected')) el.classList.remove('selected');
    if (on) row.classList.add('selected');
    return;
  }
  const m = r.msgs.get(seq);
  if (!m) return;
  // Done with this message's actions (a tap showed them): they go away.
  if (['reply', 'pick', 'edit', 'quote'].includes(btn.dataset.act) || (btn.dataset.act === 'delete' && btn.dataset.armed === '1')) {
    selected = null;
    row.classList.remove('selected');
  }
  switch (btn.dataset.act) {
    case 'reply':
      startReply(r, seq);
      break;
    case 'picker':
      r.picker = r.picker === seq ? 0 : seq;
      invalidate('messages');
      break;
    case 'pick':
      r.picker = 0;
      invalidate('messages');
      react(r, m, btn.dataset.key, true);
      break;
    case 'toggle-reaction': {
      const x = m.reactions.find((y) => y.key === btn.dataset.key);
      react(r, m, btn.dataset.key, !(x && x.mine));
      break;
    }
    case 'edit':
      startEdit(r, m);
      break;
    case 'edit-save':
      saveEdit(r.name, seq);
      break;
    case 'edit-cancel':
      cancelEdit(r.name);
      break;
    case 'delete':
      // Asked twice: the second click within a few seconds deletes.
      if (btn.dataset.armed !== '1') {
        btn.dataset.armed = '1';
        btn.textContent = 'Delete?';
        btn.classList.add('armed');
        btn.setAttribute('aria-label', 'Click again to delete');
        setTimeout(() => {
          if (!btn.isConnected) return;
          btn.dataset.armed = '';
          btn.textContent = 'Delete';
          btn.classList.remove('armed');
          btn.setAttribute('aria-label', 'Delete');
        }, 4000);
        break;
      }
      deleteMessage(r, m);
      break;
    case 'quote':
      jumpTo(r.name, Number(btn.dataset.target));
      break;
    default:
      break;
  }
}

/**
 * Applies the change an ack confirmed, unless entries before it are still
 * on their way. A `duplicate` ack made no entry (a reaction already so, or
 * a retry of one applied already): nothing to apply.
 */
function applyAcked(r, ack, change, text = '') {
  if (!client || ack.duplicate || client.cursors()[r.name] !== ack.seq - 1) return;
  addMessage({ room: r.name, seq: ack.seq, sender: me, tsMs: ack.tsMs, clientMsgId: ack.clientMsgId, text, data: '', replyTo: 0, mentions: [], change, editedMs: 0, deleted: false, reactions: [], foldedSeq: 0 });
}

async function react(r, m, key, add) {
  if (!client || r.gone) return;
  try {
    const ack = await client.react(r.name, m.seq, key, add);
    applyAcked(r, ack, { targetSeq: m.seq, kind: add ? ChangeKind.REACTION_ADD : ChangeKind.REACTION_REMOVE, key });
  } catch (e) {
    toast(`Could not ${add ? 'add' : 'remove'} the reaction: ${errorText(e)}`);
  }
}

function startEdit(r, m) {
  if (!canEdit(r, m)) return;
  r.editing = m.seq;
  r.editDraft = m.text;
  r.editFocus = true;
  r.picker = 0;
  invalidate('messages');
}

function cancelEdit(name) {
  const r = rooms.get(name);
  if (!r || !r.editing) return;
  const seq = r.editing;
  r.editing = 0;
  r.editDraft = '';
  invalidate('messages');
  // Back to the message, for the keyboard.
  queueMicrotask(() => {
    const el = r.nodes.get(seq);
    if (name === active && el && document.activeElement === document.body) $('composer-input').focus({ preventScroll: true });
  });
}

async function saveEdit(name, seq) {
  const r = rooms.get(name);
  const m = r && r.msgs.get(seq);
  if (!r || !m || !client || r.editing !== seq) return;
  const text = r.editDraft.replace(/\s+$/, '');
  if (!text.trim() || text === m.text) {
    if (!text.trim()) toast('A message cannot be empty: delete it instead.', 'info');
    else cancelEdit(name);
    return;
  }
  const node = r.nodes.get(seq);
  const input = node && node.querySelector('.edit-input');
  if (input) input.disabled = true;
  try {
    const ack = await client.edit(name, seq, text);
    if (r.editing === seq) {
      r.editing = 0;
      r.editDraft = '';
    }
    applyAcked(r, ack, { targetSeq: seq, kind: ChangeKind.EDIT, key: '' }, text);
    invalidate('messages');
    if (name === active) $('composer-input').focus({ preventScroll: true });
  } catch (e) {
    if (input && input.isConnected) {
      input.disabled = false;
      input.focus();
    }
    toast(`Could not edit the message: ${errorText(e)}`);
  }
}

async function deleteMessage(r, m) {
  if (!client || !canDelete(r, m)) return;
  try {
    const ack = await client.deleteMessage(r.name, m.seq);
    applyAcked(r, ack, { targetSeq: m.seq, kind: ChangeKind.DELETE, key: '' });
  } catch (e) {
    toast(`Could not delete the message: ${errorText(e)}`);
  }
}

function startReply(r, seq) {
  r.replyTo = seq;
  invalidate('header');
  $('composer-input').focus();
}

function cancelReply() {
  const r = active ? rooms.get(active) : null;
  if (!r || !r.replyTo) return;
  r.replyTo = 0;
  invalidate('header');
  $('composer-input').focus();
}

/** "Replying to ann: …" above the composer, with × to cancel. */
function renderReplyBar() {
  const r = active ? rooms.get(active) : null;
  const bar = $('reply-bar');
  if (!r || r.gone || !r.replyTo) {
    bar.hidden = true;
    bar.dataset.target = '';
    return;
  }
  const q = quoteOf(r, r.replyTo);
  bar.hidden = false;
  bar.dataset.target = String(r.replyTo);
  $('reply-sender').textContent = q.sender;
  $('reply-sender').hidden = !q.sender;
  $('reply-excerpt').textContent = q.text;
}

/**
 * Scrolls to message `seq` of `name` (loading older pages until it is there,
 * within reason) and makes it flash.
 */
async function jumpTo(name, seq) {
  const r = rooms.get(name);
  if (!r || !seq) return;
  for (let i = 0; i < 20 && !r.msgs.has(seq) && r.hasOlder && name === active; i++) {
    const before = r.oldest;
    await loadOlder();
    if (r.oldest === before) break;
  }
  render();
  const el = r.nodes.get(seq);
  if (!r.msgs.has(seq) || !el || !el.isConnected) {
    toast(`Message #${seq} is not available.`, 'info');
    return;
  }
  el.scrollIntoView({ block: 'center' });
  el.classList.remove('flash');
  void el.offsetWidth; // restart the animation
  el.classList.add('flash');
  setTimeout(() => el.classList.remove('flash'), 1600);
}

// ---------------------------------------------------------------------------
// @ mentions: typing @ in the composer offers the room's members.

let mention = null; // {start, end, items, index}

/** Lists the members of `r` for mentions (once; the member list keeps them current after). */
function ensureMemberNames(r) {
  if (!client || r.gone || r.memberNamesLoaded || r.memberNamesLoading) return;
  r.memberNamesLoading = true;
  client
    .listMembers(r.name, { limit: 1000 })
    .then((page) => {
      for (const m of page.members) r.memberNames.add(m.user);
      r.memberNamesLoaded = true;
      if (mention && r.name === active) updateMentions();
    }, () => {})
    .finally(() => {
      r.memberNamesLoading = false;
    });
}

function updateMentions() {
  const input = $('composer-input');
  const r = active ? rooms.get(active) : null;
  if (!r || r.gone || input.selectionStart !== input.selectionEnd) return closeMentions();
  const caret = input.selectionStart;
  const x = /(^|[^A-Za-z0-9_.@-])@([A-Za-z0-9_.-]{0,62})$/.exec(input.value.slice(0, caret));
  if (!x) return closeMentions();
  ensureMemberNames(r);
  const q = x[2].toLowerCase();
  const names = [...memberNamesOf(r)].filter((u) => u !== me);
  const starts = names.filter((u) => u.toLowerCase().startsWith(q)).sort();
  const inside = names.filter((u) => !u.toLowerCase().startsWith(q) && u.toLowerCase().includes(q)).sort();
  const items = [...starts, ...inside].slice(0, MENTION_CHOICES);
  if (!items.length) return closeMentions();
  const keep = mention && mention.items[mention.index];
  mention = { start: caret - x[2].length - 1, end: caret, items, index: Math.max(0, items.indexOf(keep)) };
  renderMentions();
}

function renderMentions() {
  const list = $('mention-list');
  const input = $('composer-input');
  if (!mention) {
    list.hidden = true;
    list.replaceChildren();
    input.removeAttribute('aria-activedescendant');
    return;
  }
  list.replaceChildren(
    ...mention.items.map((u, i) => {
      const li = h(
        'li',
        { class: `mention-option${i === mention.index ? ' active' : ''}`, id: `mention-${i}`, role: 'option', 'data-user': u, 'aria-selected': String(i === mention.index) },
        avatar(u, 'avatar small'),
        h('span', { class: 'mention-name', text: u }),
      );
      // Chosen without taking the focus from the composer.
      li.addEventListener('mousedown', (e) => e.preventDefault());
      li.addEventListener('click', () => chooseMention(u));
      return li;
    }),
  );
  list.hidden = false;
  input.setAttribute('aria-activedescendant', `mention-${mention.index}`);
}

function closeMentions() {
  if (!mention && $('mention-list').hidden) return;
  mention = null;
  renderMentions();
}

/** Puts `@user ` where the @ being typed is. */
function chooseMention(user) {
  if (!mention) return;
  const input = $('composer-input');
  const v = input.value;
  const insert = `@${user} `;
  const tail = v.slice(mention.end).replace(/^ /, '');
  input.value = v.slice(0, mention.start) + insert + tail;
  const caret = mention.start + insert.length;
  closeMentions();
  input.focus();
  input.setSelectionRange(caret, caret);
  autosize();
}

/** Keys in the composer while the mention list is open; true when handled. */
function mentionKey(e) {
  if (!mention) return false;
  const n = mention.items.length;
  if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
    mention.index = (mention.index + (e.key === 'ArrowDown' ? 1 : n - 1)) % n;
    renderMentions();
  } else if ((e.key === 'Enter' || e.key === 'Tab') && !e.shiftKey && !e.isComposing) {
    chooseMention(mention.items[mention.index]);
  } else if (e.key === 'Escape') {
    e.stopPropagation();
    closeMentions();
  } else return false;
  e.preventDefault();
  return true;
}

// ---------------------------------------------------------------------------
// Actions

async function selectRoom(name) {
  if (active && active !== name) stopTyping();
  const r = room(name);
  if (active !== name) {
    closeMentions();
    selected = null;
  }
  active = name;
  localStorage.setItem(ROOM_KEY, name);
  r.dividerAt = unread(r) > 0 ? r.read : -1;
  if (document.visibilityState === 'visible') clearCounts(r);
  ensureMemberNames(r);
  r.typing.forEach((exp, u) => exp < Date.now() && r.typing.delete(u));
  scrollMode = 'bottom';
  invalidate('sidebar', 'header', 'messages', 'typing');
  // On a phone the on-screen keyboard would come up over the messages just chosen.
  if (!narrow.matches && !r.gone) $('composer-input').focus();
  if (!r.loaded && !r.gone) await loadNewest(r);
}

async function loadNewest(r) {
  if (r.loading || !client) return;
  r.loading = true;
  try {
    let page = await client.history({ room: r.name, limit: PAGE });
    r.head = Math.max(r.head, page.headSeq);
    addPage(r, page);
    // A page of mostly edits and reactions shows little: fetch on.
    for (let i = 1; i < FILL_PAGES && page.hasMore && r.msgs.size < PAGE / 2; i++) {
      page = await client.history({ room: r.name, beforeSeq: r.oldest, limit: PAGE });
      addPage(r, page);
    }
    r.loaded = true;
    r.hasOlder = page.hasMore;
    if (r.name === active) scrollMode = 'bottom';
  } catch (e) {
    if (!(e instanceof ChatdError && e.code === 'CLOSED')) toast(`Could not load ${displayName(r.name)}: ${errorText(e)}`);
  } finally {
    r.loading = false;
    invalidate('messages');
  }
}

/** A History page: its messages, and its change entries applied where they are not folded in yet. */
function addPage(r, page) {
  for (const m of page.messages) {
    addMessage(m);
    if (!r.oldest || m.seq < r.oldest) r.oldest = m.seq;
  }
}

async function loadOlder() {
  const r = active ? rooms.get(active) : null;
  if (!r || r.loading || !r.hasOlder || !r.oldest || !client) return;
  r.loading = true;
  invalidate('messages');
  try {
    const had = r.msgs.size;
    const box = $('messages');
    // The messages on screen stay where they are as older ones come in above.
    const keep = () => {
      if (r.name === active) scrollMode = { height: box.scrollHeight, top: box.scrollTop };
    };
    let page = await client.history({ room: r.name, beforeSeq: r.oldest, limit: PAGE });
    keep();
    addPage(r, page);
    for (let i = 1; i < FILL_PAGES && page.hasMore && r.msgs.size - had < PAGE / 2; i++) {
      page = await client.history({ room: r.name, beforeSeq: r.oldest, limit: PAGE });
      keep();
      addPage(r, page);
    }
    r.hasOlder = page.hasMore;
  } catch (e) {
    toast(`Could not load older messages: ${errorText(e)}`);
  } finally {
    r.loading = false;
    invalidate('messages');
  }
}

async function joinRoom(name) {
  name = name.trim().replace(/^#/, '');
  if (!name || !client) return;
  if (!/^[A-Za-z0-9_.:-]{1,128}$/.test(name)) {
    toast('Room names are 1–128 letters, digits, _ . : -');
    return;
  }
  try {
    const j = await client.join(name);
    applyJoined(j);
    // Only once joined: a name refused is still there in the panel to correct.
    setNav(false, { refocus: true });
    await selectRoom(j.state.room);
    return true;
  } catch (e) {
    toast(`Could not join ${name}: ${errorText(e)}`);
    return false;
  }
}

function applyJoined(j) {
  const r = room(j.state.room);
  if (j.state.info) r.info = j.state.info;
  if (r.gone) {
    // Back in a room one was removed from: its messages are fetched afresh.
    r.gone = null;
    r.msgs = new Map();
    r.seqs = [];
    r.nodes = new Map();
    r.orphans = new Map();
    r.oldest = 0;
    r.loaded = false;
    r.hasOlder = false;
    if (r.name === active) loadNewest(r);
  }
  r.membersLoaded = false;
  r.memberNamesLoaded = false;
  ensureMemberNames(r);
  if (invites.delete(r.name)) invalidate('sidebar');
  r.head = Math.max(r.head, j.state.headSeq);
  r.read = Math.max(r.read, j.state.readSeq);
  r.acked = Math.max(r.acked || 0, j.state.readSeq);
  seedCounts(r, j.state);
  if (watching(r.name)) clearCounts(r);
  r.online = new Set(j.online);
  invalidate('sidebar', 'header', 'members');
}

/** Sets who is online in `name` from its member list (the first 1,000). */
function refreshOnline(c, name) {
  c.listMembers(name, { limit: 1000 }).then((page) => {
    const r = rooms.get(name);
    if (!r || r.gone) return;
    r.online = new Set(page.members.filter((m) => m.online).map((m) => m.user));
    r.memberNames = new Set(page.members.map((m) => m.user));
    r.memberNamesLoaded = true;
    invalidate('sidebar', 'header', 'members');
  }, () => {});
}

async function leaveRoom() {
  const name = active;
  if (!name || !client) return;
  try {
    await client.leave(name);
  } catch (e) {
    toast(`Could not leave: ${errorText(e)}`);
    return;
  }
  dropRoom(name);
}

/** Forgets a room the user is no longer in; if it was on screen, shows another. */
function dropRoom(name) {
  if (!rooms.delete(name)) return;
  if (typingRoom === name) stopTyping();
  invalidate('sidebar');
  if (active !== name) return;
  const next = [...rooms.keys()].sort().find((n) => !rooms.get(n).gone) || null;
  active = null;
  if (next) selectRoom(next);
  else {
    localStorage.removeItem(ROOM_KEY);
    invalidate('sidebar', 'header', 'messages', 'typing', 'members');
  }
}

/**
 * The user was removed or banned from `name` (a `left` push): the room stays
 * listed, marked, with what happened in place of the composer, until closed.
 */
function markGone(name, reason, by) {
  const r = room(name);
  r.gone = { reason, by };
  r.replyTo = 0;
  r.editing = 0;
  r.picker = 0;
  if (name === active) closeMentions();
  if (typingRoom === name) stopTyping();
  r.typing.clear();
  r.online.clear();
  r.pending.clear();
  r.members.clear();
  r.membersLoaded = false;
  invalidate('sidebar', 'header', 'messages', 'typing', 'members');
  if (memberTarget && memberTarget.room === name && $('member-dialog').open) $('member-dialog').close();
  if (name === active && $('room-dialog').open) $('room-dialog').close();
  if (name !== active) toast(`${goneText(name, r.gone)}.`, 'info');
}

// ---------------------------------------------------------------------------
// Invitations

async function acceptInvite(name) {
  if (!client) return;
  try {
    const j = await client.join(name);
    invites.delete(name);
    applyJoined(j);
    setNav(false, { refocus: true });
    await selectRoom(j.state.room);
  } catch (e) {
    // Withdrawn meanwhile, or the room is gone: nothing left to accept.
    if (e instanceof ChatdError && (e.code === ErrorCode.NOT_FOUND || e.code === ErrorCode.FORBIDDEN)) invites.delete(name);
    invalidate('sidebar');
    toast(`Could not join ${name}: ${errorText(e)}`);
  }
}

async function declineInvite(name) {
  if (!client) return;
  try {
    await client.declineInvite(name);
  } catch (e) {
    if (!(e instanceof ChatdError && e.code === ErrorCode.NOT_FOUND)) {
      toast(`Could not decline: ${errorText(e)}`);
      return;
    }
  }
  invites.delete(name);
  invalidate('sidebar');
}

// ---------------------------------------------------------------------------
// Members

async function loadMembers(r, more = false) {
  if (!client || r.membersLoading || r.gone) return;
  r.membersLoading = true;
  r.membersStale = false;
  try {
    const page = await client.listMembers(r.name, { afterUser: more ? r.membersAfter : '', limit: MEMBER_PAGE });
    if (r.gone || rooms.get(r.name) !== r) return;
    if (!more) r.members = new Map();
    for (const m of page.members) {
      r.members.set(m.user, { role: m.role, online: m.online });
      r.memberNames.add(m.user);
      if (m.online) r.online.add(m.user);
    }
    if (page.members.length) r.membersAfter = page.members[page.members.length - 1].user;
    r.membersMore = page.hasMore;
    r.membersLoaded = true;
  } catch (e) {
    r.membersFailed = true;
    if (!(e instanceof ChatdError && e.code === 'CLOSED')) toast(`Could not list the members of ${displayName(r.name)}: ${errorText(e)}`);
  } finally {
    r.membersLoading = false;
    invalidate('members', 'header');
  }
  // Someone joined or left while the page was on its way: it may predate that.
  if (r.membersStale && !r.gone && rooms.get(r.name) === r) loadMembers(r);
}

/** Keeps a listed room's members current from a RoomUpdate. */
function applyMemberChange(r, u) {
  if (u.change === MemberChange.JOINED) r.memberNames.add(u.user);
  else if (u.change === MemberChange.LEFT || u.change === MemberChange.REMOVED || u.change === MemberChange.BANNED) r.memberNames.delete(u.user);
  if (r.membersLoading) {
    r.membersStale = true;
    return;
  }
  if (!r.membersLoaded) return;
  switch (u.change) {
    case MemberChange.JOINED:
      r.members.set(u.user, { role: u.role || Role.MEMBER, online: r.online.has(u.user) || u.user === me });
      break;
    case MemberChange.LEFT:
    case MemberChange.REMOVED:
    case MemberChange.BANNED:
      r.members.delete(u.user);
      break;
    case MemberChange.ROLE_CHANGED: {
      const m = r.members.get(u.user);
      if (m) m.role = u.role;
      break;
    }
    default:
      break;
  }
  // One owner, the one RoomInfo names: a hand-over makes the old one an
  // admin, and an owner leaving passes it on.
  const owner = u.info ? u.info.owner : '';
  for (const [user, m] of r.members) {
    if (m.role === Role.OWNER && owner && user !== owner) m.role = Role.ADMIN;
  }
  const o = r.members.get(owner);
  if (o) o.role = Role.OWNER;
  const mine = r.members.get(me);
  if (mine && u.info && u.info.myRole !== Role.UNSPECIFIED) mine.role = u.info.myRole;
}

function toggleMembers(open = !membersOpen) {
  membersOpen = open;
  const r = active ? rooms.get(active) : null;
  if (open && r) r.membersFailed = false;
  invalidate('members');
  if (open) {
    // On a phone the panel covers the messages: focus goes into it.
    queueMicrotask(() => {
      if (narrow.matches && !$('members-panel').hidden) $('members-close').focus();
    });
  }
}

async function inviteFromPanel(e) {
  e.preventDefault();
  const r = active ? rooms.get(active) : null;
  const input = $('invite-input');
  const user = input.value.trim().replace(/^@/, '');
  if (!r || !user || !client) return;
  if (!/^[A-Za-z0-9_.-]{1,62}$/.test(user)) {
    toast('User names are 1–62 letters, digits, _ . -');
    return;
  }
  try {
    const info = await client.invite(r.name, user);
    r.info = info;
    input.value = '';
    toast(`Invited ${user} to ${displayName(r.name)}`, 'info');
  } catch (err) {
    toast(`Could not invite ${user}: ${errorText(err)}`);
  }
  invalidate('header', 'members');
}

// The member dialog: role changes (the owner), removal and ban (admins).
let memberTarget = null; // {room, user}
let ownerArmed = false; // "Make owner" asks to be clicked twice

function openMemberDialog(name, user) {
  const r = rooms.get(name);
  const m = r && r.members.get(user);
  if (!m) return;
  memberTarget = { room: name, user };
  ownerArmed = false;
  $('md-heading').textContent = user;
  $('md-reason').value = '';
  $('md-error').hidden = true;
  fillMemberDialog();
  $('member-dialog').showModal();
}

function fillMemberDialog() {
  const t = memberTarget;
  const r = t && rooms.get(t.room);
  const m = r && r.members.get(t.user);
  if (!m || r.gone) {
    if ($('member-dialog').open) $('member-dialog').close();
    return;
  }
  $('md-role').textContent = `${ROLE_LABEL[m.role] || 'Not a member'} of ${displayName(r.name)}`;
  const roles = canSetRoles(r);
  $('md-roles').hidden = !roles;
  $('md-admin').hidden = m.role === Role.ADMIN;
  $('md-member').hidden = m.role === Role.MEMBER;
  $('md-owner').textContent = ownerArmed ? `Yes, make ${t.user} the owner` : 'Make owner';
  $('md-owner').classList.toggle('danger', ownerArmed);
  const mod = canModerate(r, t.user, m.role);
  $('md-moderate').hidden = !mod;
  $('md-remove').textContent = `Remove ${t.user}`;
  $('md-ban').textContent = `Ban ${t.user}`;
}

async function memberAction(action) {
  const t = memberTarget;
  if (!t || !client) return;
  if (action === 'owner' && !ownerArmed) {
    ownerArmed = true;
    fillMemberDialog();
    return;
  }
  const reason = $('md-reason').value.trim();
  const { room: name, user } = t;
  const buttons = [...$('member-dialog').querySelectorAll('button')];
  buttons.forEach((b) => (b.disabled = true));
  try {
    let info;
    if (action === 'remove') info = await client.removeMember(name, user, reason);
    else if (action === 'ban') info = await client.ban(name, user, reason);
    else info = await client.setRole(name, user, action);
    const r = rooms.get(name);
    if (r) {
      r.info = info;
      // The RoomUpdate push follows; until then the list shows the outcome.
      if (action === 'remove' || action === 'ban') r.members.delete(user);
      else applyMemberChange(r, { info, change: MemberChange.ROLE_CHANGED, user, role: action === 'owner' ? Role.OWNER : action === 'admin' ? Role.ADMIN : Role.MEMBER });
    }
    $('member-dialog').close();
    invalidate('header', 'members');
  } catch (e) {
    $('md-error').textContent = errorText(e);
    $('md-error').hidden = false;
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

// ---------------------------------------------------------------------------
// Creating rooms

function openCreate() {
  setNav(false);
  $('create-form').reset();
  $('create-error').hidden = true;
  $('create-dialog').showModal();
  $('create-name').focus();
}

async function createRoom(e) {
  e.preventDefault();
  if (!client) return;
  const name = $('create-name').value.trim().replace(/^#/, '');
  const err = $('create-error');
  const fail = (text) => {
    err.textContent = text;
    err.hidden = false;
  };
  if (!/^[A-Za-z0-9_.:-]{1,128}$/.test(name)) return fail('Room names are 1–128 letters, digits, _ . : -');
  if (isDm(name)) return fail('Names starting with dm: are for direct conversations');
  const invite = $('create-invite').value.split(/[\s,]+/).map((u) => u.replace(/^@/, '')).filter(Boolean);
  const bad = invite.find((u) => !/^[A-Za-z0-9_.-]{1,62}$/.test(u));
  if (bad) return fail(`"${bad}" is not a user name (1–62 letters, digits, _ . -)`);
  const submit = $('create-submit');
  submit.disabled = true;
  try {
    const info = await client.createRoom(name, {
      kind: $('create-private').checked ? RoomKind.PRIVATE : RoomKind.PUBLIC,
      title: $('create-title').value.trim(),
      topic: $('create-topic').value.trim(),
      invite: invite.filter((u) => u !== me),
    });
    const r = room(info.room);
    r.info = info;
    r.gone = null;
    r.online.add(me);
    $('create-dialog').close();
    await selectRoom(info.room);
  } catch (e2) {
    fail(
      e2 instanceof ChatdError && e2.code === ErrorCode.ALREADY_EXISTS
        ? `A room named ${name} already exists: pick another name, or join it from the directory.`
        : errorText(e2),
    );
  } finally {
    submit.disabled = false;
  }
}

// ---------------------------------------------------------------------------
// The directory of public rooms

const dir = { query: '', after: '', seq: 0, timer: null, loading: false };

function openDirectory() {
  setNav(false);
  $('dir-dialog').showModal();
  $('dir-search').focus();
  searchDirectory(false);
}

async function searchDirectory(more) {
  if (!client) return;
  clearTimeout(dir.timer);
  const query = $('dir-search').value.trim();
  const seq = ++dir.seq; // a newer search makes older answers moot
  if (!more) {
    dir.query = query;
    dir.after = '';
  }
  dir.loading = true;
  $('dir-status').textContent = 'Searching…';
  $('dir-more').hidden = true;
  try {
    const list = await client.listRooms({ query: dir.query, afterRoom: dir.after, limit: DIR_PAGE });
    if (seq !== dir.seq) return;
    const items = list.rooms.map(directoryItem);
    if (more) $('dir-list').append(...items);
    else $('dir-list').replaceChildren(...items);
    if (list.rooms.length) dir.after = list.rooms[list.rooms.length - 1].room;
    const shownCount = $('dir-list').children.length;
    $('dir-status').textContent = shownCount ? '' : dir.query ? `No public room matches "${dir.query}".` : 'There are no public rooms yet.';
    $('dir-more').hidden = !list.hasMore;
  } catch (e) {
    if (seq === dir.seq) $('dir-status').textContent = `Could not list rooms: ${errorText(e)}`;
  } finally {
    if (seq === dir.seq) dir.loading = false;
  }
}

function directoryItem(info) {
  const r = rooms.get(info.room);
  const member = !!r && !r.gone;
  const btn = h('button', { class: member ? 'ghost small dir-join' : 'primary small dir-join', type: 'button', text: member ? 'Open' : 'Join', 'aria-label': `${member ? 'Open' : 'Join'} ${info.room}` });
  btn.addEventListener('click', async () => {
    btn.disabled = true;
    if (member) {
      $('dir-dialog').close();
      await selectRoom(info.room);
      return;
    }
    const ok = await joinRoom(info.room);
    if (ok) $('dir-dialog').close();
    else btn.disabled = false;
  });
  const n = info.memberCount;
  return h(
    'li',
    { class: 'dir-room', 'data-room': info.room },
    h(
      'div',
      { class: 'dir-text' },
      h('div', { class: 'dir-name-row' }, h('span', { class: 'dir-name', text: `#${info.room}` }), info.title ? h('span', { class: 'dir-title', text: info.title }) : null),
      info.topic ? h('div', { class: 'dir-topic', text: info.topic }) : null,
      h('div', { class: 'dir-count', text: `${n} member${n === 1 ? '' : 's'}` }),
    ),
    btn,
  );
}

// ---------------------------------------------------------------------------
// Room details (title and topic editable by admins; unban)

function openRoomDialog() {
  const r = active ? rooms.get(active) : null;
  if (!r || r.gone) return;
  $('rd-error').hidden = true;
  fillRoomDialog(r, true);
  $('room-dialog').showModal();
  if (canManage(r)) $('rd-topic').focus();
  else $('rd-close').focus();
}

function fillRoomDialog(r, fields) {
  const info = r.info;
  $('rd-heading').textContent = displayName(r.name);
  const facts = [];
  const fact = (k, v) => facts.push(h('dt', { text: k }), h('dd', { text: v }));
  if (info) {
    fact('Kind', KIND_LABEL[info.kind] || '—');
    fact('Owner', info.owner || '—');
    if (info.createdBy) fact('Created', `by ${info.createdBy}${info.createdMs ? `, ${fullFmt.format(new Date(info.createdMs))}` : ''}`);
    fact('Members', String(info.memberCount));
    fact('You', ROLE_LABEL[info.myRole] || 'not a member');
    if (!canManage(r)) {
      fact('Title', info.title || '—');
      fact('Topic', info.topic || '—');
    }
  }
  $('rd-facts').replaceChildren(...facts);
  $('rd-form').hidden = !canManage(r);
  $('unban-form').hidden = !canManage(r);
  if (fields && info) {
    $('rd-title').value = info.title;
    $('rd-topic').value = info.topic;
  }
}

async function saveRoom(e) {
  e.preventDefault();
  const r = active ? rooms.get(active) : null;
  if (!r || !r.info || !client) return;
  const title = $('rd-title').value.trim();
  const topic = $('rd-topic').value.trim();
  const changes = {};
  if (title !== r.info.title) changes.title = title;
  if (topic !== r.info.topic) changes.topic = topic;
  if (!('title' in changes) && !('topic' in changes)) {
    $('room-dialog').close();
    return;
  }
  $('rd-save').disabled = true;
  try {
    r.info = await client.updateRoom(r.name, changes);
    $('room-dialog').close();
    invalidate('header');
  } catch (err) {
    $('rd-error').textContent = errorText(err);
    $('rd-error').hidden = false;
  } finally {
    $('rd-save').disabled = false;
  }
}

async function unbanFromDialog(e) {
  e.preventDefault();
  const r = active ? rooms.get(active) : null;
  const user = $('unban-input').value.trim().replace(/^@/, '');
  if (!r || !user || !client) return;
  try {
    r.info = await client.unban(r.name, user);
    $('unban-input').value = '';
    $('rd-error').hidden = true;
    toast(`${user} may join ${displayName(r.name)} again`, 'info');
  } catch (err) {
    $('rd-error').textContent = errorText(err);
    $('rd-error').hidden = false;
  }
}

function openDm(peer) {
  peer = peer.trim().replace(/^@/, '');
  if (!peer) return;
  if (peer === me) {
    toast('That is you.');
    return;
  }
  if (!/^[A-Za-z0-9_.-]{1,62}$/.test(peer)) {
    toast('User names are 1–62 letters, digits, _ . -');
    return;
  }
  const [a, b] = [me, peer].sort();
  joinRoom(`dm:${a}:${b}`);
}

function sendPending(roomName, id, text, replyTo = 0, mentions = []) {
  const r = room(roomName);
  r.pending.set(id, { text, replyTo, mentions, failed: '', ts: Date.now() });
  invalidate('messages');
  client
    .publish(roomName, text, { clientMsgId: id, replyTo, mentions })
    .then((ack) => {
      if (r.msgs.has(ack.seq)) r.pending.delete(id);
      markRead(r, ack.seq);
      invalidate('messages');
    })
    .catch((e) => {
      const p = r.pending.get(id);
      if (p) p.failed = errorText(e);
      invalidate('messages');
    });
}

function send() {
  const input = $('composer-input');
  const text = input.value.replace(/\s+$/, '');
  if (!text.trim() || !active || !client) return;
  const r = room(active);
  const replyTo = r.replyTo;
  r.replyTo = 0;
  input.value = '';
  autosize();
  closeMentions();
  stopTyping();
  scrollMode = 'bottom';
  invalidate('header');
  sendPending(active, newClientMsgId(), text, replyTo, mentionsIn(text, r));
}

// Read markers: the room on screen is read up to its newest message. One
// MarkRead in flight per room; the next goes out when it is answered.
function maybeMarkRead() {
  const r = active ? rooms.get(active) : null;
  if (!r || r.gone || document.visibilityState !== 'visible') return;
  clearCounts(r);
  if (r.head > r.read) markRead(r, r.head);
}

function markRead(r, seq) {
  if (!client || seq <= r.read || r.name !== active || r.marking) return;
  r.marking = true;
  r.read = seq;
  invalidate('sidebar');
  client
    .markRead(r.name, seq)
    .then((rr) => {
      r.read = Math.max(r.read, rr.seq);
      r.acked = Math.max(r.acked || 0, rr.seq);
    }, () => {})
    .finally(() => {
      r.marking = false;
      invalidate('sidebar');
      maybeMarkRead();
    });
}

// Typing (sent): active while typing, refreshed every 3 s, inactive on send/blur/idle.
let typingRoom = null;
let typingSentAt = 0;
let typingIdle = null;
function onComposerInput() {
  autosize();
  if (!active || !client) return;
  if (!$('composer-input').value.trim()) {
    stopTyping();
    return;
  }
  const now = Date.now();
  if (typingRoom !== active || now - typingSentAt >= TYPING_REFRESH_MS) {
    if (typingRoom && typingRoom !== active) client.typing(typingRoom, false);
    client.typing(active, true);
    typingRoom = active;
    typingSentAt = now;
  }
  clearTimeout(typingIdle);
  typingIdle = setTimeout(stopTyping, TYPING_IDLE_MS);
}

function stopTyping() {
  clearTimeout(typingIdle);
  if (typingRoom && client) client.typing(typingRoom, false);
  typingRoom = null;
  typingSentAt = 0;
}

function autosize() {
  const t = $('composer-input');
  t.style.height = 'auto';
  t.style.height = `${Math.min(t.scrollHeight, 160)}px`;
}

// The room panel on phones. At wider sizes the sidebar is always shown and
// this does nothing.

const navOpen = () => $('app').classList.contains('nav-open');

/**
 * Opens or closes the room panel. `refocus`: on closing, focus goes back to
 * the menu button that opened it (as from a dialog), not to the body.
 */
function setNav(open, { refocus = false } = {}) {
  open = open && narrow.matches;
  if (open === navOpen()) return;
  $('app').classList.toggle('nav-open', open);
  $('menu-btn').setAttribute('aria-expanded', String(open));
  syncInert();
  if (open) ($('sidebar').querySelector('.room-item.active .room-btn') || $('sidebar')).focus();
  else if (refocus) $('menu-btn').focus();
}

/**
 * What a phone panel covers (the room list, or the member list over the
 * messages) can be neither tabbed to nor read out.
 */
function syncInert() {
  const membersCover = narrow.matches && !$('members-panel').hidden;
  $('chat').inert = navOpen() || membersCover;
  $('members-panel').inert = navOpen();
}

// ---------------------------------------------------------------------------
// Connection

function wire(c) {
  c.on('statechange', (s) => {
    connState = s.state;
    if (s.retryInMs !== undefined) retryAt = Date.now() + s.retryInMs;
    renderConn();
    if (s.state !== 'connected') {
      for (const r of rooms.values()) r.typing.clear();
    }
    invalidate('typing', 'header', 'sidebar');
  });
  c.on('connected', (w) => {
    // The client may have got a new token from getToken: a reload uses it.
    if (client === c && typeof c.token === 'string') localStorage.setItem(TOKEN_KEY, c.token);
    me = w.user;
    const member = new Set(w.rooms.map((r) => r.room));
    for (const st of w.rooms) {
      const r = room(st.room);
      r.head = Math.max(r.head, st.headSeq);
      r.read = Math.max(r.read, st.readSeq);
      r.acked = Math.max(r.acked || 0, st.readSeq);
      // The server's counts cover everything up to its head; messages after
      // it (resumed or live) are counted as they come.
      seedCounts(r, st);
      if (st.info) r.info = st.info;
      // Who is in it may have changed while away.
      r.membersLoaded = false;
      r.membersFailed = false;
    }
    droppedAtConnect = new Map();
    droppedActive = null;
    for (const name of [...rooms.keys()]) {
      // A room one was removed from stays until closed.
      if (!member.has(name) && !rooms.get(name).gone) {
        droppedAtConnect.set(name, rooms.get(name));
        rooms.delete(name);
        if (active === name) {
          active = null;
          droppedActive = name;
        }
      }
    }
    invites.clear();
    for (const inv of w.invites) if (!member.has(inv.room)) invites.set(inv.room, inv);
    // Refresh who is online (Welcome does not say) from the member list,
    // never by joining again: a Join would undo a removal from a public
    // room that landed since this Welcome.
    for (const name of member) refreshOnline(c, name);
    if (w.reconnected) {
      // Pages never fetched while away are fetched now.
      for (const r of rooms.values()) if (r.name === active && !r.loaded) loadNewest(r);
    }
    invalidate('sidebar', 'header', 'messages', 'typing', 'members');
  });
  c.on('joined', (j) => {
    // Added by someone else (an admin; the other user of a direct room).
    applyJoined(j);
  });
  c.on('left', (l) => {
    const known = rooms.has(l.room) || droppedAtConnect.has(l.room);
    const invited = invites.delete(l.room);
    if (invited) invalidate('sidebar');
    if (l.reason === MemberChange.REMOVED || l.reason === MemberChange.BANNED) {
      // Removed while away (Welcome no longer listed the room): it comes
      // back as it was, on screen if it was, to say so.
      const kept = droppedAtConnect.get(l.room);
      if (kept && !rooms.has(l.room)) rooms.set(l.room, kept);
      if (known && droppedActive === l.room && !active) {
        active = l.room;
        droppedActive = null;
      }
      if (known) markGone(l.room, l.reason, l.by);
      else if (invited) toast(`Your invitation to #${l.room} was withdrawn${l.by ? ` by ${l.by}` : ''}.`, 'info');
    } else {
      // Left on another device, or a room never joined: nothing to tell.
      dropRoom(l.room);
    }
  });
  c.on('invitation', (inv) => {
    const r = rooms.get(inv.room);
    if (r && !r.gone) return; // already in it
    const fresh = !invites.has(inv.room);
    invites.set(inv.room, inv);
    invalidate('sidebar');
    if (fresh) toast(`${inv.by || 'Someone'} invited you to ${inv.info && inv.info.title ? `${inv.info.title} (#${inv.room})` : `#${inv.room}`}`, 'info');
  });
  c.on('roomupdate', (u) => {
    const r = u.info ? rooms.get(u.info.room) : null;
    if (!r || r.gone) return;
    r.info = u.info;
    if (u.user) applyMemberChange(r, u);
    if (memberTarget && memberTarget.room === r.name && $('member-dialog').open) fillMemberDialog();
    if (r.name === active && $('room-dialog').open) fillRoomDialog(r, false);
    invalidate('header', 'members', 'sidebar');
  });
  c.on('message', (m) => {
    discover(m.room);
    addMessage(m, true);
  });
  c.on('synced', (s) => {
    const r = room(s.room);
    r.head = Math.max(r.head, s.headSeq);
    invalidate('sidebar');
  });
  c.on('presence', (p) => {
    const r = rooms.get(p.room);
    if (!r) return;
    if (p.online) r.online.add(p.user);
    else {
      r.online.delete(p.user);
      r.typing.delete(p.user);
    }
    const m = r.members.get(p.user);
    if (m) m.online = p.online;
    invalidate('header', 'typing', 'sidebar', 'members');
  });
  c.on('typing', (t) => {
    const r = rooms.get(t.room);
    if (!r || t.user === me) return;
    if (t.active) r.typing.set(t.user, Date.now() + TYPING_EXPIRE_MS);
    else r.typing.delete(t.user);
    if (t.room === active) invalidate('typing');
  });
  c.on('readreceipt', (rr) => {
    const r = rooms.get(rr.room);
    if (!r) return;
    if (rr.user === me) {
      r.read = Math.max(r.read, rr.seq);
      r.acked = Math.max(r.acked || 0, rr.seq);
      // Read on another device: what it read no longer counts.
      if (rr.seq >= r.countedThrough) {
        r.unreadSeeded = 0;
        r.mentionsSeeded = 0;
      }
      for (const seq of [...r.liveUnread.keys()]) if (seq <= rr.seq) r.liveUnread.delete(seq);
      invalidate('sidebar');
    } else {
      r.receipts.set(rr.user, Math.max(r.receipts.get(rr.user) || 0, rr.seq));
      if (rr.room === active) invalidate('messages');
    }
  });
  c.on('servererror', (e) => {
    if (e.code === ErrorCode.FORBIDDEN && /^resume:/.test(e.message)) return; // a room left elsewhere
    toast(`Server: ${e.message || e.code}`);
  });
  c.on('disconnected', (d) => {
    if (d.willReconnect || client !== c) return;
    if (d.expired) {
      sessionExpired();
      return;
    }
    toast(`Disconnected: ${d.reason}`);
    const code = d.error ? d.error.code : '';
    if (code === 'GET_TOKEN' || /AUTH/.test(code) || /AUTH/.test(d.reason)) {
      signOut(`Your session ended: ${d.error ? d.error.serverMessage || d.error.message : d.reason}`);
    }
  });
}

/**
 * Signs in with `token`. `devUser`: the name it was minted for by the dev
 * login, which can then mint a new one whenever it expires.
 */
async function start(token, devUser = '') {
  if (client) client.close();
  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
  const getToken = devUser ? () => devLogin(devUser) : undefined;
  const c = new ChatdClient({ url, token, getToken, device: 'web' });
  client = c;
  wire(c);
  let backoff = 500;
  for (;;) {
    try {
      const w = await c.connect();
      localStorage.setItem(TOKEN_KEY, typeof c.token === 'string' ? c.token : token);
      if (devUser) localStorage.setItem(DEV_USER_KEY, devUser);
      else localStorage.removeItem(DEV_USER_KEY);
      showApp(w);
      return;
    } catch (e) {
      if (client !== c) return;
      if (e instanceof ChatdError && e.expired) {
        sessionExpired();
        return;
      }
      const fatal =
        e instanceof ChatdError &&
        (e.code === ErrorCode.UNAUTHENTICATED || e.code === ErrorCode.UNSUPPORTED_VERSION || e.code === 'CLOSE_REASON_AUTH_FAILED' || e.code === 'GET_TOKEN');
      if (fatal) {
        signOut(`Sign-in failed: ${e.serverMessage || e.message}`);
        return;
      }
      // The server is unreachable: show the app offline and keep trying.
      if ($('app').hidden && localStorage.getItem(TOKEN_KEY) !== token) {
        showLogin(`Cannot reach the server: ${e.message}`);
        client = null;
        return;
      }
      showApp(null);
      connState = 'reconnecting';
      retryAt = Date.now() + backoff;
      renderConn();
      await new Promise((res) => setTimeout(res, backoff));
      backoff = Math.min(backoff * 2, 5000);
      if (client !== c) return;
    }
  }
}

function showApp(w) {
  $('login').hidden = true;
  $('app').hidden = false;
  if (w) me = w.user;
  $('me-name').textContent = me || '…';
  const av = $('me-avatar');
  av.style.setProperty('--hue', String(hue(me || '?')));
  av.textContent = (me[0] || '?').toUpperCase();
  renderConn();
  renderNotifyButton();
  if (!active) {
    const saved = localStorage.getItem(ROOM_KEY);
    const first = saved && rooms.has(saved) ? saved : [...rooms.keys()].sort()[0];
    if (first) selectRoom(first);
  }
  invalidate('sidebar', 'header', 'messages', 'typing');
}

/** The sign-in screen showing `error` (with `notice`: a plain message, not styled as an error). */
function showLogin(error, notice = false) {
  setNav(false);
  $('app').hidden = true;
  $('login').hidden = false;
  const err = $('login-error');
  err.hidden = !error;
  err.textContent = error || '';
  err.classList.toggle('notice', notice);
  ($('dev-login').hidden ? $('token-input') : $('dev-name')).focus();
}

/**
 * Back to the sign-in screen, forgetting the token. `clearInput`: also
 * empty the token box (a token that expired or was signed out of is of no
 * further use; a refused one stays there to be corrected).
 */
function signOut(error, { clearInput = false, notice = false } = {}) {
  const c = client;
  client = null;
  if (c) c.close();
  localStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(DEV_USER_KEY);
  if (clearInput) $('token-input').value = '';
  rooms.clear();
  invites.clear();
  membersOpen = false;
  selected = null;
  closeMentions();
  for (const d of document.querySelectorAll('dialog[open]')) d.close();
  active = null;
  me = '';
  showLogin(error, notice);
}

/** The token expired and no new one can be had: the user signs in again. */
function sessionExpired() {
  signOut(EXPIRED_NOTICE, { clearInput: true, notice: true });
}

async function probeDevLogin() {
  // POST without a user: 404 when dev login is off, 400 (nothing minted) when on.
  try {
    const res = await fetch('/dev/token', { method: 'POST' });
    return res.status !== 404;
  } catch {
    return false;
  }
}

async function devLogin(name) {
  const res = await fetch(`/dev/token?user=${encodeURIComponent(name)}`, { method: 'POST' });
  const text = (await res.text()).trim();
  if (!res.ok) throw new Error(text || `HTTP ${res.status}`);
  return text;
}

// ---------------------------------------------------------------------------
// Boot

function bind() {
  $('dev-login').addEventListener('submit', async (e) => {
    e.preventDefault();
    const name = $('dev-name').value.trim();
    if (!name) return;
    try {
      const token = await devLogin(name);
      $('login-error').hidden = true;
      await start(token, name);
    } catch (err) {
      showLogin(errorText(err));
    }
  });
  $('token-login').addEventListener('submit', (e) => {
    e.preventDefault();
    const token = $('token-input').value.trim();
    if (token) start(token);
  });
  $('logout').addEventListener('click', () => signOut('', { clearInput: true }));
  $('join-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const v = $('join-input').value;
    $('join-input').value = '';
    joinRoom(v);
  });
  $('dm-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const v = $('dm-input').value;
    $('dm-input').value = '';
    openDm(v);
  });
  $('join-general').addEventListener('click', () => joinRoom('general'));
  $('menu-btn').addEventListener('click', () => setNav(!navOpen()));
  $('nav-backdrop').addEventListener('click', () => setNav(false, { refocus: true }));
  document.addEventListener('keydown', (e) => {
    if (e.key !== 'Escape' || document.querySelector('dialog[open]')) return;
    if (navOpen()) {
      e.preventDefault();
      setNav(false, { refocus: true });
    } else if (membersOpen && narrow.matches) {
      e.preventDefault();
      toggleMembers(false);
      $('members-btn').focus();
    }
  });
  // Grown past phone width (a rotated tablet, a resized window): the sidebar is back in place.
  narrow.addEventListener('change', () => {
    setNav(false);
    syncInert();
  });
  $('leave-btn').addEventListener('click', leaveRoom);
  $('gone-close').addEventListener('click', () => active && dropRoom(active));
  $('members-btn').addEventListener('click', () => toggleMembers());
  $('members-close').addEventListener('click', () => {
    toggleMembers(false);
    $('members-btn').focus();
  });
  $('members-more').addEventListener('click', () => {
    const r = active ? rooms.get(active) : null;
    if (r) loadMembers(r, true);
  });
  $('invite-form').addEventListener('submit', inviteFromPanel);
  $('settings-btn').addEventListener('click', openRoomDialog);
  $('room-topic').addEventListener('click', openRoomDialog);
  $('rd-form').addEventListener('submit', saveRoom);
  $('unban-form').addEventListener('submit', unbanFromDialog);
  $('browse-btn').addEventListener('click', openDirectory);
  $('create-btn').addEventListener('click', openCreate);
  $('create-form').addEventListener('submit', createRoom);
  $('dir-search').addEventListener('input', () => {
    clearTimeout(dir.timer);
    dir.timer = setTimeout(() => searchDirectory(false), DIR_SEARCH_DELAY_MS);
  });
  $('dir-search').addEventListener('keydown', (e) => {
    if (e.key === 'Enter') {
      e.preventDefault();
      searchDirectory(false);
    }
  });
  $('dir-more').addEventListener('click', () => searchDirectory(true));
  for (const [id, action] of [['md-admin', 'admin'], ['md-member', 'member'], ['md-owner', 'owner'], ['md-remove', 'remove'], ['md-ban', 'ban']]) {
    $(id).addEventListener('click', () => memberAction(action));
  }
  for (const [btn, dlg] of [['create-cancel', 'create-dialog'], ['dir-close', 'dir-dialog'], ['rd-close', 'room-dialog'], ['md-close', 'member-dialog']]) {
    $(btn).addEventListener('click', () => $(dlg).close());
  }
  // A click on a dialog's backdrop (the dialog element itself, outside its box) closes it.
  for (const d of document.querySelectorAll('dialog')) {
    d.addEventListener('click', (e) => {
      if (e.target !== d) return;
      const b = d.getBoundingClientRect();
      if (e.clientX < b.left || e.clientX > b.right || e.clientY < b.top || e.clientY > b.bottom) d.close();
    });
  }
  $('load-older').addEventListener('click', loadOlder);
  $('messages').addEventListener('scroll', () => {
    if ($('messages').scrollTop < 40) loadOlder();
  });
  $('composer').addEventListener('submit', (e) => {
    e.preventDefault();
    send();
  });
  const input = $('composer-input');
  input.addEventListener('keydown', (e) => {
    if (mentionKey(e)) return;
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    } else if (e.key === 'Escape' && !input.value && rooms.get(active || '')?.replyTo) {
      e.stopPropagation();
      cancelReply();
    } else if (e.key === 'ArrowUp' && !input.value && active) {
      // Up in the empty composer edits one's last message (the actions are for the mouse).
      const r = rooms.get(active);
      const seq = r ? [...r.seqs].reverse().find((s) => canEdit(r, r.msgs.get(s))) : undefined;
      if (seq) {
        e.preventDefault();
        startEdit(r, r.msgs.get(seq));
      }
    }
  });
  input.addEventListener('input', () => {
    onComposerInput();
    updateMentions();
  });
  // The caret moved (arrows, a click): the @ being typed may be another one.
  input.addEventListener('keyup', (e) => {
    if (['ArrowLeft', 'ArrowRight', 'Home', 'End'].includes(e.key)) updateMentions();
  });
  input.addEventListener('click', updateMentions);
  $('message-list').addEventListener('click', onMessageClick);
  $('reply-cancel').addEventListener('click', cancelReply);
  $('notify-btn').addEventListener('click', enableNotifications);
  input.addEventListener('blur', stopTyping);
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') maybeMarkRead();
    else stopTyping();
  });
  // Expire stale typing indicators and refresh the reconnect countdown.
  setInterval(() => {
    const r = active ? rooms.get(active) : null;
    if (r && [...r.typing.values()].some((exp) => exp <= Date.now())) {
      for (const [u, exp] of r.typing) if (exp <= Date.now()) r.typing.delete(u);
      invalidate('typing');
    }
    if (connState === 'reconnecting') renderConn();
  }, 1000);
}

async function boot() {
  bind();
  const dev = await probeDevLogin();
  $('dev-login').hidden = !dev;
  $('login-or').hidden = !dev;
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) start(token, (dev && localStorage.getItem(DEV_USER_KEY)) || '');
  else showLogin('');
}

boot();
