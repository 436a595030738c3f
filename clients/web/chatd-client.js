// chatd-client.js — a small client for chatd's WebSocket protocol (JSON text
// messages, protocol version 1). No dependencies, no build step: an ES module
// for browsers (and Node >= 20 given a WebSocket implementation).
//
//   import { ChatdClient } from './chatd-client.js';
//   const client = new ChatdClient({ url: 'ws://127.0.0.1:7480/ws', token });
//   client.addEventListener('message', (e) => console.log(e.detail.sender, e.detail.text));
//   await client.connect();
//   await client.join('general');
//   const ack = await client.publish('general', 'hello');
//
// What it guarantees (the same as the Rust client, clients/rust/src/conn.rs
// and cursor.rs):
//  * per room, each message is delivered once and in seq order: a seq at or
//    below the room's cursor is dropped; a seq beyond cursor + 1 is a gap,
//    which is paged in with a forward History before later events are
//    released;
//  * if the connection drops, it reconnects with backoff (waiting at least
//    GoAway.retryAfterMs), resumes every room from its cursor
//    (Hello.resume), and re-sends every request that got no reply with the
//    same id (a publish keeps its clientMsgId, so the server answers a retry
//    of a stored message with the original seq and duplicate = true);
//  * it never retries with a token the server refused or ended a session
//    for (GoAway{CLOSE_REASON_AUTH_EXPIRED}, GoAway{CLOSE_REASON_AUTH_FAILED},
//    an UNAUTHENTICATED answer to Hello): it asks `getToken` for a new one,
//    or gives up (see Tokens below); nor after UNSUPPORTED_VERSION;
//  * it answers the server's Ping with a Pong of the same nonce, and pings
//    the server every Welcome.heartbeatMs to notice a dead network.
//
// Tokens. chatd ends a session when its token's `exp` passes
// (GoAway{CLOSE_REASON_AUTH_EXPIRED}) and refuses an expired token in Hello
// (UNAUTHENTICATED "token has expired", then GoAway{CLOSE_REASON_AUTH_FAILED}),
// so a client that outlives its token needs a way to get another:
//
//   new ChatdClient({ url, token, getToken: () => fetch('/my/token').then((r) => r.text()) });
//
// `getToken` (an async function returning a token) is called
//  (a) shortly before the token in use expires, when it is a JWT with an
//      `exp` claim (read locally, unverified): at exp minus the larger of
//      10% of its remaining life and 5 s. The new token is kept for the next
//      connection; a failure here is not fatal (it is tried again at (b));
//  (b) when the server ends the session with AUTH_EXPIRED (unless a token
//      from (a) is waiting): the client reconnects at once with the new
//      token and resumes every room from its cursor, as after any drop;
//  (c) once when the server refuses a token in Hello (or ends a session with
//      AUTH_FAILED): the client tries once more with the new token.
// Without `getToken`, or when it throws, returns no token, returns a token
// that expires no later than the one that just expired, or its token is
// refused too, the client gives up: state `closed`, and a `disconnected`
// event with `willReconnect: false`, the `error`, and `expired: true` when
// the token expiring was the cause. A `token` function (called before every
// connect) also serves as `getToken` when that is not given.
//
// Values: the proto3 JSON mapping omits default values; this client fills
// them in (a missing `complete` is `false`, a missing `seq` is 0, ...), and
// turns 64-bit seqs and timestamps (strings on the wire) into Numbers
// (exact up to 2^53). `data` (bytes) stays a base64 string; see toBase64 /
// fromBase64.

/** The protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;

/** Request id of Hello (the first frame of every connection). */
const HELLO_ID = 1;
/** Longest wait for Welcome. */
const HELLO_TIMEOUT_MS = 10_000;
/** Most user ids one Publish may mention. */
const MAX_MENTIONS = 50;
/** Largest page the server returns; used to fill gaps. */
const GAP_PAGE = 1000;
/** A new token is fetched at least this long before the current one expires. */
const REFRESH_LEAD_MS = 5000;
/** setTimeout fires at once for delays above 2^31 - 1 ms; longer waits are chained. */
const MAX_TIMER_MS = 0x7fffffff;

/**
 * Error codes (`Error.code`) as names.
 * @enum {string}
 */
export const ErrorCode = Object.freeze({
  UNSPECIFIED: 'ERROR_CODE_UNSPECIFIED',
  BAD_REQUEST: 'ERROR_CODE_BAD_REQUEST',
  UNAUTHENTICATED: 'ERROR_CODE_UNAUTHENTICATED',
  FORBIDDEN: 'ERROR_CODE_FORBIDDEN',
  NOT_FOUND: 'ERROR_CODE_NOT_FOUND',
  RATE_LIMITED: 'ERROR_CODE_RATE_LIMITED',
  TOO_LARGE: 'ERROR_CODE_TOO_LARGE',
  UNSUPPORTED_VERSION: 'ERROR_CODE_UNSUPPORTED_VERSION',
  SERVER_BUSY: 'ERROR_CODE_SERVER_BUSY',
  INTERNAL: 'ERROR_CODE_INTERNAL',
  ALREADY_EXISTS: 'ERROR_CODE_ALREADY_EXISTS',
  CONFLICT: 'ERROR_CODE_CONFLICT',
});

/**
 * Close reasons (`GoAway.reason`) as names.
 * @enum {string}
 */
export const CloseReason = Object.freeze({
  UNSPECIFIED: 'CLOSE_REASON_UNSPECIFIED',
  SHUTDOWN: 'CLOSE_REASON_SHUTDOWN',
  IDLE_TIMEOUT: 'CLOSE_REASON_IDLE_TIMEOUT',
  SLOW_CONSUMER: 'CLOSE_REASON_SLOW_CONSUMER',
  CAPACITY: 'CLOSE_REASON_CAPACITY',
  PROTOCOL_ERROR: 'CLOSE_REASON_PROTOCOL_ERROR',
  AUTH_FAILED: 'CLOSE_REASON_AUTH_FAILED',
  AUTH_EXPIRED: 'CLOSE_REASON_AUTH_EXPIRED',
});

/**
 * Room kinds (`RoomInfo.kind`, `CreateRoom.kind`) as names.
 * @enum {string}
 */
export const RoomKind = Object.freeze({
  UNSPECIFIED: 'ROOM_KIND_UNSPECIFIED',
  PUBLIC: 'ROOM_KIND_PUBLIC',
  PRIVATE: 'ROOM_KIND_PRIVATE',
  DIRECT: 'ROOM_KIND_DIRECT',
});

/**
 * Member roles (`RoomInfo.myRole`, `Member.role`, `SetRole.role`) as names;
 * `UNSPECIFIED` means not a member.
 * @enum {string}
 */
export const Role = Object.freeze({
  UNSPECIFIED: 'ROLE_UNSPECIFIED',
  MEMBER: 'ROLE_MEMBER',
  ADMIN: 'ROLE_ADMIN',
  OWNER: 'ROLE_OWNER',
});

/**
 * What happened to a member (`RoomUpdate.change`, `Left.reason`) as names.
 * `UNSPECIFIED` in a `RoomUpdate`: the room's title or topic changed; in a
 * `Left`: a resume cursor for a room the user never joined.
 * @enum {string}
 */
export const MemberChange = Object.freeze({
  UNSPECIFIED: 'MEMBER_CHANGE_UNSPECIFIED',
  JOINED: 'MEMBER_CHANGE_JOINED',
  LEFT: 'MEMBER_CHANGE_LEFT',
  INVITED: 'MEMBER_CHANGE_INVITED',
  REMOVED: 'MEMBER_CHANGE_REMOVED',
  BANNED: 'MEMBER_CHANGE_BANNED',
  UNBANNED: 'MEMBER_CHANGE_UNBANNED',
  ROLE_CHANGED: 'MEMBER_CHANGE_ROLE_CHANGED',
  DECLINED: 'MEMBER_CHANGE_DECLINED',
});

/**
 * What a change entry does to its target (`Message.change.kind`) as names
 * (proto/README.md §9).
 * @enum {string}
 */
