// The chatd web app served at `/`. Plain DOM, no framework; all protocol
// work (ordering, resume, retries) is in chatd-client.js.

import { ChatdClient, ChatdError, ErrorCode, newClientMsgId } from './chatd-client.js';

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
let dirty = { sidebar: false, header: false, messages: false, typing: false };
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
const unread = (r) => Math.max(0, r.head - r.read);

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
    }[e.code];
    return friendly ? `${friendly}: ${e.serverMessage}` : e.message;
  }
  return String(e && e.message ? e.message : e);
}

// ---------------------------------------------------------------------------
// Message store

function addMessage(m) {
  const r = room(m.room);
  r.head = Math.max(r.head, m.seq);
  if (r.msgs.has(m.seq)) return false;
  r.msgs.set(m.seq, m);
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
  if (m.clientMsgId && m.sender === me) r.pending.delete(m.clientMsgId);
  if (m.room === active) invalidate('messages');
  invalidate('sidebar');
  return true;
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
  dirty = { sidebar: false, header: false, messages: false, typing: false };
  if (d.sidebar) renderSidebar();
  if (d.header) renderHeader();
  if (d.messages) renderMessages();
  if (d.typing) renderTyping();
  if (d.sidebar || d.messages) maybeMarkRead();
}

function renderSidebar() {
  const names = [...rooms.keys()].sort();
  const item = (name) => {
    const r = rooms.get(name);
    const n = unread(r);
    const label = displayName(name);
    const icon = isDm(name) ? avatar(dmPeer(name), 'avatar small') : h('span', { class: 'hash', text: '#' });
    if (isDm(name) && connState === 'connected' && r.online.has(dmPeer(name))) icon.classList.add('is-online');
    const btn = h(
      'button',
      { class: 'room-btn', type: 'button', title: name },
      icon,
      h('span', { class: 'room-name', text: isDm(name) ? label : name }),
      n > 0 && name !== active ? h('span', { class: 'badge', 'data-unread': n, text: n > 99 ? '99+' : String(n) }) : null,
    );
    btn.addEventListener('click', () => {
      setNav(false, { refocus: true });
      selectRoom(name);
    });
    return h(
      'li',
      {
        class: `room-item${name === active ? ' active' : ''}${n > 0 && name !== active ? ' unread' : ''}`,
        'data-room': name,
        'data-head': r.head,
        'data-read': r.acked || 0, // read marker as confirmed by the server
      },
      btn,
    );
  };
  $('room-list').replaceChildren(...names.filter((n) => !isDm(n)).map(item));
  $('dm-list').replaceChildren(...names.filter(isDm).map(item));
  const total = [...rooms.values()].reduce((a, r) => a + (r.name === active ? 0 : unread(r)), 0);
  document.title = total ? `(${total}) chatd` : 'chatd';
  const menuBadge = $('menu-unread');
  menuBadge.hidden = !total;
  menuBadge.textContent = total > 99 ? '99+' : String(total);
}

function renderHeader() {
  const r = active ? rooms.get(active) : null;
  $('room-title').textContent = r ? displayName(r.name) : 'chatd';
  $('leave-btn').hidden = !r;
  $('empty').hidden = !!r;
  $('messages').hidden = !r;
  $('composer').hidden = !r;
  $('composer-input').placeholder = r ? `Message ${displayName(r.name)}` : 'Message';
  const online = $('online');
  if (!r) {
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

function messageNode(r, m) {
  let el = r.nodes.get(m.seq);
  if (el) return el;
  const ts = new Date(m.tsMs);
  el = h(
    'div',
    {
      class: `msg${m.sender === me ? ' mine' : ''}`,
      'data-room': m.room,
      'data-seq': m.seq,
      'data-sender': m.sender,
      'data-client-msg-id': m.clientMsgId || undefined,
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
      h('div', { class: 'msg-text', text: m.text || (m.data ? `[${Math.floor((m.data.length * 3) / 4)} bytes of data]` : '') }),
    ),
    h('time', { class: 'msg-hover-time', datetime: ts.toISOString(), text: timeFmt.format(ts) }),
  );
  r.nodes.set(m.seq, el);
  return el;
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
    const cont = !breakGroup && prev && prev.sender === m.sender && m.tsMs - prev.tsMs < GROUP_MS;
    el.classList.toggle('cont', !!cont);
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
          h('div', { class: 'msg-text', text: p.text }),
          p.failed ? retryButton(r, id) : null,
        ),
      ),
    );
  }
  $('message-list').replaceChildren(...out);

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
    if (p) sendPending(r.name, id, p.text);
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
// Actions

