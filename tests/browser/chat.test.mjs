// Real-browser tests of the chatd web client (clients/web) against a real
// chatd server, plus Node tests of chatd-client.js against a fake server
// and against a real chatd (token expiry).
//
//   npm install --prefix tests/browser      # once: playwright-core, ws
//   node --test tests/browser/
//
// Environment:
//   CHATD_BIN            chatd binary          (default target/debug/chatd)
//   CHAT_BIN             chat CLI binary       (default target/debug/chat)
//   CHROMIUM             Chromium executable   (default /usr/bin/chromium)
//   CHATD_WEB_EMBEDDED=1 test the web files built into chatd (no --web-dir)
//   CI=true              a missing browser or playwright-core is a failure, not a skip
//
// Every wait is bounded; nothing sleeps for a fixed time to decide a result.
// That something does not happen (a reconnect after an expired token) is
// watched for over a bounded window, failing as soon as it does happen.
// The last line printed is `browser: N passed, N failed`.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile, execFileSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { ChangeKind, ChatdClient, Cursors, MemberChange, Role, RoomKind, applyChange, parseEnvelope, tokenExpiry } from '../../clients/web/chatd-client.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const REPO = resolve(HERE, '../..');
const CHATD = process.env.CHATD_BIN || join(REPO, 'target/debug/chatd');
const CHAT = process.env.CHAT_BIN || join(REPO, 'target/debug/chat');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const CI = process.env.CI === 'true';
const EMBEDDED = process.env.CHATD_WEB_EMBEDDED === '1';
const ROOM = 'general';
const EXPIRED_NOTICE = 'Your session expired — sign in again';
/** The policy chatd serves the web client with; the pages must work under it. */
const CSP =
  "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; " +
  "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'";

// ---------------------------------------------------------------------------
// Reporting: count results and print the summary line on its own.

const results = { passed: 0, failed: 0 };

/** Prints a line (under `node --test` it shows as a `# line` comment). */
function say(line) {
  console.log(line);
}

after(() => say(`browser: ${results.passed} passed, ${results.failed} failed`));

/** `test()` that also counts its result for the summary line. */
function check(name, options, fn) {
  return test(name, options, async (t) => {
    try {
      await fn(t);
      results.passed++;
    } catch (e) {
      results.failed++;
      throw e;
    }
  });
}

// ---------------------------------------------------------------------------
// Small helpers.

/** Polls `cond` until it returns a truthy value; fails after `timeout` ms. */
async function waitUntil(cond, { timeout = 10_000, what = 'condition', interval = 25 } = {}) {
  const end = Date.now() + timeout;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

/**
 * Watches for `ms`: returns the first truthy value of `bad` (something that
 * must not happen, seen early), or null once the window passed without it.
 */
async function watchFor(ms, bad, interval = 25) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    const v = await bad();
    if (v) return v;
    await new Promise((r) => setTimeout(r, interval));
  }
  return null;
}