export const ChangeKind = Object.freeze({
  UNSPECIFIED: 'CHANGE_KIND_UNSPECIFIED',
  EDIT: 'CHANGE_KIND_EDIT',
  DELETE: 'CHANGE_KIND_DELETE',
  REACTION_ADD: 'CHANGE_KIND_REACTION_ADD',
  REACTION_REMOVE: 'CHANGE_KIND_REACTION_REMOVE',
});

// In enum number order: a numeric enum on the wire is an index here.
const ERROR_NAMES = Object.values(ErrorCode);
const CLOSE_NAMES = Object.values(CloseReason);
const KIND_NAMES = Object.values(RoomKind);
const ROLE_NAMES = Object.values(Role);
const CHANGE_NAMES = Object.values(MemberChange);
const CHANGE_KIND_NAMES = Object.values(ChangeKind);

/**
 * A request the server refused (`code` is an {@link ErrorCode} name), a
 * connection the server ended (`code` is a {@link CloseReason} name), or a
 * local failure: `code` is then `CLOSED` (the client was closed or gave up),
 * `TIMEOUT` (no Welcome in time), `CONNECTION` (could not connect) or
 * `GET_TOKEN` (`getToken` or the `token` function failed or returned no
 * usable token).
 */
export class ChatdError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   */
  constructor(code, message) {
    super(message ? `${code}: ${message}` : code);
    this.name = 'ChatdError';
    /** @type {string} */
    this.code = code;
    /** The server's human-readable text. */
    this.serverMessage = message || '';
    /**
     * True when this error ends a session because its token expired (and no
     * new token could be had): the user has to sign in again.
     */
    this.expired = false;
  }
}

/** Makes a ChatdError with `expired` set. */
function chatdError(code, message, expired) {
  const e = new ChatdError(code, message);
  e.expired = !!expired;
  return e;
}

/** How the server words an expired token in Error / GoAway messages. */
const EXPIRED_TEXT = /\bexpired\b/i;

// ---------------------------------------------------------------------------
// Typedefs (the JSON shapes, after defaults are filled in).

/**
 * A room as the asking user sees it (proto/README.md §8).
 * @typedef {object} RoomInfo
 * @property {string} room
 * @property {string} kind  a {@link RoomKind} name
 * @property {string} title  ('' when none)
 * @property {string} topic  ('' when none)
 * @property {string} createdBy
 * @property {number} createdMs  Unix milliseconds
 * @property {number} memberCount
 * @property {string} myRole  a {@link Role} name; `ROLE_UNSPECIFIED`: not a member
 * @property {string} owner  the owner's user id ('' while the room has no members)
 */
/**
 * @typedef {object} RoomState
 * @property {string} room
 * @property {number} headSeq  seq of the room's last message (0: empty)
 * @property {number} readSeq  the user's read marker
 * @property {RoomInfo | null} info  the room's details and the user's role
 *   (null from a server that does not send them)
 * @property {number} unread  messages after readSeq sent by others and not
 *   deleted (change entries excluded), capped at 9999
 * @property {number} mentions  of those, the ones that mention the user
 */
/**
 * A pending invitation (a push, and listed in `Welcome.invites`).
 * @typedef {{room: string, by: string, tsMs: number, info: RoomInfo | null}} Invitation
 */
/**
 * A change to a room or its membership, pushed to its members. `user` is
 * the member concerned ('' when the title or topic changed), `role` their
 * role afterwards, `by` who made the change ('' for the server).
 * @typedef {{info: RoomInfo | null, by: string, user: string, change: string, role: string}} RoomUpdate
 */
/** @typedef {{user: string, role: string, online: boolean}} Member */
/** @typedef {{room: string, members: Member[], hasMore: boolean}} MemberPage */
/** @typedef {{rooms: RoomInfo[], hasMore: boolean}} RoomList */
/**
 * @typedef {object} Welcome
 * @property {string} user
 * @property {string} sessionId
 * @property {number} protocolVersion
 * @property {RoomState[]} rooms  every room the user is a member of
 * @property {number} heartbeatMs
 * @property {number} maxFrameBytes
 * @property {string} server
 * @property {Invitation[]} invites  the user's pending invitations
 */
/** @typedef {{state: RoomState, online: string[]}} Joined */
/**
 * The reply to `leave` (reason `MEMBER_CHANGE_LEFT`), and a push when the
 * membership ended elsewhere: `MEMBER_CHANGE_LEFT` (another session of the
 * user left), `MEMBER_CHANGE_REMOVED` / `MEMBER_CHANGE_BANNED` (by an admin,
 * `by`), or `MEMBER_CHANGE_UNSPECIFIED` (a resume cursor for a room the user
 * never joined). Nothing of the room follows it.
 * @typedef {{room: string, reason: string, by: string}} Left
 */
/**
 * @typedef {object} PublishAck
 * @property {string} room
 * @property {number} seq
 * @property {number} tsMs
 * @property {string} clientMsgId
 * @property {boolean} duplicate  true: a retry of an already stored message
 */
/**
 * What a change entry changes: message `targetSeq` of the same room.
 * `key` is the reaction (an emoji) for REACTION_ADD and REACTION_REMOVE.
 * @typedef {{targetSeq: number, kind: string, key: string}} MessageChange
 */
/**
 * A reaction on a message: `users` are the first (up to 20) who reacted,
 * earliest first; `mine` whether the reading user did.
 * @typedef {{key: string, count: number, users: string[], mine: boolean}} Reaction
 */
/**
 * A room log entry: a message, or (with `change` set) a change entry that
 * edits, deletes or reacts to an earlier message. `sender` is who sent it
 * (who made the change). History and resume give messages with their
 * latest state folded in (`editedMs`, `deleted`, `reactions`, the text after
 * the last edit) and `foldedSeq`, the seq of the last change folded in: a
 * change entry with a seq at or below it is already included.
 * @typedef {object} Message
 * @property {string} room
 * @property {number} seq
 * @property {string} sender
 * @property {number} tsMs  server time, Unix milliseconds
 * @property {string} clientMsgId
 * @property {string} text
 * @property {string} data  base64 ('' when none)
 * @property {number} replyTo  the seq it answers (0: none)
 * @property {string[]} mentions  user ids it mentions
 * @property {MessageChange | null} change  set on a change entry
 * @property {number} editedMs  when it was last edited (0: never)
 * @property {boolean} deleted  deleted: text and data are gone
 * @property {Reaction[]} reactions
 * @property {number} foldedSeq  the last change entry folded in (0: none)
 */
/** @typedef {{room: string, messages: Message[], headSeq: number, hasMore: boolean, firstSeq: number}} HistoryPage */
/** @typedef {{room: string, headSeq: number, complete: boolean, firstSeq: number}} Synced */
/** @typedef {{room: string, user: string, active: boolean}} Typing */
/** @typedef {{room: string, user: string, seq: number}} ReadReceipt */
/** @typedef {{room: string, user: string, online: boolean, devices: number}} Presence */
/** @typedef {{code: string, message: string}} ServerError */
/** @typedef {{reason: string, message: string, retryAfterMs: number}} GoAway */
/** @typedef {{room: string, afterSeq: number}} Cursor */

// ---------------------------------------------------------------------------
// JSON mapping helpers.

const num = (v) => (v === undefined || v === null || v === '' ? 0 : Number(v));
const str = (v) => (v === undefined || v === null ? '' : String(v));
const bool = (v) => v === true;
const enumName = (v, names, fallback) => (typeof v === 'number' ? names[v] || fallback : v ? String(v) : fallback);

/** @returns {RoomInfo} */
const roomInfo = (v = {}) => ({
  room: str(v.room),
  kind: enumName(v.kind, KIND_NAMES, RoomKind.UNSPECIFIED),
  title: str(v.title),
  topic: str(v.topic),
  createdBy: str(v.createdBy),
  createdMs: num(v.createdMs),
  memberCount: num(v.memberCount),
  myRole: enumName(v.myRole, ROLE_NAMES, Role.UNSPECIFIED),
  owner: str(v.owner),
});

/** A message field: null when absent (proto3 JSON omits an unset message). */
const maybe = (v, fn) => (v && typeof v === 'object' ? fn(v) : null);

/** @returns {RoomState} */
const roomState = (v = {}) => ({
  room: str(v.room),
  headSeq: num(v.headSeq),
  readSeq: num(v.readSeq),
  info: maybe(v.info, roomInfo),
  unread: num(v.unread),
  mentions: num(v.mentions),
});

