// Top-up contention: every voucher in USERS_FILE (one per user) is spent by RACERS clients at
// the same moment, each with its own idempotency key. At most one may succeed per voucher:
// a threshold per voucher (topup_ok{voucher:CODE} count<=1) fails the run otherwise.
// Env: GATEWAY, USERS_FILE (users with token, phone, voucher), RACERS (default 3).
import { SharedArray } from 'k6/data';
import { Counter, Trend } from 'k6/metrics';
import { post, summaryWriter, TREND_STATS, uniqueSuffix } from './lib.js';

const users = new SharedArray('users', () => JSON.parse(open(__ENV.USERS_FILE)).users);
const RACERS = Number(__ENV.RACERS || 3);

const latency = new Trend('op_topup_ms', true);
const ok = new Counter('topup_ok');
const rejected = new Counter('topup_rejected');
const errors = new Counter('topup_errors');

const thresholds = { topup_ok: [`count<=${users.length}`] };
for (const user of users) thresholds[`topup_ok{voucher:${user.voucher}}`] = ['count<=1'];

export const options = {
  summaryTrendStats: TREND_STATS,
  thresholds,
  scenarios: {
    race: { executor: 'per-vu-iterations', vus: users.length * RACERS, iterations: 1, maxDuration: '120s' },
  },
};

export default function () {
  const user = users[Math.floor((__VU - 1) / RACERS)];
  const res = post(
    '/promotions/topup',
    { phoneNumber: user.phone, amount: 100000, voucherCode: user.voucher },
    user.token,
    { 'idempotency-key': `bench-${uniqueSuffix()}` },
    'topup',
  );
  latency.add(res.timings.duration);
  if (res.status === 200) ok.add(1, { voucher: user.voucher });
  else if (res.status === 400 || res.status === 409) rejected.add(1);
  else errors.add(1, { status: String(res.status) });
}

export function handleSummary(data) {
  return summaryWriter(data, ['op_topup_ms']);
}