/** Rejects after `ms` with `what` unless `p` settles first. */
function within(p, ms, what) {
  let t;
  return Promise.race([
    p,
    new Promise((_, rej) => {
      t = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(t));
}

// ===========================================================================
// d. Unit tests of chatd-client.js (Node, no server, no browser).

/** An in-memory WebSocket: the test plays the server. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.readyState = 0;
    this.closed = false;
    FakeSocket.all.push(this);
    setTimeout(() => {
      if (this.closed) return;
      this.readyState = 1;
      this.onopen && this.onopen({});
    }, 0);
  }
  send(text) {
    if (this.closed) return;
    this.sent.push(JSON.parse(text));
  }
  close() {
    if (this.closed) return;
    this.closed = true;
    this.readyState = 3;
    setTimeout(() => this.onclose && this.onclose({ code: 1000, reason: '' }), 0);
  }
  // Test side:
  push(env) {
    this.onmessage && this.onmessage({ data: JSON.stringify(env) });
  }
  drop(code = 1006) {
    this.closed = true;
    this.readyState = 3;
    this.onclose && this.onclose({ code, reason: '' });
  }
  take(kind) {
    const i = this.sent.findIndex((e) => kind in e);
    return i < 0 ? null : this.sent.splice(i, 1)[0];
  }
}

function fakeClient(opts = {}) {
  FakeSocket.all = [];
  const c = new ChatdClient({ url: 'ws://test/ws', token: 'T', WebSocket: FakeSocket, heartbeat: false, ...opts });
  const events = [];
  for (const type of ['message', 'synced', 'connected', 'disconnected', 'goaway', 'servererror', 'presence', 'typing', 'readreceipt', 'joined', 'left', 'invitation', 'roomupdate']) {
    c.addEventListener(type, (e) => events.push({ type, ...e.detail }));
  }
  return { c, events, sock: () => FakeSocket.all[FakeSocket.all.length - 1] };
}

async function handshake(sock, rooms = []) {
  await waitUntil(() => sock().sent.length > 0, { timeout: 2000, what: 'hello' });
  const hello = sock().take('hello');
  sock().push({ id: hello.id, welcome: { user: 'ann', sessionId: 's1', protocolVersion: 1, rooms, heartbeatMs: 30000 } });
  return hello;
}

/** An unsigned token shaped like a JWT (the fake server does not check it). */
const fakeJwt = (exp, sub = 'ann') =>
  `${Buffer.from('{"alg":"HS256","typ":"JWT"}').toString('base64url')}.${Buffer.from(JSON.stringify({ sub, exp })).toString('base64url')}.c2ln`;

/** The fake server refuses the Hello on the newest socket as chatd does. */
function refuseHello(sock, message = 'token has expired') {
  sock.push({ id: '1', error: { code: 'ERROR_CODE_UNAUTHENTICATED', message } });
  sock.push({ goAway: { reason: 'CLOSE_REASON_AUTH_FAILED', message } });
  sock.drop(1000);
}

const msg = (room, seq, extra = {}) => ({ room, seq: String(seq), sender: 'bob', tsMs: '1700000000000', text: `m${seq}`, ...extra });
const seqsOf = (events, room = 'r') => events.filter((e) => e.type === 'message' && e.room === room).map((e) => e.seq);

describe('chatd-client.js (unit)', () => {
  check('Cursors: duplicates are dropped and order kept', {}, () => {
    const c = new Cursors();
    c.track('r', 2);
    const out = [];
    for (const s of [1, 2, 3, 3, 4, 2]) assert.equal(c.onMessage({ room: 'r', seq: s }, out), null);
    assert.deepEqual(out.map((e) => e.value.seq), [3, 4]);
    assert.deepEqual(c.resume(), [{ room: 'r', afterSeq: 4 }]);
  });

  check('Cursors: a gap is paged in before later events are released', {}, () => {
    const c = new Cursors();
    c.track('r', 10);
    const out = [];
    assert.deepEqual(c.onMessage({ room: 'r', seq: 20 }, out), { fetchAfter: 10 });
    c.onMessage({ room: 'r', seq: 21 }, out);
    c.onSynced({ room: 'r', headSeq: 21, complete: false }, out);
    c.onMessage({ room: 'r', seq: 22 }, out);
    assert.equal(out.length, 0, 'held behind the gap');
    const page = (a, b, more) => ({ room: 'r', messages: Array.from({ length: b - a + 1 }, (_, i) => ({ room: 'r', seq: a + i })), headSeq: 22, hasMore: more });
    assert.deepEqual(c.onGapPage('r', page(11, 15, true), out), { fetchAfter: 15 });
    assert.equal(c.onGapPage('r', page(16, 22, false), out), null);
    assert.deepEqual(out.map((e) => (e.type === 'synced' ? 0 : e.value.seq)), [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 0, 22]);
    assert.equal(c.last('r'), 22);
  });

  check('Cursors: what retention removed from a gap is skipped from firstSeq on', {}, () => {
    const c = new Cursors();
    c.track('r', 10);
    const out = [];
    assert.deepEqual(c.onMessage({ room: 'r', seq: 40 }, out), { fetchAfter: 10 });
    const messages = Array.from({ length: 9 }, (_, i) => ({ room: 'r', seq: 31 + i }));
    assert.equal(c.onGapPage('r', { room: 'r', messages, headSeq: 40, hasMore: true, firstSeq: 31 }, out), null);
    assert.deepEqual(out.map((e) => e.value.seq), [31, 32, 33, 34, 35, 36, 37, 38, 39, 40]);
  });

  check('Cursors: an unknown room starts at its first message', {}, () => {
    const c = new Cursors();
    const out = [];
    assert.equal(c.onMessage({ room: 'new', seq: 7 }, out), null);
    assert.deepEqual(out.map((e) => e.value.seq), [7]);
  });

  check('JSON mapping: defaults filled in, 64-bit strings become numbers', {}, () => {
    assert.deepEqual(parseEnvelope('{"synced":{"room":"r","headSeq":"8"}}'), { id: 0, kind: 'synced', body: { room: 'r', headSeq: 8, complete: false, firstSeq: 0 } });
    assert.deepEqual(parseEnvelope('{"id":"3","publishAck":{"room":"r","seq":"1","tsMs":"5","clientMsgId":"k"}}').body, {
      room: 'r', seq: 1, tsMs: 5, clientMsgId: 'k', duplicate: false,
    });
    assert.deepEqual(parseEnvelope('{"presence":{"room":"r","user":"ann"}}').body, { room: 'r', user: 'ann', online: false, devices: 0 });
    assert.equal(parseEnvelope('{"id":7,"error":{"code":3}}').body.code, 'ERROR_CODE_FORBIDDEN');
    assert.equal(parseEnvelope('not json'), null);
  });

  check('client: live duplicates dropped, a gap is filled with History before later messages', { timeout: 5000 }, async () => {
    const { c, events, sock } = fakeClient({ resume: { r: 10 } });
    const connected = c.connect();
    const hello = await handshake(sock, [{ room: 'r', headSeq: '10', readSeq: '10' }]);
    assert.deepEqual(hello.hello, { protocolVersion: 1, token: 'T', device: 'web', resume: [{ room: 'r', afterSeq: '10' }] });
    await connected;
    sock().push({ message: msg('r', 11) });
    sock().push({ message: msg('r', 11) }); // duplicate
    sock().push({ message: msg('r', 14) }); // gap: 12, 13 missing
    const h = sock().take('history');
    assert.deepEqual(h.history, { room: 'r', afterSeq: '11', limit: 1000, forward: true });
    sock().push({ message: msg('r', 15) });
    sock().push({ synced: { room: 'r', headSeq: '15' } });
    assert.deepEqual(seqsOf(events), [11], 'later messages wait for the gap');
    sock().push({ id: h.id, historyPage: { room: 'r', messages: [msg('r', 12), msg('r', 13), msg('r', 14)], headSeq: '15' } });
    sock().push({ message: msg('r', 15) }); // duplicate after the fill
    sock().push({ message: msg('r', 16) });
    assert.deepEqual(seqsOf(events), [11, 12, 13, 14, 15, 16]);
    const order = events.filter((e) => e.type === 'message' || e.type === 'synced').map((e) => (e.type === 'synced' ? `synced:${e.complete}` : e.seq));
    assert.deepEqual(order, [11, 12, 13, 14, 15, 'synced:false', 16]);
    assert.deepEqual(c.cursors(), { r: 16 });
    c.close();
  });

  check('client: answers ping with the same nonce; server errors become events', { timeout: 5000 }, async () => {
    const { c, events, sock } = fakeClient();
    const p = c.connect();
    await handshake(sock);
    await p;
    sock().push({ ping: { nonce: '18446744073709551615' } });
    assert.deepEqual(sock().take('pong'), { pong: { nonce: '18446744073709551615' } });
    sock().push({ error: { code: 'ERROR_CODE_FORBIDDEN', message: 'resume: not a member of room x' } });
    assert.equal(events.find((e) => e.type === 'servererror').code, 'ERROR_CODE_FORBIDDEN');
    const j = c.join('nope');
    const req = sock().take('join');
    sock().push({ id: req.id, error: { code: 'ERROR_CODE_FORBIDDEN', message: 'no' } });
    await assert.rejects(j, (e) => e.code === 'ERROR_CODE_FORBIDDEN');
    c.close();
  });

  check('client: reconnects after GoAway, resumes, re-sends unanswered requests with the same ids', { timeout: 5000 }, async () => {
    const { c, events, sock } = fakeClient();
    const p = c.connect();
    await handshake(sock, [{ room: 'r', headSeq: '4', readSeq: '4' }]);
    await p;
    sock().push({ message: msg('r', 5) });
    const pub = c.publish('r', 'hello');
    const first = sock().take('publish');
    assert.ok(first.publish.clientMsgId, 'a clientMsgId is generated');
    const hist = c.history({ room: 'r', beforeSeq: 5, limit: 2 });
    const firstHist = sock().take('history');
    const t0 = Date.now();
    const first_sock = sock();
    first_sock.push({ goAway: { reason: 'CLOSE_REASON_SHUTDOWN', message: 'bye', retryAfterMs: 150 } });
    assert.equal(events.find((e) => e.type === 'goaway').retryAfterMs, 150);
    assert.equal(c.state, 'reconnecting');
    // A request made while away waits for the new connection.
    const mark = c.markRead('r', 5);
    await waitUntil(() => FakeSocket.all.length === 2, { timeout: 2000, what: 'reconnect' });
    assert.ok(Date.now() - t0 >= 140, 'waited retryAfterMs before reconnecting');
    const hello = await handshake(sock, [{ room: 'r', headSeq: '6', readSeq: '4' }]);
    assert.deepEqual(hello.hello.resume, [{ room: 'r', afterSeq: '5' }]);
    // Re-sent in id order, same ids and bodies, then the new one.
    const again = sock().take('publish');
    assert.equal(again.id, first.id);
    assert.deepEqual(again.publish, first.publish);
    assert.deepEqual(sock().take('history'), firstHist);
    const mr = sock().take('markRead');
    assert.ok(Number(mr.id) > Number(firstHist.id));
    sock().push({ message: msg('r', 5) }); // replay overlap: dropped
    sock().push({ message: msg('r', 6, { sender: 'ann', clientMsgId: first.publish.clientMsgId }) });
    sock().push({ synced: { room: 'r', headSeq: '6', complete: true } });
    sock().push({ id: again.id, publishAck: { room: 'r', seq: '6', tsMs: '1', clientMsgId: first.publish.clientMsgId, duplicate: true } });
    sock().push({ id: firstHist.id, historyPage: { room: 'r', messages: [msg('r', 3), msg('r', 4)], headSeq: '6', hasMore: true } });
    sock().push({ id: mr.id, readReceipt: { room: 'r', user: 'ann', seq: '5' } });
    const ack = await pub;
    assert.equal(ack.seq, 6);
    assert.equal(ack.duplicate, true);
    assert.deepEqual((await hist).messages.map((m) => m.seq), [3, 4]);
    assert.equal((await mark).seq, 5);
    assert.deepEqual(seqsOf(events), [5, 6]);
    assert.equal(events.filter((e) => e.type === 'connected').length, 2);
    c.close();
    assert.equal(first_sock.closed, true);
  });

  check('client: no reconnect after AUTH_FAILED; pending requests are rejected', { timeout: 5000 }, async () => {
    const { c, events, sock } = fakeClient();
    const p = c.connect();
    await handshake(sock);
    await p;
    const j = c.join('r');
    sock().push({ goAway: { reason: 'CLOSE_REASON_AUTH_FAILED', message: 'token revoked' } });
    await assert.rejects(j, (e) => e.code === 'CLOSED');
    assert.equal(c.state, 'closed');
    const d = events.find((e) => e.type === 'disconnected');
    assert.equal(d.willReconnect, false);
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(FakeSocket.all.length, 1, 'did not reconnect');
  });

  check('client: connect() rejects on a refused token', { timeout: 5000 }, async () => {
    const { c, sock } = fakeClient();
    const p = c.connect();
    await waitUntil(() => sock().sent.length > 0, { timeout: 2000, what: 'hello' });
    sock().push({ id: '1', error: { code: 'ERROR_CODE_UNAUTHENTICATED', message: 'token expired' } });
    sock().push({ goAway: { reason: 'CLOSE_REASON_AUTH_FAILED', message: 'token expired' } });
    sock().drop(1000);
    await assert.rejects(p, (e) => e.code === 'ERROR_CODE_UNAUTHENTICATED');
    assert.equal(c.state, 'closed');
  });

  check('tokenExpiry: the exp claim of a JWT; null for anything else', {}, () => {
    assert.equal(tokenExpiry(fakeJwt(1700000000)), 1700000000);
    assert.equal(tokenExpiry('not-a-jwt'), null);
    assert.equal(tokenExpiry('a.b.c'), null);
    assert.equal(tokenExpiry(`x.${Buffer.from('{"exp":"soon"}').toString('base64url')}.y`), null);
    assert.equal(tokenExpiry(`x.${Buffer.from('{"sub":"ann"}').toString('base64url')}.y`), null);
    assert.equal(tokenExpiry(undefined), null);
  });

  check('client: GoAway AUTH_EXPIRED without getToken gives up at once, as an expiry', { timeout: 5000 }, async () => {
    const { c, events, sock } = fakeClient();
    const p = c.connect();
    await handshake(sock);
    await p;
    const j = c.join('r');
    sock().push({ goAway: { reason: 'CLOSE_REASON_AUTH_EXPIRED', message: 'token expired; reconnect with a fresh token' } });
    // Decided synchronously: a client about to retry would be `reconnecting`.
    assert.equal(c.state, 'closed');
    const d = events.find((e) => e.type === 'disconnected');
    assert.equal(d.willReconnect, false);
    assert.equal(d.expired, true);
    assert.equal(d.error.code, 'CLOSE_REASON_AUTH_EXPIRED');
    assert.equal(d.error.expired, true);
    assert.match(d.reason, /session expired/);
    await assert.rejects(j, (e) => e.code === 'CLOSED');
    assert.equal(FakeSocket.all.length, 1, 'no second connection');
  });

  check('client: getToken is called shortly before exp, and its token is used after GoAway AUTH_EXPIRED', { timeout: 10_000 }, async () => {
    const exp = Math.ceil(Date.now() / 1000) + 6;
    const t1 = fakeJwt(exp);
    const t2 = fakeJwt(exp + 3600);
    const calls = [];
    const { c, events, sock } = fakeClient({
      token: t1,
      getToken: async () => {
        calls.push(Date.now());
        return t2;
      },
    });
    const p = c.connect();
    await handshake(sock, [{ room: 'r', headSeq: '3', readSeq: '3' }]);
    await p;
    const welcomedAt = Date.now();
    await waitUntil(() => calls.length > 0, { timeout: 5000, what: 'getToken before expiry' });
    // 6-7 s left: due at exp minus max(10%, 5 s), i.e. 1-2 s after Welcome.
    assert.ok(calls[0] - welcomedAt >= 900, `not before it is due (${calls[0] - welcomedAt} ms after Welcome)`);
    assert.ok(calls[0] <= exp * 1000 - 4900, 'at least 5 s before exp');
    assert.equal(FakeSocket.all.length, 1, 'fetching a token does not reconnect');
    sock().push({ message: msg('r', 4) });
    sock().push({ goAway: { reason: 'CLOSE_REASON_AUTH_EXPIRED', message: 'token expired' } });
    const d = events.find((e) => e.type === 'disconnected');
    assert.equal(d.willReconnect, true);
    assert.equal(d.expired, true);
    await waitUntil(() => FakeSocket.all.length === 2, { timeout: 2000, what: 'the reconnect' });
    const hello = await handshake(sock, [{ room: 'r', headSeq: '5', readSeq: '3' }]);
    assert.equal(hello.hello.token, t2, 'the new token');
    assert.deepEqual(hello.hello.resume, [{ room: 'r', afterSeq: '4' }]);
    assert.equal(calls.length, 1, 'the token fetched before expiry was used');
    await waitUntil(() => c.state === 'connected', { timeout: 2000, what: 'connected again' });
    assert.equal(c.token, t2);
    sock().push({ message: msg('r', 5) });
    assert.deepEqual(seqsOf(events), [4, 5]);
    c.close();
  });

  check('client: a refused Hello gets one new token from getToken, and a second refusal ends it', { timeout: 5000 }, async () => {
    let calls = 0;
    const ok = fakeClient({ token: 'old', getToken: async () => `new${++calls}` });
    const p = ok.c.connect();
    await waitUntil(() => ok.sock().sent.length > 0, { timeout: 2000, what: 'hello' });
    refuseHello(ok.sock());
    await waitUntil(() => FakeSocket.all.length === 2, { timeout: 2000, what: 'a second try' });
    const hello = await handshake(ok.sock);
    assert.equal(hello.hello.token, 'new1');
    await p;
    assert.equal(calls, 1);
    assert.equal(ok.c.token, 'new1');
    ok.c.close();

    calls = 0;
    const bad = fakeClient({ token: 'old', getToken: async () => `new${++calls}` });
    const q = bad.c.connect();
    await waitUntil(() => bad.sock().sent.length > 0, { timeout: 2000, what: 'hello' });
    refuseHello(bad.sock());
    await waitUntil(() => FakeSocket.all.length === 2 && bad.sock().sent.length > 0, { timeout: 2000, what: 'a second hello' });
    assert.equal(bad.sock().take('hello').hello.token, 'new1');
    refuseHello(bad.sock());
    await assert.rejects(q, (e) => e.code === 'ERROR_CODE_UNAUTHENTICATED' && e.expired === true);
    assert.equal(bad.c.state, 'closed');
    assert.equal(calls, 1, 'getToken asked once');
    assert.equal(FakeSocket.all.length, 2, 'two attempts, no more');
  });

  check('client: getToken failing, or handing back the expired token, ends the client with GET_TOKEN', { timeout: 5000 }, async () => {
    for (const [getToken, why] of [
      [async () => Promise.reject(new Error('backend down')), /getToken failed: backend down/],
      [async () => fakeJwt(4102444800), /expires no later/],
    ]) {
      const { c, events, sock } = fakeClient({ token: fakeJwt(4102444800), getToken });
      const p = c.connect();
      await handshake(sock);
      await p;
      sock().push({ goAway: { reason: 'CLOSE_REASON_AUTH_EXPIRED', message: 'token expired' } });
      await waitUntil(() => c.state === 'closed', { timeout: 2000, what: 'the client to give up' });
      const d = events.filter((e) => e.type === 'disconnected').pop();
      assert.equal(d.willReconnect, false);
      assert.equal(d.expired, true);
      assert.equal(d.error.code, 'GET_TOKEN');
      assert.match(d.reason, why);
      assert.equal(FakeSocket.all.length, 1, 'no connection with a token that cannot work');
    }
  });
});

describe('chatd-client.js (unit): rooms, roles and moderation', () => {
  const INFO = { room: 'core', kind: 'ROOM_KIND_PRIVATE', title: 'Core team', createdBy: 'ann', createdMs: '1764950400000', memberCount: 1, myRole: 'ROLE_OWNER', owner: 'ann' };
  const info = (extra = {}) => ({
    room: 'core', kind: RoomKind.PRIVATE, title: 'Core team', topic: '', createdBy: 'ann', createdMs: 1764950400000, memberCount: 1,
    myRole: Role.OWNER, owner: 'ann', ...extra,
  });

  check('JSON mapping: RoomInfo, invitations, members, the directory and Left, with defaults filled in', {}, () => {
    assert.deepEqual(parseEnvelope(JSON.stringify({ id: '7', roomInfo: INFO })).body, info());
    // Everything absent: the proto3 defaults; numeric enums become names.
    assert.deepEqual(parseEnvelope('{"roomInfo":{}}').body, {
      room: '', kind: RoomKind.UNSPECIFIED, title: '', topic: '', createdBy: '', createdMs: 0, memberCount: 0, myRole: Role.UNSPECIFIED, owner: '',
    });
    assert.equal(parseEnvelope('{"roomInfo":{"kind":2,"myRole":2}}').body.kind, RoomKind.PRIVATE);
    assert.equal(parseEnvelope('{"roomInfo":{"kind":2,"myRole":2}}').body.myRole, Role.ADMIN);
    const w = parseEnvelope(JSON.stringify({
      id: '1',
      welcome: { user: 'bob', rooms: [{ room: 'core', headSeq: '3', info: INFO }, { room: 'old' }], invites: [{ room: 'x', by: 'ann', tsMs: '5', info: { room: 'x' } }] },
    })).body;
    assert.deepEqual(w.rooms[0].info, info());
    assert.equal(w.rooms[1].info, null, 'no info from the server: null');
    assert.deepEqual(w.invites, [{ room: 'x', by: 'ann', tsMs: 5, info: { ...parseEnvelope('{"roomInfo":{}}').body, room: 'x' } }]);
    assert.deepEqual(parseEnvelope('{"welcome":{"user":"bob"}}').body.invites, []);
    assert.deepEqual(parseEnvelope('{"left":{"room":"core","reason":"MEMBER_CHANGE_BANNED","by":"ann"}}').body, { room: 'core', reason: MemberChange.BANNED, by: 'ann' });
    assert.deepEqual(parseEnvelope('{"id":"4","left":{"room":"core"}}').body, { room: 'core', reason: MemberChange.UNSPECIFIED, by: '' });
    assert.equal(parseEnvelope('{"left":{"room":"core","reason":4}}').body.reason, MemberChange.REMOVED);
    assert.deepEqual(parseEnvelope('{"memberPage":{"room":"core","members":[{"user":"ann","role":"ROLE_OWNER","online":true},{"user":"bob","role":"ROLE_ADMIN"}]}}').body, {
      room: 'core', members: [{ user: 'ann', role: Role.OWNER, online: true }, { user: 'bob', role: Role.ADMIN, online: false }], hasMore: false,
    });
    assert.deepEqual(parseEnvelope(JSON.stringify({ roomList: { rooms: [INFO], hasMore: true } })).body, { rooms: [info()], hasMore: true });
    assert.deepEqual(parseEnvelope('{"roomList":{}}').body, { rooms: [], hasMore: false });
    assert.deepEqual(parseEnvelope(JSON.stringify({ roomUpdate: { info: INFO, by: 'ann', user: 'bob', change: 'MEMBER_CHANGE_ROLE_CHANGED', role: 'ROLE_ADMIN' } })).body, {
      info: info(), by: 'ann', user: 'bob', change: MemberChange.ROLE_CHANGED, role: Role.ADMIN,
    });
    assert.deepEqual(parseEnvelope(JSON.stringify({ roomUpdate: { info: INFO } })).body, { info: info(), by: '', user: '', change: MemberChange.UNSPECIFIED, role: Role.UNSPECIFIED });
    assert.equal(parseEnvelope('{"error":{"code":"ERROR_CODE_CONFLICT"}}').body.code, 'ERROR_CODE_CONFLICT');
    assert.equal(parseEnvelope('{"error":{"code":10}}').body.code, 'ERROR_CODE_ALREADY_EXISTS');
  });

  check('client: every room request goes out in the JSON mapping and resolves with its reply', { timeout: 5000 }, async () => {
    const { c, sock } = fakeClient();
    const p = c.connect();
    await handshake(sock);
    await p;
    /** Sends a request, checks what went out, answers it, returns the resolved reply. */
    const roundTrip = async (call, kind, body, reply) => {
      const pending = call();
      const env = sock().take(kind);
      assert.ok(env, `${kind} was sent`);
      assert.deepEqual(env[kind], body, `${kind} body`);
      sock().push({ id: env.id, ...reply });
      return pending;
    };
    const roomInfo = { roomInfo: INFO };
    assert.deepEqual(
      await roundTrip(() => c.createRoom('core', { kind: 'private', title: 'Core team', topic: 'Release 2.0', invite: ['bob'] }), 'createRoom',
        { room: 'core', kind: 'ROOM_KIND_PRIVATE', title: 'Core team', topic: 'Release 2.0', invite: ['bob'] }, roomInfo),
      info(),
    );
    await roundTrip(() => c.createRoom('pub'), 'createRoom', { room: 'pub' }, roomInfo);
    await roundTrip(() => c.createRoom('pub2', { kind: RoomKind.PUBLIC }), 'createRoom', { room: 'pub2', kind: 'ROOM_KIND_PUBLIC' }, roomInfo);
    // Left out: unchanged; '': cleared.
    await roundTrip(() => c.updateRoom('core', { topic: 'Release 2.1' }), 'updateRoom', { room: 'core', topic: 'Release 2.1' }, roomInfo);
    await roundTrip(() => c.updateRoom('core', { title: '', topic: undefined }), 'updateRoom', { room: 'core', title: '' }, roomInfo);
    await roundTrip(() => c.getRoom('core'), 'getRoom', { room: 'core' }, roomInfo);
    await roundTrip(() => c.invite('core', 'bob'), 'invite', { room: 'core', user: 'bob' }, roomInfo);
    await roundTrip(() => c.declineInvite('core'), 'declineInvite', { room: 'core' }, roomInfo);
    await roundTrip(() => c.removeMember('core', 'bob'), 'removeMember', { room: 'core', user: 'bob' }, roomInfo);
    await roundTrip(() => c.ban('core', 'mallory', 'spam'), 'ban', { room: 'core', user: 'mallory', reason: 'spam' }, roomInfo);
    await roundTrip(() => c.unban('core', 'mallory', 'sorry'), 'unban', { room: 'core', user: 'mallory', reason: 'sorry' }, roomInfo);
    await roundTrip(() => c.setRole('core', 'bob', 'admin'), 'setRole', { room: 'core', user: 'bob', role: 'ROLE_ADMIN' }, roomInfo);
    await roundTrip(() => c.setRole('core', 'bob', Role.OWNER), 'setRole', { room: 'core', user: 'bob', role: 'ROLE_OWNER' }, roomInfo);
    assert.deepEqual(
      await roundTrip(() => c.listMembers('core', { afterUser: 'ann', limit: 50 }), 'listMembers', { room: 'core', afterUser: 'ann', limit: 50 },
        { memberPage: { room: 'core', members: [{ user: 'bob', role: 'ROLE_MEMBER' }] } }),
      { room: 'core', members: [{ user: 'bob', role: Role.MEMBER, online: false }], hasMore: false },
    );
    await roundTrip(() => c.listMembers('core'), 'listMembers', { room: 'core' }, { memberPage: { room: 'core' } });
    assert.deepEqual(
      await roundTrip(() => c.listRooms({ query: 'rust', afterRoom: 'a', limit: 20 }), 'listRooms', { query: 'rust', afterRoom: 'a', limit: 20 }, { roomList: { rooms: [INFO], hasMore: true } }),
      { rooms: [info()], hasMore: true },
    );
    await roundTrip(() => c.listRooms(), 'listRooms', {}, { roomList: {} });
    const refused = c.invite('core', 'mallory');
    const env = sock().take('invite');
    sock().push({ id: env.id, error: { code: 'ERROR_CODE_CONFLICT', message: 'mallory is banned' } });
    await assert.rejects(refused, (e) => e.code === 'ERROR_CODE_CONFLICT' && e.serverMessage === 'mallory is banned');
    c.close();
  });

  check('client: a Left push for a removal or ban drops the room: an event with reason and by, and no resume cursor', { timeout: 5000 }, async () => {
    const { c, events, sock } = fakeClient();
    const p = c.connect();
    await handshake(sock, [{ room: 'core', headSeq: '4', readSeq: '4' }, { room: 'lobby', headSeq: '2', readSeq: '2' }, { room: 'mod', headSeq: '1' }]);
    await p;
    sock().push({ message: msg('core', 5) });
    assert.deepEqual(c.cursors(), { core: 5, lobby: 2, mod: 1 });
    sock().push({ left: { room: 'core', reason: 'MEMBER_CHANGE_REMOVED', by: 'ann' } });
    sock().push({ left: { room: 'mod', reason: 'MEMBER_CHANGE_BANNED', by: 'ann' } });
    assert.deepEqual(events.filter((e) => e.type === 'left').map(({ room, reason, by }) => ({ room, reason, by })), [
      { room: 'core', reason: MemberChange.REMOVED, by: 'ann' },
      { room: 'mod', reason: MemberChange.BANNED, by: 'ann' },
    ]);
    assert.deepEqual(c.cursors(), { lobby: 2 }, 'the rooms are no longer kept');
    // Reconnecting resumes only the room still joined.
    sock().push({ goAway: { reason: 'CLOSE_REASON_SHUTDOWN', message: 'bye' } });
    await waitUntil(() => FakeSocket.all.length === 2 && sock().sent.length > 0, { timeout: 2000, what: 'the reconnect' });
    const hello = await handshake(sock, [{ room: 'lobby', headSeq: '2', readSeq: '2' }]);
    assert.deepEqual(hello.hello.resume, [{ room: 'lobby', afterSeq: '2' }]);
    c.close();
  });

  check('client: invitation, roomupdate and joined pushes become events; an added room is live from its head', { timeout: 5000 }, async () => {
    const { c, events, sock } = fakeClient();
    const p = c.connect();
    await handshake(sock);
    await p;
    sock().push({ invitation: { room: 'core', by: 'ann', tsMs: '9', info: { ...INFO, myRole: undefined } } });
    const inv = events.find((e) => e.type === 'invitation');
    assert.deepEqual({ room: inv.room, by: inv.by, tsMs: inv.tsMs, role: inv.info.myRole, title: inv.info.title }, { room: 'core', by: 'ann', tsMs: 9, role: Role.UNSPECIFIED, title: 'Core team' });
    sock().push({ roomUpdate: { info: { ...INFO, memberCount: 2 }, by: 'ann', user: 'bob', change: 'MEMBER_CHANGE_JOINED', role: 'ROLE_MEMBER' } });
    const u = events.find((e) => e.type === 'roomupdate');
    assert.deepEqual({ change: u.change, user: u.user, role: u.role, by: u.by, count: u.info.memberCount }, { change: MemberChange.JOINED, user: 'bob', role: Role.MEMBER, by: 'ann', count: 2 });
    // An admin adds the user to a room: a joined push; messages from its head on.
    sock().push({ joined: { state: { room: 'added', headSeq: '7', info: { ...INFO, room: 'added', myRole: 'ROLE_MEMBER' } }, online: ['ann'] } });
    const j = events.find((e) => e.type === 'joined');
    assert.deepEqual([j.state.room, j.state.headSeq, j.state.info.myRole, j.online], ['added', 7, Role.MEMBER, ['ann']]);
    assert.deepEqual(c.cursors(), { added: 7 });
    sock().push({ message: msg('added', 8) });
    assert.deepEqual(seqsOf(events, 'added'), [8]);
    c.close();
  });

  check('client: a room created is kept from its first message', { timeout: 5000 }, async () => {
    const { c, events, sock } = fakeClient();
    const p = c.connect();
    await handshake(sock);
    await p;
    const created = c.createRoom('core', { kind: 'private' });
    const env = sock().take('createRoom');
    sock().push({ id: env.id, roomInfo: INFO });
    await created;
    assert.deepEqual(c.cursors(), { core: 0 });
    sock().push({ message: msg('core', 1) });
    sock().push({ message: msg('core', 2) });
    assert.deepEqual(seqsOf(events, 'core'), [1, 2]);
    assert.deepEqual(c.cursors(), { core: 2 });
    c.close();
  });
});

describe('chatd-client.js (unit): message changes', () => {
  const entry = (seq, targetSeq, kind, extra = {}) => ({
    room: 'r', seq, sender: 'bob', tsMs: 1000 + seq, clientMsgId: '', text: '', data: '', replyTo: 0, mentions: [],
    change: { targetSeq, kind, key: '' }, editedMs: 0, deleted: false, reactions: [], foldedSeq: 0, ...extra,
  });
  const target = (extra = {}) => ({
    room: 'r', seq: 1, sender: 'ann', tsMs: 1000, clientMsgId: 'c', text: 'hello', data: '', replyTo: 0, mentions: [],
    change: null, editedMs: 0, deleted: false, reactions: [], foldedSeq: 0, ...extra,
  });
  const react = (seq, sender, kind, key = '👍') => ({ ...entry(seq, 1, kind), sender, change: { targetSeq: 1, kind, key } });

  check('JSON mapping: changes, folded state, replies, mentions and unread counts', {}, () => {
    const m = parseEnvelope(JSON.stringify({
      message: {
        room: 'r', seq: '9', sender: 'bob', tsMs: '5', text: 'new words',
        change: { targetSeq: '4', kind: 'CHANGE_KIND_EDIT' },
      },
    })).body;
    assert.deepEqual(m.change, { targetSeq: 4, kind: ChangeKind.EDIT, key: '' });
    assert.equal(parseEnvelope('{"message":{"change":{"kind":3,"key":"x"}}}').body.change.kind, ChangeKind.REACTION_ADD, 'a numeric enum');
    const folded = parseEnvelope(JSON.stringify({
      historyPage: {
        room: 'r',
        messages: [{
          room: 'r', seq: '4', sender: 'ann', text: 'hi @bob', replyTo: '2', mentions: ['bob'], editedMs: '77', deleted: false,
          reactions: [{ key: '👍', count: 3, users: ['bob', 'cat'], mine: true }, { key: '🎉' }], foldedSeq: '12',
        }],
      },
    })).body.messages[0];
    assert.deepEqual(
      [folded.replyTo, folded.mentions, folded.change, folded.editedMs, folded.deleted, folded.foldedSeq],
      [2, ['bob'], null, 77, false, 12],
    );
    assert.deepEqual(folded.reactions, [{ key: '👍', count: 3, users: ['bob', 'cat'], mine: true }, { key: '🎉', count: 0, users: [], mine: false }]);
    const plain = parseEnvelope('{"message":{"room":"r","seq":"1"}}').body;
    assert.deepEqual([plain.replyTo, plain.mentions, plain.change, plain.editedMs, plain.deleted, plain.reactions, plain.foldedSeq], [0, [], null, 0, false, [], 0]);
    const w = parseEnvelope('{"id":"1","welcome":{"rooms":[{"room":"r","headSeq":"9","readSeq":"2","unread":"5","mentions":"1"},{"room":"q"}]}}').body;
    assert.deepEqual(w.rooms.map((r) => [r.room, r.unread, r.mentions]), [['r', 5, 1], ['q', 0, 0]]);
    assert.deepEqual(parseEnvelope('{"joined":{"state":{"room":"r","unread":"9999","mentions":"3"}}}').body.state.unread, 9999);
  });

  check('requests: edit, delete and react are answered by a PublishAck; publish carries replyTo and mentions', { timeout: 5000 }, async () => {
    const { c, sock } = fakeClient();
    const p = c.connect();
    await handshake(sock, [{ room: 'r', headSeq: '4', readSeq: '4' }]);
    await p;
    const answer = async (kind, promise, seq) => {
      const req = sock().take(kind);
      assert.ok(req, `a ${kind} request`);
      sock().push({ id: req.id, publishAck: { room: 'r', seq: String(seq), tsMs: '1', clientMsgId: req[kind].clientMsgId } });
      assert.equal((await promise).seq, seq);
      return req[kind];
    };
    const pub = await answer('publish', c.publish('r', 'hi @bob @bob', { replyTo: 3, mentions: ['bob', 'bob', 'cat'] }), 5);
    assert.deepEqual([pub.replyTo, pub.mentions], ['3', ['bob', 'cat']], 'a uint64 as a string; mentions once each');
    const many = c.publish('r', 'everyone', { mentions: Array.from({ length: 60 }, (_, i) => `u${i}`) });
    assert.equal(sock().take('publish').publish.mentions.length, 50, 'at most 50 mentions');
    many.catch(() => {});
    const edit = await answer('edit', c.edit('r', 5, 'hi @bob!'), 6);
    assert.deepEqual({ ...edit, clientMsgId: 'x' }, { room: 'r', seq: '5', clientMsgId: 'x', text: 'hi @bob!' });
    assert.ok(edit.clientMsgId, 'a clientMsgId, so a retry is not stored twice');
    const del = await answer('delete', c.deleteMessage('r', 5), 7);
    assert.deepEqual(Object.keys(del).sort(), ['clientMsgId', 'room', 'seq']);
    const add = await answer('react', c.react('r', 4, '👍', true), 8);
    assert.deepEqual([add.seq, add.key, add.add], ['4', '👍', true]);
    const remove = await answer('react', c.react('r', 4, '👍', false), 9);
    assert.equal('add' in remove, false, 'add = false is the default, left out');
    // A refused change rejects like any request.
    const bad = c.edit('r', 4, 'not mine');
    const req = sock().take('edit');
    sock().push({ id: req.id, error: { code: 'ERROR_CODE_BAD_REQUEST', message: 'not your message' } });
    await assert.rejects(bad, (e) => e.code === 'ERROR_CODE_BAD_REQUEST');
    c.close();
  });

  check('applyChange: edits, deletes and reactions fold in once; entries already folded are skipped', {}, () => {
    const m = target();
    assert.equal(applyChange(m, entry(2, 1, ChangeKind.EDIT, { sender: 'ann', text: 'hello again', tsMs: 4242 }), 'bob'), true);
    assert.deepEqual([m.text, m.editedMs, m.foldedSeq], ['hello again', 4242, 2]);
    assert.equal(applyChange(m, entry(2, 1, ChangeKind.EDIT, { text: 'twice' }), 'bob'), false, 'the same entry again');
    assert.equal(applyChange(m, entry(5, 9, ChangeKind.EDIT, { text: 'elsewhere' }), 'bob'), false, 'another target');
    // Reactions: bob (the reader) and cat; mine follows the reader's own changes.
    assert.equal(applyChange(m, react(3, 'bob', ChangeKind.REACTION_ADD), 'bob'), true);
    assert.equal(applyChange(m, react(4, 'cat', ChangeKind.REACTION_ADD), 'bob'), true);
    assert.deepEqual(m.reactions, [{ key: '👍', count: 2, users: ['bob', 'cat'], mine: true }]);
    assert.equal(applyChange(m, react(6, 'cat', ChangeKind.REACTION_ADD), 'bob'), false, 'cat already reacted so');
    assert.equal(applyChange(m, react(7, 'bob', ChangeKind.REACTION_REMOVE), 'bob'), true);
    assert.deepEqual(m.reactions, [{ key: '👍', count: 1, users: ['cat'], mine: false }]);
    assert.equal(applyChange(m, react(8, 'cat', ChangeKind.REACTION_REMOVE), 'bob'), true);
    assert.deepEqual(m.reactions, [], 'a reaction nobody has left is gone');
    // Folded by the server up to seq 20: entries up to there are in it already.
    const f = target({ text: 'folded', editedMs: 9, foldedSeq: 20, reactions: [{ key: '🎉', count: 25, users: ['u1'], mine: false }] });
    assert.equal(applyChange(f, entry(15, 1, ChangeKind.EDIT, { text: 'older edit' }), 'bob'), false);
    assert.equal(applyChange(f, { ...react(19, 'bob', ChangeKind.REACTION_ADD), change: { targetSeq: 1, kind: ChangeKind.REACTION_ADD, key: '🎉' } }, 'bob'), false);
    assert.deepEqual([f.text, f.reactions[0].count], ['folded', 25]);
    // Beyond the 20 listed: a removal by someone not listed still counts.
    assert.equal(applyChange(f, { ...react(21, 'u30', ChangeKind.REACTION_REMOVE), change: { targetSeq: 1, kind: ChangeKind.REACTION_REMOVE, key: '🎉' } }, 'bob'), true);
    assert.equal(f.reactions[0].count, 24);
    // A delete erases the content; nothing applies after it.
    assert.equal(applyChange(f, entry(22, 1, ChangeKind.DELETE, { sender: 'ann' }), 'bob'), true);
    assert.deepEqual([f.deleted, f.text, f.data, f.reactions, f.foldedSeq], [true, '', '', [], 22]);
    assert.equal(applyChange(f, entry(23, 1, ChangeKind.EDIT, { text: 'back?' }), 'bob'), false);
    assert.equal(f.text, '');
  });
});

// ===========================================================================
// chatd-client.js in Node against a real chatd: token expiry.

/** A WebSocket for Node: the global one (Node >= 22), else the `ws` package. */
const NodeWebSocket = globalThis.WebSocket || (await import('ws').then((m) => m.WebSocket, () => null));
const nodeMissing = !existsSync(CHATD)
  ? `no chatd binary at ${CHATD} (set CHATD_BIN)`
  : !NodeWebSocket
    ? 'no WebSocket for Node (npm ci --prefix tests/browser installs ws)'
    : '';
if (nodeMissing) say(`\n!!! chatd-client.js AGAINST CHATD ${CI ? 'FAILED' : 'SKIPPED'}: ${nodeMissing}\n`);
if (nodeMissing && CI) {
  check('chatd-client.js against chatd can run (CI=true)', {}, () => {
    throw new Error(`CI=true and ${nodeMissing}`);
  });
}

/** `chatd token` for `user` with lifetime `ttl` (e.g. `2s`, `1h`). */
function mintToken(dataDir, user, ttl) {
  return execFileSync(CHATD, ['token', '--data', dataDir, '--user', user, '--ttl', ttl], { encoding: 'utf8' }).trim();
}

async function mintTokenAsync(dataDir, user, ttl) {
  const { stdout } = await promisify(execFile)(CHATD, ['token', '--data', dataDir, '--user', user, '--ttl', ttl], { encoding: 'utf8' });
  return stdout.trim();
}

/** A token signed with the server's secret, with any claims (an `exp` long past, for one). */
function signToken(dataDir, claims) {
  const key = readFileSync(join(dataDir, 'secret'), 'utf8').replace(/\n$/, '');
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const signed = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${signed}.${createHmac('sha256', key).update(signed).digest('base64url')}`;
}

/** A WebSocket class that records every connection it opens. */
function countingWebSocket() {
  const opened = [];
  class Counting extends NodeWebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      opened.push(Date.now());
      // ws emits 'error' when a socket is closed mid-handshake: keep it from being unhandled.
      if (typeof this.on === 'function') this.on('error', () => {});
    }
  }
  return { WebSocket: Counting, opened };
}

function recordEvents(c) {
  const events = [];
  for (const type of ['message', 'connected', 'disconnected', 'goaway', 'statechange']) {
    c.addEventListener(type, (e) => events.push({ type, at: Date.now(), ...e.detail }));
  }
  return events;
}

describe('chatd-client.js against chatd: token expiry', { skip: nodeMissing ? `SKIPPED: ${nodeMissing}` : false }, () => {
  const local = { server: null, data: null, clients: [] };
  const url = () => `ws://127.0.0.1:${local.server.http}/ws`;
  const client = (opts) => {
    const c = new ChatdClient({ url: url(), heartbeat: false, WebSocket: NodeWebSocket, ...opts });
    local.clients.push(c);
    return c;
  };

  before(async () => {
    local.data = mkdtempSync(join(tmpdir(), 'chatd-client-'));
    local.server = await startServer(local.data);
  });

  after(async () => {
    for (const c of local.clients) c.close();
    await stopServer(local.server).catch(() => {});
    if (local.data) rmSync(local.data, { recursive: true, force: true });
  });

  check('an expired session without getToken: GoAway AUTH_EXPIRED, then no further connection attempt', { timeout: 30_000 }, async () => {
    const { WebSocket, opened } = countingWebSocket();
    const c = client({ token: mintToken(local.data, 'erin', '2s'), WebSocket });
    const events = recordEvents(c);
    await c.connect();
    await c.join('expiry-a');
    const d = await waitUntil(() => events.find((e) => e.type === 'disconnected'), { timeout: 10_000, what: 'the session to end at exp' });
    const ga = events.find((e) => e.type === 'goaway');
    assert.equal(ga && ga.reason, 'CLOSE_REASON_AUTH_EXPIRED');
    assert.equal(d.willReconnect, false);
    assert.equal(d.expired, true);
    assert.match(d.reason, /session expired/);
    assert.equal(c.state, 'closed');
    // A storm was ~64 attempts a second; the client's first backoff steps
    // are 100-400 ms. Any attempt in this window fails the test at once.
    const again = await watchFor(1500, () => opened.length > 1 || events.some((e) => e.type === 'statechange' && /connecting/.test(e.state) && e.at > d.at));
    assert.equal(again, null, `no connection attempt after the expiry (sockets opened: ${opened.length})`);
    await assert.rejects(c.join('expiry-a'), (e) => e.code === 'CLOSED');
  });

  check('with getToken the session carries on across the expiry: no gap, no duplicate', { timeout: 30_000 }, async () => {
    const room = 'expiry-b';
    const first = mintToken(local.data, 'fay', '3s');
    const calls = [];
    const { WebSocket, opened } = countingWebSocket();
    const a = client({
      token: first,
      WebSocket,
      getToken: async () => {
        calls.push(Date.now());
        return mintTokenAsync(local.data, 'fay', '1h');
      },
    });
    const events = recordEvents(a);
    const b = client({ token: mintToken(local.data, 'gus', '1h') });
    await a.connect();
    await a.join(room);
    await b.connect();
    await b.join(room);
    const received = () => events.filter((e) => e.type === 'message' && e.room === room);
    const sent = [];
    const publish = async (text) => sent.push({ seq: (await b.publish(room, text)).seq, text });

    await publish('gus before the expiry');
    await waitUntil(() => received().length === 1, { timeout: 5000, what: 'the first message' });
    const ga = await waitUntil(() => events.find((e) => e.type === 'goaway'), { timeout: 10_000, what: 'GoAway at exp' });
    assert.equal(ga.reason, 'CLOSE_REASON_AUTH_EXPIRED');
    // Published after the expiry, while fay is away or just back (resumed from her cursor).
    await publish('gus after the expiry one');
    await waitUntil(() => events.filter((e) => e.type === 'connected').length === 2, { timeout: 10_000, what: 'fay to reconnect' });
    await publish('gus after the expiry two');
    await waitUntil(() => received().length >= 3, { timeout: 10_000, what: 'every message' });

    assert.deepEqual(received().map((m) => [m.seq, m.text]), sent.map((m) => [m.seq, m.text]), 'each message once, in order');
    assert.deepEqual(sent.map((m) => m.seq), [sent[0].seq, sent[0].seq + 1, sent[0].seq + 2], 'contiguous seqs');
    const d = events.find((e) => e.type === 'disconnected');
    assert.equal(d.willReconnect, true);
    assert.equal(d.expired, true);
    assert.ok(calls.length >= 1 && calls[0] < ga.at, 'getToken was called before the expiry');
    assert.equal(calls.length, 1, 'one new token');
    assert.equal(opened.length, 2, 'one reconnect');
    assert.equal(a.state, 'connected');
    assert.equal(a.user, 'fay');
    assert.notEqual(a.token, first);
    assert.ok(tokenExpiry(a.token) > tokenExpiry(first), 'the session runs on the new token');
  });

  check('a token refused at Hello: getToken is asked once; without it, or refused again, the client gives up', { timeout: 30_000 }, async () => {
    // Long past any clock-skew leeway the server may allow.
    const stale = signToken(local.data, { sub: 'hank', exp: Math.floor(Date.now() / 1000) - 3600 });

    const plain = countingWebSocket();
    const c1 = client({ token: stale, WebSocket: plain.WebSocket });
    await assert.rejects(c1.connect(), (e) => e.code === 'ERROR_CODE_UNAUTHENTICATED' && e.expired === true);
    assert.equal(c1.state, 'closed');
    assert.equal(plain.opened.length, 1);

    let calls = 0;
    const renewed = countingWebSocket();
    const c2 = client({
      token: stale,
      WebSocket: renewed.WebSocket,
      getToken: () => {
        calls++;
        return mintTokenAsync(local.data, 'hank', '1h');
      },
    });
    const w = await c2.connect();
    assert.equal(w.user, 'hank');
    assert.equal(calls, 1);
    assert.equal(renewed.opened.length, 2);

    calls = 0;
    const refused = countingWebSocket();
    const c3 = client({
      token: stale,
      WebSocket: refused.WebSocket,
      getToken: async () => {
        calls++;
        return signToken(local.data, { sub: 'hank', exp: Math.floor(Date.now() / 1000) - 3600 + calls });
      },
    });
    await assert.rejects(c3.connect(), (e) => e.code === 'ERROR_CODE_UNAUTHENTICATED' && e.expired === true);
    assert.equal(calls, 1, 'getToken asked once');
    assert.equal(refused.opened.length, 2, 'two attempts, no more');
    assert.equal(c3.state, 'closed');
  });
});

// ===========================================================================
// chatd-client.js in Node against a real chatd: rooms, roles and moderation
// (proto/README.md §8), request by request.

/** Resolves with the first `type` event of `c` for which `pred` holds; rejects after `ms`. */
function nextEvent(c, type, pred = () => true, ms = 5000) {
  let off;
  return within(
    new Promise((res) => {
      off = c.on(type, (d) => {
        if (pred(d)) res(d);
      });
    }),
    ms,
    `a ${type} event`,
  ).finally(() => off());
}

/** Records a client's room events (and messages) in order. */
function recordRoomEvents(c) {
  const events = [];
  for (const type of ['message', 'joined', 'left', 'invitation', 'roomupdate', 'presence']) {
    c.addEventListener(type, (e) => events.push({ type, at: Date.now(), ...e.detail }));
  }
  return events;
}

describe('chatd-client.js against chatd: rooms, roles and moderation', { skip: nodeMissing ? `SKIPPED: ${nodeMissing}` : false }, () => {
  const local = { server: null, data: null, clients: [] };
  /** A connected client for `user`, with its events recorded. */
  const connect = async (user) => {
    const c = new ChatdClient({ url: `ws://127.0.0.1:${local.server.http}/ws`, token: await mintTokenAsync(local.data, user, '1h'), heartbeat: false, WebSocket: NodeWebSocket });
    local.clients.push(c);
    const events = recordRoomEvents(c);
    const welcome = await c.connect();
    return { c, events, welcome };
  };
  const code = (want) => (e) => {
    assert.equal(e.code, want, e.message);
    return true;
  };
  const u = {};

  before(async () => {
    local.data = mkdtempSync(join(tmpdir(), 'chatd-rooms-'));
    local.server = await startServer(local.data);
    for (const name of ['ann', 'bob', 'cat']) u[name] = await connect(name);
  });

  after(async () => {
    for (const c of local.clients) c.close();
    await stopServer(local.server).catch(() => {});
    if (local.data) rmSync(local.data, { recursive: true, force: true });
  });

  check('createRoom: the caller owns it; the invitee gets an Invitation, sees it in Welcome.invites, and only they may join', { timeout: 20_000 }, async () => {
    const { ann, bob, cat } = u;
    const invited = nextEvent(bob.c, 'invitation', (i) => i.room === 'core');
    const info = await ann.c.createRoom('core', { kind: 'private', title: 'Core team', topic: 'Release 2.0', invite: ['bob'] });
    assert.deepEqual({ ...info, createdMs: 0 }, {
      room: 'core', kind: RoomKind.PRIVATE, title: 'Core team', topic: 'Release 2.0', createdBy: 'ann', createdMs: 0, memberCount: 1, myRole: Role.OWNER, owner: 'ann',
    });
    assert.ok(Math.abs(info.createdMs - Date.now()) < 60_000, `createdMs is the server's time: ${info.createdMs}`);
    const inv = await invited;
    assert.equal(inv.by, 'ann');
    assert.equal(inv.info && inv.info.title, 'Core team');
    assert.equal(inv.info.myRole, Role.UNSPECIFIED, 'the invitee is not a member yet');
    // A second session of bob lists the invitation in its Welcome.
    const again = await connect('bob');
    assert.deepEqual(again.welcome.invites.map((i) => [i.room, i.by, i.info && i.info.kind]), [['core', 'ann', RoomKind.PRIVATE]]);
    again.c.close();
    // An invitee may read the room; someone else may not, nor join it.
    assert.equal((await bob.c.getRoom('core')).title, 'Core team');
    await assert.rejects(cat.c.getRoom('core'), code('ERROR_CODE_FORBIDDEN'));
    await assert.rejects(cat.c.join('core'), code('ERROR_CODE_FORBIDDEN'));
    await assert.rejects(ann.c.createRoom('core'), code('ERROR_CODE_ALREADY_EXISTS'));
    await assert.rejects(ann.c.createRoom('dm:ann:bob'), code('ERROR_CODE_BAD_REQUEST'));
    // Joining uses the invitation up; everyone in the room hears of it.
    const annHears = nextEvent(ann.c, 'roomupdate', (x) => x.change === MemberChange.JOINED && x.user === 'bob');
    const j = await bob.c.join('core');
    assert.equal(j.state.info && j.state.info.myRole, Role.MEMBER);
    assert.equal(j.state.info.memberCount, 2);
    const up = await annHears;
    assert.deepEqual([up.info.room, up.role, up.info.memberCount, up.info.myRole], ['core', Role.MEMBER, 2, Role.OWNER], 'info.myRole is the receiver\'s role');
    const fresh = await connect('bob');
    assert.deepEqual(fresh.welcome.invites, [], 'the invitation was used up');
    const st = fresh.welcome.rooms.find((r) => r.room === 'core');
    assert.equal(st && st.info && st.info.myRole, Role.MEMBER, 'Welcome.rooms[].info carries the role');
    fresh.c.close();
    // And they chat.
    const seen = nextEvent(bob.c, 'message', (m) => m.room === 'core' && m.text === 'welcome bob');
    await ann.c.publish('core', 'welcome bob');
    await seen;
  });

  check('declineInvite: the inviter hears of it; a second decline is NOT_FOUND; a banned user cannot be invited', { timeout: 20_000 }, async () => {
    const { ann, cat } = u;
    const invited = nextEvent(cat.c, 'invitation', (i) => i.room === 'core');
    await ann.c.invite('core', 'cat');
    await invited;
    const annHears = nextEvent(ann.c, 'roomupdate', (x) => x.change === MemberChange.DECLINED && x.user === 'cat');
    await cat.c.declineInvite('core');
    await annHears;
    await assert.rejects(cat.c.declineInvite('core'), code('ERROR_CODE_NOT_FOUND'));
    await ann.c.ban('core', 'cat', 'testing');
    await assert.rejects(ann.c.invite('core', 'cat'), code('ERROR_CODE_CONFLICT'));
    await ann.c.unban('core', 'cat');
    await ann.c.invite('core', 'cat');
    await cat.c.declineInvite('core');
  });

  check('roles: the owner makes an admin; title and topic change for everyone; listMembers shows roles and who is online', { timeout: 20_000 }, async () => {
    const { ann, bob, cat } = u;
    const bobHears = nextEvent(bob.c, 'roomupdate', (x) => x.change === MemberChange.ROLE_CHANGED && x.user === 'bob');
    const info = await ann.c.setRole('core', 'bob', 'admin');
    assert.equal(info.myRole, Role.OWNER);
    const up = await bobHears;
    assert.deepEqual([up.role, up.info.myRole, up.by], [Role.ADMIN, Role.ADMIN, 'ann']);
    await assert.rejects(bob.c.setRole('core', 'ann', 'member'), code('ERROR_CODE_FORBIDDEN'), 'only the owner sets roles');
    await assert.rejects(ann.c.setRole('core', 'cat', 'admin'), code('ERROR_CODE_NOT_FOUND'), 'not a member');
    // An admin changes the topic; a field left out stays.
    const annHears = nextEvent(ann.c, 'roomupdate', (x) => x.change === MemberChange.UNSPECIFIED && x.info.topic === 'Release 2.1');
    const changed = await bob.c.updateRoom('core', { topic: 'Release 2.1' });
    assert.deepEqual([changed.title, changed.topic], ['Core team', 'Release 2.1']);
    const t = await annHears;
    assert.deepEqual([t.user, t.by, t.info.title], ['', 'bob', 'Core team']);
    await assert.rejects(bob.c.updateRoom('core', { title: 'x'.repeat(129) }), code('ERROR_CODE_BAD_REQUEST'));
    const page = await ann.c.listMembers('core');
    assert.deepEqual(page, { room: 'core', members: [{ user: 'ann', role: Role.OWNER, online: true }, { user: 'bob', role: Role.ADMIN, online: true }], hasMore: false });
    const first = await ann.c.listMembers('core', { limit: 1 });
    assert.deepEqual([first.members.map((m) => m.user), first.hasMore], [['ann'], true]);
    const rest = await ann.c.listMembers('core', { afterUser: 'ann' });
    assert.deepEqual([rest.members.map((m) => m.user), rest.hasMore], [['bob'], false]);
    await assert.rejects(cat.c.listMembers('core'), code('ERROR_CODE_FORBIDDEN'));
  });

  check('removal: the member gets Left{REMOVED, by}, nothing of the room after it, and the client stops resuming it', { timeout: 20_000 }, async () => {
    const { ann, bob } = u;
    await ann.c.setRole('core', 'bob', 'member');
    const left = nextEvent(bob.c, 'left', (l) => l.room === 'core');
    const gone = nextEvent(ann.c, 'roomupdate', (x) => x.change === MemberChange.REMOVED && x.user === 'bob');
    const info = await ann.c.removeMember('core', 'bob', 'testing');
    assert.equal(info.memberCount, 1);
    const l = await left;
    assert.deepEqual([l.reason, l.by], [MemberChange.REMOVED, 'ann']);
    await gone;
    const mark = bob.events.indexOf(bob.events.find((e) => e.type === 'left' && e.room === 'core')) + 1;
    assert.equal('core' in bob.c.cursors(), false, 'no cursor kept for the room');
    await ann.c.publish('core', 'after the removal');
    const leak = await watchFor(750, () => bob.events.slice(mark).find((e) => e.room === 'core' || (e.info && e.info.room === 'core') || (e.state && e.state.room === 'core')));
    assert.equal(leak, null, `nothing of the room after Left: ${JSON.stringify(leak)}`);
    await assert.rejects(bob.c.publish('core', 'still here?'), code('ERROR_CODE_FORBIDDEN'));
    await assert.rejects(bob.c.history({ room: 'core' }), code('ERROR_CODE_FORBIDDEN'));
    await assert.rejects(bob.c.join('core'), code('ERROR_CODE_FORBIDDEN'), 'a private room needs a new invitation');
    // A client that still had a cursor for the room (it was away) hears why at resume, and drops it.
    const back = new ChatdClient({
      url: `ws://127.0.0.1:${local.server.http}/ws`, token: await mintTokenAsync(local.data, 'bob', '1h'), heartbeat: false, WebSocket: NodeWebSocket, resume: { core: 1 },
    });
    local.clients.push(back);
    const told = nextEvent(back, 'left', (x) => x.room === 'core');
    const replayed = [];
    back.on('message', (m) => replayed.push(m));
    await back.connect();
    const why = await told;
    assert.deepEqual([why.reason, why.by], [MemberChange.REMOVED, 'ann']);
    assert.deepEqual(replayed.filter((m) => m.room === 'core'), [], 'no replay');
    assert.equal('core' in back.cursors(), false);
    back.close();
  });

  check('pushes to one\'s own sessions: Left{LEFT} when another session leaves; Joined when the other user opens a direct room', { timeout: 20_000 }, async () => {
    const { ann, cat } = u;
    const two = await connect('cat');
    await cat.c.join('cat-corner');
    const left = nextEvent(two.c, 'left', (l) => l.room === 'cat-corner');
    const reply = await cat.c.leave('cat-corner');
    assert.deepEqual([reply.reason, reply.by], [MemberChange.LEFT, 'cat'], 'the reply to Leave');
    const l = await left;
    assert.deepEqual([l.reason, l.by], [MemberChange.LEFT, 'cat']);
    assert.equal('cat-corner' in two.c.cursors(), false);
    two.c.close();
    const added = nextEvent(cat.c, 'joined', (j) => j.state.room === 'dm:ann:cat');
    await ann.c.join('dm:ann:cat');
    const j = await added;
    assert.equal(j.state.info && j.state.info.kind, RoomKind.DIRECT);
    assert.equal(j.state.info.myRole, Role.MEMBER);
    const seen = nextEvent(cat.c, 'message', (m) => m.room === 'dm:ann:cat');
    await ann.c.publish('dm:ann:cat', 'psst');
    assert.equal((await seen).text, 'psst');
  });

  check('bans and the directory: a public room is listed and searchable; a banned user is out of it until unbanned', { timeout: 20_000 }, async () => {
    const { ann, bob, cat } = u;
    await ann.c.createRoom('rust-lounge', { title: 'Rust Lounge', topic: 'crates and lifetimes' });
    await ann.c.createRoom('zz-hidden', { kind: 'private', title: 'Rust secrets' });
    const all = await cat.c.listRooms();
    const names = all.rooms.map((r) => r.room);
    assert.ok(names.includes('rust-lounge'), `listed: ${names}`);
    assert.ok(!names.includes('zz-hidden') && !names.includes('core'), `never a private room: ${names}`);
    const byName = await cat.c.listRooms({ query: 'LOUNGE' });
    assert.deepEqual(byName.rooms.map((r) => r.room), ['rust-lounge']);
    assert.deepEqual([byName.rooms[0].title, byName.rooms[0].topic, byName.rooms[0].myRole, byName.rooms[0].kind], ['Rust Lounge', 'crates and lifetimes', Role.UNSPECIFIED, RoomKind.PUBLIC]);
    assert.deepEqual((await cat.c.listRooms({ query: 'st Lou' })).rooms.map((r) => r.room), ['rust-lounge'], 'the title is searched too');
    assert.deepEqual((await cat.c.listRooms({ query: 'no-such-room-anywhere' })).rooms, []);
    await cat.c.join('rust-lounge');
    await bob.c.join('rust-lounge');
    // An admin may not ban an admin; the owner may.
    await ann.c.setRole('rust-lounge', 'bob', 'admin');
    await ann.c.setRole('rust-lounge', 'cat', 'admin');
    await assert.rejects(bob.c.ban('rust-lounge', 'cat'), code('ERROR_CODE_FORBIDDEN'));
    await assert.rejects(bob.c.removeMember('rust-lounge', 'ann'), code('ERROR_CODE_FORBIDDEN'), 'nobody removes the owner');
    const left = nextEvent(cat.c, 'left', (l) => l.room === 'rust-lounge');
    await ann.c.ban('rust-lounge', 'cat', 'spam');
    const l = await left;
    assert.deepEqual([l.reason, l.by], [MemberChange.BANNED, 'ann']);
    assert.equal('rust-lounge' in cat.c.cursors(), false);
    await assert.rejects(cat.c.join('rust-lounge'), code('ERROR_CODE_FORBIDDEN'));
    assert.deepEqual((await cat.c.listRooms({ query: 'lounge' })).rooms, [], 'never a room one is banned from');
    await ann.c.unban('rust-lounge', 'cat');
    const j = await cat.c.join('rust-lounge');
    assert.equal(j.state.info && j.state.info.myRole, Role.MEMBER, 'back as a member');
    // A removed member may rejoin a public room.
    await ann.c.removeMember('rust-lounge', 'cat');
    await cat.c.join('rust-lounge');
    // Handing ownership on: the old owner becomes an admin.
    const handed = await ann.c.setRole('rust-lounge', 'bob', 'owner');
    assert.deepEqual([handed.owner, handed.myRole], ['bob', Role.ADMIN]);
    const members = await cat.c.listMembers('rust-lounge');
    assert.deepEqual(members.members.map((m) => [m.user, m.role]), [['ann', Role.ADMIN], ['bob', Role.OWNER], ['cat', Role.MEMBER]]);
  });
});

// ===========================================================================
// a–c. The web app in a real browser, against a real server.

/** Starts chatd; resolves once it prints its listening line. */
function startServer(dataDir, { tcp = 0, http = 0 } = {}) {
  const args = ['serve', '--data', dataDir, '--tcp', `127.0.0.1:${tcp}`, '--http', `127.0.0.1:${http}`, '--dev-auth', '--publish-rate', '0'];
  if (!EMBEDDED) args.push('--web-dir', join(REPO, 'clients/web'));
  const proc = spawn(CHATD, args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, NO_COLOR: '1', RUST_LOG: process.env.RUST_LOG || 'warn' } });
  const srv = { proc, log: [], exited: null };
  srv.exited = new Promise((res) => proc.on('exit', (code, signal) => res({ code, signal })));
  return within(
    new Promise((res, rej) => {
      proc.on('error', rej);
      proc.on('exit', (code) => rej(new Error(`chatd exited (${code}) before listening:\n${srv.log.join('\n')}`)));
      createInterface({ input: proc.stderr }).on('line', (line) => {
        srv.log.push(line);
        const m = /chatd listening: tcp 127\.0\.0\.1:(\d+) http 127\.0\.0\.1:(\d+)/.exec(line);
        if (m) {
          srv.tcp = Number(m[1]);
          srv.http = Number(m[2]);
          res(srv);
        }
      });
    }),
    15_000,
    'chatd to start',
  );
}