async function selectRoom(name) {
  if (active && active !== name) stopTyping();
  const r = room(name);
  active = name;
  localStorage.setItem(ROOM_KEY, name);
  r.dividerAt = unread(r) > 0 ? r.read : -1;
  r.typing.forEach((exp, u) => exp < Date.now() && r.typing.delete(u));
  scrollMode = 'bottom';
  invalidate('sidebar', 'header', 'messages', 'typing');
  // On a phone the on-screen keyboard would come up over the messages just chosen.
  if (!narrow.matches) $('composer-input').focus();
  if (!r.loaded) await loadNewest(r);
}

async function loadNewest(r) {
  if (r.loading || !client) return;
  r.loading = true;
  try {
    const page = await client.history({ room: r.name, limit: PAGE });
    r.head = Math.max(r.head, page.headSeq);
    for (const m of page.messages) addMessage(m);
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

async function loadOlder() {
  const r = active ? rooms.get(active) : null;
  if (!r || r.loading || !r.hasOlder || !r.seqs.length || !client) return;
  r.loading = true;
  invalidate('messages');
  try {
    const page = await client.history({ room: r.name, beforeSeq: r.seqs[0], limit: PAGE });
    const box = $('messages');
    if (r.name === active) scrollMode = { height: box.scrollHeight, top: box.scrollTop };
    for (const m of page.messages) addMessage(m);
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
  } catch (e) {
    toast(`Could not join ${name}: ${errorText(e)}`);
  }
}

function applyJoined(j) {
  const r = room(j.state.room);
  r.head = Math.max(r.head, j.state.headSeq);
  r.read = Math.max(r.read, j.state.readSeq);
  r.acked = Math.max(r.acked || 0, j.state.readSeq);
  r.online = new Set(j.online);
  invalidate('sidebar', 'header');
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
  rooms.delete(name);
  const next = [...rooms.keys()].sort()[0] || null;
  active = null;
  if (next) selectRoom(next);
  else {
    localStorage.removeItem(ROOM_KEY);
    invalidate('sidebar', 'header', 'messages', 'typing');
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

function sendPending(roomName, id, text) {
  const r = room(roomName);
  r.pending.set(id, { text, failed: '', ts: Date.now() });
  invalidate('messages');
  client
    .publish(roomName, text, { clientMsgId: id })
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
  input.value = '';
  autosize();
  stopTyping();
  scrollMode = 'bottom';
  sendPending(active, newClientMsgId(), text);
}

// Read markers: the room on screen is read up to its newest message. One
// MarkRead in flight per room; the next goes out when it is answered.
function maybeMarkRead() {
  const r = active ? rooms.get(active) : null;
  if (!r || document.visibilityState !== 'visible') return;
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
  // What the panel covers can be neither tabbed to nor read out.
  $('chat').inert = open;
  if (open) ($('sidebar').querySelector('.room-item.active .room-btn') || $('sidebar')).focus();
  else if (refocus) $('menu-btn').focus();
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
    }
    for (const name of [...rooms.keys()]) {
      if (!member.has(name)) {
        rooms.delete(name);
        if (active === name) active = null;
      }
    }
    // Refresh who is online (Welcome does not say); Join is idempotent.
    for (const name of member) {
      c.join(name).then(applyJoined, () => {});
    }
    if (w.reconnected) {
      // Pages never fetched while away are fetched now.
      for (const r of rooms.values()) if (r.name === active && !r.loaded) loadNewest(r);
    }
    invalidate('sidebar', 'header', 'messages', 'typing');
  });
  c.on('message', (m) => {
    discover(m.room);
    addMessage(m);
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
    invalidate('header', 'typing', 'sidebar');
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
    if (e.key === 'Escape' && navOpen()) {
      e.preventDefault();
      setNav(false, { refocus: true });
    }
  });
  // Grown past phone width (a rotated tablet, a resized window): the sidebar is back in place.
  narrow.addEventListener('change', () => setNav(false));
  $('leave-btn').addEventListener('click', leaveRoom);
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
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  input.addEventListener('input', onComposerInput);
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
