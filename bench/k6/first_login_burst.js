// First-login burst: every pre-registered user (USERS_FILE, never logged in) logs in at the
// same moment, then polls GET /promotions/my-vouchers until a voucher is there (or POLL_TIMEOUT
// seconds pass: users beyond the campaign's maxParticipants never get one).
// login→voucher lag = time from the login answer to the first poll that sees the voucher
// (so it includes up to POLL_MS of polling granularity).
// Env: GATEWAY, USERS_FILE, POLL_MS (default 50), POLL_TIMEOUT (s, default 10).
import { SharedArray } from 'k6/data';
import { Counter, Rate, Trend } from 'k6/metrics';
import { sleep } from 'k6';
import { get, post, summaryWriter, TREND_STATS } from './lib.js';

const users = new SharedArray('users', () => JSON.parse(open(__ENV.USERS_FILE)).users);
const POLL_MS = Number(__ENV.POLL_MS || 50);
const POLL_TIMEOUT = Number(__ENV.POLL_TIMEOUT || 10);

const loginLatency = new Trend('op_login_ms', true);
const loginFailed = new Rate('op_login_failed');
const lag = new Trend('login_to_voucher_ms', true);
const vouchersSeen = new Counter('vouchers_seen');
const vouchersMissing = new Counter('vouchers_missing');
const duplicateVouchers = new Counter('users_with_several_vouchers');

export const options = {
  summaryTrendStats: TREND_STATS,
  scenarios: {
    burst: { executor: 'per-vu-iterations', vus: users.length, iterations: 1, maxDuration: `${POLL_TIMEOUT + 120}s` },
  },
};

export default function () {
  const user = users[__VU - 1];
  const res = post('/auth/login', { account: user.username, password: user.password }, null, null, 'login');
  loginLatency.add(res.timings.duration);
  loginFailed.add(res.status !== 200);
  if (res.status !== 200) return;
  const token = res.json('access_token');
  const loggedInAt = Date.now();
  while (Date.now() - loggedInAt < POLL_TIMEOUT * 1000) {
    const poll = get('/promotions/my-vouchers', token, 'my-vouchers');
    if (poll.status === 200) {
      const vouchers = poll.json();
      if (Array.isArray(vouchers) && vouchers.length > 0) {
        lag.add(Date.now() - loggedInAt);
        vouchersSeen.add(1);
        if (vouchers.length > 1) duplicateVouchers.add(1);
        return;
      }
    }
    sleep(POLL_MS / 1000);
  }
  vouchersMissing.add(1);
}

export function handleSummary(data) {
  return summaryWriter(data, ['op_login_ms', 'login_to_voucher_ms']);
}