async function stopServer(srv) {
  if (!srv || srv.proc.exitCode !== null || srv.proc.signalCode !== null) return;
  srv.proc.kill('SIGTERM');
  try {
    await within(srv.exited, 15_000, 'chatd to shut down after SIGTERM');
  } catch (e) {
    srv.proc.kill('SIGKILL');
    throw e;
  }
}

/** The interactive `chat` CLI in a room: collects `[room #seq] sender: text` lines. */
function startCli(tcp, token, room) {
  const proc = spawn(CHAT, ['--server', `127.0.0.1:${tcp}`, '--token', token, '--room', room], { stdio: ['pipe', 'pipe', 'pipe'] });
  const cli = { proc, lines: [], messages: [], stderr: [] };
  createInterface({ input: proc.stdout }).on('line', (line) => {
    cli.lines.push(line);
    const m = /^\[(\S+) #(\d+)\] ([^:]+): (.*)$/.exec(line);
    if (m) cli.messages.push({ room: m[1], seq: Number(m[2]), sender: m[3], text: m[4] });
  });
  createInterface({ input: proc.stderr }).on('line', (line) => cli.stderr.push(line));
  cli.say = (text) => proc.stdin.write(`${text}\n`);
  return cli;
}

/** `chat ... send ROOM TEXT`: one publish in a fresh process; returns the seq. */
function cliSend(tcp, token, room, text) {
  return new Promise((res, rej) => {
    const p = spawn(CHAT, ['--server', `127.0.0.1:${tcp}`, '--token', token, 'send', room, text], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    const t = setTimeout(() => p.kill('SIGKILL'), 15_000);
    p.on('exit', (code) => {
      clearTimeout(t);
      const m = /sent \S+ #(\d+)/.exec(out);
      if (code === 0 && m) res(Number(m[1]));
      else rej(new Error(`chat send exited ${code}: ${out}${err}`));
    });
  });
}

/** The messages a page shows for `room`, in DOM order. */
function shown(page, room) {
  return page.$$eval(`.msg[data-room="${room}"][data-seq]`, (els) =>
    els.map((el) => ({ seq: Number(el.dataset.seq), sender: el.dataset.sender, text: el.querySelector('.msg-text').textContent })),
  );
}

/** Waits until the page shows every text in `texts` for `room`. */
async function waitForTexts(page, room, texts, timeout = 15_000) {
  try {
    await page.waitForFunction(
      ({ room, texts }) => {
        const have = new Set([...document.querySelectorAll(`.msg[data-room="${room}"][data-seq] .msg-text`)].map((e) => e.textContent));
        return texts.every((t) => have.has(t));
      },
      { room, texts },
      { timeout, polling: 50 },
    );
  } catch (e) {
    const got = (await shown(page, room)).map((m) => `#${m.seq} ${m.text}`);
    throw new Error(`${e.message}\nwanted: ${JSON.stringify(texts)}\npage shows: ${JSON.stringify(got)}`);
  }
}

/**
 * Checks what a page shows: seqs 1..n in order with no gap or duplicate,
 * each expected text exactly once, in the order it was sent by its sender.
 */
function assertTimeline(list, expected, who) {
  const seqs = list.map((m) => m.seq);
  assert.deepEqual(seqs, Array.from({ length: list.length }, (_, i) => i + 1), `${who}: seqs must be 1..n, contiguous, no duplicate: ${seqs}`);
  for (const t of expected) {
    assert.equal(list.filter((m) => m.text === t).length, 1, `${who}: "${t}" must appear exactly once`);
  }
  const bySender = {};
  for (const e of expected) (bySender[e.split(' ')[0]] ||= []).push(e);
  for (const [sender, texts] of Object.entries(bySender)) {
    const order = list.filter((m) => texts.includes(m.text)).map((m) => m.text);
    assert.deepEqual(order, texts, `${who}: ${sender}'s messages in the order sent`);
  }
}

const state = (page) => page.locator('#conn-state').getAttribute('data-state');

/**
 * Records in `window.__cspViolations` whatever the page's
 * Content-Security-Policy blocks. (The policy is the server's: a page
 * fulfilled by page.route() instead loses its loopback address, and
 * Chromium's local-network checks then block its WebSocket.)
 */
async function watchCsp(page) {
  await page.addInitScript(() => {
    window.__cspViolations = [];
    document.addEventListener('securitypolicyviolation', (e) => window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));
  });
}

const cspViolations = (page) => page.evaluate(() => window.__cspViolations);

/** Checks the page was served with {@link CSP}, when this chatd sends one. */
function checkServedCsp(response) {
  const served = response && response.headers()['content-security-policy'];
  if (served) assert.equal(served, CSP, 'the policy the web client is written for');
  else say('note: this chatd serves no Content-Security-Policy; CSP violations could not be checked');
}

/**
 * A new page of `ctx` signed in as `name` through the dev login. `server`:
 * the chatd to use (default: this suite's); `tap`: on a touch screen, where
 * the connection indicator is in the closed room panel.
 */
async function login(ctx, name, { server = env.server, tap = false } = {}) {
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.error(`[${name} page error]`, e));
  await watchCsp(page);
  checkServedCsp(await page.goto(`http://127.0.0.1:${server.http}/`));
  await page.locator('#dev-name').waitFor({ state: 'visible', timeout: 10_000 });
  await page.fill('#dev-name', name);
  if (tap) await page.tap('#dev-login button[type=submit]');
  else await page.click('#dev-login button[type=submit]');
  await page.locator('#conn-state[data-state="connected"]').waitFor({ state: tap ? 'attached' : 'visible', timeout: 10_000 });
  assert.equal(await page.locator('#me-name').textContent(), name);
  return page;
}