/** @returns {Invitation} */
const invitation = (v = {}) => ({ room: str(v.room), by: str(v.by), tsMs: num(v.tsMs), info: maybe(v.info, roomInfo) });

/** @returns {Member} */
const member = (v = {}) => ({ user: str(v.user), role: enumName(v.role, ROLE_NAMES, Role.UNSPECIFIED), online: bool(v.online) });

/** @returns {MessageChange} */
const messageChange = (v = {}) => ({
  targetSeq: num(v.targetSeq),
  kind: enumName(v.kind, CHANGE_KIND_NAMES, ChangeKind.UNSPECIFIED),
  key: str(v.key),
});

/** @returns {Reaction} */
const reaction = (v = {}) => ({ key: str(v.key), count: num(v.count), users: (v.users || []).map(str), mine: bool(v.mine) });

/** @returns {Message} */
const message = (v = {}) => ({
  room: str(v.room),
  seq: num(v.seq),
  sender: str(v.sender),
  tsMs: num(v.tsMs),
  clientMsgId: str(v.clientMsgId),
  text: str(v.text),
  data: str(v.data),
  replyTo: num(v.replyTo),
  mentions: (v.mentions || []).map(str),
  change: maybe(v.change, messageChange),
  editedMs: num(v.editedMs),
  deleted: bool(v.deleted),
  reactions: (v.reactions || []).map(reaction),
  foldedSeq: num(v.foldedSeq),
});

/** Fills in the defaults of a body, by its JSON name. */
const NORMALIZE = {
  welcome: (v) => ({
    user: str(v.user),
    sessionId: str(v.sessionId),
    protocolVersion: num(v.protocolVersion),
    rooms: (v.rooms || []).map(roomState),
    heartbeatMs: num(v.heartbeatMs),
    maxFrameBytes: num(v.maxFrameBytes),
    server: str(v.server),
    invites: (v.invites || []).map(invitation),
  }),
  joined: (v) => ({ state: roomState(v.state), online: (v.online || []).map(str) }),
  left: (v) => ({ room: str(v.room), reason: enumName(v.reason, CHANGE_NAMES, MemberChange.UNSPECIFIED), by: str(v.by) }),
  publishAck: (v) => ({
    room: str(v.room),
    seq: num(v.seq),
    tsMs: num(v.tsMs),
    clientMsgId: str(v.clientMsgId),
    duplicate: bool(v.duplicate),
  }),
  message,
  historyPage: (v) => ({
    room: str(v.room),
    messages: (v.messages || []).map(message),
    headSeq: num(v.headSeq),
    hasMore: bool(v.hasMore),
    firstSeq: num(v.firstSeq),
  }),
  synced: (v) => ({
    room: str(v.room),
    headSeq: num(v.headSeq),
    complete: bool(v.complete),
    firstSeq: num(v.firstSeq),
  }),
  typing: (v) => ({ room: str(v.room), user: str(v.user), active: bool(v.active) }),
  readReceipt: (v) => ({ room: str(v.room), user: str(v.user), seq: num(v.seq) }),
  presence: (v) => ({ room: str(v.room), user: str(v.user), online: bool(v.online), devices: num(v.devices) }),
  // Nonces are echoed exactly as received (a string: 64-bit).
  ping: (v) => ({ nonce: str(v.nonce ?? '0') }),
  pong: (v) => ({ nonce: str(v.nonce ?? '0') }),
  error: (v) => ({ code: enumName(v.code, ERROR_NAMES, ErrorCode.UNSPECIFIED), message: str(v.message) }),
  goAway: (v) => ({
    reason: enumName(v.reason, CLOSE_NAMES, CloseReason.UNSPECIFIED),
    message: str(v.message),
    retryAfterMs: num(v.retryAfterMs),
  }),
  roomInfo,
  invitation,
  roomUpdate: (v) => ({
    info: maybe(v.info, roomInfo),
    by: str(v.by),
    user: str(v.user),
    change: enumName(v.change, CHANGE_NAMES, MemberChange.UNSPECIFIED),
    role: enumName(v.role, ROLE_NAMES, Role.UNSPECIFIED),
  }),
  memberPage: (v) => ({ room: str(v.room), members: (v.members || []).map(member), hasMore: bool(v.hasMore) }),
  roomList: (v) => ({ rooms: (v.rooms || []).map(roomInfo), hasMore: bool(v.hasMore) }),
};

/**
 * Parses one text frame: `{id, kind, body}` with the body's defaults filled
 * in, or `null` for something that is not an Envelope.
 * @param {string} text
 * @returns {{id: number, kind: string, body: any} | null}
 */
export function parseEnvelope(text) {
  let env;
  try {
    env = JSON.parse(text);
  } catch {
    return null;
  }
  if (!env || typeof env !== 'object') return null;
  const id = num(env.id);
  for (const key of Object.keys(env)) {
    if (key === 'id') continue;
    const norm = NORMALIZE[key];
    const v = env[key] && typeof env[key] === 'object' ? env[key] : {};
    return { id, kind: key, body: norm ? norm(v) : v };
  }
  return { id, kind: '', body: null };
}

/**
 * Base64 of bytes (for `Publish.data`).
 * @param {Uint8Array} bytes
 * @returns {string}
 */
