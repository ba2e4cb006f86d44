// The $100 cart example from a Node.js client: a shopper whose cart is worth less than
// $100 joins `cart.value < 100`, and leaves it the moment the cart passes $100 in the same
// visit; a subscriber of the change stream hears both, with the event that caused each.
//
// Environment: AUDIENCE_ADDRESS (host:port), AUDIENCE_DATASET (a dataset id of the test's
// own), and AUDIENCE_API_KEY when the server requires a key.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';

import { StreamReader, openAudience } from '../audience.js';

const address = process.env.AUDIENCE_ADDRESS;
const dataset = process.env.AUDIENCE_DATASET;
const apiKey = process.env.AUDIENCE_API_KEY || undefined;

const BACKFILL_WITHIN_MS = 30_000;
const CHANGE_WITHIN_MS = 20_000;

let audience;

before(() => {
  assert.ok(address, 'AUDIENCE_ADDRESS must name the server, as host:port');
  assert.ok(dataset, 'AUDIENCE_DATASET must name a dataset id for the test to use');
  audience = openAudience({ address, apiKey });
});

after(() => audience?.close());

/** A google.protobuf.Timestamp, as proto-loader takes it. */
function timestamp(ms) {
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1_000_000 };
}

function cartUpdated(userId, prices) {
  const now = Date.now();
  return {
    event_id: randomUUID(),
    type: 'EVENT_TYPE_CART_UPDATED',
    user_id: userId,
    timestamp: timestamp(now),
    sent_at: timestamp(now),
    context: { session_id: 'visit-1', channel: 'CHANNEL_WEB' },
    cart: {
      currency: 'USD',
      items: prices.map((price, n) => ({ product_id: `sku-${n}`, price, quantity: 1 })),
    },
  };
}

async function waitUntilActive(name) {
  const deadline = Date.now() + BACKFILL_WITHIN_MS;
  for (;;) {
    const { segment } = await audience.unary(audience.segments, 'GetSegment', { name });
    if (segment.state !== 'SEGMENT_STATE_BACKFILLING') {
      assert.equal(segment.state, 'SEGMENT_STATE_ACTIVE', `backfill: ${segment.backfill?.error}`);
      return segment;
    }
    const progress = JSON.stringify(segment.backfill);
    assert.ok(Date.now() < deadline, `${name} still backfilling: ${progress}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

async function send(event) {
  const { result } = await audience.unary(audience.ingest, 'SendEvent', {
    parent: `datasets/${dataset}`,
    event,
  });
  assert.equal(result.status, 'EVENT_STATUS_ACCEPTED', JSON.stringify(result.violations));
  assert.equal(result.event_id, event.event_id);
  return event.event_id;
}

const isChange = (response) => response.message === 'change';

const TITLE = 'a shopper joins cart.value < 100 at $40 and leaves when the cart passes $100';

test(TITLE, { timeout: 90_000 }, async () => {
  const { segment } = await audience.unary(audience.segments, 'CreateSegment', {
    parent: `datasets/${dataset}`,
    segment_id: 'cart-under-100',
    segment: {
      display_name: 'Carts under $100',
      kind: 'SEGMENT_KIND_USER',
      source: 'SEGMENT_SOURCE_RULE',
      rule_text: 'cart.value < 100',
    },
  });
  assert.equal(segment.name, `datasets/${dataset}/segments/cart-under-100`);
  assert.equal(segment.rule_text, 'cart.value < 100');
  await waitUntilActive(segment.name);

  const watch = new StreamReader(
    audience.stream(audience.memberships, 'WatchMembershipChanges', {
      parent: `datasets/${dataset}`,
      segments: [segment.name],
      heartbeat_interval: { seconds: 1, nanos: 0 },
    }),
  );
  try {
    // A stream that starts from now is positioned once it has answered; its first
    // heartbeat says so, and only then may the events go.
    const first = await watch.next(CHANGE_WITHIN_MS);
    assert.equal(first.message, 'heartbeat', `not a heartbeat: ${JSON.stringify(first)}`);
    assert.ok(first.heartbeat.resume_token, 'a heartbeat carries a resume token');

    const shopper = `shopper-${randomUUID()}`;
    const member = `datasets/${dataset}/profiles/${shopper}`;

    const under = await send(cartUpdated(shopper, [40]));
    const { change: join } = await watch.nextWhere(isChange, CHANGE_WITHIN_MS);
    assert.equal(join.kind, 'MEMBERSHIP_CHANGE_KIND_JOIN');
    assert.equal(join.member, member);
    assert.equal(join.segment, segment.name);
    assert.equal(join.reason.cause, 'CHANGE_CAUSE_EVENT');
    assert.deepEqual(join.reason.event_ids, [under]);
    assert.equal(join.reason.flipped_clauses[0].observed.number_value, 40);
    assert.ok(join.resume_token, 'a change carries a resume token');

    const over = await send(cartUpdated(shopper, [40, 80]));
    const { change: leave } = await watch.nextWhere(isChange, CHANGE_WITHIN_MS);
    assert.equal(leave.kind, 'MEMBERSHIP_CHANGE_KIND_LEAVE');
    assert.equal(leave.member, member);
    assert.equal(leave.segment, segment.name);
    assert.equal(leave.reason.cause, 'CHANGE_CAUSE_EVENT');
    assert.deepEqual(leave.reason.event_ids, [over]);
    assert.equal(leave.reason.flipped_clauses[0].observed.number_value, 120);
    // int64 arrives as a decimal string (longs: String).
    assert.ok(BigInt(leave.member_sequence) > BigInt(join.member_sequence));
  } finally {
    watch.cancel();
  }
});