async function joinRoom(page, room) {
  await page.fill('#join-input', room);
  await page.press('#join-input', 'Enter');
  await page.locator(`.room-item.active[data-room="${room}"]`).waitFor({ timeout: 10_000 });
}

async function sendFromPage(page, text) {
  await page.fill('#composer-input', text);
  await page.press('#composer-input', 'Enter');
}

const env = { server: null, data: null, browser: null, ctxA: null, ctxB: null, pageA: null, pageB: null, cli: null, carolToken: null, sent: [] };

// What is missing to run the browser tests, if anything.
let playwright = null;
let missing = '';
try {
  playwright = await import('playwright-core');
} catch (e) {
  missing = `playwright-core is not installed (run: npm install --prefix ${relative(HERE)}): ${e.message}`;
}
if (!missing && !existsSync(CHROMIUM)) missing = `no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM)`;
if (!missing && !existsSync(CHATD)) missing = `no chatd binary at ${CHATD} (set CHATD_BIN)`;
if (!missing && !existsSync(CHAT)) missing = `no chat CLI binary at ${CHAT} (set CHAT_BIN)`;
function relative(p) {
  return p.startsWith(process.cwd()) ? p.slice(process.cwd().length + 1) || '.' : p;
}

if (missing) {
  const banner = `\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n!!! BROWSER TESTS ${CI ? 'FAILED' : 'SKIPPED'}: ${missing}\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n`;
  say(banner);
}

if (missing && CI) {
  check('browser tests can run (CI=true)', {}, () => {
    throw new Error(`CI=true and ${missing}`);
  });
}