export function toBase64(bytes) {
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

/**
 * Bytes of a base64 string (for `Message.data`).
 * @param {string} b64
 * @returns {Uint8Array}
 */
export function fromBase64(b64) {
  const s = atob(b64 || '');
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

/**
 * The `exp` claim (Unix seconds) of a JWT, read without verifying it; `null`
 * when the token is not a JWT or has no numeric `exp`.
 * @param {string} token
 * @returns {number | null}
 */
export function tokenExpiry(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const bytes = fromBase64(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    const exp = claims && typeof claims === 'object' ? claims.exp : undefined;
    return typeof exp === 'number' && Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

/** Whether `fresh` can replace `stale`, a token the server ended a session for. */
function newerThan(fresh, stale) {
  if (fresh === stale) return false;
  const a = tokenExpiry(fresh);
  const b = tokenExpiry(stale);
  return a === null || b === null || a > b;
}

/** How many users a {@link Reaction} lists at most. */
const REACTION_USERS = 20;

/**
 * Applies change entry `entry` (a {@link Message} with `change` set) to its
 * target message `target` in place, as the server folds it into History:
 * an edit replaces the text and data and sets `editedMs` to the entry's
 * time; a delete erases the content and sets `deleted`; a reaction adds or
 * removes `entry.sender` under `change.key` (`mine` is set when `user`, the
 * reading user, made it). An entry whose seq is at or below
 * `target.foldedSeq` is already included and skipped; so is one for a
 * deleted target. Returns whether `target` changed.
 * @param {Message} target
 * @param {Message} entry
 * @param {string} user  the reading user
 * @returns {boolean}
 */
export function applyChange(target, entry, user) {
  const c = entry.change;
  if (!c || c.targetSeq !== target.seq || entry.seq <= (target.foldedSeq || 0)) return false;
  target.foldedSeq = entry.seq;
  if (target.deleted) return false;
  switch (c.kind) {
    case ChangeKind.EDIT:
      target.text = entry.text;
      target.data = entry.data;
      target.editedMs = entry.tsMs || Date.now();
      return true;
    case ChangeKind.DELETE:
      target.deleted = true;
      target.text = '';
      target.data = '';
      target.reactions = [];
      return true;
    case ChangeKind.REACTION_ADD:
    case ChangeKind.REACTION_REMOVE: {
      const add = c.kind === ChangeKind.REACTION_ADD;
      const who = entry.sender;
      const list = target.reactions || (target.reactions = []);
      let r = list.find((x) => x.key === c.key);
      if (add) {
        if (!r) {
          r = { key: c.key, count: 0, users: [], mine: false };
          list.push(r);
        }
        // Already counted (listed, or mine): an add that changes nothing.
        if (r.users.includes(who) || (who === user && r.mine)) return false;
        r.count += 1;
        if (r.users.length < REACTION_USERS) r.users.push(who);
        if (who === user) r.mine = true;
        return true;
      }
      if (!r) return false;
      const i = r.users.indexOf(who);
      if (i >= 0) r.users.splice(i, 1);
      else if (who === user && !r.mine) return false; // not there to remove
      else if (r.users.length >= r.count) return false; // every reactor is listed, and not this one
      r.count = Math.max(0, r.count - 1);
      if (who === user) r.mine = false;
      if (r.count === 0) list.splice(list.indexOf(r), 1);
      return true;
    }
    default:
      return false;
  }
}

/** A random id for `Publish.clientMsgId` (works outside secure contexts). */
export function newClientMsgId() {
  const c = globalThis.crypto;
  if (c && typeof c.getRandomValues === 'function') {
    const b = c.getRandomValues(new Uint8Array(16));
    return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  }
  return `${Date.now().toString(16)}-${Math.random().toString(16).slice(2)}${Math.random().toString(16).slice(2)}`;
}

// ---------------------------------------------------------------------------
// Per-room delivery order (a port of clients/rust/src/cursor.rs).

/**
 * Cursors of every room the client knows: the last seq handed to the
 * application. A message at or below it is a duplicate and dropped; the next
 * seq is delivered; a later one is a gap, so the room holds further events
 * back until the gap is paged in with a forward History.
 *
 * `out` arrays receive deliverable events: `{type: 'message', value}` or
 * `{type: 'synced', value}`. Methods that may need a fetch return
 * `{fetchAfter: seq}` (fetch messages with seq > fetchAfter) or `null`.
 */
export class Cursors {
  constructor() {
    /** @type {Map<string, {last: number, held: Array<{type: string, value: any}> | null}>} */
    this.rooms = new Map();
  }

  /** Sets a room's cursor; never moves an existing cursor backwards. */
  track(room, last) {
    const r = this.rooms.get(room);
    if (r) r.last = Math.max(r.last, last);
    else this.rooms.set(room, { last, held: null });
  }

  /** Forgets a room (left). */
  forget(room) {
    this.rooms.delete(room);
  }

  /** Whether the room is tracked. */
  knows(room) {
    return this.rooms.has(room);
  }

  /** The last seq delivered in `room` (undefined when unknown). */
  last(room) {
    return this.rooms.get(room)?.last;
  }

  /** Every room with its cursor, sorted by room, for `Hello.resume`. @returns {Cursor[]} */
  resume() {
    return [...this.rooms.entries()]
      .map(([room, r]) => ({ room, afterSeq: r.last }))
      .sort((a, b) => (a.room < b.room ? -1 : a.room > b.room ? 1 : 0));
  }

  /** Drops gap fills in progress (the connection was lost; the resume replays from the cursor). */
  resetGaps() {
    for (const r of this.rooms.values()) r.held = null;
  }

  /**
   * A live or replayed message.
   * @param {Message} m
   * @param {Array<{type: string, value: any}>} out
   * @returns {{fetchAfter: number} | null}
   */
  onMessage(m, out) {
    let r = this.rooms.get(m.room);
    if (!r) {
      // An unknown room starts at its first message.
      r = { last: Math.max(0, m.seq - 1), held: null };
      this.rooms.set(m.room, r);
    }
    if (r.held) {
      r.held.push({ type: 'message', value: m });
      return null;
    }
    if (m.seq <= r.last) return null;
    if (m.seq === r.last + 1) {
      r.last = m.seq;
      out.push({ type: 'message', value: m });
      return null;
    }
    const after = r.last;
    r.held = [{ type: 'message', value: m }];
    return { fetchAfter: after };
  }

  /**
   * A `Synced`: delivered in order with the room's messages.
   * @param {Synced} s
   * @param {Array<{type: string, value: any}>} out
   */
  onSynced(s, out) {
    const r = this.rooms.get(s.room);
    if (r && r.held) r.held.push({ type: 'synced', value: s });
    else out.push({ type: 'synced', value: s });
  }

  /**
   * A history page fetched to fill a gap in `room`.
   * @param {string} room
   * @param {HistoryPage} page
   * @param {Array<{type: string, value: any}>} out
   * @returns {{fetchAfter: number} | null}
   */
  onGapPage(room, page, out) {
    const r = this.rooms.get(room);
    if (!r || !r.held) return null;
    // The page fills the gap up to the first held message; the held events
    // then follow in the order the server sent them.
    const firstHeld = r.held.find((e) => e.type === 'message')?.value.seq ?? Infinity;
    // What retention removed is gone for good: the log starts at firstSeq.
    if (r.last + 1 < page.firstSeq && page.firstSeq <= firstHeld) r.last = page.firstSeq - 1;
    const before = r.last;
    for (const m of page.messages) {
      if (m.seq === r.last + 1 && m.seq < firstHeld) {
        r.last = m.seq;
        out.push({ type: 'message', value: m });
      }
    }
    if (r.last + 1 < firstHeld && page.hasMore && r.last > before) {
      return { fetchAfter: r.last };
    }
    const held = r.held;
    r.held = null;
    for (const e of held) {
      if (e.type === 'message') {
        if (e.value.seq <= r.last) continue;
        // A hole the log cannot fill (the page ended before it) is skipped
        // rather than waited for forever.
        r.last = e.value.seq;
      }
      out.push(e);
    }
    return null;
  }
}

// ---------------------------------------------------------------------------
// The client.

/**
 * @typedef {object} ChatdClientOptions
 * @property {string} url  WebSocket URL, e.g. `ws://127.0.0.1:7480/ws`
 *   (in a page served by chatd: `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`)
 * @property {string | (() => string | Promise<string>)} [token]  the JWT, or a
 *   function called before every (re)connect that returns one; required
 *   unless `getToken` is given
 * @property {() => Promise<string>} [getToken]  returns a new token: called
 *   shortly before the token in use expires, when the server ends the
 *   session with AUTH_EXPIRED, and once when it refuses a token (see the
 *   Tokens section at the top of this file). Without it, an expired or
 *   refused token ends the client (state `closed`).
 * @property {string} [device='web']  device label
 * @property {Cursor[] | Record<string, number>} [resume]  rooms the
 *   application already has, up to a seq (e.g. a saved {@link ChatdClient#cursors})
 * @property {boolean} [reconnect=true]  reconnect when the connection drops
 * @property {number} [maxBackoffMs=5000]  longest wait between reconnect attempts
 * @property {boolean} [heartbeat=true]  ping every Welcome.heartbeatMs and
 *   drop (then reconnect) a connection that does not answer within one interval
 * @property {typeof WebSocket} [WebSocket]  WebSocket implementation
 *   (default: the global one)
 */

/**
 * A chatd connection that survives disconnects.
 *
 * Events (each a `CustomEvent`; the payload is `event.detail`):
 * - `connected` — {@link Welcome} plus `reconnected` (false the first
 *   time), after every (re)connect
 * - `disconnected` — `{reason, willReconnect, goAway?, error?, expired}`:
 *   `error` ({@link ChatdError}) when the client gave up; `expired` is true
 *   when the token expired (with `willReconnect: false`: no new token could
 *   be had, so the user has to sign in again)
 * - `statechange` — `{state, retryInMs?}`; state is one of `idle`,
 *   `connecting`, `connected`, `reconnecting`, `closed`
 * - `message` — {@link Message}, per room exactly once and in seq order
 * - `synced` — {@link Synced}, the end of a resume replay for a room
 * - `presence` — {@link Presence}
 * - `typing` — {@link Typing}
 * - `readreceipt` — {@link ReadReceipt} pushed by the server
 * - `joined` — {@link Joined}: someone else added the user to a room (an
 *   admin, or the other user of a direct room opening it)
 * - `left` — {@link Left}: the membership ended elsewhere: `reason`
 *   `MEMBER_CHANGE_REMOVED` or `MEMBER_CHANGE_BANNED` (by an admin, `by`),
 *   `MEMBER_CHANGE_LEFT` (another session of the user left). The client
 *   has dropped the room: no cursor, not resumed, nothing of it follows
 * - `invitation` — {@link Invitation}: the user was invited to a room
 *   (`join` accepts, `declineInvite` declines); pending ones are in
 *   `Welcome.invites`
 * - `roomupdate` — {@link RoomUpdate}: a room the user is in, or its
 *   membership, changed (the user's own changes included)
 * - `goaway` — {@link GoAway}, just before the server closes
 * - `servererror` — {@link ServerError} not tied to a request of yours
 *   (e.g. a refused `typing`, a resume cursor for a room you left)
 *
 * @extends EventTarget
 */
export class ChatdClient extends EventTarget {
  /** @param {ChatdClientOptions} options */
  constructor(options) {
    super();
    const o = options || {};
    if (!o.url) throw new TypeError('ChatdClient: url is required');
    if (!o.token && typeof o.getToken !== 'function') throw new TypeError('ChatdClient: token or getToken is required');
    /** WebSocket URL. */
    this.url = o.url;
    this._token = o.token || null;
    /** Where new tokens come from; null: an expired or refused token ends the client. */
    this.getToken = typeof o.getToken === 'function' ? o.getToken : typeof o.token === 'function' ? o.token : null;
    /** Device label sent in Hello. */
    this.device = o.device || 'web';
    this.reconnect = o.reconnect !== false;
    this.maxBackoffMs = o.maxBackoffMs ?? 5000;
    this.heartbeat = o.heartbeat !== false;
    this._WS = o.WebSocket || null;
    /** @type {Welcome | null} The latest Welcome. */
    this.welcome = null;

    this._cursors = new Cursors();
    for (const c of normalizeResume(o.resume)) this._cursors.track(c.room, c.afterSeq);
    /** Requests waiting for a reply, by id: re-sent after a reconnect. */
    this._pending = new Map();
    /** History requests sent by the client itself to fill gaps: id -> room. */
    this._gapFetches = new Map();
    /** Ids of the client's own heartbeat pings. */
    this._pings = new Set();
    this._nextId = HELLO_ID + 1;
    this._state = 'idle';
    this._conn = null;
    this._closed = false;
    this._wake = null;
    this._hbTimer = null;
    /** The newest token from getToken, used for every attempt until a Welcome accepts it. */
    this._fresh = null;
    /** The getToken call in flight (one at a time). */
    this._tokenFetch = null;
    this._refreshTimer = null;
  }

  /**
   * The token (or token function) for the next connection. A token string
   * from getToken replaces it once the server has accepted it; setting it
   * drops a new token fetched meanwhile.
   * @type {string | (() => string | Promise<string>) | null}
   */
  get token() {
    return this._token;
  }

  set token(v) {
    this._token = v;
    this._fresh = null;
  }

  /** Connection state: `idle`, `connecting`, `connected`, `reconnecting` or `closed`. */
  get state() {
    return this._state;
  }

  /** The user id from the latest Welcome ('' before the first). */
  get user() {
    return this.welcome ? this.welcome.user : '';
  }

  /**
   * Adds a listener that receives `event.detail`; returns a function that
   * removes it.
   * @param {string} type
   * @param {(detail: any) => void} fn
   * @returns {() => void}
   */
  on(type, fn) {
    const h = (e) => fn(e.detail);
    this.addEventListener(type, h);
    return () => this.removeEventListener(type, h);
  }

  /**
   * Opens the connection and completes the handshake. Rejects (with a
   * {@link ChatdError}) when the first attempt fails (after one retry with
   * a token from `getToken` if the server refused the token); once
   * connected, the client reconnects by itself.
   * @returns {Promise<Welcome>}
   */
  async connect() {
    if (this._state !== 'idle' && this._state !== 'closed') {
      throw new ChatdError('BAD_STATE', `connect() while ${this._state}`);
    }
    this._closed = false;
    this._setState('connecting');
    try {
      return await this._attempt(null);
    } catch (e) {
      this._conn = null;
      this._setState('closed');
      throw e.error || e;
    }
  }

  /**
   * Joins a room (idempotent) and subscribes every session of the user.
   * @param {string} room
   * @returns {Promise<Joined>}
   */
  join(room) {
    return this._request({ join: { room } });
  }

  /**
   * Leaves a room; the user's sessions stop receiving it.
   * @param {string} room
   * @returns {Promise<Left>}
   */
  leave(room) {
    return this._request({ leave: { room } });
  }

  /**
   * Publishes a message. The ack comes once the message is durable. A
   * unique `clientMsgId` is generated unless given; it is kept for retries
   * (after a reconnect, the server answers a retry of a stored message with
   * its original seq and `duplicate: true`).
   * @param {string} room
   * @param {string} text
   * @param {{data?: Uint8Array | string, clientMsgId?: string, replyTo?: number, mentions?: string[]}} [opts]
   *   `data`: bytes, or a base64 string; `replyTo`: the seq it answers;
   *   `mentions`: user ids it mentions (deduplicated, at most 50 sent)
   * @returns {Promise<PublishAck>}
   */
  publish(room, text, opts = {}) {
    const body = { room, clientMsgId: opts.clientMsgId || newClientMsgId(), text: text || '' };
    if (opts.data && opts.data.length) body.data = typeof opts.data === 'string' ? opts.data : toBase64(opts.data);
    if (opts.replyTo) body.replyTo = String(opts.replyTo);
    if (opts.mentions && opts.mentions.length) body.mentions = [...new Set(opts.mentions.map(String))].slice(0, MAX_MENTIONS);
    return this._request({ publish: body });
  }

  // -------------------------------------------------------------------------
  // Message changes (proto/README.md §9). Each is a new entry in the room's
  // log, answered by a PublishAck (its seq is the change entry's) and
  // delivered to every session as a `message` event whose `change` is set.
  // Only the sender edits; the sender or an admin/owner deletes; any member
  // reacts. A change to a deleted message, to a change entry or to an
  // unknown seq is refused (BAD_REQUEST or NOT_FOUND).

  /**
   * Replaces the text (and data) of the user's own message `seq`.
   * @param {string} room
   * @param {number} seq
   * @param {string} text
   * @param {{data?: Uint8Array | string, clientMsgId?: string}} [opts]
   * @returns {Promise<PublishAck>}
   */
  edit(room, seq, text, opts = {}) {
    const body = { room, seq: String(seq), clientMsgId: opts.clientMsgId || newClientMsgId(), text: text || '' };
    if (opts.data && opts.data.length) body.data = typeof opts.data === 'string' ? opts.data : toBase64(opts.data);
    return this._request({ edit: body });
  }

  /**
   * Deletes message `seq` (the user's own, or any as an admin or the owner):
   * its content is erased for everyone.
   * @param {string} room
   * @param {number} seq
   * @param {{clientMsgId?: string}} [opts]
   * @returns {Promise<PublishAck>}
   */
  deleteMessage(room, seq, opts = {}) {
    return this._request({ delete: { room, seq: String(seq), clientMsgId: opts.clientMsgId || newClientMsgId() } });
  }

  /**
   * Adds (`add` true) or removes the user's reaction `key` (an emoji) on
   * message `seq`.
   * @param {string} room
   * @param {number} seq
   * @param {string} key
   * @param {boolean} add
   * @param {{clientMsgId?: string}} [opts]
   * @returns {Promise<PublishAck>}
   */
  react(room, seq, key, add, opts = {}) {
    const body = { room, seq: String(seq), key: String(key), clientMsgId: opts.clientMsgId || newClientMsgId() };
    if (add) body.add = true;
    return this._request({ react: body });
  }

  /**
   * A page of a room's history, always in ascending seq order.
   * `forward: false` (default): the newest `limit` messages with seq <
   * `beforeSeq` (0: up to the head). `forward: true`: the oldest `limit`
   * messages with seq > `afterSeq` (0: from the start). `limit` 0 means 100,
   * at most 1000. These messages do not go through the cursors (no
   * `message` events).
   * @param {{room: string, beforeSeq?: number, afterSeq?: number, limit?: number, forward?: boolean}} q
   * @returns {Promise<HistoryPage>}
   */
  history(q) {
    const h = { room: q.room };
    if (q.beforeSeq) h.beforeSeq = String(q.beforeSeq);
    if (q.afterSeq) h.afterSeq = String(q.afterSeq);
    if (q.limit) h.limit = q.limit;
    if (q.forward) h.forward = true;
    return this._request({ history: h });
  }

  /**
   * Moves the user's read marker to `seq` (clamped to the head, never
   * backwards).
   * @param {string} room
   * @param {number} seq
   * @returns {Promise<ReadReceipt>}
   */
  markRead(room, seq) {
    return this._request({ markRead: { room, seq: String(seq) } });
  }

  /**
   * Tells the room's other members that the user is (or stopped) typing.
   * Fire-and-forget: dropped while disconnected; a refusal comes back as a
   * `servererror` event.
   * @param {string} room
   * @param {boolean} active
   */
  typing(room, active) {
    if (this._state !== 'connected') return;
    this._send(0, { typing: active ? { room, active: true } : { room } });
  }

  // -------------------------------------------------------------------------
  // Rooms, roles and moderation (proto/README.md §8). Each request that
  // changes a room counts against the same per-user rate as publishes. Like
  // every request, one still unanswered when the connection drops is sent
  // again after the reconnect: a createRoom that had got through is then
  // answered ALREADY_EXISTS (and a declineInvite NOT_FOUND); the others are
  // idempotent.

  /**
   * Creates a room with the user as its owner, and invites `invite`.
   * `kind`: `'public'` (default), `'private'`, or a {@link RoomKind} name.
   * ALREADY_EXISTS when the name is taken.
   * @param {string} room
   * @param {{kind?: string, title?: string, topic?: string, invite?: string[]}} [opts]
   * @returns {Promise<RoomInfo>}
   */
  createRoom(room, opts = {}) {
    const body = { room };
    const kind = enumArg(opts.kind, RoomKind);
    if (kind && kind !== RoomKind.UNSPECIFIED) body.kind = kind;
    if (opts.title) body.title = opts.title;
    if (opts.topic) body.topic = opts.topic;
    if (opts.invite && opts.invite.length) body.invite = [...opts.invite];
    return this._request({ createRoom: body });
  }

  /**
   * Changes a room's title and/or topic (admins and the owner). A field
   * left out (undefined) stays as it is; a string replaces it ('' clears it).
   * @param {string} room
   * @param {{title?: string, topic?: string}} changes
   * @returns {Promise<RoomInfo>}
   */
  updateRoom(room, changes = {}) {
    const body = { room };
    if (typeof changes.title === 'string') body.title = changes.title;
    if (typeof changes.topic === 'string') body.topic = changes.topic;
    return this._request({ updateRoom: body });
  }

  /**
   * A room's details as the user may see them (`myRole` is the user's role).
   * @param {string} room
   * @returns {Promise<RoomInfo>}
   */
  getRoom(room) {
    return this._request({ getRoom: { room } });
  }

  /**
   * Invites `user` (admins and the owner; any member in a public room). The
   * invitee gets an `invitation` event and may then `join`.
   * @param {string} room
   * @param {string} user
   * @returns {Promise<RoomInfo>}
   */
  invite(room, user) {
    return this._request({ invite: { room, user } });
  }

  /**
   * Declines a pending invitation (NOT_FOUND when there is none). To accept
   * one, `join` the room.
   * @param {string} room
   * @returns {Promise<RoomInfo>}
   */
  declineInvite(room) {
    return this._request({ declineInvite: { room } });
  }

  /**
   * Ends `user`'s membership, or withdraws their invitation.
   * @param {string} room
   * @param {string} user
   * @param {string} [reason]  for the server's audit log
   * @returns {Promise<RoomInfo>}
   */
  removeMember(room, user, reason = '') {
    return this._request({ removeMember: withReason({ room, user }, reason) });
  }

  /**
   * Ends `user`'s membership (if any), withdraws any invitation, and keeps
   * them out until `unban`.
   * @param {string} room
   * @param {string} user
   * @param {string} [reason]
   * @returns {Promise<RoomInfo>}
   */
  ban(room, user, reason = '') {
    return this._request({ ban: withReason({ room, user }, reason) });
  }

  /**
   * @param {string} room
   * @param {string} user
   * @param {string} [reason]
   * @returns {Promise<RoomInfo>}
   */
  unban(room, user, reason = '') {
    return this._request({ unban: withReason({ room, user }, reason) });
  }

  /**
   * Sets a member's role (the owner only): `'member'`, `'admin'`, or
   * `'owner'` to hand ownership on (the caller becomes an admin); or a
   * {@link Role} name.
   * @param {string} room
   * @param {string} user
   * @param {string} role
   * @returns {Promise<RoomInfo>}
   */
  setRole(room, user, role) {
    return this._request({ setRole: { room, user, role: enumArg(role, Role) } });
  }

  /**
   * A page of a room's members in user-id order after `afterUser`; `limit`
   * 0 means 100, at most 1000.
   * @param {string} room
   * @param {{afterUser?: string, limit?: number}} [q]
   * @returns {Promise<MemberPage>}
   */
  listMembers(room, q = {}) {
    const body = { room };
    if (q.afterUser) body.afterUser = q.afterUser;
    if (q.limit) body.limit = q.limit;
    return this._request({ listMembers: body });
  }

  /**
   * The directory of public rooms whose name or title contains `query`
   * (case-insensitive; '' lists all), in name order after `afterRoom`;
   * `limit` 0 means 50, at most 200.
   * @param {{query?: string, afterRoom?: string, limit?: number}} [q]
   * @returns {Promise<RoomList>}
   */
  listRooms(q = {}) {
    const body = {};
    if (q.query) body.query = q.query;
    if (q.afterRoom) body.afterRoom = q.afterRoom;
    if (q.limit) body.limit = q.limit;
    return this._request({ listRooms: body });
  }

  /** Closes the connection for good; requests waiting for a reply are rejected. */
  close() {
    if (this._closed && this._state === 'closed') return;
    this._closed = true;
    const conn = this._conn;
    this._conn = null;
    this._stopHeartbeat();
    this._stopRefresh();
    if (conn && !conn.welcomed && conn.fail) {
      conn.fail(new ChatdError('CLOSED', 'client closed'), true); // a connect() under way rejects now
    } else if (conn) {
      detach(conn.ws);
      try {
        conn.ws.close(1000, 'client closed');
      } catch {
        /* already closed */
      }
    }
    if (this._wake) this._wake();
    this._failAll(new ChatdError('CLOSED', 'client closed'));
    this._setState('closed');
  }

  /**
   * The last seq delivered per room (save it to resume later with the
   * `resume` option).
   * @returns {Record<string, number>}
   */
  cursors() {
    const o = {};
    for (const c of this._cursors.resume()) o[c.room] = c.afterSeq;
    return o;
  }

  // -------------------------------------------------------------------------
  // Internals.

  _setState(state, extra = {}) {
    const changed = this._state !== state;
    this._state = state;
    if (changed || extra.retryInMs !== undefined) this._emit('statechange', { state, ...extra });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _send(id, body, conn = this._conn) {
    if (!conn) return false;
    const env = id ? { id: String(id), ...body } : body;
    try {
      conn.ws.send(JSON.stringify(env));
      return true;
    } catch {
      return false;
    }
  }

  _request(body) {
    if (this._closed || this._state === 'closed') return Promise.reject(new ChatdError('CLOSED', 'client closed'));
    return new Promise((resolve, reject) => {
      const id = this._nextId++;
      this._pending.set(id, { body, resolve, reject });
      // While disconnected it waits in _pending and goes out after Welcome.
      if (this._state === 'connected') this._send(id, body);
    });
  }

  _failAll(err) {
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) p.reject(err);
  }

  /**
   * Connects with the current token; if the server refuses it, once more
   * with a token from getToken. With `renew` (`{stale, expired}`: the server
   * just ended a session for the token `stale`), a newer token is obtained
   * first. Resolves with Welcome; rejects like {@link ChatdClient#_open}.
   */
  async _attempt(renew) {
    let expired = !!(renew && renew.expired);
    // Whether the token about to be sent came from a getToken call made for
    // this attempt: such a token being refused too ends it.
    let fetched = false;
    if (renew && !(this._fresh && newerThan(this._fresh, renew.stale))) {
      await this._newToken(expired, renew.stale);
      fetched = true;
    }
    for (;;) {
      try {
        return await this._open();
      } catch (e) {
        if (!e.auth || !this.getToken || fetched || this._closed) {
          if (e.auth) {
            this._fresh = null; // refused: never to be sent again
            if (expired && e.error) e.error.expired = true;
          }
          throw e;
        }
        expired = expired || !!(e.error && e.error.expired);
        this._fresh = null;
        await this._newToken(expired, null);
        fetched = true;
      }
    }
  }

  /** Calls getToken, one call at a time (a pre-fetch and an expiry share it). */
  _fetchToken() {
    if (!this._tokenFetch) {
      const p = Promise.resolve().then(() => this.getToken());
      this._tokenFetch = p;
      const done = () => {
        if (this._tokenFetch === p) this._tokenFetch = null;
      };
      p.then(done, done);
    }
    return this._tokenFetch;
  }

  /**
   * A new token from getToken, kept in `_fresh`; a failure rejects with a
   * fatal `GET_TOKEN` error. `stale`: a token it must be newer than.
   */
  async _newToken(expired, stale) {
    let t;
    try {
      t = await this._fetchToken();
    } catch (err) {
      throw tokenFailure(`getToken failed: ${errorText(err)}`, expired);
    }
    if (typeof t !== 'string' || !t) throw tokenFailure('getToken returned no token', expired);
    if (stale && !newerThan(t, stale)) {
      throw tokenFailure('getToken returned a token that expires no later than the expired one', expired);
    }
    if (this._closed) throw { error: new ChatdError('CLOSED', 'client closed'), fatal: true };
    this._fresh = t;
    return t;
  }

  /**
   * The token to send in the next Hello: a string when it is at hand (so
   * the socket opens without waiting a tick), else a promise.
   * @returns {string | Promise<string>}
   */
  _helloToken() {
    if (this._fresh) return this._fresh;
    if (typeof this._token === 'function') return this._callToken(this._token);
    if (this._token) return this._token;
    return this._newToken(false, null);
  }

  async _callToken(fn) {
    let t;
    try {
      t = await fn();
    } catch (err) {
      throw tokenFailure(`the token function failed: ${errorText(err)}`, false);
    }
    if (typeof t !== 'string' || !t) throw tokenFailure('the token function returned no token', false);
    return t;
  }

  /**
   * Fetches a new token shortly before the one `conn` was accepted with
   * expires (at most once per accepted connection, so a skewed clock cannot
   * make it loop). The server still ends the session at `exp`; the new
   * token saves a getToken round trip then.
   */
  _scheduleRefresh(conn) {
    this._stopRefresh();
    if (!this.getToken) return;
    const exp = tokenExpiry(conn.token);
    if (exp === null) return;
    const arm = () => {
      this._refreshTimer = null;
      const left = exp * 1000 - Date.now();
      const due = left - Math.max(left * 0.1, REFRESH_LEAD_MS);
      if (due > 0) {
        this._refreshTimer = setTimeout(arm, Math.min(due, MAX_TIMER_MS));
        return;
      }
      if (this._conn !== conn || this._fresh) return;
      this._fetchToken().then(
        (t) => {
          if (!this._closed && !this._fresh && typeof t === 'string' && t) this._fresh = t;
        },
        () => {
          /* asked again when the server ends the session */
        },
      );
    };
    arm();
  }

  _stopRefresh() {
    if (this._refreshTimer) clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
  }

  /**
   * One connection attempt. Resolves with Welcome once it is accepted;
   * rejects with `{error, fatal, auth, wait}` (`auth`: the server refused
   * the token).
   */
  async _open() {
    const next = this._helloToken();
    const token = typeof next === 'string' ? next : await next;
    const WS = this._WS || globalThis.WebSocket;
    if (!WS) throw { error: new ChatdError('CONNECTION', 'no WebSocket implementation'), fatal: true };
    if (this._closed) throw { error: new ChatdError('CLOSED', 'client closed'), fatal: true };
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WS(this.url);
      } catch (e) {
        reject({ error: new ChatdError('CONNECTION', String(e && e.message ? e.message : e)), fatal: false });
        return;
      }
      const conn = { ws, token, welcomed: false, goAway: null, helloError: null, lastRecv: Date.now(), pingSentAt: 0 };
      this._conn = conn;
      const timer = setTimeout(() => {
        if (conn.welcomed) return;
        fail(new ChatdError('TIMEOUT', `no welcome within ${HELLO_TIMEOUT_MS / 1000} s`), false);
      }, HELLO_TIMEOUT_MS);
      const fail = (error, fatal, auth = false) => {
        clearTimeout(timer);
        if (this._conn === conn) this._conn = null;
        detach(ws);
        try {
          ws.close();
        } catch {
          /* ignore */
        }
        reject({ error, fatal, auth, wait: conn.goAway ? conn.goAway.retryAfterMs : 0 });
      };
      conn.fail = fail;
      ws.onopen = () => {
        const hello = { protocolVersion: PROTOCOL_VERSION, token, device: this.device };
        const resume = this._cursors.resume().map((c) => (c.afterSeq ? { room: c.room, afterSeq: String(c.afterSeq) } : { room: c.room }));
        if (resume.length) hello.resume = resume;
        this._send(HELLO_ID, { hello }, conn);
      };
      ws.onmessage = (ev) => {
        if (this._conn !== conn) return;
        conn.lastRecv = Date.now();
        if (typeof ev.data !== 'string') return; // we only speak JSON
        const env = parseEnvelope(ev.data);
        if (!env) return;
        if (conn.welcomed) {
          this._onFrame(conn, env);
          return;
        }
        if (env.kind === 'welcome') {
          clearTimeout(timer);
          conn.welcomed = true;
          this._accept(conn, env.body);
          resolve(env.body);
        } else if (env.kind === 'error') {
          conn.helloError = env.body;
        } else if (env.kind === 'goAway') {
          conn.goAway = env.body;
          this._emit('goaway', env.body);
        } else if (env.kind === 'ping') {
          this._send(env.id, { pong: env.body }, conn);
        }
      };
      ws.onerror = () => {
        /* a close event follows */
      };
      ws.onclose = (ev) => {
        if (this._conn !== conn) return;
        if (conn.welcomed) {
          this._onLost(conn, closeText(ev));
          return;
        }
        const e = conn.helloError;
        const ga = conn.goAway;
        const auth =
          !!(ga && (ga.reason === CloseReason.AUTH_FAILED || ga.reason === CloseReason.AUTH_EXPIRED)) ||
          !!(e && e.code === ErrorCode.UNAUTHENTICATED);
        const fatal = auth || !!(e && e.code === ErrorCode.UNSUPPORTED_VERSION);
        const error = e
          ? new ChatdError(e.code, e.message)
          : ga
            ? new ChatdError(ga.reason, ga.message)
            : new ChatdError('CONNECTION', `could not connect to ${this.url} (${closeText(ev)})`);
        if (auth) {
          error.expired = (ga && ga.reason === CloseReason.AUTH_EXPIRED) || EXPIRED_TEXT.test(e ? e.message : ga.message);
        }
        fail(error, fatal, auth);
      };
    });
  }

  /** A Welcome arrived on `conn`: the connection is live. */
  _accept(conn, w) {
    const reconnected = this.welcome !== null;
    this.welcome = w;
    // Rooms joined elsewhere start live from their head; rooms the user is no
    // longer a member of are forgotten.
    const member = new Set(w.rooms.map((r) => r.room));
    for (const r of w.rooms) if (!this._cursors.knows(r.room)) this._cursors.track(r.room, r.headSeq);
    for (const c of this._cursors.resume()) if (!member.has(c.room)) this._cursors.forget(c.room);
    if (this._fresh && conn.token === this._fresh) {
      this._fresh = null;
      if (typeof this._token !== 'function') this._token = conn.token;
    }
    this._setState('connected');
    this._startHeartbeat(conn, w.heartbeatMs);
    this._scheduleRefresh(conn);
    // Requests that got no reply (or were made while away) go out again,
    // with the same ids and bodies (so the same clientMsgIds), before
    // anything the application sends on `connected`.
    for (const id of [...this._pending.keys()].sort((a, b) => a - b)) {
      this._send(id, this._pending.get(id).body, conn);
    }
    this._emit('connected', { ...w, reconnected });
  }

  _onFrame(conn, { id, kind, body }) {
    if (id !== 0) {
      if (this._gapFetches.has(id)) {
        const room = this._gapFetches.get(id);
        this._gapFetches.delete(id);
        // An error (e.g. the room was left meanwhile) releases what was held.
        const page = kind === 'historyPage' ? body : { room, messages: [], headSeq: 0, hasMore: false };
        const out = [];
        const action = this._cursors.onGapPage(room, page, out);
        this._deliver(out);
        if (action) this._fetchGap(room, action.fetchAfter);
        return;
      }
      if (this._pings.delete(id)) return;
      const p = this._pending.get(id);
      if (p) {
        this._pending.delete(id);
        if (kind === 'error') {
          p.reject(new ChatdError(body.code, body.message));
          return;
        }
        if (kind === 'joined') {
          // A known room keeps its cursor: a resume replay may still be under way.
          if (!this._cursors.knows(body.state.room)) this._cursors.track(body.state.room, body.state.headSeq);
        } else if (kind === 'left') {
          this._cursors.forget(body.room);
        } else if (kind === 'roomInfo' && 'createRoom' in p.body) {
          // A new room, the user its owner: resumed from its start.
          if (!this._cursors.knows(body.room)) this._cursors.track(body.room, 0);
        }
        p.resolve(body);
        return;
      }
      if (kind === 'error') this._emit('servererror', { ...body, id });
      return;
    }
    switch (kind) {
      case 'message': {
        const out = [];
        const action = this._cursors.onMessage(body, out);
        this._deliver(out);
        if (action) this._fetchGap(body.room, action.fetchAfter);
        break;
      }
      case 'synced': {
        const out = [];
        this._cursors.onSynced(body, out);
        this._deliver(out);
        break;
      }
      case 'ping':
        this._send(0, { pong: { nonce: body.nonce } }, conn);
        break;
      case 'readReceipt':
        this._emit('readreceipt', body);
        break;
      case 'presence':
        this._emit('presence', body);
        break;
      case 'typing':
        this._emit('typing', body);
        break;
      case 'joined':
        // Added to a room by someone else (an admin, the other user of a
        // direct room): live from its head, like a join of one's own.
        if (!this._cursors.knows(body.state.room)) this._cursors.track(body.state.room, body.state.headSeq);
        this._emit('joined', body);
        break;
      case 'left':
        // The membership ended (left on another session, removed, banned,
        // or a resume cursor for a room the user is not in): nothing of the
        // room follows, and the room is no longer resumed.
        this._cursors.forget(body.room);
        this._emit('left', body);
        break;
      case 'invitation':
        this._emit('invitation', body);
        break;
      case 'roomUpdate':
        this._emit('roomupdate', body);
        break;
      case 'error':
        this._emit('servererror', body);
        break;
      case 'goAway':
        conn.goAway = body;
        this._emit('goaway', body);
        // The server closes next; do not wait for it.
        this._onLost(conn, `${body.reason}: ${body.message}`);
        break;
      default:
        break;
    }
  }

  _deliver(out) {
    for (const e of out) this._emit(e.type, e.value);
  }

  _fetchGap(room, after) {
    const id = this._nextId++;
    const h = { room, limit: GAP_PAGE, forward: true };
    if (after) h.afterSeq = String(after);
    this._gapFetches.set(id, room);
    this._send(id, { history: h });
  }

  _startHeartbeat(conn, heartbeatMs) {
    this._stopHeartbeat();
    if (!this.heartbeat) return;
    const every = heartbeatMs > 0 ? heartbeatMs : 30_000;
    this._hbTimer = setInterval(() => {
      if (this._conn !== conn) return;
      // Nothing heard since the previous ping, a whole interval ago: the
      // network is gone (a dead TCP connection can take minutes to close).
      // Measured from the ping, so timers throttled in a background tab do
      // not cause false alarms.
      if (conn.pingSentAt && conn.lastRecv < conn.pingSentAt && Date.now() - conn.pingSentAt >= every * 0.9) {
        this._onLost(conn, 'no answer to heartbeat');
        return;
      }
      const id = this._nextId++;
      this._pings.add(id);
      conn.pingSentAt = Date.now();
      this._send(id, { ping: { nonce: String(id) } }, conn);
    }, every);
  }

  _stopHeartbeat() {
    if (this._hbTimer) clearInterval(this._hbTimer);
    this._hbTimer = null;
  }

  /** The live connection `conn` ended. */
  _onLost(conn, reason) {
    if (this._conn !== conn) return;
    this._conn = null;
    this._stopHeartbeat();
    this._stopRefresh();
    detach(conn.ws);
    try {
      conn.ws.close();
    } catch {
      /* ignore */
    }
    this._cursors.resetGaps();
    this._gapFetches.clear();
    this._pings.clear();
    if (this._closed) return;
    const ga = conn.goAway;
    const expired = !!ga && ga.reason === CloseReason.AUTH_EXPIRED;
    const refused = !!ga && ga.reason === CloseReason.AUTH_FAILED;
    if ((expired || refused) && (!this.getToken || !this.reconnect)) {
      // Reconnecting with the same token would be refused (or, within a
      // server's clock-skew leeway, accepted and ended again at once).
      const why = expired
        ? `session expired: the token expired${this.getToken ? '' : ' and there is no getToken to get a new one'}`
        : reason;
      this._giveUp(why, ga, chatdError(ga.reason, ga.message, expired));
      return;
    }
    if (!this.reconnect) {
      this._giveUp(reason, ga, new ChatdError('CONNECTION', reason));
      return;
    }
    this._emit('disconnected', { reason, willReconnect: true, goAway: ga || undefined, expired });
    if (expired || refused) this._reconnectLoop(0, { stale: conn.token, expired });
    else this._reconnectLoop(ga ? ga.retryAfterMs : 0, null);
  }

  _giveUp(reason, goAway, error) {
    this._closed = true;
    this._stopRefresh();
    this._failAll(new ChatdError('CLOSED', reason));
    this._setState('closed');
    this._emit('disconnected', {
      reason,
      willReconnect: false,
      goAway: goAway || undefined,
      error,
      expired: !!(error && error.expired),
    });
  }

  /** Reconnects until it works or fails for good; `renew` as in {@link ChatdClient#_attempt}. */
  async _reconnectLoop(firstWait, renew) {
    let wait = firstWait;
    let backoff = 100;
    for (;;) {
      this._setState('reconnecting', { retryInMs: wait });
      await this._sleep(wait);
      if (this._closed) return;
      try {
        await this._attempt(renew);
        return;
      } catch (e) {
        if (this._closed) return;
        if (e.fatal) {
          this._giveUp(e.error ? e.error.message : String(e), undefined, e.error);
          return;
        }
        wait = Math.max(e.wait || 0, backoff + Math.floor(Math.random() * 100));
        backoff = Math.min(backoff * 2, this.maxBackoffMs);
      }
    }
  }

  /** Sleeps `ms`, cut short by close() or by the browser coming back online. */
  _sleep(ms) {
    return new Promise((resolve) => {
      const g = globalThis;
      const done = () => {
        clearTimeout(t);
        if (g.removeEventListener) g.removeEventListener('online', done);
        this._wake = null;
        resolve();
      };
      const t = setTimeout(done, ms);
      if (g.addEventListener && g.window === g) g.addEventListener('online', done);
      this._wake = done;
    });
  }
}

/**
 * An enum argument: a name of `names` as it is, or its short form
 * (`'private'` for `ROOM_KIND_PRIVATE`, `'admin'` for `ROLE_ADMIN`);
 * anything else is sent as given (the server refuses it).
 */
function enumArg(v, names) {
  if (v === undefined || v === null || v === '') return '';
  const s = String(v);
  return names[s.toUpperCase()] || s;
}

function withReason(body, reason) {
  if (reason) body.reason = String(reason);
  return body;
}

function normalizeResume(resume) {
  if (!resume) return [];
  if (Array.isArray(resume)) return resume.map((c) => ({ room: String(c.room), afterSeq: num(c.afterSeq) }));
  return Object.entries(resume).map(([room, seq]) => ({ room, afterSeq: num(seq) }));
}

/** A getToken (or token function) failure: ends the client. */
function tokenFailure(message, expired) {
  return { error: chatdError('GET_TOKEN', message, expired), fatal: true, auth: false };
}

function errorText(err) {
  return err && err.message ? err.message : String(err);
}

function detach(ws) {
  ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
}

function closeText(ev) {
  if (!ev) return 'closed';
  return ev.reason ? `closed ${ev.code}: ${ev.reason}` : `closed ${ev.code ?? ''}`.trim();
}