describe('web client in Chromium against chatd', { skip: missing ? `SKIPPED: ${missing}` : false }, () => {
  before(async () => {
    try {
      await setUp();
    } catch (e) {
      // The tests of this suite will not run; count the failure here.
      results.failed++;
      throw e;
    }
  });

  async function setUp() {
    env.data = mkdtempSync(join(tmpdir(), 'chatd-browser-'));
    env.server = await startServer(env.data);
    env.browser = await within(
      playwright.chromium.launch({
        executablePath: CHROMIUM,
        // launch() gives the browser a fresh temporary profile (user-data-dir);
        // each user below gets an isolated context (own storage) in it.
        args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'],
      }),
      30_000,
      'Chromium to start',
    );
    env.ctxA = await env.browser.newContext({ viewport: { width: 1200, height: 760 } });
    env.ctxB = await env.browser.newContext({ viewport: { width: 1200, height: 760 } });
    env.ctxA.setDefaultTimeout(15_000);
    env.ctxB.setDefaultTimeout(15_000);
    env.carolToken = execFileSync(CHATD, ['token', '--data', env.data, '--user', 'carol'], { encoding: 'utf8' }).trim();
  }

  after(async () => {
    if (env.cli) env.cli.proc.kill('SIGTERM');
    if (env.browser) await env.browser.close().catch(() => {});
    await stopServer(env.server).catch(() => {});
    if (env.data) rmSync(env.data, { recursive: true, force: true });
  });

  check('a. two pages and the CLI chat in one room: every message once, in order, everywhere', { timeout: 60_000 }, async () => {
    env.pageA = await login(env.ctxA, 'ann');
    env.pageB = await login(env.ctxB, 'bob');
    await joinRoom(env.pageA, ROOM);
    await joinRoom(env.pageB, ROOM);
    env.cli = startCli(env.server.tcp, env.carolToken, ROOM);
    // The CLI joins the room at start; its join shows up as presence.
    await env.pageA.locator('#online [data-user="carol"]').waitFor({ timeout: 10_000 });

    const rounds = [
      ['ann', 'ann says hello'],
      ['bob', 'bob says hi'],
      ['carol', 'carol waves from the terminal'],
      ['ann', 'ann asks how everyone is'],
      ['carol', 'carol is fine'],
      ['bob', 'bob is fine too'],
    ];
    for (const [who, text] of rounds) {
      if (who === 'ann') await sendFromPage(env.pageA, text);
      else if (who === 'bob') await sendFromPage(env.pageB, text);
      else env.cli.say(text);
      env.sent.push(text);
      // Each message lands before the next is sent, so the expected order is known.
      await waitForTexts(env.pageA, ROOM, [text]);
      await waitForTexts(env.pageB, ROOM, [text]);
    }
    for (const [name, page] of [['ann', env.pageA], ['bob', env.pageB]]) {
      assertTimeline(await shown(page, ROOM), env.sent, `${name}'s page`);
    }
    // The CLI saw the pages' messages (and its own), once each, in order.
    await waitUntil(() => env.sent.every((t) => env.cli.messages.some((m) => m.text === t)), { timeout: 10_000, what: 'the CLI to print every message' });
    assertTimeline(env.cli.messages.filter((m) => m.room === ROOM), env.sent, 'carol (CLI)');
    const senders = Object.fromEntries(env.cli.messages.map((m) => [m.text, m.sender]));
    assert.equal(senders['ann says hello'], 'ann');
    assert.equal(senders['bob says hi'], 'bob');
    // Viewing the room marks it read: no unread badge for the open room.
    assert.equal(await env.pageB.locator(`.room-item[data-room="${ROOM}"] .badge`).count(), 0);
    await env.pageB.screenshot({ path: '/tmp/chatd-web.png' });
  });

  check('b. typing indicator and presence', { timeout: 60_000 }, async () => {
    const { pageA, pageB } = env;
    await pageB.locator('#online [data-user="ann"]').waitFor({ timeout: 10_000 });
    // Typing in ann's page shows in bob's, and goes away when ann sends.
    await pageA.locator('#composer-input').click();
    await pageA.locator('#composer-input').pressSequentially('I am typ', { delay: 30 });
    await pageB.locator('#typing', { hasText: 'ann is typing' }).waitFor({ timeout: 10_000 });
    await pageB.screenshot({ path: '/tmp/chatd-web-typing.png' });
    await pageA.locator('#composer-input').pressSequentially('ing a message', { delay: 10 });
    await pageA.press('#composer-input', 'Enter');
    env.sent.push('I am typing a message');
    await waitForTexts(pageB, ROOM, ['I am typing a message']);
    await waitUntil(async () => !(await pageB.locator('#typing').textContent()).includes('ann'), { timeout: 10_000, what: '"ann is typing" to go away after sending' });
    // bob's page shows ann online; closing ann's page makes her go offline.
    assert.equal(await pageB.locator('#online [data-user="ann"]').count(), 1);
    await pageA.close();
    await pageB.locator('#online [data-user="ann"]').waitFor({ state: 'detached', timeout: 10_000 });
    // Opening the app again signs ann back in (saved token), reopens the
    // room and loads its history; bob sees her online again.
    const page = await env.ctxA.newPage();
    await page.goto(`http://127.0.0.1:${env.server.http}/`);
    await page.locator('#conn-state[data-state="connected"]').waitFor({ timeout: 10_000 });
    await page.locator(`.room-item.active[data-room="${ROOM}"]`).waitFor({ timeout: 10_000 });
    await waitForTexts(page, ROOM, env.sent);
    assertTimeline(await shown(page, ROOM), env.sent, "ann's reopened page");
    await pageB.locator('#online [data-user="ann"]').waitFor({ timeout: 10_000 });
    env.pageA = page;
  });

  check('c. server restart mid-conversation: pages reconnect and resume with no gap or duplicate', { timeout: 90_000 }, async () => {
    assert.ok(env.pageA && env.pageB && env.server, 'the earlier tests set up both pages and the server');
    const { pageA, pageB, cli } = env;
    const { tcp, http } = env.server;
    await stopServer(env.server);
    await waitUntil(async () => (await state(pageA)) !== 'connected' && (await state(pageB)) !== 'connected', { timeout: 10_000, what: 'both pages to notice the shutdown' });
    // ann's browser also loses the network (while the server is down, so no
    // reconnect can slip in): she stays away until we give it back.
    await env.ctxA.setOffline(true);
    // While disconnected ann writes a message: it waits and goes out on reconnect.
    await sendFromPage(pageA, 'ann wrote this while offline');
    await pageA.locator('.msg.pending', { hasText: 'ann wrote this while offline' }).waitFor({ timeout: 5000 });

    env.server = await startServer(env.data, { tcp, http });
    // Published right after the restart, while ann's page is still away.
    const s1 = await cliSend(tcp, env.carolToken, ROOM, 'carol after restart one');
    const s2 = await cliSend(tcp, env.carolToken, ROOM, 'carol after restart two');
    assert.equal(s2, s1 + 1);
    env.sent.push('carol after restart one', 'carol after restart two');
    await pageB.locator('#conn-state[data-state="connected"]').waitFor({ timeout: 20_000 });
    await sendFromPage(pageB, 'bob after restart');
    env.sent.push('bob after restart');
    await waitForTexts(pageB, ROOM, ['carol after restart two', 'bob after restart']);
    assert.notEqual(await state(pageA), 'connected', "ann's page must still be away: these messages were published while it was disconnected");
    assert.equal(await pageA.locator('.msg[data-seq]', { hasText: 'carol after restart one' }).count(), 0);

    // ann's network comes back: she reconnects, resumes from her cursor, and her queued message goes out.
    await env.ctxA.setOffline(false);
    await pageA.locator('#conn-state[data-state="connected"]').waitFor({ timeout: 20_000 });
    env.sent.push('ann wrote this while offline');
    await waitForTexts(pageA, ROOM, env.sent);
    await sendFromPage(pageA, 'ann is back');
    cli.say('carol sees everyone is back');
    env.sent.push('ann is back', 'carol sees everyone is back');

    for (const [name, page] of [['ann', pageA], ['bob', pageB]]) {
      await waitForTexts(page, ROOM, env.sent, 20_000);
      assert.equal(await page.locator('.msg.pending').count(), 0, `${name}: nothing left pending`);
    }
    // The last two were sent concurrently: only each sender's own order is fixed.
    for (const [name, page] of [['ann', pageA], ['bob', pageB]]) {
      const list = await shown(page, ROOM);
      assertTimeline(list, env.sent, `${name}'s page after the restart`);
      assert.equal(list.length, env.sent.length, `${name}: nothing extra`);
    }
    // The interactive CLI lived through the restart too.
    await waitUntil(() => env.sent.every((t) => cli.messages.some((m) => m.text === t)), { timeout: 20_000, what: 'the CLI to print every message after the restart' });
    const cliRoom = cli.messages.filter((m) => m.room === ROOM);
    assert.deepEqual(cliRoom.map((m) => m.seq), Array.from({ length: cliRoom.length }, (_, i) => i + 1), 'CLI: contiguous seqs');
    await pageA.screenshot({ path: '/tmp/chatd-web-after-restart.png' });
  });

  check('e. unread badges, read markers that persist, and a direct conversation', { timeout: 60_000 }, async () => {
    assert.ok(env.pageA && env.pageB && env.server, 'the earlier tests set up both pages and the server');
    const { pageA, pageB } = env;
    await joinRoom(pageA, 'random');
    await joinRoom(pageB, 'random');
    await pageB.click(`.room-item[data-room="${ROOM}"] button`);
    await pageB.locator(`.room-item.active[data-room="${ROOM}"]`).waitFor();
    await sendFromPage(pageA, 'ann in random one');
    await sendFromPage(pageA, 'ann in random two');
    // bob is looking at another room: random gets an unread badge of 2.
    await pageB.locator('.room-item[data-room="random"] .badge', { hasText: /^2$/ }).waitFor({ timeout: 10_000 });
    // Viewing it marks it read.
    await pageB.click('.room-item[data-room="random"] button');
    await waitForTexts(pageB, 'random', ['ann in random one', 'ann in random two']);
    await pageB.locator('.room-item[data-room="random"] .badge').waitFor({ state: 'detached' });
    await pageB.waitForFunction(() => {
      const el = document.querySelector('.room-item[data-room="random"]');
      return el && Number(el.dataset.head) >= 2 && el.dataset.read === el.dataset.head;
    }, null, { timeout: 10_000, polling: 50 });
    // The read marker is on the server: after a reload (looking at general), random has no badge.
    await pageB.click(`.room-item[data-room="${ROOM}"] button`);
    await pageB.reload();
    await pageB.locator('#conn-state[data-state="connected"]').waitFor();
    await pageB.locator(`.room-item.active[data-room="${ROOM}"]`).waitFor();
    await pageB.locator('.room-item[data-room="random"]').waitFor();
    assert.equal(await pageB.locator('.room-item[data-room="random"] .badge').count(), 0, 'random was read before the reload');
    // A message arriving while bob is away from random, seen after the reload.
    await sendFromPage(pageA, 'ann in random three');
    await pageB.locator('.room-item[data-room="random"] .badge', { hasText: /^1$/ }).waitFor({ timeout: 10_000 });

    // Direct conversation: dm:ann:bob (ids sorted), whoever opens it.
    await pageB.fill('#dm-input', 'ann');
    await pageB.press('#dm-input', 'Enter');
    await pageB.locator('.room-item.active[data-room="dm:ann:bob"]').waitFor({ timeout: 10_000 });
    assert.equal((await pageB.locator('.room-item.active[data-room="dm:ann:bob"] .room-name').textContent()).trim(), 'ann');
    await sendFromPage(pageB, 'bob whispers to ann');
    await pageA.fill('#dm-input', 'bob');
    await pageA.press('#dm-input', 'Enter');
    await pageA.locator('.room-item.active[data-room="dm:ann:bob"]').waitFor({ timeout: 10_000 });
    await waitForTexts(pageA, 'dm:ann:bob', ['bob whispers to ann']);
    await sendFromPage(pageA, 'ann whispers back');
    await waitForTexts(pageB, 'dm:ann:bob', ['bob whispers to ann', 'ann whispers back']);
    assertTimeline(await shown(pageB, 'dm:ann:bob'), ['bob whispers to ann', 'ann whispers back'], "bob's DM");
  });

  check('f. scrolling back through history loads older pages with no gap', { timeout: 60_000 }, async () => {
    assert.ok(env.pageA && env.pageB && env.server, 'the earlier tests set up both pages and the server');
    const { pageB } = env;
    const N = 130;
    const cli = startCli(env.server.tcp, env.carolToken, 'history');
    try {
      await waitUntil(() => cli.stderr.some((l) => l.includes('connected')), { timeout: 10_000, what: 'the CLI to connect' });
      for (let i = 1; i <= N; i++) cli.say(`history line ${i}`);
      await waitUntil(() => cli.messages.filter((m) => m.room === 'history').length >= N, { timeout: 20_000, what: `the CLI to publish ${N} lines` });
    } finally {
      cli.proc.kill('SIGTERM');
    }
    await joinRoom(pageB, 'history');
    // The newest page first.
    await waitForTexts(pageB, 'history', [`history line ${N}`]);
    const first = await shown(pageB, 'history');
    assert.ok(first.length < N, `only the newest page is loaded at first (${first.length})`);
    assert.equal(await pageB.locator('#load-older').isVisible(), true, '"Load older messages" is offered');
    // Scroll to the top until the beginning of the room shows.
    for (let round = 0; round < 10; round++) {
      const before = (await shown(pageB, 'history')).length;
      if (before >= N) break;
      await pageB.locator('#messages').evaluate((el) => {
        el.scrollTop = 0;
        el.dispatchEvent(new Event('scroll'));
      });
      await waitUntil(async () => (await shown(pageB, 'history')).length > before, { timeout: 10_000, what: 'older messages to load on scroll' });
    }
    const all = await shown(pageB, 'history');
    assertTimeline(all, Array.from({ length: N }, (_, i) => `history line ${i + 1}`), "bob's history");
    await pageB.locator('#history-start').waitFor({ state: 'visible' });
    assert.deepEqual(await cspViolations(pageB), [], 'nothing the Content-Security-Policy blocks');
  });

  check('g. a pasted token that expires: the sign-in screen says so, the box is empty, no reconnect loop', { timeout: 60_000 }, async () => {
    assert.ok(env.server, 'the server is up');
    const ctx = await env.browser.newContext({ viewport: { width: 1200, height: 760 } });
    try {
      const page = await ctx.newPage();
      page.on('pageerror', (e) => console.error('[ivy page error]', e));
      const sockets = [];
      page.on('websocket', (ws) => sockets.push(ws.url()));
      await watchCsp(page);
      checkServedCsp(await page.goto(`http://127.0.0.1:${env.server.http}/`));
      await page.locator('#token-input').waitFor({ state: 'visible', timeout: 10_000 });
      const token = mintToken(env.data, 'ivy', '3s');
      await page.fill('#token-input', token);
      await page.click('#token-login button[type=submit]');
      await page.locator('#conn-state[data-state="connected"]').waitFor({ timeout: 10_000 });
      assert.equal(await page.locator('#me-name').textContent(), 'ivy');
      await joinRoom(page, 'expiry-web');

      const notice = page.locator('#login-error', { hasText: EXPIRED_NOTICE });
      await notice.waitFor({ state: 'visible', timeout: 15_000 });
      assert.equal((await notice.textContent()).trim(), EXPIRED_NOTICE, 'plain words, no error code');
      assert.equal(await page.locator('#app').isVisible(), false);
      assert.equal(await page.inputValue('#token-input'), '', 'the token box is cleared');
      assert.equal(await page.evaluate(() => localStorage.getItem('chatd.token')), null, 'the stored token is forgotten');
      assert.equal(sockets.length, 1);
      const loop = await watchFor(1500, () => sockets.length > 1);
      assert.equal(loop, null, `no reconnect after the expiry (WebSockets opened: ${sockets.length})`);

      // A page reloaded with the expired token still stored (a tab left
      // open overnight): one refused attempt, then the same notice.
      await page.evaluate((t) => localStorage.setItem('chatd.token', t), token);
      const before = sockets.length;
      await page.reload();
      await notice.waitFor({ state: 'visible', timeout: 15_000 });
      assert.equal(await page.inputValue('#token-input'), '');
      assert.equal(await page.evaluate(() => localStorage.getItem('chatd.token')), null);
      const reloadLoop = await watchFor(1500, () => sockets.length - before > 1);
      assert.equal(reloadLoop, null, `one attempt with the expired token (WebSockets opened since the reload: ${sockets.length - before})`);
      await page.screenshot({ path: '/tmp/chatd-web-expired.png' });
      assert.deepEqual(await cspViolations(page), [], 'nothing the Content-Security-Policy blocks');
    } finally {
      await ctx.close();
    }
  });

  check('h. a dev login carries on across its token\'s expiry with a new token', { timeout: 60_000 }, async () => {
    assert.ok(env.server, 'the server is up');
    const ctx = await env.browser.newContext({ viewport: { width: 1200, height: 760 } });
    try {
      const page = await ctx.newPage();
      page.on('pageerror', (e) => console.error('[jo page error]', e));
      const sockets = [];
      page.on('websocket', (ws) => sockets.push(ws.url()));
      await watchCsp(page);
      // The first dev token is short-lived (the server's last 24 h); later
      // ones come from the server as usual.
      const first = mintToken(env.data, 'jo', '3s');
      let minted = 0;
      await page.route(/\/dev\/token\?user=jo$/, (route) => {
        minted++;
        if (minted === 1) return route.fulfill({ status: 200, contentType: 'text/plain', body: first });
        return route.continue();
      });
      await page.goto(`http://127.0.0.1:${env.server.http}/`);
      await page.locator('#dev-name').waitFor({ state: 'visible', timeout: 10_000 });
      await page.fill('#dev-name', 'jo');
      await page.click('#dev-login button[type=submit]');
      await page.locator('#conn-state[data-state="connected"]').waitFor({ timeout: 10_000 });
      await joinRoom(page, 'expiry-dev');
      await sendFromPage(page, 'jo before the expiry');
      await waitForTexts(page, 'expiry-dev', ['jo before the expiry']);

      await waitUntil(() => sockets.length >= 2, { timeout: 15_000, what: 'the reconnect at the expiry' });
      await page.locator('#conn-state[data-state="connected"]').waitFor({ timeout: 10_000 });
      assert.ok(minted >= 2, 'a new token was minted for jo');
      await sendFromPage(page, 'jo after the expiry');
      await waitForTexts(page, 'expiry-dev', ['jo before the expiry', 'jo after the expiry']);
      assertTimeline(await shown(page, 'expiry-dev'), ['jo before the expiry', 'jo after the expiry'], "jo's page");
      assert.equal(await page.locator('#login').isVisible(), false, 'still signed in');
      const stored = await page.evaluate(() => localStorage.getItem('chatd.token'));
      assert.ok(tokenExpiry(stored) > tokenExpiry(first), 'the new token is stored for a reload');
      assert.equal(sockets.length, 2, 'one reconnect');
      assert.deepEqual(await cspViolations(page), [], 'nothing the Content-Security-Policy blocks');
    } finally {
      await ctx.close();
    }
  });

  check('i. a phone-sized screen: the room list slides in from a menu button, with names, badges and the join box', { timeout: 60_000 }, async () => {
    assert.ok(env.server && env.pageB, 'the earlier tests set up the server and a desktop page');
    // The desktop layout is unchanged: no menu button, the sidebar in place.
    assert.equal(await env.pageB.locator('#menu-btn').isVisible(), false, 'no menu button on the desktop');
    const desk = await env.pageB.locator('#sidebar').boundingBox();
    assert.ok(desk && desk.x === 0 && Math.round(desk.width) === 270, `the desktop sidebar in place: ${JSON.stringify(desk)}`);

    const PHONE = { width: 390, height: 844 };
    const [lounge, kitchen] = ['phone-lounge', 'phone-kitchen-table'];
    const ctx = await env.browser.newContext({ viewport: PHONE, isMobile: true, hasTouch: true, deviceScaleFactor: 2 });
    ctx.setDefaultTimeout(15_000);
    try {
      const page = await ctx.newPage();
      page.on('pageerror', (e) => console.error('[pia page error]', e));
      await watchCsp(page);
      checkServedCsp(await page.goto(`http://127.0.0.1:${env.server.http}/`));
      await page.locator('#dev-name').waitFor({ state: 'visible', timeout: 10_000 });
      await page.fill('#dev-name', 'pia');
      await page.tap('#dev-login button[type=submit]');
      // The connection indicator is in the closed panel: there, not visible.
      await page.locator('#conn-state[data-state="connected"]').waitFor({ state: 'attached', timeout: 10_000 });

      const menu = page.getByRole('button', { name: 'Rooms', exact: true });
      const sidebar = page.locator('#sidebar');
      const backdrop = page.locator('#nav-backdrop');
      const openPanel = async () => {
        await menu.tap();
        await sidebar.waitFor({ state: 'visible', timeout: 5000 });
        await waitUntil(async () => {
          const box = await sidebar.boundingBox();
          return box && box.x === 0;
        }, { timeout: 5000, what: 'the panel to slide all the way in' });
        assert.equal(await menu.getAttribute('aria-expanded'), 'true');
        assert.equal(await backdrop.isVisible(), true, 'a backdrop over the messages');
        assert.equal(await page.locator('#chat').evaluate((el) => el.inert), true, 'the messages behind are out of reach');
      };
      const panelClosed = async (why) => {
        await sidebar.waitFor({ state: 'hidden', timeout: 5000 });
        assert.equal(await menu.getAttribute('aria-expanded'), 'false', why);
        assert.equal(await backdrop.isVisible(), false, why);
        assert.equal(await page.locator('#chat').evaluate((el) => el.inert), false, why);
      };

      // The message view takes the whole screen; the room list waits behind the menu button.
      assert.equal(await menu.isVisible(), true, 'the menu button shows');
      assert.equal(await sidebar.isVisible(), false, 'the room list is closed');
      const chat = await page.locator('#chat').boundingBox();
      assert.deepEqual([chat.x, chat.width], [0, PHONE.width], 'the message view is as wide as the screen');

      // Two rooms joined through the panel; each join closes it.
      for (const room of [lounge, kitchen]) {
        await openPanel();
        await page.fill('#join-input', room);
        await page.tap('#join-form button[type=submit]');
        await page.locator(`.room-item.active[data-room="${room}"]`).waitFor({ state: 'attached', timeout: 10_000 });
        await panelClosed(`joining ${room} closes the panel`);
        assert.equal(await page.locator('#room-title').textContent(), `#${room}`);
      }

      // A message in the room not on screen: the menu button and the panel count it.
      await cliSend(env.server.tcp, env.carolToken, lounge, 'carol in the lounge one');
      await page.locator('#menu-unread', { hasText: /^1$/ }).waitFor({ timeout: 10_000 });
      await openPanel();
      await page.locator(`.room-item[data-room="${lounge}"] .badge`, { hasText: /^1$/ }).waitFor({ timeout: 5000 });
      const panel = await sidebar.boundingBox();
      assert.ok(panel.width < PHONE.width, 'the panel leaves a strip of the messages to tap');
      for (const room of [lounge, kitchen]) {
        const name = page.locator(`#room-list .room-item[data-room="${room}"] .room-name`);
        assert.equal(await name.isVisible(), true, `${room} is named in the panel, not just an icon`);
        assert.equal((await name.textContent()).trim(), room);
        assert.equal(await name.evaluate((el) => el.scrollWidth <= el.clientWidth), true, `${room} is shown in full, not cut off`);
        const box = await name.boundingBox();
        assert.ok(box.x >= panel.x && box.x + box.width <= panel.x + panel.width, `${room} is inside the panel`);
      }
      const join = await page.locator('#join-input').boundingBox();
      assert.ok(join && join.x >= panel.x && join.x + join.width <= panel.x + panel.width, 'the join box is in the panel');
      await page.screenshot({ path: '/tmp/mobile-open.png' });

      // Switching rooms by name closes the panel and shows the room.
      await page.locator('#room-list').getByText(lounge, { exact: true }).tap();
      await panelClosed('choosing a room closes the panel');
      await page.locator(`.room-item.active[data-room="${lounge}"]`).waitFor({ state: 'attached' });
      assert.equal(await page.locator('#room-title').textContent(), `#${lounge}`);
      await waitForTexts(page, lounge, ['carol in the lounge one']);
      await page.locator('#menu-unread').waitFor({ state: 'hidden', timeout: 10_000 });
      // Live messages from another client arrive in the room chosen, next to the phone's own.
      await cliSend(env.server.tcp, env.carolToken, lounge, 'carol in the lounge two');
      await sendFromPage(page, 'pia answers from her phone');
      const lines = ['carol in the lounge one', 'carol in the lounge two', 'pia answers from her phone'];
      await waitForTexts(page, lounge, lines);
      assertTimeline(await shown(page, lounge), lines, "pia's phone");
      for (const [what, el] of [['the composer', page.locator('#composer')], ['the newest message', page.locator(`.msg[data-room="${lounge}"][data-seq]`).last()]]) {
        const box = await el.boundingBox();
        assert.ok(box && box.x >= 0 && box.x + box.width <= PHONE.width && box.y + box.height <= PHONE.height, `${what} is on the screen: ${JSON.stringify(box)}`);
      }
      await page.screenshot({ path: '/tmp/mobile-closed.png' });

      // Escape closes the panel, and so does a tap beside it; focus goes back to the menu button.
      await openPanel();
      await page.keyboard.press('Escape');
      await panelClosed('Escape closes the panel');
      assert.equal(await page.evaluate(() => document.activeElement.id), 'menu-btn');
      await openPanel();
      await backdrop.tap({ position: { x: PHONE.width - 30, y: PHONE.height / 2 } });
      await panelClosed('a tap outside closes the panel');
      assert.equal(await page.evaluate(() => document.activeElement.id), 'menu-btn');
      assert.equal(await page.locator('#room-title').textContent(), `#${lounge}`, 'closing without a choice stays in the room');

      // Grown to desktop size with the panel open: the sidebar is back in place, the menu gone.
      await openPanel();
      await page.setViewportSize({ width: 1200, height: 760 });
      await page.waitForFunction(() => !document.getElementById('app').classList.contains('nav-open'), null, { timeout: 5000, polling: 50 });
      assert.equal(await menu.isVisible(), false);
      assert.equal(await backdrop.isVisible(), false);
      assert.equal(await page.locator('#chat').evaluate((el) => el.inert), false);
      const wide = await sidebar.boundingBox();
      assert.ok(wide && wide.x === 0 && Math.round(wide.width) === 270, `the sidebar in place: ${JSON.stringify(wide)}`);
      assert.deepEqual(await cspViolations(page), [], 'nothing the Content-Security-Policy blocks');
    } finally {
      await ctx.close();
    }
  });
});

// ===========================================================================
// j–n. Rooms, roles and moderation in the web app (proto/README.md §8), in
// a real browser against a real server of their own.

const rooms = { server: null, data: null, browser: null, carolToken: null, contexts: [], pages: {}, frames: {} };

/** Pages of the rooms tests, by user; `phone`: a 390×844 touch screen. */
async function roomsPage(name, { phone = false } = {}) {
  const ctx = await rooms.browser.newContext(
    phone ? { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2 } : { viewport: { width: 1200, height: 760 } },
  );
  ctx.setDefaultTimeout(15_000);
  rooms.contexts.push(ctx);
  // Every WebSocket text frame the page receives, parsed, with the time it came.
  const frames = [];
  rooms.frames[name] = frames;
  ctx.on('page', (page) =>
    page.on('websocket', (ws) =>
      ws.on('framereceived', ({ payload }) => {
        try {
          frames.push({ at: Date.now(), env: JSON.parse(String(payload)) });
        } catch {
          /* binary: not this client */
        }
      }),
    ),
  );
  const page = await login(ctx, name, { server: rooms.server, tap: phone });
  rooms.pages[name] = page;
  return page;
}

/** Whether an Envelope is about `room` (a message, presence, update, … of it). */
function envelopeOf(env, room) {
  for (const [k, v] of Object.entries(env)) {
    if (k === 'id' || !v || typeof v !== 'object') continue;
    if (v.room === room || (v.info && v.info.room === room) || (v.state && v.state.room === room)) return true;
  }
  return false;
}

/** Opens the room panel on a phone (the sidebar is always there on a desktop). */
async function openNav(page) {
  if (!(await page.locator('#menu-btn').isVisible())) return;
  if ((await page.locator('#menu-btn').getAttribute('aria-expanded')) === 'true') return;
  await page.locator('#menu-btn').tap();
  await page.locator('#sidebar').waitFor({ state: 'visible', timeout: 5000 });
  await waitUntil(async () => ((await page.locator('#sidebar').boundingBox()) || {}).x === 0, { timeout: 5000, what: 'the panel to slide in' });
}

/** Creates a room through the "New room" dialog; resolves once it is on screen. */
async function createRoomFromPage(page, { name, title = '', topic = '', kind = 'public', invite = '' }, { phone = false } = {}) {
  await openNav(page);
  const press = (sel) => (phone ? page.tap(sel) : page.click(sel));
  await press('#create-btn');
  await page.locator('#create-dialog').waitFor({ state: 'visible', timeout: 5000 });
  await page.fill('#create-name', name);
  await page.fill('#create-title', title);
  await page.fill('#create-topic', topic);
  await page.check(kind === 'private' ? '#create-private' : '#create-public');
  await page.fill('#create-invite', invite);
  await press('#create-submit');
  await page.locator('#create-dialog').waitFor({ state: 'hidden', timeout: 10_000 });
  await page.locator(`.room-item.active[data-room="${name}"]`).waitFor({ state: 'attached', timeout: 10_000 });
}

/** Opens the member panel of the room on screen. */
async function openMembers(page) {
  if ((await page.locator('#members-btn').getAttribute('aria-expanded')) !== 'true') await page.locator('#members-btn').click();
  await page.locator('#members-panel').waitFor({ state: 'visible', timeout: 5000 });
}

const memberRow = (page, user) => page.locator(`#member-list .member[data-user="${user}"]`);

/** An admin's action on a member, through the member panel: `admin`, `member`, `owner`, `remove` or `ban`. */
async function manageMember(page, user, action, reason = '') {
  await openMembers(page);
  await memberRow(page, user).locator('.member-menu').click();
  await page.locator('#member-dialog').waitFor({ state: 'visible', timeout: 5000 });
  if (reason) await page.fill('#md-reason', reason);
  await page.click(`#md-${action}`);
  if (action === 'owner') await page.click('#md-owner'); // asked twice
  await page.locator('#member-dialog').waitFor({ state: 'hidden', timeout: 10_000 });
}

/** Invites `user` to the room on screen from the member panel. */
async function inviteFromPage(page, user) {
  await openMembers(page);
  await page.fill('#invite-input', user);
  await page.press('#invite-input', 'Enter');
  // Done: the box is emptied, and it says so.
  await page.waitForFunction(() => document.getElementById('invite-input').value === '', null, { timeout: 10_000, polling: 50 });
  await page.locator('.toast', { hasText: `Invited ${user}` }).last().waitFor({ timeout: 5000 });
}

describe('rooms, roles and moderation in Chromium against chatd', { skip: missing ? `SKIPPED: ${missing}` : false }, () => {
  before(async () => {
    try {
      rooms.data = mkdtempSync(join(tmpdir(), 'chatd-web-rooms-'));
      rooms.server = await startServer(rooms.data);
      rooms.browser = await within(
        playwright.chromium.launch({
          executablePath: CHROMIUM,
          args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'],
        }),
        30_000,
        'Chromium to start',
      );
      rooms.carolToken = await mintTokenAsync(rooms.data, 'carol', '1h');
    } catch (e) {
      results.failed++;
      throw e;
    }
  });

  after(async () => {
    for (const ctx of rooms.contexts) await ctx.close().catch(() => {});
    if (rooms.browser) await rooms.browser.close().catch(() => {});
    await stopServer(rooms.server).catch(() => {});
    if (rooms.data) rmSync(rooms.data, { recursive: true, force: true });
  });

  check('j. a private room: ann creates it and invites bob; bob sees the invitation, accepts, and they chat', { timeout: 60_000 }, async () => {
    const ann = await roomsPage('ann');
    const bob = await roomsPage('bob');
    await createRoomFromPage(ann, { name: 'team-core', title: 'Core team', topic: 'Release 2.0', kind: 'private' });
    assert.equal(await ann.locator('#room-title').textContent(), '#team-core');
    await ann.locator('#room-display-title', { hasText: 'Core team' }).waitFor();
    await ann.locator('#room-topic', { hasText: 'Release 2.0' }).waitFor();
    await ann.locator('#room-kind', { hasText: 'Private' }).waitFor();
    await ann.locator('.room-item[data-room="team-core"] .hash[data-kind="private"]').waitFor(); // a padlock
    // Not in the directory, and nobody uninvited gets in.
    await bob.fill('#join-input', 'team-core');
    await bob.press('#join-input', 'Enter');
    await bob.locator('.toast', { hasText: 'Could not join team-core' }).waitFor({ timeout: 10_000 });
    assert.equal(await bob.locator('.room-item[data-room="team-core"]').count(), 0);

    await inviteFromPage(ann, 'bob');
    const invite = bob.locator('.invite[data-room="team-core"]');
    await invite.waitFor({ timeout: 10_000 });
    assert.equal((await invite.locator('.invite-room').textContent()).trim(), 'Core team');
    assert.equal((await invite.locator('.invite-by').textContent()).trim(), 'from ann');
    await bob.screenshot({ path: '/tmp/chatd-web-invited.png' });
    await invite.getByRole('button', { name: /^Accept/ }).click();
    await bob.locator('.room-item.active[data-room="team-core"]').waitFor({ timeout: 10_000 });
    await invite.waitFor({ state: 'detached', timeout: 5000 });
    await bob.locator('#room-display-title', { hasText: 'Core team' }).waitFor();
    await bob.locator('#room-topic', { hasText: 'Release 2.0' }).waitFor();
    // ann's member list has bob now (a RoomUpdate), online.
    await memberRow(ann, 'bob').and(ann.locator('[data-role="ROLE_MEMBER"][data-online="true"]')).waitFor({ timeout: 10_000 });

    const lines = ['ann welcomes bob to the core team', 'bob says thanks', 'ann asks about the release'];
    await sendFromPage(ann, lines[0]);
    await waitForTexts(bob, 'team-core', [lines[0]]);
    await sendFromPage(bob, lines[1]);
    await waitForTexts(ann, 'team-core', [lines[1]]);
    await sendFromPage(ann, lines[2]);
    for (const [who, page] of [['ann', ann], ['bob', bob]]) {
      await waitForTexts(page, 'team-core', lines);
      assertTimeline(await shown(page, 'team-core'), lines, `${who}'s page`);
    }
    await bob.screenshot({ path: '/tmp/chatd-web-private-room.png' });
    for (const page of [ann, bob]) assert.deepEqual(await cspViolations(page), [], 'nothing the Content-Security-Policy blocks');
  });

  check('k. removed by an admin: the page says so plainly and receives nothing more; then banned the same way', { timeout: 60_000 }, async () => {
    const { ann, bob } = rooms.pages;
    assert.ok(ann && bob, 'test j set up both pages');
    await manageMember(ann, 'bob', 'remove', 'testing removals');
    const notice = bob.locator('#gone-text');
    await notice.waitFor({ state: 'visible', timeout: 10_000 });
    assert.equal((await notice.textContent()).trim(), 'You were removed from #team-core by ann.');
    assert.equal(await bob.locator('#composer').isVisible(), false, 'no composer in a room one was removed from');
    await bob.locator('.room-item.gone[data-room="team-core"]').waitFor({ state: 'attached' });
    await memberRow(ann, 'bob').waitFor({ state: 'detached', timeout: 10_000 });
    const frames = rooms.frames.bob;
    const left = frames.find((f) => f.env.left && f.env.left.room === 'team-core');
    assert.ok(left, "bob's page got the Left push");
    assert.deepEqual([left.env.left.reason, left.env.left.by], ['MEMBER_CHANGE_REMOVED', 'ann']);

    // Published after the removal: never on bob's page, nor on his socket.
    const after = 'ann writes after bob is gone';
    await sendFromPage(ann, after);
    await waitForTexts(ann, 'team-core', [after]);
    const leak = await watchFor(1500, async () => {
      const later = frames.filter((f) => f.at >= left.at && f !== left && envelopeOf(f.env, 'team-core'));
      if (later.length) return `frames about team-core after the Left: ${JSON.stringify(later.map((f) => f.env))}`;
      const texts = (await shown(bob, 'team-core')).map((m) => m.text);
      return texts.includes(after) ? `bob's page shows "${after}"` : null;
    });
    assert.equal(leak, null, 'nothing of the room reaches the removed member');
    assert.equal(await notice.isVisible(), true, 'the notice stays');

    // Invited again, he is back (the notice goes); then banned.
    await inviteFromPage(ann, 'bob');
    await bob.locator('.invite[data-room="team-core"]').getByRole('button', { name: /^Accept/ }).click();
    await bob.locator('#composer').waitFor({ state: 'visible', timeout: 10_000 });
    assert.equal(await notice.isVisible(), false);
    await waitForTexts(bob, 'team-core', [after]); // members read the history
    await manageMember(ann, 'bob', 'ban', 'testing bans');
    await bob.locator('#gone-text', { hasText: 'You were banned from #team-core by ann.' }).waitFor({ timeout: 10_000 });
    await bob.screenshot({ path: '/tmp/chatd-web-banned.png' });
    // "Close room" takes it off the list.
    await bob.click('#gone-close');
    await bob.locator('.room-item[data-room="team-core"]').waitFor({ state: 'detached', timeout: 5000 });
    // Unbanned from the room details; an invitation works again.
    await ann.click('#settings-btn');
    await ann.locator('#room-dialog').waitFor({ state: 'visible' });
    await ann.fill('#unban-input', 'bob');
    await ann.press('#unban-input', 'Enter');
    await ann.locator('.toast', { hasText: 'bob may join #team-core again' }).waitFor({ timeout: 10_000 });
    await ann.click('#rd-close');
    await inviteFromPage(ann, 'bob');
    await bob.locator('.invite[data-room="team-core"]').getByRole('button', { name: /^Decline/ }).click();
    await bob.locator('.invite[data-room="team-core"]').waitFor({ state: 'detached', timeout: 10_000 });
    for (const page of [ann, bob]) assert.deepEqual(await cspViolations(page), [], 'nothing the Content-Security-Policy blocks');
  });

  check('l. the directory lists public rooms (never a private one); search narrows it; joining from it works', { timeout: 60_000 }, async () => {
    const { ann, bob } = rooms.pages;
    assert.ok(ann && bob, 'test j set up both pages');
    await createRoomFromPage(ann, { name: 'rust-lounge', title: 'Rust Lounge', topic: 'crates and lifetimes' });
    await createRoomFromPage(ann, { name: 'gardening', title: 'Green thumbs' });
    await bob.click('#browse-btn');
    await bob.locator('#dir-dialog').waitFor({ state: 'visible' });
    const listed = () => bob.$$eval('#dir-list .dir-room', (els) => els.map((el) => el.dataset.room));
    await bob.locator('#dir-list .dir-room[data-room="rust-lounge"]').waitFor({ timeout: 10_000 });
    let names = await listed();
    assert.ok(names.includes('gardening'), `every public room: ${names}`);
    assert.ok(!names.includes('team-core'), `never a private room: ${names}`);
    const item = bob.locator('.dir-room[data-room="rust-lounge"]');
    assert.equal((await item.locator('.dir-title').textContent()).trim(), 'Rust Lounge');
    assert.equal((await item.locator('.dir-topic').textContent()).trim(), 'crates and lifetimes');
    assert.equal((await item.locator('.dir-count').textContent()).trim(), '1 member');

    await bob.fill('#dir-search', 'LOUNGE');
    await waitUntil(async () => {
      const n = await listed();
      return n.length === 1 && n[0] === 'rust-lounge';
    }, { timeout: 10_000, what: 'the search for LOUNGE to list rust-lounge alone' });
    await bob.fill('#dir-search', 'green thumb'); // the title is searched too
    await waitUntil(async () => (await listed()).join() === 'gardening', { timeout: 10_000, what: 'a search by title' });
    await bob.fill('#dir-search', 'no-such-room-anywhere');
    await bob.locator('#dir-status', { hasText: 'No public room matches' }).waitFor({ timeout: 10_000 });
    assert.deepEqual(await listed(), []);
    await bob.fill('#dir-search', 'rust');
    await item.waitFor({ timeout: 10_000 });
    await bob.screenshot({ path: '/tmp/chatd-web-directory.png' });
    await item.getByRole('button', { name: 'Join rust-lounge' }).click();
    await bob.locator('#dir-dialog').waitFor({ state: 'hidden', timeout: 10_000 });
    await bob.locator('.room-item.active[data-room="rust-lounge"]').waitFor({ timeout: 10_000 });
    await bob.locator('#room-display-title', { hasText: 'Rust Lounge' }).waitFor();
    await sendFromPage(bob, 'bob found the lounge');
    await ann.locator('.room-item[data-room="rust-lounge"] button').click();
    await waitForTexts(ann, 'rust-lounge', ['bob found the lounge']);
    // Listed again, it is one bob is in.
    await bob.click('#browse-btn');
    await bob.locator('.dir-room[data-room="rust-lounge"] .dir-count', { hasText: '2 members' }).waitFor({ timeout: 10_000 });
    await bob.locator('.dir-room[data-room="rust-lounge"]').getByRole('button', { name: 'Open rust-lounge' }).waitFor();
    await bob.click('#dir-close');
    await bob.locator('#dir-dialog').waitFor({ state: 'hidden', timeout: 5000 });
    assert.deepEqual(await cspViolations(bob), [], 'nothing the Content-Security-Policy blocks');
  });

  check('m. the member list shows roles and online dots, kept current; a role change and a new topic show up live', { timeout: 60_000 }, async () => {
    const { ann, bob } = rooms.pages;
    assert.ok(ann && bob, 'tests j and l set up the pages and rust-lounge');
    await cliSend(rooms.server.tcp, rooms.carolToken, 'rust-lounge', 'carol drops by'); // joins, then goes offline
    await bob.locator('.room-item[data-room="rust-lounge"]').click();
    await openMembers(bob);
    const row = (user, role, online) => memberRow(bob, user).and(bob.locator(`[data-role="${role}"][data-online="${online}"]`));
    await row('ann', 'ROLE_OWNER', true).waitFor({ timeout: 10_000 });
    await row('bob', 'ROLE_MEMBER', true).waitFor();
    await row('carol', 'ROLE_MEMBER', false).waitFor({ timeout: 10_000 });
    assert.equal((await memberRow(bob, 'ann').locator('.role-badge').textContent()).trim(), 'Owner');
    assert.equal(await memberRow(bob, 'carol').locator('.role-badge').count(), 0, 'members have no badge');
    assert.equal(await memberRow(bob, 'ann').locator('.presence.on').count(), 1, 'a green dot for ann');
    assert.equal(await memberRow(bob, 'carol').locator('.presence.off').count(), 1, 'an empty dot for carol');
    assert.equal(await bob.locator('#member-list .member-menu').count(), 0, 'a member may manage nobody');
    assert.equal(await bob.locator('#invite-form').isVisible(), true, 'any member may invite to a public room');
    assert.equal(await bob.locator('#settings-btn').isVisible(), true);
    assert.deepEqual(await bob.$$eval('#member-list .member', (els) => els.map((el) => el.dataset.user)), ['ann', 'bob', 'carol'], 'the owner first, then by name');
    await bob.screenshot({ path: '/tmp/chatd-web-members.png' });

    // carol comes online: her dot turns green; she goes: it empties.
    const cli = startCli(rooms.server.tcp, rooms.carolToken, 'rust-lounge');
    try {
      await row('carol', 'ROLE_MEMBER', true).waitFor({ timeout: 10_000 });
    } finally {
      cli.proc.kill('SIGTERM');
    }
    await row('carol', 'ROLE_MEMBER', false).waitFor({ timeout: 10_000 });

    // The owner makes bob an admin: his own page shows it, and lets him edit the topic.
    await ann.locator('.room-item[data-room="rust-lounge"]').click();
    await manageMember(ann, 'bob', 'admin');
    await row('bob', 'ROLE_ADMIN', true).waitFor({ timeout: 10_000 });
    assert.equal((await memberRow(bob, 'bob').locator('.role-badge').textContent()).trim(), 'Admin');
    await bob.locator('#member-list .member[data-user="carol"] .member-menu').waitFor({ timeout: 5000 }); // an admin manages members
    assert.equal(await memberRow(bob, 'ann').locator('.member-menu').count(), 0, 'but not the owner');
    await bob.click('#settings-btn');
    await bob.locator('#rd-form').waitFor({ state: 'visible' });
    assert.equal(await bob.inputValue('#rd-topic'), 'crates and lifetimes');
    await bob.fill('#rd-topic', 'async, crates and lifetimes');
    await bob.click('#rd-save');
    await bob.locator('#room-dialog').waitFor({ state: 'hidden', timeout: 10_000 });
    await ann.locator('#room-topic', { hasText: 'async, crates and lifetimes' }).waitFor({ timeout: 10_000 });
    await bob.locator('#room-topic', { hasText: 'async, crates and lifetimes' }).waitFor({ timeout: 10_000 });
    // And back to member: the panel follows.
    await manageMember(ann, 'bob', 'member');
    await row('bob', 'ROLE_MEMBER', true).waitFor({ timeout: 10_000 });
    await bob.locator('#member-list .member-menu').waitFor({ state: 'detached', timeout: 5000 });
    // ann hands ownership on to bob: one owner on both pages, ann an admin.
    await manageMember(ann, 'bob', 'owner');
    for (const page of [ann, bob]) {
      const r = (user, role) => memberRow(page, user).and(page.locator(`[data-role="${role}"]`));
      await r('bob', 'ROLE_OWNER').waitFor({ timeout: 10_000 });
      await r('ann', 'ROLE_ADMIN').waitFor({ timeout: 10_000 });
      assert.equal(await page.locator('#member-list .member[data-role="ROLE_OWNER"]').count(), 1, 'one owner');
    }
    assert.equal(await memberRow(ann, 'bob').locator('.member-menu').count(), 0, 'an admin does not manage the owner');
    await memberRow(ann, 'carol').locator('.member-menu').waitFor({ timeout: 5000 });
    for (const page of [ann, bob]) assert.deepEqual(await cspViolations(page), [], 'nothing the Content-Security-Policy blocks');
  });

  check('n. a phone (390×844): create a private room, invite, accept from the room panel, chat, see the members', { timeout: 60_000 }, async () => {
    const PHONE = { width: 390, height: 844 };
    const uma = await roomsPage('uma', { phone: true });
    // The dialog to create a room fits the screen.
    await openNav(uma);
    await uma.locator('#create-btn').tap();
    const dialog = await uma.locator('#create-dialog').boundingBox();
    assert.ok(dialog && dialog.x >= 0 && dialog.x + dialog.width <= PHONE.width && dialog.y >= 0 && dialog.y + dialog.height <= PHONE.height, `the dialog is on the screen: ${JSON.stringify(dialog)}`);
    const submit = await uma.locator('#create-submit').boundingBox();
    assert.ok(submit && submit.y + submit.height <= PHONE.height, 'its button is within reach');
    await uma.keyboard.press('Escape');
    await uma.locator('#create-dialog').waitFor({ state: 'hidden' });
    await createRoomFromPage(uma, { name: 'phone-core', title: 'Pocket team', kind: 'private', invite: 'vic' }, { phone: true });
    assert.equal(await uma.locator('#room-title').textContent(), '#phone-core');

    // vic signs in after the invitation: it comes in Welcome.invites.
    const vic = await roomsPage('vic', { phone: true });
    await vic.locator('#menu-unread', { hasText: /^1$/ }).waitFor({ timeout: 10_000 }); // the invitation, behind the menu button
    await openNav(vic);
    const invite = vic.locator('.invite[data-room="phone-core"]');
    await invite.waitFor({ timeout: 10_000 });
    const panel = await vic.locator('#sidebar').boundingBox();
    for (const el of [invite, invite.getByRole('button', { name: /^Accept/ }), invite.getByRole('button', { name: /^Decline/ })]) {
      const box = await el.boundingBox();
      assert.ok(box && box.x >= panel.x && box.x + box.width <= panel.x + panel.width && box.y + box.height <= PHONE.height, `inside the panel: ${JSON.stringify(box)}`);
    }
    await vic.screenshot({ path: '/tmp/mobile-invited.png' });
    await invite.getByRole('button', { name: /^Accept/ }).tap();
    await vic.locator('#sidebar').waitFor({ state: 'hidden', timeout: 5000 });
    await vic.locator('.room-item.active[data-room="phone-core"]').waitFor({ state: 'attached', timeout: 10_000 });
    assert.equal(await vic.locator('#room-title').textContent(), '#phone-core');
    await vic.locator('#menu-unread').waitFor({ state: 'hidden', timeout: 5000 });

    const lines = ['vic says hi from her phone', 'uma answers from hers'];
    await sendFromPage(vic, lines[0]);
    await waitForTexts(uma, 'phone-core', [lines[0]]);
    await sendFromPage(uma, lines[1]);
    for (const [who, page] of [['uma', uma], ['vic', vic]]) {
      await waitForTexts(page, 'phone-core', lines);
      assertTimeline(await shown(page, 'phone-core'), lines, `${who}'s phone`);
    }
    for (const [what, el] of [['the composer', vic.locator('#composer')], ['the members button', vic.locator('#members-btn')], ['the title', vic.locator('#room-title')]]) {
      const box = await el.boundingBox();
      assert.ok(box && box.x >= 0 && box.x + box.width <= PHONE.width && box.y + box.height <= PHONE.height, `${what} is on the screen: ${JSON.stringify(box)}`);
    }

    // The member list covers the screen, and closes again.
    await uma.locator('#members-btn').tap();
    const members = uma.locator('#members-panel');
    await members.waitFor({ state: 'visible' });
    const box = await members.boundingBox();
    assert.deepEqual([box.x, box.y, box.width, box.height], [0, 0, PHONE.width, PHONE.height], 'the panel covers the screen');
    await memberRow(uma, 'uma').and(uma.locator('[data-role="ROLE_OWNER"]')).waitFor({ timeout: 10_000 });
    await memberRow(uma, 'vic').and(uma.locator('[data-role="ROLE_MEMBER"][data-online="true"]')).waitFor({ timeout: 10_000 });
    assert.equal(await uma.locator('#chat').evaluate((el) => el.inert), true, 'the messages behind are out of reach');
    await uma.screenshot({ path: '/tmp/mobile-members.png' });
    await uma.locator('#members-close').tap();
    await members.waitFor({ state: 'hidden', timeout: 5000 });
    assert.equal(await uma.locator('#chat').evaluate((el) => el.inert), false);
    assert.equal(await uma.evaluate(() => document.activeElement.id), 'members-btn', 'focus goes back to the button');
    for (const page of [uma, vic]) assert.deepEqual(await cspViolations(page), [], 'nothing the Content-Security-Policy blocks');
  });

  check('o. removed while the page was away: back online, it says so in the room on screen', { timeout: 60_000 }, async () => {
    const { ann, bob } = rooms.pages;
    assert.ok(ann && bob, 'test j set up both pages');
    await createRoomFromPage(ann, { name: 'away-room', title: 'While you were out' });
    await joinRoom(bob, 'away-room');
    await sendFromPage(ann, 'ann before bob goes away');
    await waitForTexts(bob, 'away-room', ['ann before bob goes away']);
    // bob's page loses its connection (the server restarts while his
    // network is gone: an offline browser keeps an open WebSocket), and ann
    // removes him meanwhile.
    const { tcp, http } = rooms.server;
    await stopServer(rooms.server);
    await waitUntil(async () => (await state(bob)) !== 'connected' && (await state(ann)) !== 'connected', { timeout: 10_000, what: 'both pages to notice the shutdown' });
    await bob.context().setOffline(true);
    rooms.server = await startServer(rooms.data, { tcp, http });
    await ann.locator('#conn-state[data-state="connected"]').waitFor({ timeout: 20_000 });
    await manageMember(ann, 'bob', 'remove');
    assert.notEqual(await state(bob), 'connected', 'bob is still away');
    await sendFromPage(ann, 'ann while bob is away');
    await waitForTexts(ann, 'away-room', ['ann while bob is away']);
    // Back: the page resumes with its cursor, and the server answers it with Left.
    await bob.context().setOffline(false);
    await bob.locator('#conn-state[data-state="connected"]').waitFor({ timeout: 20_000 });
    await bob.locator('#gone-text', { hasText: 'You were removed from #away-room by ann.' }).waitFor({ timeout: 10_000 });
    assert.equal(await bob.locator('#room-title').textContent(), '#away-room', 'the room stays on screen');
    await waitForTexts(bob, 'away-room', ['ann before bob goes away']);
    const leak = await watchFor(1000, async () => (await shown(bob, 'away-room')).some((m) => m.text === 'ann while bob is away'));
    assert.equal(leak, null, 'nothing published while he was removed');
    assert.deepEqual(await cspViolations(bob), [], 'nothing the Content-Security-Policy blocks');
  });
});

// ===========================================================================
// p. System notices in the web app: a message an application's backend
// posted as the system, whose sender is "" (proto/README.md), shows as a
// notice, not as a user's message. chatd has no way yet for a test to post
// one, so a proxy between the page and a real chatd (Playwright's
// routeWebSocket) makes chosen messages system notices in flight: it drops
// their sender, as canonical proto3 JSON omits an empty string (or sends it
// as "", which is as valid), in live pushes and in history pages alike.
// Everything else passes through untouched.

/** Rewrites one server→page frame: the messages whose text is in `texts` lose their sender. */
function asSystemNotices(payload, texts, counts) {
  if (typeof payload !== 'string') return payload;
  let env;
  try {
    env = JSON.parse(payload);
  } catch {
    return payload;
  }
  const where = env.message ? 'live' : env.historyPage ? 'history' : null;
  if (!where) return payload;
  const list = env.message ? [env.message] : env.historyPage.messages || [];
  let changed = false;
  for (const m of list) {
    if (!texts.has(m.text)) continue;
    // One of each spelling: omitted (what chatd sends) and an explicit "".
    if (texts.get(m.text) === 'omitted') delete m.sender;
    else m.sender = '';
    counts[where]++;
    changed = true;
  }
  return changed ? JSON.stringify(env) : payload;
}

/** What a page shows of each message of `room`, for the notice checks. */
function rendered(page, room) {
  return page.$$eval(`.msg[data-room="${room}"][data-seq]`, (els) =>
    els.map((el) => {
      const text = el.querySelector('.msg-text');
      const label = el.querySelector('.notice-label');
      const visible = (sel) => {
        const e = el.querySelector(sel);
        if (!e) return false;
        const s = getComputedStyle(e);
        const b = e.getBoundingClientRect();
        return s.display !== 'none' && s.visibility !== 'hidden' && b.width > 0 && b.height > 0;
      };
      const row = el.getBoundingClientRect();
      const body = (el.querySelector('.notice-body') || text).getBoundingClientRect();
      return {
        seq: Number(el.dataset.seq),
        text: text ? text.textContent : null,
        notice: el.classList.contains('notice'),
        mine: el.classList.contains('mine'),
        cont: el.classList.contains('cont'),
        label: label && visible('.notice-label') ? label.textContent : null,
        avatar: visible('.avatar'),
        author: visible('.msg-sender') ? el.querySelector('.msg-sender').textContent : null,
        // How far the text's box is off the middle of the row, in pixels.
        offCentre: Math.abs(body.left + body.width / 2 - (row.left + row.width / 2)),
        color: text ? getComputedStyle(text).color : null,
      };
    }),
  );
}

describe('system notices in Chromium against chatd', { skip: missing ? `SKIPPED: ${missing}` : false }, () => {
  const local = { server: null, data: null, browser: null, carolToken: null };

  before(async () => {
    try {
      local.data = mkdtempSync(join(tmpdir(), 'chatd-web-notices-'));
      local.server = await startServer(local.data);
      local.browser = await within(
        playwright.chromium.launch({
          executablePath: CHROMIUM,
          args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'],
        }),
        30_000,
        'Chromium to start',
      );
      local.carolToken = await mintTokenAsync(local.data, 'carol', '1h');
    } catch (e) {
      results.failed++;
      throw e;
    }
  });

  after(async () => {
    if (local.browser) await local.browser.close().catch(() => {});
    await stopServer(local.server).catch(() => {});
    if (local.data) rmSync(local.data, { recursive: true, force: true });
  });

  check('p. a system message (sender "") shows as a notice: no author or avatar, centred, never mine or grouped; it counts as unread', { timeout: 60_000 }, async () => {
    const [room, lobby] = ['notices-room', 'notices-lobby'];
    const SHIPPED = 'Your order has shipped';
    const MAINTENANCE = 'Maintenance tonight at 22:00: expect a short outage';
    const notices = new Map([[SHIPPED, 'omitted'], [MAINTENANCE, 'empty']]);
    const counts = { live: 0, history: 0 };
    const ctx = await local.browser.newContext({ viewport: { width: 1200, height: 760 } });
    ctx.setDefaultTimeout(15_000);
    try {
      await ctx.routeWebSocket(/\/ws$/, (ws) => {
        const server = ws.connectToServer();
        ws.onMessage((m) => server.send(m));
        server.onMessage((m) => ws.send(asSystemNotices(m, notices, counts)));
      });
      const page = await login(ctx, 'nia', { server: local.server });
      await joinRoom(page, room);
      await joinRoom(page, lobby); // on screen: the notices arrive in a room in the background

      const { tcp } = local.server;
      const lines = ['carol before the notices', SHIPPED, MAINTENANCE, 'carol after the notices'];
      for (const text of lines) await cliSend(tcp, local.carolToken, room, text);
      // Unread counts count notices like any message.
      await page.locator(`.room-item[data-room="${room}"] .badge`, { hasText: /^4$/ }).waitFor({ timeout: 10_000 });
      assert.equal(counts.live, 2, 'the proxy made two live messages notices');

      await page.click(`.room-item[data-room="${room}"] button`);
      await waitForTexts(page, room, lines);
      await sendFromPage(page, 'nia says thanks');
      lines.push('nia says thanks');
      await waitForTexts(page, room, lines);
      // Seeing them marks them read, notices included.
      await page.locator(`.room-item[data-room="${room}"] .badge`).waitFor({ state: 'detached' });
      await page.waitForFunction(
        (room) => {
          const el = document.querySelector(`.room-item[data-room="${room}"]`);
          return el && Number(el.dataset.head) >= 5 && el.dataset.read === el.dataset.head;
        },
        room,
        { timeout: 10_000, polling: 50 },
      );

      const verify = async (why) => {
        const list = await rendered(page, room);
        assert.deepEqual(list.map((m) => m.text), lines, `${why}: every message once, in order`);
        const by = Object.fromEntries(list.map((m) => [m.text, m]));
        for (const text of [SHIPPED, MAINTENANCE]) {
          const n = by[text];
          assert.equal(n.notice, true, `${why}: "${text}" is shown as a notice`);
          assert.equal(n.label, 'Notice', `${why}: "${text}" is labelled as a notice`);
          assert.equal(n.author, null, `${why}: "${text}" names no author`);
          assert.equal(n.avatar, false, `${why}: "${text}" has no avatar`);
          assert.equal(n.mine, false, `${why}: "${text}" is not mine`);
          assert.equal(n.cont, false, `${why}: "${text}" is not grouped with the message before it`);
          assert.ok(n.offCentre < 2, `${why}: "${text}" is centred (${n.offCentre}px off)`);
          assert.notEqual(n.color, by['carol before the notices'].color, `${why}: "${text}" is muted, unlike a user's words`);
        }
        for (const [text, author, mine] of [['carol before the notices', 'carol', false], ['carol after the notices', 'carol', false], ['nia says thanks', 'nia', true]]) {
          const m = by[text];
          assert.deepEqual([m.notice, m.label, m.author, m.avatar, m.mine], [false, null, author, true, mine], `${why}: "${text}" is ${author}'s message`);
        }
        // After a notice, a user's message starts a group of its own: with its author.
        assert.equal(by['carol after the notices'].cont, false, `${why}: carol's message after the notices shows who wrote it`);
      };
      await verify('live');
      await page.screenshot({ path: '/tmp/chatd-web-notices.png' });

      // From history (a reload fetches the newest page): notices again.
      await page.reload();
      await page.locator('#conn-state[data-state="connected"]').waitFor({ timeout: 10_000 });
      await page.locator(`.room-item.active[data-room="${room}"]`).waitFor({ timeout: 10_000 });
      await waitForTexts(page, room, lines);
      assert.ok(counts.history >= 2, `the proxy made the history page's messages notices (${counts.history})`);
      await verify('from history');
      assert.deepEqual(await cspViolations(page), [], 'nothing the Content-Security-Policy blocks');
    } finally {
      await ctx.close();
    }
  });
});

// ===========================================================================
// q–z. Message changes (edits, deletes, reactions), replies, mentions, unread
// and mention badges, and desktop notifications in the web app (proto/README.md
// §9), two users in two browser contexts against a real server of their own.

const changes = { server: null, data: null, browser: null, contexts: [] };

/**
 * A page of the message-change tests signed in as `name`. `phone`: a 390×844
 * touch screen; `notifications`: notifications allowed, and every
 * `new Notification(...)` recorded in `window.__notifications`.
 */
async function changesPage(name, { phone = false, notifications = false } = {}) {
  const ctx = await changes.browser.newContext(
    phone ? { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2 } : { viewport: { width: 1200, height: 760 } },
  );
  ctx.setDefaultTimeout(15_000);
  changes.contexts.push(ctx);
  if (notifications) {
    await ctx.grantPermissions(['notifications'], { origin: `http://127.0.0.1:${changes.server.http}` });
    // The page's Notification, recording each call: what the client shows is
    // what it passed to the constructor (a headless browser shows nothing).
    await ctx.addInitScript(() => {
      const Real = window.Notification;
      window.__notifications = [];
      function Recorded(title, options = {}) {
        const seen = { title: String(title), body: options.body, tag: options.tag, n: null };
        window.__notifications.push(seen);
        try {
          seen.n = new Real(title, options);
        } catch {
          // Still something to click, which calls its onclick as a real one does.
          const t = new EventTarget();
          t.close = () => {};
          t.addEventListener('click', (e) => typeof t.onclick === 'function' && t.onclick(e));
          seen.n = t;
        }
        return seen.n;
      }
      Object.defineProperty(Recorded, 'permission', { get: () => Real.permission });
      Recorded.requestPermission = (...a) => Real.requestPermission(...a);
      Recorded.prototype = Real.prototype;
      window.Notification = Recorded;
    });
  }
  return login(ctx, name, { server: changes.server, tap: phone });
}

/** A message of `room` on `page`, by its text (the rows of the message list). */
const row = (page, room, text) =>
  page.locator(`.msg[data-room="${room}"][data-seq]`).filter({ has: page.locator('.msg-text', { hasText: text }) });

/** Clicks one of a message's actions (`reply`, `picker`, `edit`, `delete`): they show on hover. */
async function messageAction(page, room, text, act) {
  const r = row(page, room, text);
  await r.hover();
  await r.locator(`.msg-actions .act-${act}`).click();
}

/** The reaction chip `key` of a message: its count, title and whether it is mine; null when there is none. */
async function chip(page, room, text, key) {
  const c = row(page, room, text).locator(`.reaction[data-key="${key}"]`);
  if (!(await c.count())) return null;
  return c.evaluate((el) => ({ count: Number(el.dataset.count), shown: el.querySelector('.reaction-count').textContent, title: el.title, mine: el.classList.contains('mine') }));
}

/** Waits until `fn` (polled) deep-equals `want`; fails with the last value. */
async function until(fn, want, what, timeout = 10_000) {
  let last;
  try {
    await waitUntil(async () => {
      last = await fn();
      try {
        assert.deepEqual(last, want);
        return true;
      } catch {
        return false;
      }
    }, { timeout, what });
  } catch (e) {
    throw new Error(`${e.message}: last ${JSON.stringify(last)}, wanted ${JSON.stringify(want)}`);
  }
}

/** The unread and mention badges of `room` in the room list ('' when not shown). */
const badges = (page, room) =>
  page.evaluate((room) => {
    const li = document.querySelector(`.room-item[data-room="${room}"]`);
    const text = (sel) => (li && li.querySelector(sel) ? li.querySelector(sel).textContent : '');
    return { unread: text('.badge'), mentions: text('.mention-badge') };
  }, room);

/** Makes the page look hidden (another tab in front), or visible again. */
function setHidden(page, hidden) {
  return page.evaluate((hidden) => {
    if (hidden) {
      Object.defineProperty(document, 'hidden', { configurable: true, get: () => true });
      Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => 'hidden' });
    } else {
      delete document.hidden;
      delete document.visibilityState;
    }
    document.dispatchEvent(new Event('visibilitychange'));
  }, hidden);
}

/** Clicks a room in the sidebar (desktop). */
async function openRoom(page, room) {
  await page.click(`.room-item[data-room="${room}"] button`);
  await page.locator(`.room-item.active[data-room="${room}"]`).waitFor();
}

describe('message changes, replies, mentions and badges in Chromium against chatd', { skip: missing ? `SKIPPED: ${missing}` : false }, () => {
  const pages = {};

  before(async () => {
    try {
      changes.data = mkdtempSync(join(tmpdir(), 'chatd-web-changes-'));
      changes.server = await startServer(changes.data);
      changes.browser = await within(
        playwright.chromium.launch({
          executablePath: CHROMIUM,
          args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'],
        }),
        30_000,
        'Chromium to start',
      );
      pages.ann = await changesPage('ann');
      pages.bob = await changesPage('bob');
    } catch (e) {
      results.failed++;
      throw e;
    }
  });

  after(async () => {
    if (changes.browser) await changes.browser.close().catch(() => {});
    await stopServer(changes.server).catch(() => {});
    if (changes.data) rmSync(changes.data, { recursive: true, force: true });
  });

  check('q. an edit: the sender edits in place (Enter saves, Escape cancels); the other page shows the new text and "(edited)"', { timeout: 60_000 }, async () => {
    const { ann, bob } = pages;
    const room = 'edits';
    await joinRoom(ann, room);
    await joinRoom(bob, room);
    await sendFromPage(ann, 'ann writes a tpyo');
    await waitForTexts(bob, room, ['ann writes a tpyo']);
    assert.equal(await row(bob, room, 'ann writes a tpyo').locator('.act-edit').count(), 0, "bob cannot edit ann's message");

    // Escape leaves it as it was.
    await messageAction(ann, room, 'ann writes a tpyo', 'edit');
    const editor = ann.locator(`.msg[data-room="${room}"] .edit-input`);
    await editor.waitFor();
    assert.equal(await editor.evaluate((el) => el === document.activeElement), true, 'the editor has the focus');
    assert.equal(await editor.inputValue(), 'ann writes a tpyo');
    await editor.fill('never saved');
    await editor.press('Escape');
    await editor.waitFor({ state: 'detached' });
    await waitForTexts(ann, room, ['ann writes a tpyo']);
    assert.equal(await row(ann, room, 'ann writes a tpyo').locator('.msg-edited').count(), 0);

    // Enter saves.
    await messageAction(ann, room, 'ann writes a tpyo', 'edit');
    await editor.fill('ann writes a typo, fixed');
    await editor.press('Enter');
    for (const page of [bob, ann]) {
      await waitForTexts(page, room, ['ann writes a typo, fixed']);
      const r = row(page, room, 'ann writes a typo, fixed');
      const mark = r.locator('.msg-edited');
      await mark.waitFor();
      assert.equal(await mark.textContent(), '(edited)');
      assert.match(await mark.getAttribute('title'), /^Edited \S/, 'the edit time in its title');
    }
    assert.deepEqual((await shown(bob, room)).map((m) => m.text), ['ann writes a typo, fixed'], 'the edit is not a line of its own');
    // Up in the empty composer edits one's last message, from the keyboard.
    await ann.locator('#composer-input').press('ArrowUp');
    await editor.waitFor();
    assert.equal(await editor.inputValue(), 'ann writes a typo, fixed');
    assert.equal(await editor.evaluate((el) => el === document.activeElement), true);
    await editor.press('Escape');
    await editor.waitFor({ state: 'detached' });
    assert.equal(await bob.locator(`.msg[data-room="${room}"]`, { hasText: 'tpyo' }).count(), 0, 'the old text is gone');

    // From history too (a reload): the folded text, still marked.
    await bob.reload();
    await bob.locator('#conn-state[data-state="connected"]').waitFor();
    await bob.locator(`.room-item.active[data-room="${room}"]`).waitFor();
    await waitForTexts(bob, room, ['ann writes a typo, fixed']);
    await row(bob, room, 'ann writes a typo, fixed').locator('.msg-edited').waitFor();
    assert.deepEqual((await shown(bob, room)).map((m) => m.text), ['ann writes a typo, fixed']);
    for (const page of [ann, bob]) assert.deepEqual(await cspViolations(page), [], 'nothing the Content-Security-Policy blocks');
  });

  check('r. a delete: the placeholder on both pages, the words gone from the DOM; the owner may delete anyone\'s message, a member only their own', { timeout: 60_000 }, async () => {
    const { ann, bob } = pages;
    const room = 'deletes'; // ann joins first: its owner
    await joinRoom(ann, room);
    await joinRoom(bob, room);
    await sendFromPage(bob, 'bob says something regrettable');
    await waitForTexts(ann, room, ['bob says something regrettable']);
    await sendFromPage(ann, 'ann keeps this one');
    await waitForTexts(bob, room, ['ann keeps this one']);
    await sendFromPage(bob, 'bob posts spam');
    const all = ['bob says something regrettable', 'ann keeps this one', 'bob posts spam'];
    await waitForTexts(ann, room, all);
    await waitForTexts(bob, room, all);
    assert.equal(await row(bob, room, 'ann keeps this one').locator('.act-delete').count(), 0, "a member cannot delete the owner's message");
    assert.equal(await row(ann, room, 'bob says something regrettable').locator('.act-delete').count(), 1, "the owner may delete bob's message");

    // bob deletes his own: asked twice.
    await messageAction(bob, room, 'bob says something regrettable', 'delete');
    const del = row(bob, room, 'bob says something regrettable').locator('.act-delete');
    assert.equal(await del.textContent(), 'Delete?');
    await del.click();
    for (const page of [bob, ann]) {
      await page.waitForFunction(
        (room) => [...document.querySelectorAll(`.msg[data-room="${room}"] .msg-text.deleted`)].some((el) => el.textContent === 'This message was deleted'),
        room,
        { timeout: 10_000, polling: 50 },
      );
      assert.deepEqual((await shown(page, room)).map((m) => m.text), ['This message was deleted', 'ann keeps this one', 'bob posts spam']);
      assert.equal((await page.content()).includes('regrettable'), false, 'the deleted words are nowhere in the page');
      const gone = row(page, room, 'This message was deleted');
      assert.equal(await gone.locator('.msg-actions').count(), 0, 'nothing more to do with a deleted message');
    }
    // The owner deletes bob's other message; gone for bob as well.
    await messageAction(ann, room, 'bob posts spam', 'delete');
    await row(ann, room, 'bob posts spam').locator('.act-delete').click();
    const after = ['This message was deleted', 'ann keeps this one', 'This message was deleted'];
    for (const page of [ann, bob]) await until(async () => (await shown(page, room)).map((m) => m.text), after, 'both placeholders');
    assert.equal((await bob.content()).includes('spam'), false);
  });

  check('s. reactions: bob adds 👍, ann sees it (count 1, bob in its title), adds hers (2, highlighted), takes it back (1)', { timeout: 60_000 }, async () => {
    const { ann, bob } = pages;
    const room = 'reactions';
    const text = 'ann asks who likes this';
    await joinRoom(ann, room);
    await joinRoom(bob, room);
    await sendFromPage(ann, text);
    await waitForTexts(bob, room, [text]);

    // bob: "add reaction" offers a few emoji.
    await messageAction(bob, room, text, 'picker');
    const picker = row(bob, room, text).locator('.reaction-picker');
    await picker.waitFor();
    assert.deepEqual(await picker.locator('.pick').allTextContents(), ['👍', '❤️', '😂', '🎉', '😮', '😢']);
    await picker.locator('.pick[data-key="👍"]').click();
    await picker.waitFor({ state: 'detached' });
    await until(() => chip(bob, room, text, '👍').then((c) => c && [c.count, c.mine]), [1, true], "bob's own 👍");

    await until(() => chip(ann, room, text, '👍').then((c) => c && [c.count, c.shown, c.mine]), [1, '1', false], 'the 👍 on ann\'s page');
    assert.match((await chip(ann, room, text, '👍')).title, /\bbob\b/, 'who reacted, in the title');

    // ann clicks the chip: hers too.
    await row(ann, room, text).locator('.reaction[data-key="👍"]').click();
    await until(() => chip(ann, room, text, '👍').then((c) => c && [c.count, c.mine]), [2, true], 'ann\'s 👍 added');
    assert.match((await chip(ann, room, text, '👍')).title, /bob.*you|you.*bob/);
    await until(() => chip(bob, room, text, '👍').then((c) => c && [c.count, c.mine]), [2, true], "bob's page counts two, his still his");
    assert.match((await chip(bob, room, text, '👍')).title, /\bann\b/);
    assert.equal(await row(ann, room, text).locator('.reaction[data-key="👍"]').getAttribute('aria-pressed'), 'true');
    await ann.screenshot({ path: '/tmp/chatd-web-reactions.png' });

    // Again: hers is taken back.
    await row(ann, room, text).locator('.reaction[data-key="👍"]').click();
    await until(() => chip(ann, room, text, '👍').then((c) => c && [c.count, c.mine]), [1, false], 'ann\'s 👍 removed');
    await until(() => chip(bob, room, text, '👍').then((c) => c && [c.count, c.mine]), [1, true], 'bob sees one again');
    // Reactions are not lines in the room.
    assert.deepEqual((await shown(ann, room)).map((m) => m.text), [text]);
    // From history (a reload): the same chip, mine as the server says.
    await bob.reload();
    await bob.locator('#conn-state[data-state="connected"]').waitFor();
    await bob.locator(`.room-item.active[data-room="${room}"]`).waitFor();
    await until(() => chip(bob, room, text, '👍').then((c) => c && [c.count, c.mine]), [1, true], "bob's 👍 after a reload");
  });

  check('t. a reply: the bar above the composer quotes what is answered; the reply shows the quote on both pages, and a click on it goes there', { timeout: 60_000 }, async () => {
    const { ann, bob } = pages;
    const room = 'replies';
    await joinRoom(ann, room);
    await joinRoom(bob, room);
    const question = 'bob asks: who is bringing the cake to the meeting on Friday afternoon, and should it be chocolate or lemon this time?';
    await sendFromPage(bob, question);
    await waitForTexts(ann, room, [question]);

    // Reply, then cancel: nothing is answered.
    await messageAction(ann, room, question, 'reply');
    const bar = ann.locator('#reply-bar');
    await bar.waitFor();
    assert.equal(await ann.locator('#reply-sender').textContent(), 'bob');
    const quoted = await ann.locator('#reply-excerpt').textContent();
    assert.ok(question.startsWith(quoted.replace(/…$/, '')) && quoted.endsWith('…') && quoted.length <= 81, `the first ~80 characters: ${quoted}`);
    await ann.click('#reply-cancel');
    await bar.waitFor({ state: 'hidden' });

    // Reply for real.
    await messageAction(ann, room, question, 'reply');
    await bar.waitFor();
    await sendFromPage(ann, 'ann answers: lemon, and I bring it');
    await bar.waitFor({ state: 'hidden' });
    for (const page of [ann, bob]) {
      await waitForTexts(page, room, ['ann answers: lemon, and I bring it']);
      const quote = row(page, room, 'ann answers: lemon').locator('.msg-quote');
      await quote.waitFor();
      assert.equal(await quote.locator('.quote-sender').textContent(), 'bob');
      assert.ok(question.startsWith((await quote.locator('.quote-text').textContent()).replace(/…$/, '')), 'the start of the question');
      const target = await quote.getAttribute('data-target');
      assert.equal(target, await row(page, room, question).getAttribute('data-seq'), 'it names the message answered');
    }
    // A click on the quote brings the message answered into view, flashing.
    await row(bob, room, 'ann answers: lemon').locator('.msg-quote').click();
    await row(bob, room, question).and(bob.locator('.flash')).waitFor({ timeout: 5000 });
    assert.equal(await row(bob, room, question).isVisible(), true);

    // A reply to a message deleted since: the quote says so.
    await messageAction(bob, room, question, 'delete');
    await row(bob, room, question).locator('.act-delete').click();
    await until(() => row(ann, room, 'ann answers: lemon').locator('.msg-quote .quote-text').textContent(), 'deleted message', 'the quote of a deleted message');
  });

  check('u. a mention chosen from the @ autocomplete: highlighted as mine on the mentioned page, and counted in the room\'s mention badge while not open', { timeout: 60_000 }, async () => {
    const { ann, bob } = pages;
    const room = 'mentions';
    await joinRoom(bob, room);
    await joinRoom(ann, room);
    await joinRoom(bob, 'mentions-elsewhere'); // bob looks at another room
    await ann.locator(`.room-item.active[data-room="${room}"]`).waitFor();

    const input = ann.locator('#composer-input');
    await input.click();
    await input.pressSequentially('see this @b');
    const list = ann.locator('#mention-list');
    await list.waitFor();
    await list.locator('.mention-option[data-user="bob"]').waitFor();
    assert.equal(await list.locator('.mention-option[data-user="ann"]').count(), 0, 'not oneself');
    await input.press('Enter'); // chooses; does not send
    assert.equal(await input.inputValue(), 'see this @bob ');
    await list.waitFor({ state: 'hidden' });
    await input.pressSequentially('before Friday');
    await input.press('Enter');
    const text = 'see this @bob before Friday';
    await waitForTexts(ann, room, [text]);
    // On ann's page a mention, not hers.
    const annMention = row(ann, room, text).locator('.mention');
    assert.equal(await annMention.textContent(), '@bob');
    assert.equal(await annMention.evaluate((el) => el.classList.contains('mention-me')), false);

    // bob, in another room: a mention badge and an unread badge.
    await until(() => badges(bob, room), { unread: '1', mentions: '@1' }, "bob's badges");
    // Opened: read, and the mention is his.
    await openRoom(bob, room);
    await waitForTexts(bob, room, [text]);
    const mine = row(bob, room, text).locator('.mention.mention-me');
    await mine.waitFor();
    assert.equal(await mine.textContent(), '@bob');
    assert.equal(await row(bob, room, text).evaluate((el) => el.classList.contains('mentions-me')), true);
    await until(() => badges(bob, room), { unread: '', mentions: '' }, 'no badges once opened');

    // A click on a name in the list works as well; @names that are not members are plain text.
    await input.click();
    await input.pressSequentially('@');
    await list.locator('.mention-option[data-user="bob"]').click();
    await input.pressSequentially('and @nobody-here too');
    await input.press('Enter');
    const text2 = '@bob and @nobody-here too';
    await waitForTexts(bob, room, [text2]);
    assert.deepEqual(await row(bob, room, text2).locator('.mention').allTextContents(), ['@bob']);
    await bob.screenshot({ path: '/tmp/chatd-web-mentions.png' });
    for (const page of [ann, bob]) assert.deepEqual(await cspViolations(page), [], 'nothing the Content-Security-Policy blocks');
  });

  check('v. unread badges count messages of a room not open (not changes, not deleted ones, not one\'s own) and clear when it is read, here or in another tab', { timeout: 60_000 }, async () => {
    const { ann, bob } = pages;
    const room = 'unread-room';
    await joinRoom(bob, room);
    await joinRoom(ann, room);
    await joinRoom(bob, 'unread-elsewhere');
    for (const t of ['ann one', 'ann two', 'ann three']) await sendFromPage(ann, t);
    await waitForTexts(ann, room, ['ann one', 'ann two', 'ann three']);
    await until(() => badges(bob, room), { unread: '3', mentions: '' }, 'three unread');
    // A reaction and an edit are not new messages.
    await messageAction(ann, room, 'ann one', 'picker');
    await row(ann, room, 'ann one').locator('.pick[data-key="🎉"]').click();
    await until(() => chip(ann, room, 'ann one', '🎉').then((c) => c && c.count), 1, 'ann\'s reaction');
    await messageAction(ann, room, 'ann two', 'edit');
    await ann.locator('.edit-input').fill('ann two, edited');
    await ann.locator('.edit-input').press('Enter');
    await waitForTexts(ann, room, ['ann two, edited']);
    // A deleted one no longer counts.
    await messageAction(ann, room, 'ann three', 'delete');
    await row(ann, room, 'ann three').locator('.act-delete').click();
    await until(() => badges(bob, room), { unread: '2', mentions: '' }, 'two unread once one is deleted');
    assert.match(await bob.title(), /^\(2\) /, 'the page title counts them');

    // bob reads the room in another tab (another session): the badge goes
    // here too; what he sends there never counts for him here.
    const tab = await bob.context().newPage();
    await watchCsp(tab);
    await tab.goto(`http://127.0.0.1:${changes.server.http}/`);
    await tab.locator('#conn-state[data-state="connected"]').waitFor();
    await openRoom(tab, room);
    await waitForTexts(tab, room, ['ann one', 'ann two, edited']);
    await until(() => badges(bob, room), { unread: '', mentions: '' }, 'read in the other tab');
    await sendFromPage(tab, 'bob from his other tab');
    await waitForTexts(ann, room, ['bob from his other tab']);
    assert.deepEqual(await cspViolations(tab), []);
    await tab.close(); // gone before ann writes again: it would read that too
    await sendFromPage(ann, 'ann after that');
    await waitForTexts(ann, room, ['ann after that']);
    // Once this page has it (its head), it has bob's message before it too.
    const seq = Number(await row(ann, room, 'ann after that').getAttribute('data-seq'));
    await bob.waitForFunction(({ room, seq }) => Number(document.querySelector(`.room-item[data-room="${room}"]`).dataset.head) >= seq, { room, seq }, { timeout: 10_000, polling: 50 });
    assert.deepEqual(await badges(bob, room), { unread: '1', mentions: '' }, "ann's message counts, bob's own does not");

    // Opened: read.
    await openRoom(bob, room);
    await waitForTexts(bob, room, ['ann one', 'ann two, edited', 'bob from his other tab', 'ann after that']);
    await until(() => badges(bob, room), { unread: '', mentions: '' }, 'no badge once opened');
    assert.equal(await bob.title(), 'chatd');
  });

  check('w. after a reload (a new Welcome) the badges come back from the server\'s counts', { timeout: 60_000 }, async () => {
    const { ann, bob } = pages;
    const room = 'welcome-counts';
    await joinRoom(bob, room);
    await joinRoom(ann, room);
    await joinRoom(bob, 'welcome-elsewhere');
    await sendFromPage(ann, 'ann first');
    await sendFromPage(ann, 'ann second');
    const input = ann.locator('#composer-input');
    await input.click();
    await input.pressSequentially('@bo');
    await ann.locator('#mention-list .mention-option[data-user="bob"]').waitFor();
    await input.press('Tab');
    await input.pressSequentially('third, for you');
    await input.press('Enter');
    await sendFromPage(ann, 'ann fourth, soon deleted');
    await waitForTexts(ann, room, ['ann first', 'ann second', '@bob third, for you', 'ann fourth, soon deleted']);
    await until(() => badges(bob, room), { unread: '4', mentions: '@1' }, 'four unread, one a mention');
    await messageAction(ann, room, 'ann fourth, soon deleted', 'delete');
    await row(ann, room, 'ann fourth, soon deleted').locator('.act-delete').click();
    await until(() => badges(bob, room), { unread: '3', mentions: '@1' }, 'live counts');
    await bob.reload();
    await bob.locator('#conn-state[data-state="connected"]').waitFor();
    await bob.locator('.room-item.active[data-room="welcome-elsewhere"]').waitFor();
    await until(() => badges(bob, room), { unread: '3', mentions: '@1' }, 'the counts of Welcome');
    await openRoom(bob, room);
    await until(() => badges(bob, room), { unread: '', mentions: '' }, 'read');
    await bob.reload();
    await bob.locator('#conn-state[data-state="connected"]').waitFor();
    await bob.locator(`.room-item.active[data-room="${room}"]`).waitFor();
    await openRoom(bob, 'welcome-elsewhere');
    assert.deepEqual(await badges(bob, room), { unread: '', mentions: '' }, 'read before the reload');
  });

  check('x. a desktop notification for a mention, and for a direct message, while the page is hidden; a click opens the room', { timeout: 60_000 }, async () => {
    const { ann } = pages;
    const cat = await changesPage('cat', { notifications: true });
    const room = 'notify-room';
    await joinRoom(cat, room);
    await joinRoom(ann, room);
    await joinRoom(cat, 'notify-elsewhere');
    assert.equal(await cat.evaluate(() => Notification.permission), 'granted');
    assert.equal(await cat.locator('#notify-btn').isVisible(), false, 'nothing to enable: allowed already');
    const notes = () => cat.evaluate(() => window.__notifications.map(({ title, body, tag }) => ({ title, body, tag })));

    // Visible: no notification.
    await sendFromPage(ann, '@cat while you look');
    await until(() => badges(cat, room), { unread: '1', mentions: '@1' }, 'the mention counted');
    assert.deepEqual(await notes(), []);

    await setHidden(cat, true);
    // Not a mention: no notification (the mention after it comes in order behind it).
    await sendFromPage(ann, 'ann to everyone');
    await sendFromPage(ann, 'hey @cat, the build is green');
    await waitUntil(async () => (await notes()).length >= 1, { what: 'a notification' });
    const [n] = await notes();
    assert.equal(n.title, 'ann in #notify-room');
    assert.equal(n.body, 'hey @cat, the build is green');
    assert.ok(n.tag, 'a tag');
    assert.equal((await notes()).length, 1, 'only the mention');

    // A direct message: always.
    await ann.fill('#dm-input', 'cat');
    await ann.press('#dm-input', 'Enter');
    await ann.locator('.room-item.active[data-room="dm:ann:cat"]').waitFor();
    await sendFromPage(ann, 'a word in private');
    await waitUntil(async () => (await notes()).length >= 2, { what: 'a notification of the direct message' });
    assert.deepEqual((await notes())[1].body, 'a word in private');
    assert.match((await notes())[1].title, /^ann\b/);

    // A click on the mention's notification opens its room.
    await cat.evaluate(() => window.__notifications[0].n.dispatchEvent(new Event('click')));
    await cat.locator(`.room-item.active[data-room="${room}"]`).waitFor();
    await waitForTexts(cat, room, ['hey @cat, the build is green']);
    await setHidden(cat, false);
    await until(() => badges(cat, room), { unread: '', mentions: '' }, 'read once visible');
    assert.deepEqual(await cspViolations(cat), [], 'nothing the Content-Security-Policy blocks');
  });

  check('y. a change the server refuses (the message was deleted meanwhile) is shown as an error', { timeout: 60_000 }, async () => {
    const { ann } = pages;
    const room = 'refusals';
    // dan's page hears from the server through a proxy that can hold what
    // comes back: his page acts on a message that, for the server, is gone.
    const ctx = await changes.browser.newContext({ viewport: { width: 1200, height: 760 } });
    ctx.setDefaultTimeout(15_000);
    changes.contexts.push(ctx);
    let held = null;
    let release = null;
    await ctx.routeWebSocket(/\/ws$/, (ws) => {
      const server = ws.connectToServer();
      ws.onMessage((m) => server.send(m));
      server.onMessage((m) => (held ? held.push(m) : ws.send(m)));
      release = () => {
        const frames = held;
        held = null;
        for (const m of frames) ws.send(m);
      };
    });
    const dan = await login(ctx, 'dan', { server: changes.server });
    await joinRoom(ann, room);
    await joinRoom(dan, room);
    await sendFromPage(dan, 'dan posts a thing');
    await waitForTexts(ann, room, ['dan posts a thing']);

    held = [];
    await messageAction(ann, room, 'dan posts a thing', 'delete');
    await row(ann, room, 'dan posts a thing').locator('.act-delete').click();
    await row(ann, room, 'This message was deleted').waitFor();
    // dan still sees it, and deletes it too: refused.
    await messageAction(dan, room, 'dan posts a thing', 'delete');
    await row(dan, room, 'dan posts a thing').locator('.act-delete').click();
    await waitUntil(() => held.some((m) => String(m).includes('"error"')), { what: 'the refusal' });
    release();
    await dan.locator('.toast.error', { hasText: /^Could not delete the message: Not found: / }).waitFor();
    await row(dan, room, 'This message was deleted').waitFor();
    assert.deepEqual((await shown(dan, room)).map((m) => m.text), ['This message was deleted']);
    assert.deepEqual(await cspViolations(dan), [], 'nothing the Content-Security-Policy blocks');
  });

  check('z. a phone (390×844): a tap shows a message\'s actions; react and edit from there', { timeout: 60_000 }, async () => {
    const PHONE = { width: 390, height: 844 };
    const { ann } = pages;
    const pia = await changesPage('pia', { phone: true });
    const room = 'phone-changes';
    await joinRoom(ann, room);
    await openNav(pia);
    await pia.fill('#join-input', room);
    await pia.tap('#join-form button[type=submit]');
    await pia.locator(`.room-item.active[data-room="${room}"]`).waitFor({ state: 'attached' });
    await sendFromPage(ann, 'ann asks the phone');
    await waitForTexts(pia, room, ['ann asks the phone']);

    // A tap on the message: its actions, on the screen and big enough to tap.
    await row(pia, room, 'ann asks the phone').locator('.msg-text').tap();
    const bar = row(pia, room, 'ann asks the phone').locator('.msg-actions');
    await bar.waitFor();
    const box = await bar.boundingBox();
    assert.ok(box && box.x >= 0 && box.x + box.width <= PHONE.width && box.y >= 0, `the actions are on the screen: ${JSON.stringify(box)}`);
    const react = await bar.locator('.act-picker').boundingBox();
    assert.ok(react.height >= 28 && react.width >= 28, `the react button can be tapped: ${JSON.stringify(react)}`);
    await bar.locator('.act-picker').tap();
    await row(pia, room, 'ann asks the phone').locator('.pick[data-key="❤️"]').tap();
    await until(() => chip(pia, room, 'ann asks the phone', '❤️').then((c) => c && [c.count, c.mine]), [1, true], "pia's ❤️");
    await until(() => chip(ann, room, 'ann asks the phone', '❤️').then((c) => c && [c.count, c.mine]), [1, false], "pia's ❤️ on ann's page");

    // Her own message: edited.
    await sendFromPage(pia, 'pia answers quikly');
    await waitForTexts(ann, room, ['pia answers quikly']);
    await row(pia, room, 'pia answers quikly').locator('.msg-text').tap();
    await row(pia, room, 'pia answers quikly').locator('.act-edit').tap();
    const editor = pia.locator('.edit-input');
    await editor.waitFor();
    const ebox = await editor.boundingBox();
    assert.ok(ebox.x >= 0 && ebox.x + ebox.width <= PHONE.width, `the editor fits: ${JSON.stringify(ebox)}`);
    await editor.fill('pia answers quickly');
    await editor.press('Enter');
    await waitForTexts(ann, room, ['pia answers quickly']);
    await row(ann, room, 'pia answers quickly').locator('.msg-edited').waitFor();
    await waitForTexts(pia, room, ['pia answers quickly']);
    await pia.screenshot({ path: '/tmp/mobile-changes.png' });
    assert.deepEqual(await cspViolations(pia), [], 'nothing the Content-Security-Policy blocks');
  });
});
